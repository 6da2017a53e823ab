"""The Train and Export docks, driven through their public methods in a real viewer.

Run under Xvfb (see scripts/run_tests.sh). Training uses the bundled sample volume with a
small network (base 8 channels, depth 3, batches of 2) so the whole file stays quick on
two CPU cores; the dock itself is unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")
nib = pytest.importorskip("nibabel")

from qtpy.QtCore import QTimer  # noqa: E402

from napari_semicl.engine.events import Finished, StepDone  # noqa: E402
from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir  # noqa: E402
from napari_semicl.widgets.export_widget import ExportWidget  # noqa: E402
from napari_semicl.widgets.launch import add_sample_layers  # noqa: E402
from napari_semicl.widgets.train import TrainWidget  # noqa: E402

log = logging.getLogger(__name__)

PAINTED = (30, 50)      # axial slices "painted" by copying the reference labels
VALIDATION = 45         # a painted slice held out for live Dice
CROP_PAINTED = (2, 20)
CROP_VALIDATION = 14
CROP_LATE = 9           # painted while training runs
MAX_LATENCY_MS = 200.0  # the Qt event loop must keep answering while training


class LatencyProbe:
    """A QTimer that records how late its ticks come (the Qt event loop's latency)."""

    def __init__(self, interval_ms: int = 20) -> None:
        self.interval_ms = interval_ms
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._on_timeout)
        self.max_ms = 0.0
        self.ticks = 0
        self._last = None

    def start(self) -> None:
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def _on_timeout(self) -> None:
        now = time.perf_counter()
        self.max_ms = max(self.max_ms, (now - self._last) * 1000.0 - self.interval_ms)
        self._last = now
        self.ticks += 1


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Train on one torch thread here: the Qt thread and Mesa's renderer need the other
    core, and two OpenMP threads fighting a busy machine run 10-30x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record_events(widget: TrainWidget) -> list:
    events: list = []
    widget.worker.yielded.connect(events.append)
    return events


@pytest.fixture
def sample_viewer(make_napari_viewer):
    """A viewer with the sample image, its hidden reference and an empty 'painted' layer."""
    viewer = make_napari_viewer()
    image, reference, painted = add_sample_layers(viewer)
    return viewer, image, reference, painted


def make_train_widget(viewer, tmp_path, small_network, *, iterations, method="supervised") -> TrainWidget:
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train (semi-supervised)")
    small_network(widget)
    widget.method_combo.setCurrentText(method)
    widget.iterations_spin.setValue(iterations)
    widget.patch_spin.setValue(64)
    widget.refresh_spin.setValue(10)
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    return widget


def paint(painted, reference, slices) -> None:
    """What painting does: write label values into the layer's array."""
    for s in slices:
        painted.data[s] = reference.data[s]
    painted.refresh()


def test_dock_defaults_and_new_labels_layer(sample_viewer, qtbot):
    viewer, image, reference, painted = sample_viewer
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    # the image and the active (last added) labels layer of the same shape
    assert widget.pairs() == [(image, painted)]
    assert widget.method_combo.count() >= 2
    assert widget.device_label.text().startswith("Device: ")

    row = widget.rows[0]
    row.new_labels_button.click()
    new = viewer.layers[-1]
    assert isinstance(new, napari.layers.Labels)
    assert new.data.shape == image.data.shape and not new.data.any()
    np.testing.assert_allclose(new.scale, image.scale)
    assert new.metadata["affine"] == image.metadata["affine"]
    assert widget.pairs() == [(image, new)]

    # validation slices: the current slice along the slicing axis
    viewer.dims.set_current_step(0, VALIDATION)
    assert widget.mark_validation() == VALIDATION
    assert str(VALIDATION) in widget.validation_label.text()
    assert widget.snapshot()[0].validation_slices == (VALIDATION,)
    widget.mark_validation(False)
    assert widget.validation_label.text() == "none"

    # class table from the painted values, names go to the labels layer's features
    widget.set_pair(0, image, painted)
    paint(painted, reference, PAINTED)
    assert widget.refresh_classes() == [1, 2, 3]
    assert widget.class_table.rowCount() == 3
    widget.class_table.item(0, 1).setText("grey matter")
    assert widget.build_config().data.class_names["1"] == "grey matter"
    features = painted.features
    assert dict(zip(features["index"], features["class_name"]))[1] == "grey matter"


