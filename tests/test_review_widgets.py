"""The review docks (pseudo-labels, suggestions, t-SNE, curves) driven in a real viewer
after a short real training run of the Train dock (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

from qtpy.QtCore import QPoint, Qt  # noqa: E402

from napari_semicl.analysis import sample_disagreement, slice_means  # noqa: E402
from napari_semicl.engine.events import Finished, Reviewed  # noqa: E402
from napari_semicl.widgets._link import find_train_widget  # noqa: E402
from test_analysis import FakeAleatoric  # noqa: E402
from napari_semicl.widgets.curves_widget import DICE, CurvesWidget  # noqa: E402
from napari_semicl.widgets.feature_plot import FeaturePlotWidget  # noqa: E402
from napari_semicl.widgets.review_widget import ReviewWidget  # noqa: E402
from napari_semicl.widgets.suggest_widget import SuggestWidget  # noqa: E402
from napari_semicl.widgets.train import TrainWidget  # noqa: E402

CROP = slice(28, 52)
PAINTED = (2, 20)
VALIDATION = 14
ACCEPT = 6  # an unlabelled slice whose pseudo-labels are accepted


class _FakeAleatoric(FakeAleatoric):
    """test_analysis's fake aleatoric method plus the rest of the AUA/AGCL review contract:
    the samples' disagreement per slice and an affinity matrix in review()."""

    def review_slice(self, x, *, valid_shape=None):
        samples = self.sample_aleatoric(x, 4, valid_shape).numpy()
        k = self.student.head.out_channels
        return {"aleatoric_samples": samples, "aleatoric_disagreement": sample_disagreement(samples, k)}

    def review(self):
        a = np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)
        return {"affinity": a}


@pytest.fixture
def trained(make_napari_viewer, qtbot, tmp_path, small_network):
    """Viewer + Train dock + the four review docks after 20 mean-teacher steps on a
    24-slice crop of the sample with two painted slices and one validation slice."""
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    img = viewer.add_image(image.data[CROP].copy(), name="t1 crop", scale=image.scale)
    ref = reference.data[CROP].copy()
    painted = viewer.add_labels(np.zeros(img.data.shape, np.uint16), name="painted", scale=image.scale)
    for s in (*PAINTED, VALIDATION):
        painted.data[s] = ref[s]
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train (semi-supervised)")
    small_network(train)
    train.set_pair(0, img, painted)
    train.method_combo.setCurrentText("mean_teacher")
    train.iterations_spin.setValue(20)
    train.patch_spin.setValue(64)
    train.refresh_spin.setValue(10)
    train.background_check.setChecked(True)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    viewer.dims.set_current_step(0, VALIDATION)
    train.mark_validation()
    docks = {}
    for cls in (ReviewWidget, SuggestWidget, FeaturePlotWidget, CurvesWidget):
        dock = cls(viewer)  # finds the Train dock itself
        viewer.window.add_dock_widget(dock, name=cls.__name__)
        docks[cls.__name__] = dock
    finished = []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    assert train.start_training()
    # the review layer exists as soon as Train is pressed (adding a layer pauses napari: not
    # in the middle of training), empty, with the predictions' dtype (refreshed in place)
    pseudo = viewer.layers["t1 crop pseudo-labels"]
    assert pseudo.data.shape == img.data.shape and pseudo.data.dtype == viewer.layers["t1 crop prediction"].data.dtype
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=240_000)
    assert finished[0].reason == "budget"
    qtbot.wait(200)  # the pseudo-label / score workers deliver
    return viewer, img, painted, ref, train, docks


