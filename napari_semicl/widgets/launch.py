"""Open napari with the napari-semicl docks (and the sample volume).

Usage::

    python -m napari_semicl.widgets.launch            # sample volume + empty 'painted' layer
    python -m napari_semicl.widgets.launch --no-sample

``scripts/run_app.sh`` runs this when a display is available.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

log = logging.getLogger(__name__)

TRAIN_DOCK_NAME = "Train (semi-supervised)"
EXPORT_DOCK_NAME = "Export mask"


def add_sample_layers(viewer) -> tuple:
    """Add the sample image, its reference labels (hidden) and an empty 'painted' layer.

    Returns (image layer, reference labels layer, painted labels layer).
    """
    from ..io._npe2 import sample_volume

    image = reference = None
    for data, attributes, kind in sample_volume():
        if kind == "image":
            image = viewer.add_image(data, **attributes)
        else:
            reference = viewer.add_labels(data, visible=False, **attributes)
    painted = viewer.add_labels(
        np.zeros(image.data.shape, dtype=np.uint16), name="painted",
        scale=image.scale, translate=image.translate, metadata=dict(image.metadata),
    )
    painted.mode = "paint"
    return image, reference, painted


def add_docks(viewer) -> tuple:
    """Add the Train and Export docks on the right; returns (train, export) widgets."""
    from qtpy.QtCore import QTimer

    from .export_widget import ExportWidget
    from .train import TrainWidget

    train = TrainWidget(viewer)
    export = ExportWidget(viewer)
    train_dock = viewer.window.add_dock_widget(train, name=TRAIN_DOCK_NAME, area="right")
    viewer.window.add_dock_widget(export, name=EXPORT_DOCK_NAME, area="right", tabify=True)
    train_dock.raise_()  # show the Train tab first (again once the tabs exist)
    QTimer.singleShot(0, train_dock.raise_)
    return train, export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m napari_semicl.widgets.launch",
        description="Open napari with the napari-semicl Train and Export docks.",
    )
    parser.add_argument("--no-sample", action="store_true", help="do not open the sample volume")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import napari

    viewer = napari.Viewer(title="napari-semicl")
    sample = None
    if not args.no_sample:
        try:
            sample = add_sample_layers(viewer)
        except (FileNotFoundError, ValueError) as exc:
            log.error("the sample volume could not be opened: %s", exc)
    train, _ = add_docks(viewer)
    if sample is not None:
        image, _, painted = sample
        train.set_pair(0, image, painted)
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
