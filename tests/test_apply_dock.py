"""The "Apply model" dock as napari opens it (``add_plugin_dock_widget``).

Train a few steps in the Train dock on a crop of the sample, open a second image (another
part of the brain, flipped), apply the current run and the run's checkpoint to it: the
prediction and entropy layers have the image's geometry and both sources predict the same.
An RGB image against a grey network, a 2D image against a 2.5D one, no trainer and a refused
checkpoint give messages; "Apply to files" writes '<name>_mask' with the source geometry.
Run under Xvfb; small network, few steps (two CPU cores).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")
nib = pytest.importorskip("nibabel")

from test_plugin_docks import open_dock  # noqa: E402  (the one way tests open docks)

TRAIN = "Train (semi-supervised)"
APPLY = "Apply model"
CROP = slice(28, 44)
PAINTED = (2, 12)


def apply_and_wait(dock, qtbot, **kwargs) -> None:
    with qtbot.waitSignal(dock.applied, timeout=60_000):
        assert dock.apply(**kwargs)


def test_apply_the_run_and_its_checkpoint_to_a_second_image(make_napari_viewer, qtbot, tmp_path, small_network):
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    first = viewer.add_image(image.data[CROP].copy(), name="t1 crop", scale=image.scale)
    painted = viewer.add_labels(np.zeros(first.data.shape, np.uint16), name="painted", scale=image.scale)
    for s in PAINTED:
        painted.data[s] = reference.data[CROP][s]

    apply = open_dock(viewer, APPLY)
    # no Train dock, no trainer: a message, no traceback
    assert not apply.apply()
    assert "No trained network" in apply.status_label.text()

    train = open_dock(viewer, TRAIN)
    small_network(train)
    train.background_check.setChecked(True)
    train.method_combo.setCurrentText("mean_teacher")
    train.budget_combo.setCurrentText("iterations")
    train.iterations_spin.setValue(3)
    train.patch_spin.setValue(64)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    train.train_button.click()
    qtbot.waitUntil(lambda: not train.is_training, timeout=120_000)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert checkpoint.is_file()
    rows = {train.class_table.item(r, 0).text(): r for r in range(train.class_table.rowCount())}
    train.class_table.item(rows["1"], 1).setText("csf")  # a class name the current run's layers get

    # a second image, as File > Open would add it: another part of the brain, flipped, moved
    second = viewer.add_image(np.ascontiguousarray(image.data[50:60, ::-1]), name="second",
                              scale=(3.0, 2.0, 2.0), translate=(5.0, -1.0, 0.0), metadata={"source_path": "x.nii"})
    assert apply.image_combo.currentText() == "second"  # the newest image
    apply.set_source("run")
    apply_and_wait(apply, qtbot)
    pred, ent = viewer.layers["second prediction"], viewer.layers["second entropy"]
    assert pred.data.shape == ent.data.shape == second.data.shape
    for layer in (pred, ent):
        np.testing.assert_allclose(layer.scale, second.scale)
        np.testing.assert_allclose(layer.translate, second.translate)
        assert layer.metadata["source_path"] == "x.nii"
    assert pred.data.any() and 0.0 <= float(ent.data.min()) and float(ent.data.max()) <= 1.0
    assert "csf" in list(pred.features["class_name"])
    from_run = np.array(pred.data, copy=True)

    names = [layer.name for layer in viewer.layers]
    pred.data = np.zeros_like(from_run)  # only the checkpoint's prediction can bring the run's back
    apply.set_checkpoint(checkpoint)
    apply_and_wait(apply, qtbot)
    assert [layer.name for layer in viewer.layers] == names  # the same layers, refreshed in place
    np.testing.assert_array_equal(viewer.layers["second prediction"].data, from_run)
    assert "checkpoint.pt" in apply.status_label.text()

    # an RGB image against a grey network: the message, nothing added
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True)
    apply.set_image("photo")
    apply.set_source("run")
    assert not apply.apply()
    assert "trained on grey images but this image is RGB" in apply.status_label.text()
    with qtbot.waitSignal(apply.failed, timeout=60_000) as blocker:  # from the checkpoint: in the worker
        apply.set_source("checkpoint")
        assert apply.apply()
    assert "trained on grey images but this image is RGB" in blocker.args[0]
    assert "photo prediction" not in viewer.layers

    # a file that is not plain data is refused
    bad = tmp_path / "evil.pt"
    bad.write_bytes(b"not a checkpoint")
    apply.set_checkpoint(bad)
    apply.set_image("second")
    with qtbot.waitSignal(apply.failed, timeout=60_000) as blocker:
        assert apply.apply()
    assert "checkpoint" in blocker.args[0]

    # files: masks with the source geometry, beside each other in the folder picked
    from napari_semicl.io import write_image

    src = tmp_path / "src"
    src.mkdir()
    a = write_image(src / "other.nii.gz", image.data[CROP][::-1].copy(), metadata=image.metadata)
    b = write_image(src / "slab.tif", image.data[40:46].copy(), metadata={})
    apply.set_checkpoint(checkpoint)
    apply.choose_files = lambda: ([a, b], tmp_path / "masks")
    with qtbot.waitSignal(apply.files_done, timeout=120_000) as blocker:
        apply.files_button.click()
    assert [r.ok for r in blocker.args[0]] == [True, True]
    written = nib.load(tmp_path / "masks" / "other_mask.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(a).affine)
    assert written.shape == nib.load(a).shape
    assert (tmp_path / "masks" / "slab_mask.tif").is_file()
    assert "2 mask(s) written" in apply.status_label.text()
