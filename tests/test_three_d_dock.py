"""The Train dock's Advanced 'Network: 3D patches' as napari opens the dock: a 3D run on a
volume, its whole-volume preview in the image's geometry, and 2D images kept on slices."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

from conftest import set_train_dock  # noqa: E402
from napari_semicl.data.reveal import reveal_slices  # noqa: E402
from napari_semicl.engine.events import Finished, Preview  # noqa: E402
from napari_semicl.io.sample import load_sample_volume  # noqa: E402


def test_dock_trains_and_previews_in_3d_on_a_volume(make_napari_viewer, qtbot, tmp_path, small_network):
    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    crop = (slice(28, 60), slice(10, 74), slice(10, 66))
    img = viewer.add_image(image.data[crop].copy(), name="t1", scale=image.scale)
    painted = reveal_slices(reference.data[crop], [8, 16, 24], 0).astype(np.uint16)
    viewer.add_labels(painted, name="painted", scale=image.scale)
    viewer.add_image(image.data[40].copy(), name="one slice")
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    controls = train.prior_controls
    train.set_pair(0, viewer.layers["one slice"], None)
    assert not controls.network_combo.isEnabled()  # a 2D image trains on slices
    train.set_pair(0, viewer.layers["t1"], viewer.layers["painted"])
    assert controls.network_combo.isEnabled()
    controls.network_combo.setCurrentText("3D patches")
    assert not controls.context_spin.isEnabled() and controls.depth_spin.isEnabled()
    controls.depth_spin.setValue(32)
    set_train_dock(train, tmp_path / "run", method="mean_teacher", iterations=2, refresh_every=1000, patch_size=32)
    small_network(train, base_channels=4, depth=None, batch=1)
    cfg = train.build_config()
    assert cfg.model.spatial_dims == 3 and cfg.data.patch_shape == (32, 32, 32) and cfg.data.context_slices == 0
    finished, previews = [], []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    train.event_received.connect(lambda e: previews.append(e) if isinstance(e, Preview) else None)
    assert train.start_training()
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=120_000)
    assert finished[0].reason == "budget", finished[0].error
    assert train.trainer.config.model.spatial_dims == 3
    assert any(p.kind == "prediction" for p in previews)
    pred = viewer.layers["t1 prediction"]
    assert pred.data.shape == img.data.shape
    np.testing.assert_allclose(pred.scale, img.scale)
    assert (tmp_path / "run" / "config.json").read_text().count('"spatial_dims": 3') == 1
