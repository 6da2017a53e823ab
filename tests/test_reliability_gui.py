"""Reliability in the GUI (issue #10): every bad input is one napari notification naming the
problem and changes no layer and no file; warnings do not stop training; a saved run resumes
from the dock. Run under Xvfb. The command-line side is in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]

napari = pytest.importorskip("napari")

import torch  # noqa: E402
from test_reliability import (  # noqa: E402
    blobs_volume,
    malicious_checkpoint,
    small_config,
    write_nifti,
)

from napari_semicl.data import AnnotatedPair  # noqa: E402
from napari_semicl.engine import Trainer, load_checkpoint, run_sync, save_checkpoint  # noqa: E402
from napari_semicl.engine.autosave import load_annotations  # noqa: E402
from napari_semicl.widgets.train import TrainWidget  # noqa: E402

CPU = torch.device("cpu")



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A grey checkpoint trained 2 steps on the blobs, one of another network, a pickle
    carrying code (and the file its payload would create) and a truncated checkpoint."""
    d = tmp_path_factory.mktemp("ckpt")
    image, labels = blobs_volume()
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels)], device=CPU, out_dir=d / "run")
    run_sync(trainer.run(previews=False))
    good = d / "run" / "checkpoint.pt"
    state = trainer.state()
    state["student"] = {"encoders.0.0.weight": torch.zeros(3, 3, 3, 3)}
    truncated = d / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"good": good, "other_arch": save_checkpoint(d / "other_arch.pt", state),
            "evil": malicious_checkpoint(d / "evil.pt", d / "payload_ran"), "marker": d / "payload_ran",
            "truncated": truncated}


def layer_state(viewer) -> list[tuple]:
    """Names, types and a hash of the data of every layer."""
    return [(layer.name, type(layer).__name__,
             hashlib.sha256(np.ascontiguousarray(np.asarray(layer.data)).tobytes()).hexdigest())
            for layer in viewer.layers]


def add_pair(viewer, image, labels, name="vol", rgb=False):
    img = viewer.add_image(image, name=name, rgb=rgb)
    lab = viewer.add_labels(labels, name=f"{name} painted") if labels is not None else None
    return img, lab


def _extra_value(labels):
    extra = labels.copy()
    extra[3, :5, :5] = 7
    return extra


# each case: (set up layers -> pairs to choose, what to press, fragment of the message)
def case_4d(viewer):
    image = np.random.default_rng(0).random((2, 6, 40, 40), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 1, :, :20], labels[0, 1, :, 20:] = 1, 2
    return [add_pair(viewer, image, labels)]


def case_5d(viewer):
    image = np.random.default_rng(0).random((2, 2, 3, 40, 40), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 0, 1, :, :20], labels[0, 0, 1, :, 20:] = 1, 2
    return [add_pair(viewer, image, labels)]


def case_rgb_with_grey(viewer):
    image, labels = blobs_volume()
    rgb = np.random.default_rng(0).random((40, 40, 3), np.float32)
    rgb_labels = np.zeros((40, 40), np.uint8)
    rgb_labels[:5], rgb_labels[-5:] = 1, 2
    return [add_pair(viewer, image, labels), add_pair(viewer, rgb, rgb_labels, name="rgb", rgb=True)]


def case_rgb_on_grey_checkpoint(viewer):
    rgb = np.random.default_rng(0).random((40, 40, 3), np.float32)
    labels = np.zeros((40, 40), np.uint8)
    labels[:5], labels[-5:] = 1, 2
    return [add_pair(viewer, rgb, labels, name="rgb", rgb=True)]


def case_all_nan(viewer):
    _, labels = blobs_volume()
    return [add_pair(viewer, np.full(labels.shape, np.nan, np.float32), labels)]


def case_labels_shape(viewer):
    """The dock offers only labels of the image's shape; a chosen layer whose data is
    replaced later (a script, another plugin) still must not reach training."""
    image, labels = blobs_volume()
    pair = add_pair(viewer, image, labels)

    def reshape():
        pair[1].data = labels[:, :20].copy()

    return [pair], reshape


def case_only_labels_of_another_shape(viewer):
    image, labels = blobs_volume()
    return [add_pair(viewer, image, labels[:, :20])]


def case_extra_values(viewer):
    image, labels = blobs_volume()
    return [add_pair(viewer, image, _extra_value(labels))]


def case_no_labelled_slice(viewer):
    image, labels = blobs_volume()
    return [add_pair(viewer, image, np.zeros_like(labels))]


def case_one_class(viewer):
    image, labels = blobs_volume()
    labels[labels == 2] = 0
    return [add_pair(viewer, image, labels)]


def case_no_image(viewer):
    return []


def case_good(viewer):
    image, labels = blobs_volume()
    return [add_pair(viewer, image, labels)]


GUI_CASES = {
    "4D volume": (case_4d, "train", "4 spatial dimensions"),
    "5D volume": (case_5d, "train", "5 spatial dimensions"),
    "RGB beside grey": (case_rgb_with_grey, "train", "same channels"),
    "RGB on a grey checkpoint": (case_rgb_on_grey_checkpoint, "good", "trained on grey (1 channel) images"),
    "all NaN intensities": (case_all_nan, "train", "no finite value"),
    "labels of another shape": (case_labels_shape, "train", "shape"),
    "only labels of another shape": (case_only_labels_of_another_shape, "train", "has shape (6, 20, 40)"),
    "label values beyond the class table": (case_extra_values, "good", "[7]"),
    "no labelled slice": (case_no_labelled_slice, "train", "no labelled slice"),
    "only one class painted": (case_one_class, "train", "only one class"),
    "no image": (case_no_image, "train", "no image layer chosen"),
    "checkpoint of another architecture": (case_good, "other_arch", "does not fit"),
    "truncated checkpoint": (case_good, "truncated", "corrupt"),
    "pickle with code": (case_good, "evil", "refusing to load"),
}