def test_train_with_empty_labels_notifies(sample_viewer, qtbot, tmp_path, monkeypatch):
    viewer, image, reference, painted = sample_viewer
    errors: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", errors.append)
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    n_layers = len(viewer.layers)

    assert widget.start_training() is False
    assert len(errors) == 1 and "paint" in errors[0]
    assert widget.trainer is None and widget.worker is None
    assert len(viewer.layers) == n_layers
    assert not (tmp_path / "run").exists()

    # one class only is refused the same way
    painted.data[30] = 1
    assert widget.start_training() is False
    assert len(errors) == 2 and "one class" in errors[1]
    assert len(viewer.layers) == n_layers


def test_train_live_labels_stop_resume(crop_viewer, qtbot, tmp_path, small_network):
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, (*CROP_PAINTED, CROP_VALIDATION))
    widget = make_train_widget(viewer, tmp_path, small_network, iterations=100_000)
    widget.refresh_spin.setValue(5)
    assert widget.pairs() == [(image, painted)]
    viewer.dims.set_current_step(0, CROP_VALIDATION)
    widget.mark_validation()

    t0 = time.perf_counter()
    assert widget.start_training()  # builds the trainer and the (empty) output layers
    click_ms = (time.perf_counter() - t0) * 1000
    probe = LatencyProbe()
    probe.start()
    events = record_events(widget)
    trainer = widget.trainer
    prediction = viewer.layers[f"{image.name} prediction"]
    assert prediction.data.shape == image.data.shape
    np.testing.assert_allclose(prediction.scale, image.scale)
    entropy = viewer.layers[f"{image.name} entropy"]
    assert entropy.visible is False and entropy.data.shape == image.data.shape
    assert [widget.class_table.item(i, 0).text() for i in range(3)] == ["1", "2", "3"]
    qtbot.waitUntil(lambda: prediction.data.any(), timeout=60_000)  # the first refresh
    assert set(np.unique(prediction.data)) <= {1, 2, 3}
    assert trainer.dataset.summary()["labelled"] == 2
    assert trainer.dataset.summary()["validation"] == 1
    qtbot.waitUntil(lambda: "Validation Dice" in widget.dice_label.text(), timeout=30_000)
    assert any(isinstance(e, StepDone) for e in events)
    assert "loss:" in widget.loss_label.text() and "ETA" in widget.eta_label.text()
    assert "2 labelled" in widget.status_label.text()

    # labels painted meanwhile join at the next refresh
    paint(painted, reference, (CROP_LATE,))
    qtbot.waitUntil(lambda: trainer.dataset.summary()["labelled"] == 3, timeout=30_000)

    # Stop: ends within a step, keeps the model
    t0 = time.perf_counter()
    widget.stop_training()
    assert not widget.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_training, timeout=30_000)
    stop_s = time.perf_counter() - t0
    finished = [e for e in events if isinstance(e, Finished)]
    assert [f.reason for f in finished] == ["stopped"]
    assert stop_s < 15, stop_s
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert checkpoint.is_file() and finished[0].checkpoint == str(checkpoint)
    stopped_at = trainer.step
    qtbot.wait(300)
    assert trainer.step == stopped_at
    assert widget.resume_button.isEnabled() and widget.train_button.isEnabled()

    # Resume: the same trainer goes on from where it stopped
    assert widget.resume_training()
    assert widget.trainer is trainer
    events = record_events(widget)
    resumed = time.perf_counter()
    # train on for a few seconds (many refreshes) so that the latency probe sees them
    qtbot.waitUntil(
        lambda: trainer.step >= stopped_at + 6 and time.perf_counter() - resumed > 4, timeout=60_000
    )
    widget.stop_training()
    qtbot.waitUntil(lambda: not widget.is_training, timeout=30_000)
    probe.stop()
    assert [e.reason for e in events if isinstance(e, Finished)] == ["stopped"]
    message = (
        f"Qt event-loop latency while training: max {probe.max_ms:.1f} ms over {probe.ticks} "
        f"ticks (stop took {stop_s:.1f} s; the Train click itself {click_ms:.0f} ms)"
    )
    log.warning(message)
    print("\n" + message)
    assert probe.ticks > 50
    assert probe.max_ms < MAX_LATENCY_MS


