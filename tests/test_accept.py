"""Accepting pseudo-labels: the merge rule against hand-made slices, and the Review dock as
napari opens it (Plugins menu: ``add_plugin_dock_widget``) after a short real training run."""

from __future__ import annotations

import numpy as np
import pytest

from napari_semicl.analysis.accept import merge_accepted_slice
from napari_semicl.errors import DataError

# a 2 x 4 slice: the network predicts class 2 on the right half, class 0 (background) on
# the left; the pixels of column 1 and 2 are uncertain
PRED = np.array([[0, 0, 2, 2], [0, 0, 2, 2]], np.uint8)
CERT = np.array([[0.9, 0.4, 0.6, 0.95], [0.9, 0.4, 0.6, 0.95]], np.float32)
THRESHOLD = 0.7
SHOWN = np.where(CERT >= THRESHOLD, PRED, 0).astype(np.uint8)  # [[0,0,0,2],[0,0,0,2]]


def test_background_accepts_the_whole_predicted_slice():
    painted = np.zeros((2, 4), np.uint16)
    result = merge_accepted_slice(painted, PRED, CERT, SHOWN, THRESHOLD, unpainted="background")
    # the uncertain class-2 pixels in column 2 are not turned into background
    np.testing.assert_array_equal(result.labels, PRED)
    assert result.labels.dtype == np.uint16
    assert result.whole_slice and result.labelled == 4 and result.added == 4
    assert result.uncertain == 4  # columns 1 and 2, taken as predicted
    assert "whole slice" in result.describe(7) and "4 uncertain" in result.describe(7)


def test_background_keeps_the_users_corrections():
    painted = np.zeros((2, 4), np.uint8)
    shown = SHOWN.copy()
    shown[0, 3] = 0  # the user erased a confident foreground pixel: background
    shown[1, 0] = 3  # and painted class 3 over a confident background pixel
    result = merge_accepted_slice(painted, PRED, CERT, shown, THRESHOLD, unpainted="background")
    np.testing.assert_array_equal(result.labels, [[0, 0, 2, 0], [3, 0, 2, 2]])


def test_background_refuses_a_painted_slice():
    painted = np.zeros((2, 4), np.uint8)
    painted[0, 0] = 1
    with pytest.raises(DataError, match="already painted"):
        merge_accepted_slice(painted, PRED, CERT, SHOWN, THRESHOLD, unpainted="background")


def test_ignore_copies_confident_pixels_where_unpainted():
    painted = np.zeros((2, 4), np.uint8)
    painted[1, 3] = 1  # the user's scribble wins
    result = merge_accepted_slice(painted, PRED, CERT, SHOWN, THRESHOLD, unpainted="ignore")
    np.testing.assert_array_equal(result.labels, [[0, 0, 0, 2], [0, 0, 0, 1]])
    assert not result.whole_slice and result.added == 1 and result.uncertain == 0
    with pytest.raises(DataError, match="above the certainty threshold"):
        merge_accepted_slice(painted, PRED, CERT, np.zeros_like(SHOWN), THRESHOLD, unpainted="ignore")


def test_merge_checks_its_arguments():
    with pytest.raises(ValueError, match="shapes differ"):
        merge_accepted_slice(np.zeros((2, 3)), PRED, CERT, SHOWN, THRESHOLD, unpainted="ignore")
    with pytest.raises(ValueError, match="unpainted must be one of"):
        merge_accepted_slice(np.zeros((2, 4)), PRED, CERT, SHOWN, THRESHOLD, unpainted="zero")


# --- the dock as napari opens it -----------------------------------------------------------
CROP = slice(28, 52)
PAINTED = (2, 20)
ACCEPT = 10


@pytest.mark.gui
@pytest.mark.usefixtures("one_torch_thread")
def test_accept_through_the_plugin_menu_keeps_the_slice_whole(make_napari_viewer, qtbot, tmp_path, small_network):
    pytest.importorskip("napari")
    from napari_semicl.engine.events import Finished
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    img = viewer.add_image(image.data[CROP].copy(), name="t1 crop", scale=image.scale)
    ref = reference.data[CROP].copy()
    painted = viewer.add_labels(np.zeros(img.data.shape, np.uint16), name="painted", scale=image.scale)
    for s in PAINTED:
        painted.data[s] = ref[s]
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    _, review = viewer.window.add_plugin_dock_widget("napari-semicl", "Review pseudo-labels")
    small_network(train)
    train.set_pair(0, viewer.layers["t1 crop"], viewer.layers["painted"])
    train.method_combo.setCurrentText("supervised")
    train.iterations_spin.setValue(10)
    train.patch_spin.setValue(64)
    train.refresh_spin.setValue(10)
    train.background_check.setChecked(True)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    finished = []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    assert train.start_training()
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=240_000)
    assert finished[0].reason == "budget"
    qtbot.waitUntil(lambda: review.pseudo_layer(0) is not None and 0 in review._pred and 0 in review._ent, timeout=20_000)

    pred = np.asarray(viewer.layers["t1 crop prediction"].data)
    ent = np.asarray(viewer.layers["t1 crop entropy"].data)
    review.set_threshold(0.7)
    review.refresh_pseudo_labels(0, wait=True)
    shown = np.asarray(review.pseudo_layer(0).data[ACCEPT])
    uncertain_fg = ((1 - ent[ACCEPT]) < 0.7) & (pred[ACCEPT] != 0)
    assert uncertain_fg.any(), "the test needs uncertain foreground on the accepted slice"
    assert not shown[uncertain_fg].any()

    viewer.dims.set_current_step(0, ACCEPT)
    assert review.accept_slice()
    labels = viewer.layers["painted"].data
    # the whole argmax prediction: no uncertain foreground pixel became background
    np.testing.assert_array_equal(labels[ACCEPT], pred[ACCEPT])
    item = review.accepted_list.item(0).text()
    assert item.startswith(f"slice {ACCEPT}: whole slice accepted") and "uncertain" in item
    # accepting it again is refused (it is painted now), and the labels are unchanged
    assert not review.accept_slice(ACCEPT)
    assert "already painted" in review.status_label.text()
    np.testing.assert_array_equal(labels[ACCEPT], pred[ACCEPT])
    # undo through the proxy the dock holds restores the unpainted slice
    assert review.undo_accept()
    assert not viewer.layers["painted"].data[ACCEPT].any()
    for s in PAINTED:
        np.testing.assert_array_equal(viewer.layers["painted"].data[s], ref[s])