def test_review_docks_after_training(trained, qtbot):
    viewer, img, painted, ref, train, docks = trained
    review, suggest = docks["ReviewWidget"], docks["SuggestWidget"]
    feature, curves = docks["FeaturePlotWidget"], docks["CurvesWidget"]
    assert find_train_widget(viewer) is train
    assert all(d.train_widget is train for d in docks.values())
    values = set(train.trainer.dataset.class_values)

    # --- pseudo-labels: image shape, values in the class table; threshold 0 = prediction
    qtbot.waitUntil(lambda: review.pseudo_layer(0) is not None, timeout=10_000)
    pred = viewer.layers["t1 crop prediction"].data
    ent = viewer.layers["t1 crop entropy"].data
    assert ent.shape == img.data.shape and 0.0 <= ent.min() and ent.max() <= 1.0 and ent.max() > 0
    review.set_threshold(0.0)
    review.refresh_pseudo_labels(0, wait=True)
    pseudo = review.pseudo_layer(0).data
    assert pseudo.shape == img.data.shape
    assert set(np.unique(pseudo)) <= values
    np.testing.assert_array_equal(pseudo, pred)
    review.set_threshold(0.9)
    review.refresh_pseudo_labels(0, wait=True)
    pseudo = review.pseudo_layer(0).data
    np.testing.assert_array_equal(pseudo[(1 - ent) < 0.9], 0)
    np.testing.assert_array_equal(pseudo[(1 - ent) >= 0.9], pred[(1 - ent) >= 0.9])

    # --- accept / undo / accept; the next round trains on the accepted slice
    review.set_threshold(0.0)
    review.refresh_pseudo_labels(0, wait=True)
    assert not painted.data[ACCEPT].any()
    viewer.dims.set_current_step(0, ACCEPT)
    assert review.accept_slice()
    np.testing.assert_array_equal(painted.data[ACCEPT], review.pseudo_layer(0).data[ACCEPT])
    assert review.accepted_slices() == [ACCEPT] and review.accepted_list.count() == 1
    assert review.undo_accept()
    assert not painted.data[ACCEPT].any() and review.accepted_list.count() == 0
    assert review.accept_slice(ACCEPT)
    assert (0, ACCEPT) not in train.trainer.dataset.labelled
    train.iterations_spin.setValue(2)
    finished = []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    assert train.resume_training()
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=120_000)
    assert (0, ACCEPT) in train.trainer.dataset.labelled

    # --- suggestions ordered by mean entropy, labelled/validation slices left out
    qtbot.waitUntil(lambda: bool(suggest.suggestions), timeout=10_000)
    suggest.update_scores(0, viewer.layers["t1 crop entropy"].data, wait=True)
    sugs = suggest.suggestions
    scores = [s.entropy for s in sugs]
    assert scores == sorted(scores, reverse=True)
    listed = {s.slice_index for s in sugs}
    assert listed.isdisjoint({*PAINTED, VALIDATION, ACCEPT})
    means = slice_means(viewer.layers["t1 crop entropy"].data, 0)
    assert sugs[0].entropy == pytest.approx(means[sugs[0].slice_index], rel=1e-6)
    assert suggest.table.rowCount() == len(sugs) and suggest.table.item(0, 0).text() == str(sugs[0].slice_index)
    assert "log K" in suggest.table.horizontalHeaderItem(1).toolTip()
    target = sugs[-1].slice_index
    viewer.dims.set_current_step(0, sugs[0].slice_index if target != sugs[0].slice_index else 0)
    suggest.table.cellClicked.emit(len(sugs) - 1, 0)
    assert viewer.dims.current_step[0] == target
    # the second score, computed by the idle trainer in a worker
    suggest.request("disagreement", pair_index=0)
    qtbot.waitUntil(lambda: suggest.suggestions[0].disagreement is not None, timeout=60_000)
    suggest.order_combo.setCurrentText("disagreement")
    dis = [s.disagreement for s in suggest.suggestions]
    assert dis == sorted(dis, reverse=True)

    # --- t-SNE: bounded sample, clicking a point moves the viewer to its slice
    feature.points_spin.setValue(200)
    feature.slices_spin.setValue(4)
    assert feature.compute()
    qtbot.waitUntil(lambda: not feature.busy, timeout=120_000)
    n = len(feature.points)
    assert 0 < n <= 200 and feature.points.shape == (n, 2)
    pos = feature.data["positions"]
    # drawn in the render thread; the image shown is the one clicked
    qtbot.waitUntil(lambda: not feature.view.busy and feature.view.info is not None
                    and len(feature.view.info["display_xy"]) == n, timeout=30_000)
    i = int(np.argmax(pos[:, 1] != viewer.dims.current_step[0]))
    x, y = feature.point_position(i)
    qtbot.mouseClick(feature.view, Qt.LeftButton, pos=QPoint(round(x), round(y)))
    xy = feature.view.info["display_xy"][i]
    j = feature.point_at(*xy)
    assert j is not None and (pos[j, 1] == pos[i, 1] or np.allclose(feature.points[j], feature.points[i]))
    assert viewer.dims.current_step[0] == pos[j, 1]

    # --- curves: every loss by name and the validation Dice against steps
    curves.redraw()
    qtbot.waitUntil(lambda: not curves.view.busy, timeout=30_000)
    steps, total = curves.history.series("total")
    assert len(steps) == 22 and steps[-1] == 22
    assert {"ce", "dice", "consistency", "total"} <= set(curves.history.names())
    assert len(curves.history.series(DICE)[0]) >= 2
    # the image shown (drawn in the render process) is at the widget's size, not blank
    assert curves.view.in_process
    image = curves.view._image
    assert (image.width(), image.height()) == curves.view.pixel_size()
    assert image.pixelColor(0, 0).name() == "#ffffff" and not image.isNull()
    # the same snapshot drawn here: a line per loss, and the Dice on its own axis
    curves.redraw(wait=True)
    ax, ax_dice = curves.view.figure.axes
    assert len(ax.get_lines()) >= 4 and len(ax_dice.get_lines()) == 1


