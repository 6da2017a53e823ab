"""A user's path through the plugin, with every dock opened the way the Plugins menu opens it.

File > Open Sample, the Train dock, a new labels layer, two painted slices and a third marked
for validation, a short run with its validation Dice, the review docks opened after it (as
tabs), Resume and Stop, the mask exported with the source geometry, and the model applied to a
second image. Small network and few steps (two CPU cores); run under Xvfb.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")
nib = pytest.importorskip("nibabel")

from napari_semicl.analysis.plots import DICE  # noqa: E402
from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir  # noqa: E402

from conftest import set_train_dock  # noqa: E402
from test_plugin_docks import open_dock  # noqa: E402  (the one way tests open docks)

PLUGIN = "napari-semicl"
PAINTED = (30, 50)
VALIDATION = 44
ACCEPTED = 40






def test_open_paint_validate_train_review_resume_export(make_napari_viewer, qtbot, tmp_path, small_network):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "mni152_brain")
    image, reference = viewer.layers["mni152_t1"], viewer.layers["mni152_t1 reference"]

    # the Train dock: the reference is not offered as what to train on; a new layer is
    train = open_dock(viewer, "Train (semi-supervised)")
    assert [lab for _, lab in train.pairs()] == [None]
    train.rows[0].new_labels_button.click()
    labels = viewer.layers[f"{image.name} labels"]
    assert [(im.name, lab.name) for im, lab in train.pairs()] == [(image.name, labels.name)]

    # paint two complete slices and a third held out for validation
    for s in (*PAINTED, VALIDATION):
        labels.data[s] = reference.data[s]
    labels.refresh()
    viewer.layers.selection.active = labels
    viewer.dims.set_current_step(0, VALIDATION)
    train.mark_button.click()
    assert train.validation_label.text() == f"{image.name}: {VALIDATION}"

    small_network(train)
    set_train_dock(train, tmp_path / "run", method="mean_teacher", iterations=6, refresh_every=3, patch_size=64)

    train.train_button.click()
    assert train.is_training
    qtbot.waitUntil(lambda: not train.is_training, timeout=120_000)
    trainer = train.trainer
    assert trainer.step == 6
    assert trainer.dataset.summary()["labelled"] == 2 and trainer.dataset.summary()["validation"] == 1
    assert train.dice_label.text().startswith("Validation Dice ") and "(1 slice(s))" in train.dice_label.text()
    prediction = viewer.layers[f"{image.name} prediction"]
    assert prediction.data.any()

    # the review docks, opened after the run, show it (as tabs beside the Train dock)
    review = open_dock(viewer, "Review pseudo-labels")
    suggest = open_dock(viewer, "Annotate next")
    curves = open_dock(viewer, "Training curves")
    review.set_threshold(0.0)
    pseudo = f"{image.name} pseudo-labels"
    qtbot.waitUntil(lambda: pseudo in viewer.layers and viewer.layers[pseudo].data.any(), timeout=30_000)
    qtbot.waitUntil(lambda: len(suggest.suggestions) > 0, timeout=30_000)
    assert VALIDATION not in [s.slice_index for s in suggest.suggestions]
    assert list(curves.history.series("total")[0]) == list(range(1, 7))
    assert len(curves.history.series(DICE)[0]) >= 1
    curves.redraw(wait=True)
    assert len(curves.figure.axes) == 2  # losses and the validation Dice
    # the feature space: a bounded t-SNE of the network's features, drawn off the Qt thread
    feature = open_dock(viewer, "Feature space (t-SNE)")
    feature.points_spin.setValue(100)
    feature.slices_spin.setValue(3)
    assert feature.compute()
    qtbot.waitUntil(lambda: not feature.busy, timeout=120_000)
    assert 0 < len(feature.points) <= 100 and feature.points.shape[1] == 2

    # accept the pseudo-labels of an unpainted slice: with 'unpainted means background' the
    # whole predicted slice goes into the labels layer, and Resume trains on it
    viewer.layers.selection.active = labels
    viewer.dims.set_current_step(0, ACCEPTED)
    assert not labels.data[ACCEPTED].any()
    assert review.accept_slice()
    np.testing.assert_array_equal(labels.data[ACCEPTED], prediction.data[ACCEPTED])
    assert review.accepted_list.item(0).text().startswith(f"slice {ACCEPTED}: whole slice accepted")

    # Resume for more steps, Stop part-way: the model is kept
    train.iterations_spin.setValue(1000)
    assert "1000 more steps" in train.resume_button.toolTip()
    train.resume_button.click()
    assert train.trainer is trainer
    qtbot.waitUntil(lambda: trainer.step >= 8, timeout=60_000)
    train.stop_button.click()
    qtbot.waitUntil(lambda: not train.is_training, timeout=60_000)
    assert 8 <= trainer.step < 1006
    assert (0, ACCEPTED) in trainer.dataset.labelled  # the accepted slice trains as labelled
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert train.status_label.text().startswith("Stopped at step")

    # export the prediction with the source geometry
    export = open_dock(viewer, "Export mask")
    assert export.labels_combo.currentText() == prediction.name
    target = tmp_path / "mask.nii.gz"
    with qtbot.waitSignal(export.exported, timeout=30_000):
        assert export.export(target)
    source = nib.load(sample_data_dir() / SAMPLE_IMAGE_FILE)
    written = nib.load(target)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), prediction.data)

    # apply the model (its checkpoint) to a second image, as if opened with File > Open
    second = viewer.add_image(np.ascontiguousarray(image.data[20:40, ::-1]), name="second", scale=image.scale,
                              metadata=dict(image.metadata))
    apply = open_dock(viewer, "Apply model")
    assert apply.image_combo.currentText() == "second"
    apply.set_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with qtbot.waitSignal(apply.applied, timeout=60_000):
        assert apply.apply()
    assert viewer.layers["second prediction"].data.shape == second.data.shape
    assert viewer.layers["second entropy"].data.shape == second.data.shape
