"""Reliability and security (issue #10): bad input, faults and untrusted files lose nothing.

* Bad input on the command line: a table of cases, each must exit with 2, print ONE line on
  stderr naming the problem, and leave every input file as it was (and write no checkpoint).
* Inputs that are accepted with a warning or handled (partial NaN/Inf, integer CT ranges,
  no unlabelled slice, images smaller than the network's input) and out-of-memory fallbacks.
* Faults: a training process killed (SIGKILL) in the middle of a step or of a checkpoint
  write keeps its last checkpoint and the annotations, and resumes from them; an export
  killed mid-write leaves the previous export intact.
* Untrusted files: pickles carrying code are refused by every entry point and never run.

The GUI side of the same table (napari notifications, unchanged layers) is in
``tests/test_reliability_gui.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from napari_semicl.cli import main
from napari_semicl.data import AnnotatedPair
from napari_semicl.engine import (
    Finished,
    Notice,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_predictor,
    predict_volume,
    run_sync,
    save_checkpoint,
)
from napari_semicl.engine.autosave import load_annotations
from napari_semicl.errors import CheckpointError, DataError
from napari_semicl.io import read_labels, write_labels

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def small_config(method: str = "supervised", iterations: int = 2, **data) -> TrainConfig:
    """A tiny network so that every case trains in well under a second per step."""
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=1000, seed=0)
    cfg.model.base_channels = 4
    cfg.model.depth = 2
    cfg.data.patch_size = 32
    cfg.data.batch_labelled = 2
    cfg.data.batch_unlabelled = 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def blobs_volume(shape=(6, 40, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float volume of two intensity regions and labels painted on slice 1 (values 1, 2)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.1, shape).astype(np.float32)
    image[..., shape[-1] // 2:] += 1.0
    labels = np.zeros(shape, np.uint8)
    labels[1, :, : shape[-1] // 2] = 1
    labels[1, :, shape[-1] // 2:] = 2
    return image, labels


def write_nifti(path: Path, array: np.ndarray) -> Path:
    """Save ``array`` (napari axis order) as NIfTI the way the readers expect it back."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(*reversed(range(array.ndim)))), np.eye(4)), path)
    return path