def test_aleatoric_and_affinity_through_the_contract(trained, qtbot):
    viewer, img, painted, ref, train, docks = trained
    review, feature = docks["ReviewWidget"], docks["FeaturePlotWidget"]
    trainer = train.trainer
    trainer.method = _FakeAleatoric(trainer.config, trainer.model)
    # on-demand samples of the current slice: a stack with its own slider
    viewer.dims.set_current_step(0, 9)
    review.samples_spin.setValue(5)
    assert review.draw_samples()
    qtbot.waitUntil(lambda: "t1 crop aleatoric samples" in viewer.layers, timeout=30_000)
    stack = viewer.layers["t1 crop aleatoric samples"]
    assert stack.data.shape == (5, 1, *img.data.shape[1:])
    assert set(np.unique(stack.data)) <= set(trainer.dataset.class_values)
    dis = viewer.layers["t1 crop aleatoric disagreement"]
    assert dis.data.shape == (1, *img.data.shape[1:]) and 0 <= dis.data.min() and dis.data.max() <= 1
    assert dis.data.max() > 0
    # the Reviewed event's disagreement map replaces it on the reviewed slice
    arrays = trainer.review_slice(0, 11)
    train.event_received.emit(Reviewed(trainer.step, 0, 11, arrays))
    np.testing.assert_allclose(dis.data[0], arrays["aleatoric_disagreement"])
    assert dis.metadata["slice_index"] == 11
    # the affinity heat map of review() beside the t-SNE
    feature.points_spin.setValue(100)
    assert feature.compute()
    qtbot.waitUntil(lambda: not feature.busy and feature.affinity is not None and not feature.view.busy,
                    timeout=120_000)
    assert feature.affinity.shape == (6, 6)
    feature._redraw(wait=True)  # the render process's figure, drawn here to look inside
    assert feature.view.figure.axes[-1].get_images()[0].get_array().shape == (6, 6)


@pytest.mark.parametrize("method, suffix", [("plgcl", " patch entropy"), ("arco", " sampled pixels"),
                                            ("aua", " aleatoric disagreement")])
def test_method_review_layers_exist_before_training_and_are_refreshed_in_place(
        method, suffix, make_napari_viewer, qtbot, tmp_path, small_network):
    """Adding a layer while training runs paused the viewer 0.1-1 s (bench ui): the layers a
    method's review shows are created, empty, when Train is pressed, and the first review
    writes into the same layer."""
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    img = viewer.add_image(image.data[CROP].copy(), name="t1 crop", scale=image.scale)
    painted = viewer.add_labels(np.zeros(img.data.shape, np.uint16), name="painted", scale=image.scale)
    painted.data[PAINTED[0]] = reference.data[CROP][PAINTED[0]]
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train (semi-supervised)")
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review")
    small_network(train)
    train.set_pair(0, img, painted)
    train.method_combo.setCurrentText(method)
    if method == "arco":  # a teacher 6 steps old is confident nowhere: let every pixel be a candidate
        train.method_settings.control("confidence").setValue(0.0)
    train.iterations_spin.setValue(6)
    train.patch_spin.setValue(64)
    train.refresh_spin.setValue(2)
    train.background_check.setChecked(True)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    viewer.dims.set_current_step(0, PAINTED[0])
    events = []
    train.event_received.connect(events.append)
    added = []
    viewer.layers.events.inserted.connect(lambda e: added.append(e.value.name))
    assert train.start_training()
    name = "t1 crop" + suffix
    assert name in viewer.layers  # before the first step
    layer = viewer.layers[name]
    created_at_train = list(added)
    qtbot.waitUntil(lambda: any(isinstance(e, Finished) for e in events) and not train.is_training,
                    timeout=240_000)
    assert any(isinstance(e, Reviewed) for e in events), [type(e).__name__ for e in events]
    assert viewer.layers[name] is layer and added == created_at_train  # no layer added since
    reviewed = [e for e in events if isinstance(e, Reviewed)][-1]
    assert reviewed.slice_index == PAINTED[0] != 0
    assert layer.metadata["slice_index"] == reviewed.slice_index  # the review went into it
    if suffix == " sampled pixels":  # the points are the pixels the review sampled, on its slice
        sampled = reviewed.arrays["sampled_pixels"]
        assert len(sampled) > 0
        axis = layer.metadata["axis"]
        assert (layer.data[:, axis] == reviewed.slice_index).all()
        np.testing.assert_array_equal(np.delete(layer.data, axis, axis=1), sampled)
        np.testing.assert_array_equal(layer.features["class"], reviewed.arrays["sampled_classes"])
    else:
        assert layer.data.max() > 0