@pytest.mark.parametrize("case", list(GUI_CASES), ids=list(GUI_CASES))
def test_gui_bad_input_is_one_notification_and_changes_no_layer(case, checkpoints, make_napari_viewer, qtbot,
                                                                 tmp_path, monkeypatch):
    setup, action, fragment = GUI_CASES[case]
    viewer = make_napari_viewer()
    pairs, after = setup(viewer), None
    if isinstance(pairs, tuple):
        pairs, after = pairs
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    for i, (image, labels) in enumerate(pairs):
        widget.set_pair(i, image, labels)
    if after is not None:
        after()
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    errors: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", errors.append)
    before = layer_state(viewer)
    ckpt_digests = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in checkpoints.items() if p.is_file()}

    started = widget.start_training() if action == "train" else widget.resume_from_checkpoint(checkpoints[action])

    assert started is False
    assert len(errors) == 1 and fragment in errors[0], errors
    assert layer_state(viewer) == before  # no layer added, removed or changed
    assert widget.trainer is None and widget.worker is None and not widget.is_training
    assert not (tmp_path / "run").exists()
    assert {k: hashlib.sha256(checkpoints[k].read_bytes()).hexdigest() for k in ckpt_digests} == ckpt_digests
    assert not checkpoints["marker"].exists()  # the pickle's payload never ran


@pytest.mark.parametrize("name", ["truncated", "unsupported", "4d"])
def test_reading_a_bad_file_names_it_and_adds_no_layer(name, make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4)), name="existing")
    before = layer_state(viewer)
    image, _ = blobs_volume()
    good = write_nifti(tmp_path / "good.nii.gz", image)
    path = {"truncated": tmp_path / "cut.nii.gz", "unsupported": tmp_path / "text.tif", "4d": tmp_path / "v4.nii.gz"}[name]
    if name == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif name == "unsupported":
        path.write_text("not a tiff")
    else:
        write_nifti(path, np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(Exception) as info:  # napari wraps the reader's error and notifies the user
        viewer.open(str(path), plugin="napari-semicl")
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    message = " | ".join(chain)
    assert path.name in message
    assert {"truncated": "truncated", "unsupported": "not a TIFF file", "4d": "(4D)"}[name] in message
    assert layer_state(viewer) == before


@pytest.mark.parametrize("kind", ["nan", "no_unlabelled"])
def test_gui_warnings_do_not_stop_training_and_change_no_input(kind, make_napari_viewer, qtbot, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    image, labels = blobs_volume()
    if kind == "nan":
        image[2, :3, :3] = np.nan
        method, fragment = "supervised", "9 NaN/Inf voxel(s)"
    else:
        image, labels = image[1], labels[1]
        method, fragment = "mean_teacher", "no unlabelled slice"
    img, lab = add_pair(viewer, image, labels)
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_pair(0, img, lab)
    widget.method_combo.setCurrentText(method)
    widget.iterations_spin.setValue(2)
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    build = widget.build_config

    def build_small():
        cfg = build()
        small = small_config(method, iterations=2)
        cfg.model, cfg.data.patch_size = small.model, 32
        cfg.data.batch_labelled = cfg.data.batch_unlabelled = 2
        return cfg

    monkeypatch.setattr(widget, "build_config", build_small)
    warnings: list[str] = []
    errors: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", warnings.append)
    monkeypatch.setattr(napari.utils.notifications, "show_error", errors.append)
    inputs = layer_state(viewer)
    assert widget.start_training()
    qtbot.waitUntil(lambda: not widget.is_training, timeout=120_000)
    assert not errors and any(fragment in w for w in warnings), warnings
    assert widget.trainer.step == 2
    assert layer_state(viewer)[:2] == inputs  # the image (NaNs and all) and labels as they were
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    np.testing.assert_array_equal(load_annotations(tmp_path / "run")[0]["labels"], labels)


def test_dock_resumes_a_saved_run_and_continues_its_steps(checkpoints, make_napari_viewer, qtbot, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    (img, lab), = case_good(viewer)
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_pair(0, img, lab)
    widget.iterations_spin.setValue(4)
    widget.run_folder_edit.setText(str(tmp_path / "run"))
    errors: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", errors.append)
    step0 = load_checkpoint(checkpoints["good"])["step"]
    assert step0 == 2
    assert widget.resume_from_checkpoint(checkpoints["good"])
    qtbot.waitUntil(lambda: not widget.is_training, timeout=120_000)
    assert not errors
    assert widget.trainer.step == 6  # continued from step 2 for the dock's budget: 4 more steps
    assert load_checkpoint(Path(tmp_path / "run" / "checkpoint.pt"))["step"] == 6
    assert f"{img.name} prediction" in [layer.name for layer in viewer.layers]
    np.testing.assert_array_equal(load_annotations(tmp_path / "run")[0]["labels"], lab.data)
