"""The Train dock's painted-slice prior as napari opens the dock (Plugins menu): Fill between
slices before any training, the filled shape shown when Train is pressed, scribbles refused."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

from napari_semicl.data.interpolation import interpolate_labels  # noqa: E402
from napari_semicl.data.reveal import reveal_slices  # noqa: E402
from napari_semicl.engine.events import Finished, Preview  # noqa: E402
from napari_semicl.io.sample import load_sample_volume  # noqa: E402

CROP = slice(28, 52)
PAINTED = [2, 11, 20]


@pytest.fixture
def dock(make_napari_viewer):
    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    img = viewer.add_image(image.data[CROP].copy(), name="t1", scale=image.scale)
    ref = reference.data[CROP].copy()
    viewer.add_labels(reveal_slices(ref, PAINTED, 0).astype(np.uint16), name="painted", scale=image.scale)
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    train.set_pair(0, viewer.layers["t1"], viewer.layers["painted"])
    train.background_check.setChecked(True)
    return viewer, img, ref, train


def _discs(depth: int, size: int, image_radius: float, painted_radii: dict[int, float]):
    """A volume whose image is the same textured disc (radius ``image_radius``) on every slice,
    and concentric discs painted on the slices of ``painted_radii`` (slice -> radius); returns
    the image, the painted labels and the in-plane distance to the centre."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    texture = np.random.default_rng(0).random((size, size))
    image = np.repeat((texture + (radius < image_radius))[None], depth, axis=0).astype(np.float32)
    painted = np.zeros((depth, size, size), np.uint16)
    for z, r in painted_radii.items():
        painted[z] = radius <= r
    return image, painted, radius


def test_fill_between_slices_shows_the_interpolation_before_training(make_napari_viewer, qtbot):
    """Two concentric discs painted (radius 6 on slice 3, 12 on slice 7) of a volume whose image
    is the same on every slice: the fill's radius grows linearly between them (7.5, 9, 10.5)
    and, past them, shrinks by 1.5 px a slice (docs/prior.md), whatever the fill's code."""
    depth = 11
    image, painted, radius = _discs(depth, 48, 15, {3: 6, 7: 12})
    viewer = make_napari_viewer()
    viewer.add_image(image, name="disc")
    viewer.add_labels(painted, name="painted")
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    train.set_pair(0, viewer.layers["disc"], viewer.layers["painted"])
    train.background_check.setChecked(True)
    controls = train.prior_controls
    assert controls.prior_check.isChecked()  # on by default (docs/prior.md)

    controls.fill_button.click()
    qtbot.waitUntil(lambda: not controls.busy, timeout=20_000)

    fill = viewer.layers["disc prediction"].data
    expected_radius = {z: 6 - 1.5 * (3 - z) for z in range(3)}
    expected_radius.update({z: 6 + (12 - 6) * (z - 3) / 4 for z in range(3, 8)})
    expected_radius.update({z: 12 - 1.5 * (z - 7) for z in range(8, depth)})
    for z, r in expected_radius.items():  # a pixel's width of tolerance for the discrete discs
        assert (fill[z][radius <= r - 1] == 1).all(), f"slice {z}: the disc of radius {r} has holes"
        assert (fill[z][radius >= r + 1] == 0).all(), f"slice {z}: the fill reaches past radius {r}"
    for z in (3, 7):
        np.testing.assert_array_equal(fill[z], painted[z])
    assert "slices filled between 2 painted slices" in train.status_label.text()
    assert "(flow; prediction layer)" in train.status_label.text()
    assert np.array_equal(viewer.layers["painted"].data, painted)  # the labels are not touched
    assert not train.is_training


@pytest.mark.parametrize("axis", [1, 2])
def test_fill_between_slices_on_the_docks_slicing_axis_1_and_2(make_napari_viewer, qtbot, axis):
    """Issue 27: the same discs painted across axis 1 or 2 (the dock's Slicing axis) give the
    same fill as axis 0 on the transposed volume (the flow fill failed there before)."""
    image0, painted0, radius = _discs(9, 40, 13, {2: 5, 6: 10})
    fills = {}
    for a in (0, axis):
        viewer = make_napari_viewer()
        viewer.add_image(np.moveaxis(image0, 0, a).copy(), name="disc")
        viewer.add_labels(np.moveaxis(painted0, 0, a).copy(), name="painted")
        _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
        train.set_pair(0, viewer.layers["disc"], viewer.layers["painted"])
        train.background_check.setChecked(True)
        train.axis_spin.setValue(a)
        train.prior_controls.fill_button.click()
        qtbot.waitUntil(lambda: not train.prior_controls.busy, timeout=20_000)
        assert "slices filled between 2 painted slices" in train.status_label.text(), train.status_label.text()
        fills[a] = viewer.layers["disc prediction"].data.copy()
    assert fills[axis].shape == np.moveaxis(painted0, 0, axis).shape
    np.testing.assert_array_equal(fills[axis], np.moveaxis(fills[0], 0, axis))
    middle = np.take(fills[axis], 4, axis=axis)  # radius 7.5 halfway between 5 and 10
    assert (middle[radius <= 6.5] == 1).all() and (middle[radius >= 8.5] == 0).all()


def test_scribbles_are_refused_with_a_message(dock, qtbot):
    viewer, img, ref, train = dock
    train.background_check.setChecked(False)  # 0 = unpainted: painted slices are scribbles
    assert train.prior_controls.fill_between_slices(wait=True)
    assert "scribbles have no interpolation" in train.status_label.text()
    assert "t1 prediction" not in [layer.name for layer in viewer.layers]


def test_train_with_the_prior_starts_from_the_filled_shape(dock, qtbot, tmp_path, monkeypatch, small_network):
    viewer, img, ref, train = dock
    small_network(train)
    train.prior_controls.context_spin.setValue(1)
    train.iterations_spin.setValue(3)
    train.patch_spin.setValue(32)
    train.refresh_spin.setValue(1000)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    cfg = train.build_config()
    assert cfg.prior.mode == "targets" and cfg.data.context_slices == 1
    import threading

    import napari_semicl.engine.prior as prior_module

    threads = []
    fill = prior_module.interpolate_labels

    def recording_fill(*args, **kwargs):
        threads.append(threading.current_thread())
        return fill(*args, **kwargs)

    monkeypatch.setattr(prior_module, "interpolate_labels", recording_fill)
    finished, previews = [], []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    train.event_received.connect(lambda e: previews.append(e) if isinstance(e, Preview) else None)
    assert train.start_training()  # returns at once: the fill is computed in the training thread
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=120_000)
    # the fill (seconds with optical flow) ran in the training thread, never on the Qt thread
    assert threads and threading.main_thread() not in threads
    # before any step, the run showed the filled shape
    expected = interpolate_labels(reveal_slices(ref, PAINTED, 0), axis=0, spacing=img.scale, method="flow",
                                  image=img.data).labels
    first = previews[0]
    assert first.kind == "prediction" and first.step == 0
    np.testing.assert_array_equal(first.array, expected)
    assert finished[0].reason == "budget"
    assert train.trainer.prior is not None and train.trainer.config.model.in_channels == 3
    final = viewer.layers["t1 prediction"].data
    for s in PAINTED:  # the fused mask keeps the painted slices
        np.testing.assert_array_equal(final[s], ref[s])