class Payload:
    """A pickled object that runs code when unpickled: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file in PyTorch's own format, with the right format tag, carrying code."""
    torch.save({"format": "napari-semicl/1", "config": "{}", "student": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good inputs (image, labels, a grey checkpoint) and every bad one the table uses."""
    d = tmp_path_factory.mktemp("inputs")
    image, labels = blobs_volume()
    f = {"image": write_nifti(d / "image.nii.gz", image), "labels": write_nifti(d / "labels.nii.gz", labels)}
    good = f["image"].read_bytes()
    f["truncated"] = d / "truncated.nii.gz"
    f["truncated"].write_bytes(good[: len(good) // 2])
    f["garbage"] = d / "garbage.nii.gz"
    f["garbage"].write_bytes(b"this is not an image\n" * 20)
    f["text_tif"] = d / "text.tif"
    f["text_tif"].write_text("not a tiff\n")
    f["wrong_ext"] = d / "image.xyz"
    f["wrong_ext"].write_bytes(good)
    f["4d"] = write_nifti(d / "vol4d.nii.gz", np.random.default_rng(0).random((2, 6, 16, 16), np.float32))
    f["5d"] = write_nifti(d / "vol5d.nii.gz", np.random.default_rng(0).random((2, 2, 6, 16, 16), np.float32))
    nan_all = np.full(image.shape, np.nan, np.float32)
    f["all_nan"] = write_nifti(d / "all_nan.nii.gz", nan_all)
    f["rgb"] = d / "rgb.tif"
    tifffile.imwrite(f["rgb"], (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8), photometric="rgb")
    f["labels_small"] = write_nifti(d / "labels_small.nii.gz", labels[:, :20])
    f["labels_empty"] = write_nifti(d / "labels_empty.nii.gz", np.zeros_like(labels))
    one = labels.copy()
    one[one == 2] = 0
    f["labels_one_class"] = write_nifti(d / "labels_one_class.nii.gz", one)
    extra = labels.copy()
    extra[3, :5, :5] = 7
    f["labels_extra"] = write_nifti(d / "labels_extra.nii.gz", extra)
    f["cfg_unknown"] = d / "unknown.json"
    f["cfg_unknown"].write_text(json.dumps({"learning_rate": 0.1}))
    f["cfg_type"] = d / "type.json"
    f["cfg_type"].write_text(json.dumps({"iterations": "100"}))
    f["cfg_code"] = d / "code.json"
    f["cfg_code"].write_text(json.dumps({"optim": {"lr": "__import__('os').system('touch PWNED')"}}))
    f["cfg_table"] = d / "table.json"
    f["cfg_table"].write_text(json.dumps({"data": {"class_values": [1, 2]}}))
    # a grey checkpoint, and one whose weights belong to another network
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels)], device=CPU, out_dir=d / "run")
    run_sync(trainer.run(previews=False))
    f["checkpoint"] = d / "run" / "checkpoint.pt"
    state = trainer.state()
    state["student"] = {"encoders.0.0.weight": torch.zeros(3, 3, 3, 3)}
    f["other_arch"] = save_checkpoint(d / "other_arch.pt", state)
    f["marker"] = d / "payload_ran"
    f["evil"] = malicious_checkpoint(d / "evil.pt", f["marker"])
    f["junk_ckpt"] = d / "junk.pt"
    f["junk_ckpt"].write_bytes(b"hello, this is not a checkpoint\n")
    f["truncated_ckpt"] = d / "truncated.pt"
    ckpt_bytes = f["checkpoint"].read_bytes()
    f["truncated_ckpt"].write_bytes(ckpt_bytes[: len(ckpt_bytes) // 2])
    return f


# --- bad input on the command line ----------------------------------------------------------
TRAIN = ["train", "--iterations", "1", "--patch-size", "32", "--out", "{out}"]
CLI_CASES = {
    # id: (argv, fragment of the message)
    "missing file": (TRAIN + ["--image", "{tmp}/nope.nii.gz"], "does not exist"),
    "truncated file": (TRAIN + ["--image", "{truncated}"], "truncated"),
    "unreadable file": (TRAIN + ["--image", "{garbage}"], "Cannot read"),
    "wrong format": (TRAIN + ["--image", "{text_tif}"], "not a TIFF file"),
    "unsupported extension": (TRAIN + ["--image", "{wrong_ext}"], "not supported"),
    "4D volume": (TRAIN + ["--image", "{4d}"], "4D"),
    "5D volume": (TRAIN + ["--image", "{5d}"], "5D"),
    "all NaN intensities": (TRAIN + ["--image", "{all_nan}", "--labels", "{labels}"], "no finite value"),
    "RGB where grey is expected": (
        ["predict", "--checkpoint", "{checkpoint}", "--image", "{rgb}", "--out", "{out}/mask.tif"], "RGB"),
    "labels of another shape": (TRAIN + ["--image", "{image}", "--labels", "{labels_small}"], "shape"),
    "label values beyond the class table": (
        TRAIN + ["--image", "{image}", "--labels", "{labels_extra}", "--config", "{cfg_table}"], "[7]"),
    "no labelled slice": (TRAIN + ["--image", "{image}", "--labels", "{labels_empty}"], "no labelled slice"),
    "only one class painted": (TRAIN + ["--image", "{image}", "--labels", "{labels_one_class}"], "only one class"),
    "config unknown key": (TRAIN + ["--image", "{image}", "--labels", "{labels}", "--config", "{cfg_unknown}"],
                           "unknown key(s): learning_rate"),
    "config wrong type": (TRAIN + ["--image", "{image}", "--labels", "{labels}", "--config", "{cfg_type}"],
                          "iterations must be an integer"),
    "config value with code": (TRAIN + ["--image", "{image}", "--labels", "{labels}", "--config", "{cfg_code}"],
                               "optim.lr must be a number"),
    "checkpoint of another architecture": (
        ["predict", "--checkpoint", "{other_arch}", "--image", "{image}", "--out", "{out}/mask.nii.gz"],
        "does not fit"),
    "resume from another architecture": (
        TRAIN + ["--image", "{image}", "--labels", "{labels}", "--resume", "{other_arch}"], "does not fit"),
    "not a checkpoint": (
        ["predict", "--checkpoint", "{junk_ckpt}", "--image", "{image}", "--out", "{out}/mask.nii.gz"], "corrupt"),
    "truncated checkpoint": (
        ["predict", "--checkpoint", "{truncated_ckpt}", "--image", "{image}", "--out", "{out}/mask.nii.gz"],
        "corrupt"),
    "pickle with code (predict)": (
        ["predict", "--checkpoint", "{evil}", "--image", "{image}", "--out", "{out}/mask.nii.gz"], "refusing to load"),
    "pickle with code (resume)": (
        TRAIN + ["--image", "{image}", "--labels", "{labels}", "--resume", "{evil}"], "refusing to load"),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_changes_no_file(case, files, tmp_path, capsys, monkeypatch):
    argv, fragment = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)  # a config value run as code would 'touch PWNED' here
    out = tmp_path / "out"
    fill = {k: str(v) for k, v in files.items()} | {"out": str(out), "tmp": str(tmp_path)}
    inputs = {k: digest(v) for k, v in files.items() if isinstance(v, Path) and v.is_file()}
    capsys.readouterr()
    code = main(["-q", *[a.format(**fill) for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("napari-semicl: error:"), err
    assert fragment in err[0], err
    assert {k: digest(files[k]) for k in inputs} == inputs  # no input file changed
    assert not (out / "checkpoint.pt").exists() and not any(out.glob("mask*"))
    assert not files["marker"].exists() and not (tmp_path / "PWNED").exists()  # no code ran


def test_cli_error_is_one_line_on_the_real_stderr(files, tmp_path):
    """Outside pytest's capture: the process's whole stderr is the one line (with -q)."""
    proc = subprocess.run(
        [sys.executable, "-m", "napari_semicl.cli", "-q", "train", "--image", str(files["truncated"]),
         "--out", str(tmp_path / "o")],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "truncated" in lines[0], proc.stderr


# --- inputs that are handled, with a message where the user should know -----------------------
def notices(events) -> list[str]:
    return [e.text for e in events if isinstance(e, Notice)]


def test_partial_nan_inf_trains_with_a_warning_and_the_input_is_untouched():
    image, labels = blobs_volume()
    image[2, 5:10, 5:10] = np.nan
    image[4, 0, :3] = np.inf
    original = image.copy()
    events: list = []
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels, name="ct")], device=CPU)
    finished = run_sync(trainer.run(previews=False), events.append)
    assert finished.reason == "budget"
    assert any("'ct': 28 NaN/Inf voxel(s)" in t for t in notices(events)), notices(events)
    assert np.isfinite(trainer.dataset.images[0]).all()
    np.testing.assert_array_equal(image, original)  # NaNs included: the snapshot is not modified
    assert trainer.predict(image).labels.shape == image.shape


@pytest.mark.parametrize("dtype, lo, hi", [(np.int16, -1024, 3071), (np.uint16, 0, 65535), (np.int32, -2000, 40000)])
def test_integer_ct_ranges_are_normalised_to_unit_range(dtype, lo, hi):
    _, labels = blobs_volume()
    rng = np.random.default_rng(0)
    image = rng.integers(lo, hi, labels.shape, endpoint=True).astype(dtype)
    image[..., 20:] = hi  # a bright half: something to segment
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels)], device=CPU)
    assert run_sync(trainer.run(previews=False)).reason == "budget"
    normalised = trainer.dataset.images[0]
    assert normalised.dtype == np.float32 and normalised.min() >= 0 and normalised.max() <= 1
    assert normalised.max() == 1.0 and normalised.min() == 0.0
    assert np.isfinite(trainer.last_losses["total"])


def test_no_unlabelled_slice_is_said_and_training_goes_on():
    image, labels = blobs_volume()
    image, labels = image[1], labels[1]  # one 2D slice, and it is labelled
    events: list = []
    trainer = Trainer(small_config("mean_teacher"), [AnnotatedPair(image, labels)], device=CPU)
    assert run_sync(trainer.run(previews=False), events.append).reason == "budget"
    assert any("no unlabelled slice" in t for t in notices(events))


@pytest.mark.parametrize("shape", [(3, 5), (1, 2), (2, 7, 9)])
def test_images_smaller_than_the_network_input_train_and_predict(shape):
    """Crops are padded to the patch size and windows to the network's size multiple."""
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels.flat[0], labels.flat[-1] = 1, 2
    if len(shape) == 3:
        labels[0, 0, 0], labels[0, -1, -1] = 1, 2
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels)], device=CPU)
    assert run_sync(trainer.run(previews=True)).reason == "budget"
    pred = trainer.predict(image)
    assert pred.labels.shape == shape and set(np.unique(pred.labels)) <= {1, 2}


