"""The docks as napari opens them: ``viewer.window.add_plugin_dock_widget``.

napari hands a plugin dock a ``PublicOnlyProxy`` of the viewer; every layer fetched through
it is a new proxy object (``viewer.layers[0] is viewer.layers[0]`` is False). These tests
open every dock that way (never by constructing the widget class) and check what a user
sees. Run under Xvfb. Training uses a 24-slice crop of the bundled sample and a small
network (base 8 channels, depth 3) so that each run takes seconds on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

napari = pytest.importorskip("napari")

from napari_semicl.engine.events import Finished  # noqa: E402

PLUGIN = "napari-semicl"
TRAIN = "Train (semi-supervised)"
REVIEW = "Review pseudo-labels"
CURVES = "Training curves"
CROP = slice(28, 52)       # 24 axial slices of the sample
PAINTED = (2, 20)          # slices of the crop "painted" from the reference
VALIDATION = 14            # a painted slice held out for Dice
IN_VIEW = 9                # the slice the user looks at


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: the Qt thread and Mesa's renderer need the other core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def crop_viewer(make_napari_viewer):
    """A viewer with a 24-slice crop of the sample, its hidden reference and 'painted'."""
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    img = viewer.add_image(image.data[CROP].copy(), name="t1 crop", scale=image.scale)
    ref = viewer.add_labels(reference.data[CROP].copy(), name="reference", scale=image.scale, visible=False)
    painted = viewer.add_labels(np.zeros(img.data.shape, np.uint16), name="painted", scale=image.scale)
    return viewer, img, ref, painted


def open_dock(viewer, name: str):
    """Open a dock the way the Plugins menu does; returns the widget."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def paint(painted, reference, slices) -> None:
    for s in slices:
        painted.data[s] = reference.data[s]
    painted.refresh()


def small_network(widget, monkeypatch) -> None:
    """Keep the dock's config but train a small U-Net (test speed only)."""
    build = widget.build_config

    def build_small():
        cfg = build()
        cfg.model.base_channels = 8
        cfg.model.depth = 3
        cfg.data.batch_labelled = 2
        cfg.data.batch_unlabelled = 2
        return cfg

    monkeypatch.setattr(widget, "build_config", build_small)


def open_train_dock(viewer, tmp_path, monkeypatch, *, iterations: int, method: str = "supervised",
                    refresh: int = 5):
    widget = open_dock(viewer, TRAIN)
    small_network(widget, monkeypatch)
    widget.method_combo.setCurrentText(method)
    widget.budget_combo.setCurrentText("iterations")
    widget.iterations_spin.setValue(iterations)
    widget.patch_spin.setValue(64)
    widget.refresh_spin.setValue(refresh)
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    return widget


def train_to_end(widget, qtbot, timeout_ms: int = 120_000) -> list:
    events: list = []
    widget.worker.yielded.connect(events.append)
    qtbot.waitUntil(lambda: not widget.is_training, timeout=timeout_ms)
    return events


