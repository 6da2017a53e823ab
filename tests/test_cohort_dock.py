"""A cohort in the Train dock (issue 26, item 2), as a user works: two painted volumes train;
the next volume is opened and added to the dock WHILE training runs: its mask is the
network's at once (a prediction layer for it, without pressing anything else); a labels layer
made for it and two slices painted there: its mask keeps them exactly (the network fused with
their fill); the step counter goes on (one trainer, never restarted)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

from napari_semicl.data.reveal import reveal_slices  # noqa: E402
from napari_semicl.engine.events import DataUpdated, Finished, Preview, StepDone  # noqa: E402
from napari_semicl.io.sample import load_sample_volume  # noqa: E402
from napari_semicl.widgets.train.model import join_problem, merge_pairs  # noqa: E402
from napari_semicl.widgets.train.pairs import NO_LABELS  # noqa: E402

CROPS = {"A": slice(4, 28), "B": slice(28, 52), "C": slice(52, 76)}  # three volumes of one shape
PAINTED = [3, 11, 19]  # on A and B
NEW_PAINTED = [6, 16]  # on C, once it joined


def predictions_of(events, pair_index, since=0):
    return [e for e in events[since:] if isinstance(e, Preview) and e.kind == "prediction"
            and e.pair_index == pair_index]


def start_until_stop(train, tmp_path, refresh_every: int) -> list:
    """Press Train on the dock's pairs, set for a run that goes on until Stop (the fastest fill,
    32 px crops, a refresh every ``refresh_every`` steps); returns the list the dock's events
    are appended to."""
    train.background_check.setChecked(True)
    train.prior_controls.interpolation_combo.setCurrentText("sdf")  # the fastest fill (test speed)
    train.iterations_spin.setValue(100_000)  # runs until Stop
    train.patch_spin.setValue(32)
    train.refresh_spin.setValue(refresh_every)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    events: list = []
    train.event_received.connect(events.append)
    assert train.start_training()
    return events


def test_the_next_volume_joins_a_running_cohort(make_napari_viewer, qtbot, tmp_path, small_network):
    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    ref = {name: reference.data[crop].copy() for name, crop in CROPS.items()}
    for name in "AB":
        viewer.add_image(image.data[CROPS[name]].copy(), name=name, scale=image.scale)
        viewer.add_labels(reveal_slices(ref[name], PAINTED, 0).astype(np.uint16), name=f"{name} painted",
                          scale=image.scale)
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    small_network(train)
    train.set_pair(0, viewer.layers["A"], viewer.layers["A painted"])
    train.set_pair(1, viewer.layers["B"], viewer.layers["B painted"])
    events = start_until_stop(train, tmp_path, refresh_every=10)
    trainer = train.trainer
    qtbot.waitUntil(lambda: len(predictions_of(events, 1)) >= 2 and trainer.step >= 10, timeout=120_000)

    # the next volume: File > Open, then '+ pair' in the Train dock, while training runs
    c = viewer.add_image(image.data[CROPS["C"]].copy(), name="C", scale=image.scale)
    assert train.is_training
    since = len(events)
    train.pairs_view.add_pair_button.click()
    row = train.rows[-1]
    assert row.image_combo.currentText() == "C" and row.labels_combo.currentText() == NO_LABELS
    assert "C prediction" in viewer.layers  # made on the click, filled by the first preview
    qtbot.waitUntil(lambda: bool(predictions_of(events, 2, since)), timeout=60_000)
    (update, *_) = [e for e in events[since:] if isinstance(e, DataUpdated)]
    assert update.changed == (2,) and update.step >= 10  # A and B unchanged; no restart
    first = predictions_of(events, 2, since)[0]
    assert first.step == update.step  # its mask came before the next step
    assert "C prediction" in viewer.layers
    mask = np.array(viewer.layers["C prediction"].data)  # a copy: the layer is written in place
    assert mask.shape == c.data.shape == ref["C"].shape
    np.testing.assert_array_equal(mask, predictions_of(events, 2, since)[-1].array)
    tissue = np.count_nonzero((mask > 0) & (ref["C"] > 0)) * 2 / (np.count_nonzero(mask) + np.count_nonzero(ref["C"]))
    assert tissue > 0.9  # the network already tells the brain from the background (0.98 measured at step 12)
    assert train.trainer is trainer and trainer.pairs[2].labels is None  # unlabelled data
    assert trainer.dataset.summary()["unlabelled"] > 0

    # a labels layer for it, two slices painted: its mask keeps them (the network fused with their fill)
    row.new_labels_button.click()
    assert row.labels_combo.currentText() == "C labels"
    labels = viewer.layers["C labels"]
    assert train.run_layers[2][1].name == "C labels"
    since = len(events)
    for s in NEW_PAINTED:
        labels.data[s] = ref["C"][s]
    labels.refresh()

    def painted_mask_shown():
        shown = predictions_of(events, 2, since)
        return bool(shown) and all(np.array_equal(shown[-1].array[s], ref["C"][s]) for s in NEW_PAINTED)

    qtbot.waitUntil(painted_mask_shown, timeout=90_000)
    fused = viewer.layers["C prediction"].data
    for s in NEW_PAINTED:  # the painted slices exact in the layer the user sees
        np.testing.assert_array_equal(fused[s], ref["C"][s])
    assert np.count_nonzero(trainer.pairs[2].labels) == np.count_nonzero(ref["C"][NEW_PAINTED])
    if os.environ.get("SEMICL_SCREENSHOTS"):  # for a person to look at
        for layer in viewer.layers:  # C and its mask in view, at an unpainted slice
            layer.visible = layer.name in ("C", "C prediction", "C labels")
        viewer.layers.selection.active = viewer.layers["C prediction"]
        viewer.reset_view()
        viewer.dims.set_point(0, float(NEW_PAINTED[0] + 4) * image.scale[0])
        qtbot.wait(200)
        from imageio import imwrite

        imwrite(Path(os.environ["SEMICL_SCREENSHOTS"]) / "cohort_next_volume.png",
                viewer.screenshot(canvas_only=False))

    train.stop_training()
    qtbot.waitUntil(lambda: any(isinstance(e, Finished) for e in events) and not train.is_training,
                    timeout=60_000)
    (finished,) = [e for e in events if isinstance(e, Finished)]
    assert finished.reason == "stopped" and train.trainer is trainer
    steps = [e.step for e in events if isinstance(e, StepDone)]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[0] == 1  # never back to 0
    assert finished.step == steps[-1] > update.step
    assert all(not isinstance(e, DataUpdated) or e.step > 0 for e in events)

    # one more volume after Stop: it joins at Resume (same network, the step goes on)
    viewer.add_image(image.data[CROPS["A"]].copy() * 0.9, name="D", scale=image.scale)
    train.pairs_view.add_pair_button.click()
    assert train.rows[-1].image_combo.currentText() == "D"
    since = len(events)
    assert train.resume_training()
    qtbot.waitUntil(lambda: bool(predictions_of(events, 3, since))
                    and any(isinstance(e, StepDone) for e in events[since:]), timeout=60_000)
    train.stop_training()
    qtbot.waitUntil(lambda: isinstance(events[-1], Finished) and not train.is_training, timeout=60_000)
    assert train.trainer is trainer and len(trainer.pairs) == 4 and trainer.pairs[3].labels is None
    assert [e.step for e in events[since:] if isinstance(e, StepDone)][0] == finished.step + 1
    assert viewer.layers["D prediction"].data.shape == ref["A"].shape


def test_merge_pairs_appends_new_images_and_takes_a_labels_layer_made_for_one():
    same = lambda a, b: a is not None and b is not None and a == b  # noqa: E731 - layers stand in as names
    run = [("A", "A painted"), ("B", None)]
    merged, added = merge_pairs(run, [("A", "other"), ("B", "B labels"), ("C", None)], same)
    # A keeps the labels it trains on; B takes the one made for it; C is appended
    assert merged == [("A", "A painted"), ("B", "B labels"), ("C", None)] and added == [2]
    merged, added = merge_pairs(merged, [("C", None)], same)  # a row removed: its pair stays in the run
    assert merged == [("A", "A painted"), ("B", "B labels"), ("C", None)] and added == []


def test_join_problem_names_an_image_the_run_cannot_take():
    from napari_semicl.data import AnnotatedPair

    volume = AnnotatedPair(np.zeros((4, 8, 8), np.float32), None, name="v")
    assert join_problem([volume], AnnotatedPair(np.zeros((8, 8), np.float32), None, name="s")) is None
    assert "not a volume" in join_problem([volume], AnnotatedPair(np.zeros((8, 8), np.float32), None, name="s"),
                                          spatial_dims=3)
    rgb = AnnotatedPair(np.zeros((4, 8, 8, 3), np.float32), None, rgb=True, name="colour")
    assert "it has 3 channel(s) but this run's images have 1" in join_problem([volume], rgb)


def test_an_image_the_run_cannot_take_is_named_and_training_goes_on(make_napari_viewer, qtbot, tmp_path,
                                                                    small_network, monkeypatch):
    import napari_semicl.widgets.train.controller as controller_module

    warnings: list[str] = []
    monkeypatch.setattr(controller_module.notifications, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    crop = CROPS["B"]
    viewer.add_image(image.data[crop].copy(), name="B", scale=image.scale)
    viewer.add_labels(reveal_slices(reference.data[crop], PAINTED, 0).astype(np.uint16), name="B painted",
                      scale=image.scale)
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    small_network(train)
    train.set_pair(0, viewer.layers["B"], viewer.layers["B painted"])
    events = start_until_stop(train, tmp_path, refresh_every=5)
    trainer = train.trainer
    qtbot.waitUntil(lambda: trainer.step >= 3, timeout=120_000)
    grey = image.data[crop]
    viewer.add_image(np.stack([grey] * 3, axis=-1), name="colour", rgb=True)
    train.pairs_view.add_pair_button.click()
    assert train.rows[-1].image_combo.currentText() == "colour"
    assert warnings == ["'colour' does not join the run: it has 3 channel(s) but this run's images have 1: "
                        "press Stop, then Train for a new run with it"]
    assert len(train.run_layers) == 1
    step = trainer.step
    qtbot.waitUntil(lambda: len(predictions_of(events, 0)) >= 3 and trainer.step > step + 5, timeout=60_000)
    assert len(warnings) == 1 and len(trainer.pairs) == 1 and train.is_training  # said once; the run goes on
    train.stop_training()
    qtbot.waitUntil(lambda: not train.is_training, timeout=60_000)
    assert [e.reason for e in events if isinstance(e, Finished)] == ["stopped"]


def test_the_intensity_augmentation_control_sets_the_config(make_napari_viewer):
    """Advanced > Intensity augmentation (issue 26: a cohort meets other volumes' contrasts)."""
    viewer = make_napari_viewer()
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    assert train.build_config().data.intensity_augment == 0.0
    train.intensity_spin.setValue(0.8)
    assert train.build_config().data.intensity_augment == pytest.approx(0.8)
