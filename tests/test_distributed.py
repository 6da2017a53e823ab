"""Training under ``torchrun`` on the CPU (gloo, two ranks): the same loop, rank 0 writes.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` with this
worktree's package first on the children's path (so the code tested is the code that runs),
one torch thread per rank.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_semicl
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, load_predictor, predict_volume
from napari_semicl.engine.distributed import SINGLE, Distributed, setup
from napari_semicl.io import write_labels
from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir

PROBE = Path(__file__).with_name("ddp_probe.py")
CPU = torch.device("cpu")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(napari_semicl.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_sample")
    image, reference = load_sample_volume()
    painted = reveal_slices(reference.data, [30, 50], 0)
    return {"image": sample_data_dir() / SAMPLE_IMAGE_FILE,
            "painted": write_labels(folder / "painted.nii.gz", painted, metadata=image.metadata)}


def test_one_process_has_no_process_group():
    dist, device = setup(CPU)
    assert dist is SINGLE and device == CPU and not dist.active and dist.is_main
    assert dist.agree(True, 1.5) == (True, 1.5)
    assert dist.mean_losses({"ce": 1.0}) == {"ce": 1.0}
    assert dist.wrap(torch.nn.Linear(2, 2), torch.nn.ModuleDict(), CPU) is None


def test_rank_streams_differ_between_ranks_and_repeat_per_seed():
    draws = [Distributed(2, r).rank_streams(5) for r in (0, 1, 0)]
    first = [(rng.integers(1 << 30), int(torch.randint(1 << 30, (1,), generator=g))) for rng, g in draws]
    assert first[0] != first[1] and first[0] == first[2]


def test_every_method_trains_in_step_on_two_ranks(tmp_path):
    """Two ranks: the losses fall, every method runs (with the prior's dense targets too),
    the ranks draw different crops, end with the same weights, and only rank 0 writes."""
    specs = ["supervised:20", "mean_teacher+prior:4", "arco:3", "plgcl:3", "agcl:3", "aua:4"]
    proc = subprocess.run(_torchrun(str(PROBE), str(tmp_path), *specs), env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for spec in specs:
        name, steps = spec.split(":")
        ranks = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
        for r, rec in enumerate(ranks):
            assert (rec["rank"], rec["world_size"], rec["reason"], rec["steps"]) == (r, 2, "budget", int(steps)), rec
        assert [rec["writes"] for rec in ranks] == [True, False], name
        assert ranks[0]["totals"] == ranks[1]["totals"], name  # the logged losses are the ranks' mean
        assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-9), name  # DDP kept them equal
        assert all(a != b for a, b in zip(ranks[0]["crops"], ranks[1]["crops"])), name
        assert (tmp_path / name / "checkpoint.pt").is_file()
    totals = json.loads((tmp_path / "supervised_rank0.json").read_text())["totals"]
    assert np.mean(totals[-5:]) < 0.85 * np.mean(totals[:5])
    # shutdown() ends every gloo thread while Python is whole: ranks whose gloo threads ran
    # on into interpreter finalization aborted now and then at exit ("terminate called
    # without an active exception")
    for r in (0, 1):
        threads = json.loads((tmp_path / f"threads_rank{r}.json").read_text())
        if threads["training"] is not None:
            assert threads["training"] > 0 and threads["after_shutdown"] == 0, threads


def test_cli_under_torchrun_writes_once_and_the_checkpoint_predicts_alone(sample_files, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        _torchrun("-m", "napari_semicl", "-q", "train", "--image", str(sample_files["image"]), "--labels",
                  str(sample_files["painted"]), "--method", "mean_teacher", "--iterations", "5", "--patch-size", "32",
                  "--unpainted", "background", "--device", "cpu", "--out", str(out)),
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"world_size": 2') == 1  # one summary: rank 0's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 5 and metrics["reason"] == "budget"
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "config.json", "prediction.nii.gz", "metrics.json"}
    model, config = load_predictor(out / "checkpoint.pt", device=CPU)  # one process, no group
    image, _ = load_sample_volume()
    pred = predict_volume(model, image.data[:4], class_values=config.data.class_values, device=CPU)
    assert pred.labels.shape == image.data[:4].shape


def test_a_killed_rank_ends_the_run_with_a_clear_error_and_a_usable_checkpoint(sample_files, tmp_path):
    import psutil

    cfg = TrainConfig(checkpoint_minutes=0.001)  # rank 0 checkpoints after every step
    cfg.to_json(tmp_path / "config.json")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun("-m", "napari_semicl", "train", "--config", str(tmp_path / "config.json"), "--image",
                  str(sample_files["image"]), "--labels", str(sample_files["painted"]), "--iterations", "100000",
                  "--patch-size", "32", "--unpainted", "background", "--device", "cpu", "--out", str(out)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        victim = next(w for w in workers if w.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "local_rank: 1" in stderr, stderr[-3000:]  # torchrun names the rank that died
    ours = [line for line in stderr.splitlines() if line.startswith("napari-semicl: error (rank 0)")]
    for line in ours:  # rank 0 says it in words when it notices before torchrun ends it
        assert "lost contact with the other ranks" in line and "the last checkpoint is kept" in line, line
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # no rank left behind
    model, config = load_predictor(out / "checkpoint.pt", device=CPU)  # the last checkpoint loads and predicts
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, 32, 32))
    assert logits.shape == (1, len(config.data.class_values), 32, 32)


def test_an_abandoned_run_ends_its_ranks_even_when_its_generator_is_never_resumed(tmp_path, monkeypatch):
    """The viewer closes while napari's worker has quit: run()'s generator stays suspended at
    a yield, so abandon() alone must end torchrun and every rank (its own thread)."""
    from napari_semicl.data.annotation import AnnotatedPair
    from napari_semicl.engine.events import StepDone
    from napari_semicl.engine.launch import DistributedRun, _alive

    monkeypatch.setattr(os, "environ", _env())  # the children import this checkout, one thread each
    image, reference = load_sample_volume()
    crop = (slice(20, 60), slice(20, 84), slice(20, 84))
    painted = reveal_slices(reference.data[crop], [5, 30], 0)
    cfg = TrainConfig(iterations=100_000, refresh_every=10_000)
    cfg.data.patch_size, cfg.data.unpainted = 32, "background"
    run = DistributedRun(cfg, [AnnotatedPair(image.data[crop], painted, name="crop")], n_procs=2,
                         out_dir=tmp_path / "run")
    gen = run.run(previews=False)
    try:
        for event in gen:  # until the ranks train, then the generator is left at its yield
            if isinstance(event, StepDone):
                break
        pids = run.processes()
        assert len(pids) == 3
        run.abandon()
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids)
    finally:
        run.kill()
        gen.close()