def test_label_values_painted_during_a_run_outside_the_table_are_said():
    image, labels = blobs_volume()
    trainer = Trainer(small_config(iterations=3), [AnnotatedPair(image, labels)], device=CPU)
    more = labels.copy()
    more[3, :4, :4] = 9
    trainer.submit_data([AnnotatedPair(image, more)])
    events: list = []
    assert run_sync(trainer.run(previews=False), events.append).reason == "budget"
    assert any("[9]" in t and "class table [1, 2]" in t for t in notices(events)), notices(events)


# --- out of memory ---------------------------------------------------------------------------
class OOMAbove(torch.nn.Module):
    """Wraps a network; raises the CUDA OOM error for inputs above ``max_pixels`` (B*H*W)."""

    def __init__(self, net: torch.nn.Module, max_pixels: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = net.multiple
        self.max_pixels = max_pixels
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-1] * x.shape[-2] > self.max_pixels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_prediction_out_of_memory_falls_back_to_fewer_slices_then_smaller_tiles():
    image, labels = blobs_volume((6, 64, 64))
    trainer = Trainer(small_config(), [AnnotatedPair(image, labels)], device=CPU)
    run_sync(trainer.run(previews=False))
    net = trainer.method.inference_model()
    reference = predict_volume(net, image, class_values=[1, 2], device=CPU, batch_size=1)
    # 2 slices of 64x64 fit, 8 do not: the batch halves 8 -> 4 -> 2, the tiles stay whole
    wrapped = OOMAbove(net, max_pixels=2 * 64 * 64)
    pred = predict_volume(wrapped, image, class_values=[1, 2], device=CPU, batch_size=8)
    assert pred.notes == ["out of memory on cpu: predicting 4 slice(s) at a time",
                          "out of memory on cpu: predicting 2 slice(s) at a time"]
    np.testing.assert_array_equal(pred.labels, reference.labels)  # same windows: same result
    # not even one whole slice fits: one slice at a time in 32-pixel tiles
    wrapped = OOMAbove(net, max_pixels=32 * 32)  # unfolded: a folded copy would record the shapes it saw
    pred = predict_volume(wrapped, image, class_values=[1, 2], device=CPU, batch_size=2, fold=False)
    assert pred.notes[-1] == "out of memory on cpu: predicting in 32-pixel tiles"
    assert pred.labels.shape == image.shape
    assert max(s[-1] for s in wrapped.seen[-3:]) == 32
    assert (pred.labels == reference.labels).mean() > 0.9
    # nothing fits: a clear error, not a traceback
    with pytest.raises(DataError, match="out of memory on cpu even for one slice"):
        predict_volume(OOMAbove(net, max_pixels=0), image, class_values=[1, 2], device=CPU)


