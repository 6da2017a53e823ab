"""Memory estimated before it is spent (engine/memory.py): what the process can have, the 3D
defaults, defaults shrinking to fit and saying so, forced settings refused with a value that
fits (the labels and the last checkpoint intact), inference windows that shrink, and the
estimate against a measured peak."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_semicl.cli import main
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer
from napari_semicl.engine import memory
from napari_semicl.engine.config import (
    DEFAULT_3D_BATCH,
    DEFAULT_3D_PATCH,
    apply_network_defaults,
    is_forced,
    set_option,
)
from napari_semicl.engine.events import Notice
from napari_semicl.engine.inference import predict_volume_probabilities
from napari_semicl.errors import ConfigError
from napari_semicl.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GB = 2**30


def volume(shape=(40, 48, 48), seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ball = ((zz - shape[0] / 2) / 12) ** 2 + ((yy - 24) / 14) ** 2 + ((xx - 24) / 13) ** 2 < 1
    image = (ball + rng.normal(0, 0.3, shape)).astype(np.float32)
    labels = reveal_slices(ball.astype(np.uint8), [14, 20, 26], 0)
    return image, labels


def three_d(method="supervised") -> TrainConfig:
    cfg = TrainConfig(method=method, iterations=1, refresh_every=10**6)
    cfg.model.spatial_dims = 3
    cfg.data.unpainted = "background"
    return cfg


# --- what the process can have ------------------------------------------------------------------
def test_available_memory_is_the_least_of_ram_cgroup_and_address_space(monkeypatch):
    assert memory.available_memory() > 0
    monkeypatch.setattr(memory, "_mem_available", lambda: 20 * GB)
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    monkeypatch.setattr(memory, "_address_space_headroom", lambda: None)
    assert memory.available_memory() == 20 * GB
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 6 * GB)
    assert memory.available_memory() == 6 * GB
    monkeypatch.setattr(memory, "_address_space_headroom", lambda: 3 * GB)
    assert memory.available_memory("cpu") == 3 * GB
    assert memory.memory_budget("cpu") == int(0.75 * 3 * GB) - memory.RESERVE_BYTES


def test_an_address_space_limit_counts(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (10**12, resource.RLIM_INFINITY))
    size = memory._address_space_headroom()
    assert size is not None and 0 < size < 10**12  # the limit less this process's size


# --- defaults, forced settings ------------------------------------------------------------------
def test_a_3d_network_gets_the_3d_defaults_unless_a_value_is_forced():
    cfg = three_d()
    assert apply_network_defaults(cfg)
    assert cfg.data.patch_shape == DEFAULT_3D_PATCH
    assert (cfg.data.batch_labelled, cfg.data.batch_unlabelled) == DEFAULT_3D_BATCH
    cfg = three_d()
    set_option(cfg, "data.patch_size", "128")  # forced, though equal to the 2D default
    set_option(cfg, "data.batch_labelled", "3")
    apply_network_defaults(cfg)
    assert cfg.data.patch_shape == (DEFAULT_3D_PATCH[0], 128, 128)
    assert cfg.data.batch_labelled == 3 and cfg.data.batch_unlabelled == DEFAULT_3D_BATCH[1]
    assert cfg.forced == ["data.patch_size", "data.batch_labelled"]
    assert TrainConfig.from_json(cfg.to_json()).forced == cfg.forced  # saved with the run
    two_d = TrainConfig()
    assert apply_network_defaults(two_d) == [] and two_d.data.patch_size == 128


def test_forced_means_set_explicitly_or_not_a_default():
    cfg = three_d()
    assert not is_forced(cfg, "data.patch_size")          # 128, the 2D default (the dock's spin)
    cfg.data.patch_size = DEFAULT_3D_PATCH[1]
    assert not is_forced(cfg, "data.patch_size")          # the 3D default
    cfg.data.patch_size = 160
    assert is_forced(cfg, "data.patch_size")              # a value the user chose
    cfg.model.spatial_dims = 2
    cfg.data.patch_size = 96
    assert is_forced(cfg, "data.patch_size")              # 96 is no 2D default


def test_defaults_that_do_not_fit_shrink_patch_first_then_batch_and_say_so():
    cfg = three_d("mean_teacher").validate()
    apply_network_defaults(cfg)
    full = memory.estimate_training(cfg).total
    budget = int(full * 0.6)
    notes = memory.fit_training_memory(cfg, None, "cpu", budget=budget)
    assert memory.estimate_training(cfg).total <= budget
    d = cfg.data
    assert all(n % 16 == 0 and n >= 32 for n in d.patch_shape)
    assert d.patch_shape != DEFAULT_3D_PATCH
    assert (d.batch_labelled, d.batch_unlabelled) == DEFAULT_3D_BATCH  # the patch went first
    assert [n.level for n in notes] == ["warning"]
    assert "training patches" in notes[0].text and "to fit in memory" in notes[0].text and "would need" in notes[0].text
    cfg.validate()
    # a budget the smallest patch does not meet: the batch goes too
    cfg = three_d("mean_teacher").validate()
    small = memory.estimate_training(_with(three_d("mean_teacher"), (32, 32, 32), (1, 1))).total
    memory.fit_training_memory(cfg, None, "cpu", budget=int(small * 1.2))
    assert cfg.data.patch_shape == (32, 32, 32) and cfg.data.batch_labelled + cfg.data.batch_unlabelled < 4


def _with(cfg, patch, batch):
    cfg.data.patch_depth, cfg.data.patch_size = patch[0], patch[1]
    cfg.data.batch_labelled, cfg.data.batch_unlabelled = batch
    return cfg


def test_a_forced_patch_that_cannot_fit_is_refused_with_a_value_that_fits():
    cfg = three_d("mean_teacher")
    set_option(cfg, "data.patch_size", "256")
    budget = memory.estimate_training(_with(three_d("mean_teacher"), (64, 96, 96), (2, 2))).total
    with pytest.raises(ConfigError, match=r"data\.patch_size = 256 does not fit in memory") as info:
        memory.fit_training_memory(cfg.validate(), None, "cpu", budget=budget)
    message = str(info.value)
    fits = int(message.split("data.patch_size = ")[2].split()[0])
    assert fits % 16 == 0 and 32 <= fits < 256
    trial = three_d("mean_teacher")
    set_option(trial, "data.patch_size", str(fits))
    memory.fit_training_memory(trial.validate(), None, "cpu", budget=budget)  # the value named fits
    assert trial.data.patch_size == fits


def test_nothing_fits_says_what_to_do():
    cfg = three_d().validate()
    with pytest.raises(ConfigError, match="not enough memory to train.*2D network"):
        memory.fit_training_memory(cfg, None, "cpu", budget=10 * 2**20)


# --- through the trainer, the CLI ---------------------------------------------------------------
def test_the_trainer_applies_the_3d_defaults_and_shrinks_them_with_a_notice(monkeypatch):
    image, labels = volume()
    cfg = three_d()
    cfg.model.base_channels = 4
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    assert trainer.config.data.patch_shape == DEFAULT_3D_PATCH
    assert [n.text for n in trainer._notices if "training patches" in n.text] == [
        "3D network: training patches 64 x 64 x 64, batches 2 labelled + 2 unlabelled (the 3D defaults)"]
    need = memory.estimate_training(trainer.config, trainer.dataset).total
    monkeypatch.setattr(memory, "available_memory", lambda device=None: int((need * 0.7 + memory.RESERVE_BYTES) / 0.75))
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    assert trainer.config.data.patch_shape != DEFAULT_3D_PATCH
    notices = [n for n in trainer._notices if isinstance(n, Notice) and "training patches" in n.text]
    assert len(notices) == 1 and notices[0].level == "warning" and "to fit in memory" in notices[0].text
    losses = trainer.train_step()  # and it trains
    assert np.isfinite(losses["total"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_refuses_a_forced_3d_patch_that_cannot_fit_keeping_labels_and_checkpoint(tmp_path, monkeypatch, capsys):
    from napari_semicl.io import write_image, write_labels

    image, labels = volume()
    src = write_image(tmp_path / "image.nii.gz", image)
    painted = write_labels(tmp_path / "painted.nii.gz", labels)
    run = tmp_path / "run"
    common = ["-q", "train", "--image", str(src), "--labels", str(painted), "--spatial-dims", "3",
              "--unpainted", "background", "--set", "model.base_channels=4", "--out", str(run)]
    assert main([*common, "--patch-size", "32", "--patch-depth", "32", "--iterations", "1",
                 "--set", "data.batch_labelled=1", "--set", "data.batch_unlabelled=1"]) == 0
    checkpoint, before = run / "checkpoint.pt", _digest(run / "checkpoint.pt")
    labels_before = _digest(painted)
    capsys.readouterr()
    # a machine where the forced 160-voxel patches do not fit, but 32-voxel ones do
    cfg = three_d()
    cfg.model.base_channels = 4
    small = memory.estimate_training(_with(cfg, (32, 32, 32), (1, 1))).total
    monkeypatch.setattr(memory, "available_memory",
                        lambda device=None: int((small * 1.5 + memory.RESERVE_BYTES) / 0.75))
    code = main([*common, "--patch-size", "160", "--patch-depth", "32", "--iterations", "1",
                 "--method", "mean_teacher", "--set", "data.batch_labelled=1", "--set", "data.batch_unlabelled=1"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.patch_size = 160 does not fit in memory" in lines[0], err
    assert "Traceback" not in err
    assert _digest(checkpoint) == before and _digest(painted) == labels_before
    assert json.loads((run / "config.json").read_text())["data"]["patch_size"] == 32


# --- inference windows --------------------------------------------------------------------------
def test_3d_prediction_shrinks_its_windows_to_the_memory_and_says_so(monkeypatch):
    torch.manual_seed(0)
    cfg = three_d().model
    cfg.base_channels = 4
    model = build_model(cfg).eval()
    image, _ = volume((40, 48, 48))
    slices = image[:, None]
    full = memory.estimate_volume_prediction(slices.shape, 2, base_channels=4, window=48).total
    small = memory.estimate_volume_prediction(slices.shape, 2, base_channels=4, window=32).total
    assert small < full
    monkeypatch.setattr(memory, "memory_budget", lambda device=None: (small + full) // 2)
    assert memory.fit_inference_window(model, slices.shape, torch.device("cpu"), 128) == 32
    notes: list = []
    probs = predict_volume_probabilities(model, slices, device=torch.device("cpu"), notes=notes)
    assert probs.shape == (40, 2, 48, 48)
    assert len(notes) == 1 and "32-voxel 3D windows" in notes[0]
    monkeypatch.setattr(memory, "memory_budget", lambda device=None: 1)
    with pytest.raises(Exception, match="not enough memory to predict"):
        memory.fit_inference_window(model, slices.shape, torch.device("cpu"), 128)


def test_slice_prediction_shrinks_its_batch_then_its_window_to_the_memory(monkeypatch):
    from napari_semicl.engine.inference import predict_slices

    model = build_model(TrainConfig().model).eval()
    shape = (6, 1, 64, 64)
    need = memory.estimate_volume_prediction(shape, 2, base_channels=16, window=64, spatial_dims=2, batch=6).total
    one = memory.estimate_volume_prediction(shape, 2, base_channels=16, window=64, spatial_dims=2, batch=1).total
    monkeypatch.setattr(memory, "memory_budget", lambda device=None: (need + one) // 2)
    notes: list = []
    batch, window = memory.fit_slice_batch(model, shape, torch.device("cpu"), 8, 512, notes=notes)
    assert batch < 6 and window == 512 and len(notes) == 1
    monkeypatch.setattr(memory, "memory_budget", lambda device=None: one - 1)
    batch, window = memory.fit_slice_batch(model, shape, torch.device("cpu"), 8, 512)
    assert batch == 1 and window < 64
    notes = []
    labels, _ = predict_slices(model, np.zeros(shape, np.float32), device=torch.device("cpu"), notes=notes)
    assert labels.shape == (6, 64, 64) and "slice(s) at a time" in notes[0]


# --- the estimate against a measured peak ---------------------------------------------------------
#: the estimate of a training step lies between the measured peak and this multiple of it
ESTIMATE_FACTOR = 3.0

_MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from napari_semicl.data import AnnotatedPair
    from napari_semicl.engine import TrainConfig, Trainer
    from napari_semicl.engine.config import set_option
    from napari_semicl.engine.memory import estimate_step
    dims, method, patch, bl, bu = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    precision = sys.argv[7]
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 64, 64)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8); labels[[12, 20, 28], 16:48, 16:48] = 1
    cfg = TrainConfig(method=method, iterations=1)
    cfg.model.spatial_dims = dims
    cfg.model.precision = precision
    cfg.data.unpainted = "background"
    for key, value in (("patch_size", patch), ("patch_depth", patch if dims == 3 else 0),
                       ("batch_labelled", bl), ("batch_unlabelled", bu)):
        set_option(cfg, "data." + key, str(value))
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    rss = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from here
    trainer.train_step()
    print(json.dumps({"measured": status("VmHWM") - rss, "estimate": estimate_step(trainer.config).total}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("dims, method, patch, bl, bu, precision", [
    (3, "mean_teacher", 32, 1, 1, "fp32"), (2, "supervised", 128, 4, 0, "fp32"),  # what the figures calibrate
    (3, "mean_teacher", 32, 1, 1, "auto"),  # bf16 autocast where the CPU has it: less memory, the estimate above it
])
def test_the_step_estimate_lies_above_a_measured_peak_within_a_factor(dims, method, patch, bl, bu, precision):
    root = str(Path(memory.__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", _MEASURE, root, str(dims), method, str(patch), str(bl), str(bu),
                          precision], capture_output=True, text=True, timeout=600, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["measured"] <= figures["estimate"], figures
    if precision == "fp32":
        assert figures["estimate"] <= ESTIMATE_FACTOR * figures["measured"], figures


# --- a volume that joins a running trainer --------------------------------------------------------
def _two_d_with_prior(patch: str | None = None) -> TrainConfig:
    cfg = TrainConfig(method="supervised", iterations=1, refresh_every=10**6)
    cfg.data.unpainted = "background"
    cfg.prior.mode = "targets"
    cfg.model.base_channels = 4
    cfg.data.batch_labelled = cfg.data.batch_unlabelled = 1
    if patch is not None:
        set_option(cfg, "data.patch_size", patch)
    return cfg


def _budget_for(cfg, trainer, pairs, patch: int) -> int:
    """The estimate of ``trainer``'s run on ``pairs`` with ``patch``-pixel crops."""
    from napari_semicl.data.tiles import make_dataset
    import copy

    trial = copy.deepcopy(trainer.config)
    trial.data.patch_size = patch
    return memory.estimate_training(trial, make_dataset(pairs, trial.data, spatial_dims=2)).total


