"""The Train dock on a whole-slide image: open a small pyramidal TIFF (written here from
real H&E tiles), paint two tiles, train a few steps, and find the stitched prediction as a
multiscale Labels layer at every level."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from test_wsi import CELL, _he_tiles

from napari_semicl.bench.slides import write_mosaic_slide
from napari_semicl.io._npe2 import get_reader
from napari_semicl.widgets.train import TrainWidget

pytestmark = pytest.mark.gui


def _paint_tile(labels, row: int, col: int) -> None:
    """Two scribbles in one tile through the layer's painting API (what the brush calls)."""
    y, x = row * CELL, col * CELL
    yy, xx = np.mgrid[y + 20:y + 60, x + 20:x + 60]
    labels.data_setitem((yy.ravel(), xx.ravel()), 1)
    yy, xx = np.mgrid[y + 150:y + 200, x + 150:x + 200]
    labels.data_setitem((yy.ravel(), xx.ravel()), 2)


def test_slide_paint_two_tiles_train_and_see_the_prediction_at_every_level(make_napari_viewer, qtbot, tmp_path,
                                                                           small_network):
    layout = np.array([[0, 1, 2, 3], [3, 2, -1, 0], [1, -1, -1, 2], [-1, 0, 1, -1]])
    path = write_mosaic_slide(tmp_path / "slide.ome.tif", _he_tiles(4), layout, tile=128, min_size=256)
    reader = get_reader(str(path))
    assert reader is not None
    (data, attributes, kind), = reader(str(path))
    assert kind == "image" and attributes["multiscale"] and attributes["rgb"]
    viewer = make_napari_viewer()
    image = viewer.add_image(data, **attributes)
    assert image.multiscale and len(image.data) == 3 and image.rgb

    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train (semi-supervised)")
    small_network(widget)
    labels = widget.new_labels_layer(image)
    assert labels.data.shape == (4 * CELL, 4 * CELL)
    assert not isinstance(labels.data, np.ndarray)  # chunked: a slide's labels are not allocated whole
    _paint_tile(labels, 0, 1)
    _paint_tile(labels, 2, 3)
    widget.set_pair(0, image, labels)
    widget.method_combo.setCurrentText("mean_teacher")
    widget.iterations_spin.setValue(4)
    widget.refresh_spin.setValue(2)
    widget.patch_spin.setValue(64)
    widget.tile_spin.setValue(CELL)
    widget.slide_level_spin.setValue(0)
    widget.run_folder_edit.setText(str(tmp_path / "run"))

    assert widget.start_training()
    trainer = widget.trainer
    assert trainer.dataset.summary()["labelled"] == 2
    assert trainer.dataset.summary()["unlabelled"] == int((layout >= 0).sum()) - 2
    qtbot.waitUntil(lambda: not widget.is_training, timeout=240_000)
    assert trainer.step == 4
    prediction = viewer.layers[f"{image.name} prediction"]
    assert prediction.multiscale
    shapes = [tuple(level.shape) for level in prediction.data]
    assert shapes == [(1024, 1024), (512, 512), (256, 256)]
    np.testing.assert_allclose(prediction.scale, image.scale)
    for level, factor in zip(prediction.data, (1, 2, 4)):
        arr = np.asarray(level[:, :])
        # every tissue cell is predicted (1 or 2) at every level; the glass cell in the middle is not
        cell = CELL // factor
        assert np.isin(arr[:cell, :cell], [1, 2]).all()
        centre = arr[2 * cell + cell // 4:3 * cell - cell // 4, cell + cell // 4:2 * cell - cell // 4]
        assert not centre.any()