def test_validation_marks_through_the_plugin_dock(crop_viewer, qtbot, tmp_path, monkeypatch):
    """Issue 17, item 1: one mark per slice, Unmark removes it, training validates on it."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, (*PAINTED, VALIDATION))
    widget = open_train_dock(viewer, tmp_path, monkeypatch, iterations=6)
    assert [(im.name, lab.name) for im, lab in widget.pairs()] == [(image.name, painted.name)]
    viewer.layers.selection.active = painted
    viewer.dims.set_current_step(0, VALIDATION)

    widget.mark_button.click()
    widget.mark_button.click()  # the same slice twice: still one mark
    assert widget.validation_label.text() == f"{image.name}: {VALIDATION}"
    assert widget.snapshot()[0].validation_slices == (VALIDATION,)
    widget.unmark_button.click()
    assert widget.validation_label.text() == "none"
    assert widget.snapshot()[0].validation_slices == ()
    widget.mark_button.click()

    assert widget.start_training()
    events = train_to_end(widget, qtbot)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["budget"]
    assert widget.trainer.dataset.summary()["validation"] == 1
    assert widget.trainer.dataset.summary()["labelled"] == 2
    assert widget.dice_label.text().startswith("Validation Dice 0.") or widget.dice_label.text().startswith(
        "Validation Dice 1.")
    assert "(1 slice(s))" in widget.dice_label.text()


@pytest.mark.parametrize("method", ["plgcl", "arco"])
def test_review_layers_fill_in_the_plugin_dock(crop_viewer, qtbot, tmp_path, monkeypatch, method):
    """Issue 17, item 2: PLGCL's patch entropy and ARCO's sampled pixels of the slice in view."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, monkeypatch, iterations=12, method=method)
    widget.method_settings.control("warmup_steps").setValue(1)
    if method == "arco":
        widget.method_settings.control("confidence").setValue(0.3)  # a young teacher is unsure
    viewer.layers.selection.active = image
    viewer.dims.set_current_step(0, IN_VIEW)
    assert widget.start_training()
    events = train_to_end(widget, qtbot)
    reviewed = [e for e in events if type(e).__name__ == "Reviewed"]
    assert [(e.pair_index, e.slice_index) for e in reviewed] == [(0, IN_VIEW)] * 2  # refreshes at 5, 10
    assert f"slice {IN_VIEW}" in widget.review_label.text()
    if method == "plgcl":
        assert viewer.layers[f"{image.name} patch entropy"].data.max() > 0
    else:
        assert len(viewer.layers[f"{image.name} sampled pixels"].data) > 0


def test_resume_trains_the_budget_more(crop_viewer, qtbot, tmp_path, monkeypatch):
    """Issue 17, item 4: after a stop, Resume trains the dock's budget *more* steps, and says so."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, monkeypatch, iterations=1000, refresh=1000)
    assert widget.start_training()
    trainer = widget.trainer
    qtbot.waitUntil(lambda: trainer.step >= 2, timeout=60_000)
    widget.stop_button.click()
    qtbot.waitUntil(lambda: not widget.is_training, timeout=60_000)
    stopped_at = trainer.step
    assert 2 <= stopped_at < 1000

    widget.iterations_spin.setValue(3)
    assert "3 more steps" in widget.resume_button.toolTip()
    assert "+3 steps" in widget.resume_button.text()
    widget.resume_button.click()
    events = train_to_end(widget, qtbot)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["budget"]
    assert trainer.step == stopped_at + 3

    widget.budget_combo.setCurrentText("minutes")
    widget.minutes_spin.setValue(2.5)
    assert "2.5 more minutes" in widget.resume_button.toolTip()


def test_docks_opened_after_training_show_the_last_run(crop_viewer, qtbot, tmp_path, monkeypatch):
    """Issue 17, item 6: review docks opened after a run show its pseudo-labels, suggestions and
    the whole curve; no Dice axis without a validation slice."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, monkeypatch, iterations=10)
    assert widget.start_training()
    events = train_to_end(widget, qtbot)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["budget"]

    review = open_dock(viewer, REVIEW)
    review.set_threshold(0.0)  # a 10-step network is unsure everywhere: show every pixel
    suggest = open_dock(viewer, "Annotate next")
    curves = open_dock(viewer, CURVES)
    pseudo_name = f"{image.name} pseudo-labels"
    qtbot.waitUntil(lambda: pseudo_name in viewer.layers and viewer.layers[pseudo_name].data.any(), timeout=30_000)
    assert "appear" not in review.status_label.text()
    qtbot.waitUntil(lambda: len(suggest.suggestions) > 0, timeout=30_000)
    steps, total = curves.history.series("total")
    assert list(steps) == list(range(1, 11))  # every step of the run, not only those after opening
    curves.redraw(wait=True)
    assert len(curves.figure.axes) == 1  # losses only: no empty Dice axis