@pytest.mark.parametrize("method", ["arco", "plgcl"])
def test_review_layers_show_the_sampler_on_the_current_slice(crop_viewer, qtbot, tmp_path, small_network, method):
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, CROP_PAINTED)
    widget = make_train_widget(viewer, tmp_path, small_network, iterations=12, method=method)
    widget.refresh_spin.setValue(5)
    widget.method_settings.control("warmup_steps").setValue(1)
    if method == "arco":
        widget.method_settings.control("confidence").setValue(0.3)  # a young teacher is unsure
    viewer.layers.selection.active = image
    viewer.dims.set_current_step(0, CROP_LATE)
    assert widget.start_training()
    events = record_events(widget)
    qtbot.waitUntil(lambda: not widget.is_training, timeout=120_000)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["budget"]
    reviewed = [e for e in events if type(e).__name__ == "Reviewed"]
    assert [(e.pair_index, e.slice_index) for e in reviewed] == [(0, CROP_LATE)] * 2  # refreshes at 5, 10
    assert f"slice {CROP_LATE}" in widget.review_label.text()
    k = widget.trainer.config.model.n_classes
    if method == "arco":
        points = viewer.layers[f"{image.name} sampled pixels"]
        assert len(points.data) > 0 and points.ndim == 3
        world = points.data * np.asarray(points.scale) + np.asarray(points.translate)
        np.testing.assert_allclose(world[:, 0], viewer.dims.point[0])  # on the slice in view
        assert points.metadata["slice_index"] == CROP_LATE
        classes = points.features["class"].to_numpy()
        assert len(classes) == len(points.data) and set(classes) <= set(range(k))
        _, h, w = image.data.shape
        assert (points.data[:, 1:] >= 0).all() and (points.data[:, 1] < h).all() and (points.data[:, 2] < w).all()
        same = classes[:, None] == classes[None, :]
        colours_match = np.all(np.isclose(points.face_color[:, None], points.face_color[None, :]), axis=-1)
        np.testing.assert_array_equal(colours_match, same)  # one colour per class
    else:
        maps = viewer.layers[f"{image.name} patch entropy"]
        assert maps.data.shape == (k, *image.data.shape[1:])  # (K, H, W)
        assert maps.visible is False and maps.metadata["slice_index"] == CROP_LATE
        assert 0.0 <= maps.data.min() and maps.data.max() <= np.log(2) + 1e-6
        assert maps.data.max() > 0
    assert [layer.name for layer in viewer.layers][:3] == [image.name, reference.name, painted.name]


def test_closing_the_dock_stops_training(sample_viewer, qtbot, tmp_path, small_network):
    viewer, image, reference, painted = sample_viewer
    paint(painted, reference, PAINTED)
    widget = make_train_widget(viewer, tmp_path, small_network, iterations=100_000)
    assert widget.start_training()
    trainer = widget.trainer
    qtbot.waitUntil(lambda: trainer.step >= 2, timeout=30_000)
    control = widget.run.control
    t0 = time.perf_counter()
    viewer.window.remove_dock_widget(widget)  # the dock's "x"
    assert time.perf_counter() - t0 < 8
    assert widget.worker is None and not widget.is_training
    qtbot.waitUntil(control.done.is_set, timeout=20_000)
    qtbot.waitUntil((tmp_path / "run" / "checkpoint.pt").is_file, timeout=20_000)
    step = trainer.step
    qtbot.wait(200)
    assert trainer.step == step