def test_training_out_of_memory_says_what_to_lower_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    image, labels = blobs_volume()
    trainer = Trainer(small_config(iterations=5), [AnnotatedPair(image, labels)], device=CPU, out_dir=tmp_path)
    good = trainer.save()
    before = digest(good)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(trainer.method, "compute_losses", oom)
    finished = run_sync(trainer.run(previews=False))
    assert finished.reason == "error"
    assert finished.error.startswith("out of memory on CPU")
    assert "data.patch_size, now 32" in finished.error and "the last checkpoint is kept" in finished.error
    assert digest(good) == before
    assert load_annotations(tmp_path)[0]["labels"].tolist() == labels.tolist()


# --- autosave and resume ----------------------------------------------------------------------
def test_autosave_writes_checkpoint_and_annotations_every_n_minutes(tmp_path, monkeypatch):
    image, labels = blobs_volume()
    cfg = small_config(iterations=6)
    cfg.checkpoint_minutes = 0.5
    import napari_semicl.engine.trainer as trainer_module

    class Clock:
        """The trainer's clock: every reading advances 10 s (three readings per step)."""

        t = 1000.0

        def monotonic(self):
            self.t += 10.0
            return self.t

    trainer = Trainer(cfg, [AnnotatedPair(image, labels, name="case 01/a", validation_slices=(3,))],
                      device=CPU, out_dir=tmp_path)
    monkeypatch.setattr(trainer_module, "time", Clock())
    events: list = []
    finished = run_sync(trainer.run(previews=False), events.append)
    saves = [e.step for e in events if type(e).__name__ == "Checkpointed"]
    # 30 s per step, a save when more than 0.5 min passed since the last: every second step
    assert finished.reason == "budget" and saves == [2, 4, 6]
    saved = load_annotations(tmp_path)
    assert saved[0]["name"] == "case 01/a" and saved[0]["validation_slices"] == [3]
    assert saved[0]["path"].name == "pair0_case_01_a_labels.tif"
    np.testing.assert_array_equal(saved[0]["labels"], labels)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


