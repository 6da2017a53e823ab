"""napari-semicl: label a few slices, then train a semi-supervised segmentation network.

The package is layered (see ``docs/architecture.md``): ``widgets`` and ``cli`` drive the
``engine``; the engine runs ``methods`` over ``models``, ``data``, ``io`` and ``analysis``.
Nothing below ``widgets`` imports Qt or napari.
"""

__version__ = "0.1.0"
