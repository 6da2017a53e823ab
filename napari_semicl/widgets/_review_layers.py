"""Layers of the review docks: pseudo-labels, one-slice maps and sample stacks.

One-slice results (aleatoric samples, their disagreement) are placed on the slice they
were computed on, with the image's scale and translate, the same way as
:func:`~napari_semicl.widgets._layers.show_patch_entropy`.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels, Layer

from . import _layers

PSEUDO_SUFFIX = " pseudo-labels"
DISAGREEMENT_SUFFIX = " aleatoric disagreement"
SAMPLES_SUFFIX = " aleatoric samples"


def show_pseudo_labels(viewer, image: Layer, array: np.ndarray) -> Labels:
    """Create or refresh the '<image> pseudo-labels' Labels layer (editable: the user
    corrects it with the brush before accepting a slice). An existing layer is refreshed in
    place when shape and dtype allow (cheaper for napari than new data), else it takes
    ``array`` as it is."""
    name = f"{image.name}{PSEUDO_SUFFIX}"
    layer = _layers._find(viewer, name, Labels)
    if layer is not None:
        if layer.data.shape == array.shape and np.can_cast(array.dtype, layer.data.dtype):
            return _layers._replace_data(layer, array)
        layer.data = array
        return layer
    kwargs = _layers._geometry_kwargs(image)
    kwargs["metadata"][_layers.ROLE_KEY] = "pseudo_labels"
    return viewer.add_labels(array, name=name, opacity=0.6, **kwargs)


def _on_slice(image: Layer, data: np.ndarray, slice_index: int, axis: int, *, leading: bool):
    """(data placed on the slice, scale, translate). ``data`` is (H, W) or, with
    ``leading``, (S, H, W): a stack that gets an axis of its own in front."""
    scale, translate, ax = _layers._slice_geometry(image, slice_index, axis)
    if ax is not None:
        data = np.expand_dims(data, ax + (1 if leading else 0))
    if leading:
        scale, translate = (1.0, *scale), (0.0, *translate)
    return data, scale, translate


def show_slice_map(viewer, image: Layer, array: np.ndarray, slice_index: int, axis: int, *,
                   suffix: str = DISAGREEMENT_SUFFIX, role: str = "aleatoric_disagreement") -> Image:
    """Create or refresh an (H, W) map in [0, 1] of one slice as an Image layer on that slice
    (magma, contrast 0..1, additive)."""
    name = f"{image.name}{suffix}"
    data, scale, translate = _on_slice(image, np.asarray(array, np.float32), slice_index, axis, leading=False)
    layer = _layers._find(viewer, name, Image)
    if layer is not None and layer.data.shape == data.shape:
        layer.data = data
        layer.translate = translate
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_image(data, name=name, colormap="magma", contrast_limits=(0.0, 1.0),
                                 blending="additive", scale=scale, translate=translate,
                                 metadata={_layers.ROLE_KEY: role})
    layer.metadata.update({"slice_index": int(slice_index)})
    return layer


def show_sample_stack(viewer, image: Layer, samples: np.ndarray, slice_index: int, axis: int) -> Labels:
    """Create or refresh the '<image> aleatoric samples' Labels layer: (S, H, W) label
    values of one slice, on that slice, with the sample index as a new leading axis (a
    slider of its own that the user scrolls)."""
    name = f"{image.name}{SAMPLES_SUFFIX}"
    data, scale, translate = _on_slice(image, np.asarray(samples), slice_index, axis, leading=True)
    layer = _layers._find(viewer, name, Labels)
    if layer is not None:
        viewer.layers.remove(layer)  # the stack's depth may change: a fresh layer
    layer = viewer.add_labels(data, name=name, opacity=0.7, scale=scale, translate=translate,
                              metadata={_layers.ROLE_KEY: "aleatoric_samples", "slice_index": int(slice_index)})
    return layer