def test_autosaved_nifti_annotations_keep_the_source_geometry(files, tmp_path):
    from napari_semicl.io import read_image

    img = read_image(files["image"])
    lab = read_labels(files["labels"], like=img)
    trainer = Trainer(small_config(iterations=1), [AnnotatedPair(img.data, lab.data, name=img.name,
                                                                 metadata=img.metadata)],
                      device=CPU, out_dir=tmp_path)
    run_sync(trainer.run(previews=False))
    path = load_annotations(tmp_path)[0]["path"]
    assert path.name == "pair0_image_labels.nii.gz"
    np.testing.assert_array_equal(nib.load(path).affine, nib.load(files["labels"]).affine)
    np.testing.assert_array_equal(read_labels(path).data, lab.data)


def test_new_annotations_are_autosaved_with_the_next_checkpoint(tmp_path):
    image, labels = blobs_volume()
    cfg = small_config(iterations=4)
    cfg.checkpoint_minutes = 1e-9  # every step
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=CPU, out_dir=tmp_path)
    more = labels.copy()
    more[4, :, :20] = 1
    trainer.submit_data([AnnotatedPair(image, more)])
    run_sync(trainer.run(previews=False))
    np.testing.assert_array_equal(load_annotations(tmp_path)[0]["labels"], more)


# --- faults: a run killed mid-step / mid-checkpoint, an export killed mid-write ---------------
KILLED_RUN = textwrap.dedent("""
    import io, sys, time
    from pathlib import Path
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_reliability import blobs_volume, small_config
    from napari_semicl.data import AnnotatedPair
    from napari_semicl.engine import Trainer, checkpoint as ck
    out, where, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    image, labels = blobs_volume()
    cfg = small_config(iterations=50)
    cfg.checkpoint_minutes = 1e-9  # a checkpoint after every step
    trainer = Trainer(cfg, [AnnotatedPair(image, labels, name="vol")], device=torch.device("cpu"), out_dir=out)
    compute, real_save = trainer.method.compute_losses, ck.torch.save
    def hang():
        marker.write_text(str(trainer.step))
        time.sleep(600)
    def losses(*args, **kwargs):
        result = compute(*args, **kwargs)  # half of the step is done: now hang in it
        if where == "step" and trainer.step == 3:
            hang()
        return result
    def save(obj, target):  # save_checkpoint hands torch.save a temporary path (io.atomic)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])  # half a checkpoint is on disk
            fh.flush()
            if where == "checkpoint" and trainer.step == 3:
                hang()
            fh.write(data[len(data) // 2:])
    trainer.method.compute_losses = losses
    ck.torch.save = save
    for event in trainer.run(previews=False):
        pass
""")