def test_closing_the_viewer_stops_training(sample_viewer, qtbot, tmp_path, small_network):
    viewer, image, reference, painted = sample_viewer
    paint(painted, reference, PAINTED)
    widget = make_train_widget(viewer, tmp_path, small_network, iterations=100_000)
    assert widget.start_training()
    trainer = widget.trainer
    control = widget.run.control
    qtbot.waitUntil(lambda: trainer.step >= 2, timeout=30_000)
    t0 = time.perf_counter()
    viewer.close()  # napari cancels its tasks (worker.quit), then deletes the dock
    closed_s = time.perf_counter() - t0
    qtbot.waitUntil(control.done.is_set, timeout=20_000)
    qtbot.waitUntil((tmp_path / "run" / "checkpoint.pt").is_file, timeout=20_000)
    assert closed_s < 8, closed_s  # the dock waits at most CLOSE_TIMEOUT_S for the worker
    step = trainer.step
    qtbot.wait(200)
    assert trainer.step == step


def test_export_prediction_nifti(sample_viewer, qtbot, tmp_path, monkeypatch, small_network):
    viewer, image, reference, painted = sample_viewer
    paint(painted, reference, PAINTED)
    widget = make_train_widget(viewer, tmp_path, small_network, iterations=4)
    widget.refresh_spin.setValue(1000)  # one whole-volume prediction, at the end
    assert widget.start_training()
    events = record_events(widget)
    qtbot.waitUntil(lambda: not widget.is_training, timeout=60_000)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["budget"]
    prediction = viewer.layers[f"{image.name} prediction"]

    export = ExportWidget(viewer)
    qtbot.addWidget(export)
    assert export.labels_combo.currentText() == prediction.name  # the newest prediction
    target = tmp_path / "mask.nii.gz"
    with qtbot.waitSignal(export.exported, timeout=30_000):
        assert export.export(target)
    source = nib.load(sample_data_dir() / SAMPLE_IMAGE_FILE)
    written = nib.load(target)
    assert written.shape == image.data.shape[::-1] == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), prediction.data)

    # never overwrite silently: a "No" keeps the file as it was
    before = target.read_bytes()
    asked: list[Path] = []
    export.confirm_overwrite = lambda path: asked.append(path) or False
    prediction.data[:] = 0
    assert export.export(target) is False
    assert asked == [target]
    assert target.read_bytes() == before
    # "Yes" replaces it
    export.confirm_overwrite = lambda path: True
    with qtbot.waitSignal(export.exported, timeout=30_000):
        assert export.export(target)
    assert not np.asarray(nib.load(target).dataobj).any()

    # labels without geometry take it from the chosen image; bad names are refused
    errors: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", errors.append)
    bare = viewer.add_labels(np.asarray(reference.data), name="bare")
    export.set_labels(bare)
    assert export.source_combo.currentText() == image.name
    assert export.geometry_metadata(bare)["affine"] == image.metadata["affine"]
    assert export.export(tmp_path / "mask.png") is False
    assert errors and "mask.png" in errors[0]


def test_method_settings_follow_the_method_and_reach_the_config(sample_viewer, tmp_path, monkeypatch):
    from napari.utils import notifications

    viewer, image, _, painted = sample_viewer
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train (semi-supervised)")
    assert widget.num_threads >= 1
    widget.method_combo.setCurrentText("supervised")
    assert widget.method_settings is None and not widget.method_settings_box.isVisible()
    widget.method_combo.setCurrentText("plgcl")
    form = widget.method_settings
    assert form is not None and "plgcl" in widget.method_settings_box.title()
    form.control("warmup_steps").setValue(7)
    form.control("tau").setValue(0.3)
    cfg = widget.build_config()
    assert cfg.method == "plgcl" and cfg.plgcl.warmup_steps == 7 and cfg.plgcl.tau == pytest.approx(0.3)
    widget.method_combo.setCurrentText("arco")
    widget.method_settings.control("sampler").setText("sg")
    assert widget.build_config().arco.sampler == "sg"
    # a wrong value is a notification naming the key, and nothing starts
    widget.method_settings.control("sampler").setText("bogus")
    painted.data[30] = 1
    painted.data[30, 40:] = 2
    errors = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: errors.append(str(msg)))
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    assert widget.start_training() is False
    assert errors and "arco.sampler" in errors[0]
    assert widget.trainer is None
