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

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

from napari_semicl.engine.events import Finished  # noqa: E402

PLUGIN = "napari-semicl"
TRAIN = "Train (semi-supervised)"
REVIEW = "Review pseudo-labels"
CURVES = "Training curves"
PAINTED = (2, 20)          # slices of the crop "painted" from the reference
VALIDATION = 14            # a painted slice held out for Dice
IN_VIEW = 9                # the slice the user looks at


def open_dock(viewer, name: str):
    """Open a dock the way the Plugins menu does; returns the widget."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def paint(painted, reference, slices) -> None:
    for s in slices:
        painted.data[s] = reference.data[s]
    painted.refresh()


def open_train_dock(viewer, tmp_path, small_network, *, iterations: int, method: str = "supervised",
                    refresh: int = 5):
    widget = open_dock(viewer, TRAIN)
    small_network(widget)
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


def test_validation_marks_through_the_plugin_dock(crop_viewer, qtbot, tmp_path, small_network):
    """Issue 17, item 1: one mark per slice, Unmark removes it, training validates on it."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, (*PAINTED, VALIDATION))
    widget = open_train_dock(viewer, tmp_path, small_network, iterations=6)
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
def test_review_layers_fill_in_the_plugin_dock(crop_viewer, qtbot, tmp_path, small_network, method):
    """Issue 17, item 2: PLGCL's patch entropy and ARCO's sampled pixels of the slice in view."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, small_network, iterations=12, method=method)
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


def test_resume_trains_the_budget_more(crop_viewer, qtbot, tmp_path, small_network):
    """Issue 17, item 4: after a stop, Resume trains the dock's budget *more* steps, and says so."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, small_network, iterations=1000, refresh=1000)
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

    # item 7: the device line and the run agree on the thread count
    started = widget.replay_events()[0]
    assert type(started).__name__ == "Started"
    assert widget.device_label.text() == f"Device: {started.device}"


def test_docks_opened_after_training_show_the_last_run(crop_viewer, qtbot, tmp_path, small_network):
    """Issue 17, item 6: review docks opened after a run show its pseudo-labels, suggestions and
    the whole curve; no Dice axis without a validation slice."""
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, small_network, iterations=10)
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


def _fully_visible(widget) -> bool:
    """Whether all of ``widget`` is on screen (not clipped by its dock, not scrolled away)."""
    shown = widget.visibleRegion().boundingRect()
    return widget.isVisible() and shown.width() == widget.width() and shown.height() == widget.height()


def test_train_dock_fits_a_1600_by_1000_window(make_napari_viewer, qtbot):
    """Issue 17, item 5: nothing clipped on the right, progress/ETA/loss in view without
    scrolling, other docks become tabs instead of squeezing the Train dock."""
    from qtpy.QtWidgets import QApplication, QDockWidget

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    name = "la_003_0000_left_atrium_mri_volume_resampled_to_isotropic"  # a real-life long name
    viewer.add_image(np.zeros((8, 64, 64), np.float32), name=name)
    viewer.add_labels(np.zeros((8, 64, 64), np.uint16), name=f"{name} labels")
    train = open_dock(viewer, TRAIN)
    train.method_combo.setCurrentText("plgcl")
    train.eta_label.setText("step 41 · 0:12 elapsed · ETA 0:30")
    train.loss_label.setText("loss: " + " · ".join(f"{k} 0.1234" for k in ("ce", "dice", "consistency", "contrast", "total")))
    train.dice_label.setText("Validation Dice 0.812 at step 40 (1 slice(s)): grey matter 0.801, white matter 0.850, CSF 0.700")
    qtbot.wait(200)
    QApplication.processEvents()
    assert window.height() <= 1000
    row = train.rows[0]
    for widget in (row.image_combo, row.remove_button, row.labels_combo, train.method_combo, train.budget_combo,
                   train.iterations_spin, train.train_button, train.stop_button, train.resume_button,
                   train.progress_bar, train.eta_label, train.loss_label, train.dice_label, train.status_label,
                   train.mark_button, train.unmark_button):
        assert _fully_visible(widget), type(widget).__name__ + " " + getattr(widget, "text", lambda: "")() + " " + str(widget.visibleRegion().boundingRect())
    assert train.scroll_area.verticalScrollBar().value() == 0

    for dock in ("Export mask", REVIEW, "Annotate next", CURVES, "Feature space (t-SNE)"):
        open_dock(viewer, dock)
    qtbot.wait(200)
    QApplication.processEvents()
    assert window.height() <= 1000
    docks = {d.windowTitle(): d for d in window.findChildren(QDockWidget)}
    train_dock = next(d for t, d in docks.items() if t.startswith(TRAIN))
    tabbed = {d.windowTitle().split(" (")[0] for d in window.tabifiedDockWidgets(train_dock)}
    assert {"Export mask", REVIEW, "Annotate next", CURVES, "Feature space"} <= {t.split(" (t-SNE")[0] for t in tabbed}
    train_dock.raise_()
    qtbot.wait(100)
    assert train.height() > 700 and _fully_visible(train.progress_bar) and _fully_visible(train.resume_button)


def test_a_reference_mask_is_not_chosen_to_train_on(crop_viewer, qtbot):
    """Issue 17, item 5: opening '<case>_gt.nii.gz' does not make it the labels to train on."""
    viewer, image, reference, painted = crop_viewer
    viewer.layers.remove(painted)
    viewer.layers.remove(reference)
    gt = viewer.add_labels(np.zeros(image.data.shape, np.uint16), name="t1 crop_gt")  # as the reader names it
    viewer.layers.selection.active = gt
    train = open_dock(viewer, TRAIN)
    assert train.rows[0].labels_combo.currentText() != gt.name
    assert [lab for _, lab in train.pairs()] == [None]
    viewer.add_labels(np.zeros(image.data.shape, np.uint16), name="case_01 reference")
    assert [lab for _, lab in train.pairs()] == [None]
    train.rows[0].new_labels_button.click()  # a fresh layer to paint: chosen
    assert [lab.name for _, lab in train.pairs()] == [f"{image.name} labels"]
    train.set_pair(0, image, gt)  # still possible by hand
    assert [lab.name for _, lab in train.pairs()] == [gt.name]


def test_method_settings_are_readable_in_the_dock(crop_viewer, qtbot):
    """Issue 17, item 7: PLGCL's settings are words with a tooltip, not bare symbols."""
    viewer = crop_viewer[0]
    train = open_dock(viewer, TRAIN)
    train.method_combo.setCurrentText("plgcl")
    form = train.method_settings
    layout = form.layout()
    for name in ("beta", "gamma", "tau", "zeta", "eps", "patch_size"):
        control = form.control(name)
        label = layout.labelForField(control)
        assert label.text() not in (name, name.replace("_", " ")), label.text()
        assert control.toolTip().startswith(f"{name}: ") and len(control.toolTip()) > 20
    assert "entropy" in layout.labelForField(form.control("patch_size")).text().lower()