def kill_when_marked(script: Path, args: list[str], marker: Path, *, timeout_s: float, poll_s: float) -> int:
    """Run ``script`` in a subprocess, wait until it writes ``marker`` (it then hangs at the
    point under test), SIGKILL it there and return its exit status."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        assert marker.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


@pytest.mark.parametrize("where", ["step", "checkpoint"])
def test_a_run_killed_mid_step_keeps_checkpoint_and_annotations_and_resumes(where, tmp_path, files):
    out, marker = tmp_path / "run", tmp_path / "hanging"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent)))
    returncode = kill_when_marked(script, [str(out), where, str(marker)], marker, timeout_s=240, poll_s=0.1)
    assert returncode == -signal.SIGKILL
    assert marker.read_text() == "3"
    # the last good checkpoint: complete, loadable, from before the kill
    data = load_checkpoint(out / "checkpoint.pt")
    assert data["step"] == (3 if where == "step" else 2)
    if where == "checkpoint":  # the half-written one is a hidden temporary file, never the checkpoint
        # (io.atomic names it .checkpoint.<random>.tmp.pt beside the checkpoint)
        assert [p.name.endswith(".tmp.pt") for p in out.glob(".checkpoint.*")] == [True]
    image, labels = blobs_volume()
    saved = load_annotations(out)
    assert saved[0]["name"] == "vol"
    np.testing.assert_array_equal(saved[0]["labels"], labels)
    # resume from the run folder (its last checkpoint) with the autosaved annotations
    img_path = write_nifti(tmp_path / "vol.nii.gz", image)
    code = main(["-q", "train", "--image", str(img_path), "--labels", str(saved[0]["path"]),
                 "--resume", str(out), "--iterations", "5", "--out", str(out)])
    assert code == 0
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["step"] == data["step"] + 5  # continued from step 3 (or 2) for 5 more steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == data["step"] + 5 and metrics["reason"] == "budget"


KILLED_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from napari_semicl.io import writers
    target, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real = writers._write_nifti
    def slow(tmp, img):
        real(tmp, img)
        size = tmp.stat().st_size
        with open(tmp, "r+b") as fh:
            fh.truncate(size // 2)  # the writer has got half way
        marker.write_text(str(tmp))
        time.sleep(600)
    writers._write_nifti = slow
    new = np.full((20, 30, 40), 2, np.uint8)
    writers.write_labels(target, new, overwrite=True)
""")


def test_an_export_killed_mid_write_leaves_the_previous_export(tmp_path):
    target, marker = tmp_path / "mask.nii.gz", tmp_path / "writing"
    previous = np.ones((20, 30, 40), np.uint8)
    write_labels(target, previous)
    before = digest(target)
    script = tmp_path / "killed_export.py"
    script.write_text(KILLED_EXPORT)
    kill_when_marked(script, [str(target), str(marker)], marker, timeout_s=120, poll_s=0.05)
    partial = Path(marker.read_text())
    assert partial.parent == tmp_path and partial.name.startswith(".mask.") and partial.exists()
    assert digest(target) == before
    np.testing.assert_array_equal(read_labels(target).data, previous.T)  # no geometry: NIfTI (i, j, k) order
    # the next export replaces it as usual
    write_labels(target, previous * 3, overwrite=True)
    assert read_labels(target).data.max() == 3


# --- untrusted files --------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["load_checkpoint", "load_predictor", "from_checkpoint"])
def test_a_malicious_pickle_is_refused_by_every_loader_and_never_runs(entry, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    # the payload is real: plain torch.load would run it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "payload ran"
    marker.unlink()
    image, labels = blobs_volume()
    call = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "load_predictor": lambda: load_predictor(evil, device=CPU),
        "from_checkpoint": lambda: Trainer.from_checkpoint(evil, [AnnotatedPair(image, labels)], device=CPU),
    }[entry]
    with pytest.raises(CheckpointError, match=r"refusing to load .* must never carry code.*Unsupported global"):
        call()
    assert not marker.exists()


def test_resume_checkpoint_of_grey_images_on_rgb_images_is_refused(files):
    rgb = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    labels = np.zeros((40, 40), np.uint8)
    labels[:5], labels[-5:] = 1, 2
    with pytest.raises(CheckpointError, match=r"trained on grey \(1 channel\) images, these are RGB"):
        Trainer.from_checkpoint(files["checkpoint"], [AnnotatedPair(rgb, labels, rgb=True)], device=CPU)


def test_finished_event_carries_the_checkpoint_after_an_error(tmp_path, monkeypatch):
    """An error after some steps: Finished names the last good checkpoint, which loads."""
    image, labels = blobs_volume()
    cfg = small_config(iterations=10)
    cfg.checkpoint_minutes = 1e-9
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=CPU, out_dir=tmp_path)
    compute = trainer.method.compute_losses

    def fail_at_4(*args, **kwargs):
        if trainer.step == 4:
            raise RuntimeError("simulated failure")
        return compute(*args, **kwargs)

    monkeypatch.setattr(trainer.method, "compute_losses", fail_at_4)
    finished = run_sync(trainer.run(previews=False))
    assert isinstance(finished, Finished) and finished.reason == "error"
    assert finished.checkpoint == str(tmp_path / "checkpoint.pt")
    assert load_checkpoint(finished.checkpoint)["step"] == 4