@pytest.mark.parametrize("forced", [False, True])
def test_a_volume_joining_a_run_is_checked_against_memory(monkeypatch, forced):
    """The bigger volume grows the prior's arrays: defaults shrink to fit (and say so); a forced
    patch that no longer fits keeps the volume out of the run, which trains on."""
    image, labels = volume()
    cfg = _two_d_with_prior("112" if forced else None)
    trainer = Trainer(cfg, [AnnotatedPair(image, labels, name="first")], device=torch.device("cpu"))
    patch = trainer.config.data.patch_size
    big_image, big_labels = volume((80, 96, 96), seed=1)
    pairs = [*trainer.pairs, AnnotatedPair(big_image, big_labels, name="big")]
    need = _budget_for(cfg, trainer, pairs, patch)
    assert need > memory.estimate_training(trainer.config, trainer.dataset).total
    monkeypatch.setattr(memory, "available_memory",
                        lambda device=None: int((need - 1 + memory.RESERVE_BYTES) / 0.75) + 1)
    trainer._notices.clear()
    trainer.submit_data(pairs)
    update = trainer._apply_pending()
    texts = [n.text for n in trainer._notices]
    if forced:
        assert update.changed == () and [p.name for p in trainer.pairs] == ["first"]
        assert len(texts) == 1 and texts[0].startswith("'big' not added to this run: data.patch_size = 112 does not fit")
        assert trainer.config.data.patch_size == 112
    else:
        assert update.changed == (1,) and [p.name for p in trainer.pairs] == ["first", "big"]
        assert trainer.config.data.patch_size < patch == trainer.dataset.cfg.patch_size + 16
        assert len(texts) == 1 and "to fit in memory" in texts[0]
    assert np.isfinite(trainer.train_step()["total"])  # and it trains on
