"""Run under ``torchrun`` by tests/test_distributed.py: trains methods on a crop of the sample
with the one Trainer and writes, per rank, what the test checks (``OUT/<method>_rank<r>.json``):
the losses of every step, a fingerprint of every step's crops, a checksum of the weights
(the parameters of student, heads and teacher) at the end and whether the trainer saw itself as rank 0.
At the end, ``OUT/threads_rank<r>.json``: this process's gloo worker threads while the last
trainer exists and after :func:`~napari_semicl.engine.distributed.shutdown` (Linux only).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py OUT SPEC...

SPEC is METHOD[+prior]:STEPS; ``+prior`` turns the painted-slice prior's dense targets on.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.engine.distributed import shutdown
from napari_semicl.io.sample import load_sample_volume


def _config(method: str, steps: int) -> TrainConfig:
    cfg = TrainConfig(method=method, iterations=steps, refresh_every=10_000, seed=3)
    cfg.data.patch_size = 48
    cfg.data.batch_labelled = cfg.data.batch_unlabelled = 2
    cfg.data.unpainted = "background"
    cfg.model.base_channels, cfg.model.depth = 8, 3
    section = getattr(cfg, method, None)
    for name, value in (("warmup_steps", 0), ("stage2_at", 0.5), ("stage2_init", "restart"), ("queue_size", 16)):
        if section is not None and hasattr(section, name):
            setattr(section, name, value)
    return cfg


@torch.no_grad()
def _checksum(*modules) -> float:
    """The sum of the modules' parameters (batch-norm statistics are each rank's own)."""
    return float(sum(float(p.double().sum()) for m in modules if m is not None for p in m.parameters()))


def _gloo_workers() -> int | None:
    """How many of this process's threads are gloo workers (None off Linux)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as fh:
                names.append(fh.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sum(name == "pt_gloo_runloop" for name in names)


def main(out: str, *specs: str) -> None:
    image, reference = load_sample_volume()
    image, reference = image.data[28:52].astype(np.float32), reference.data[28:52]
    pair = AnnotatedPair(image, reveal_slices(reference, [6, 17], 0))
    for spec in specs:
        name, _, steps = spec.partition(":")
        method, _, prior = name.partition("+")
        cfg = _config(method, int(steps))
        if prior:
            cfg.prior.mode, cfg.prior.interpolation = "targets", "sdf"
        trainer = Trainer(cfg, [pair], device=torch.device("cpu"), out_dir=Path(out) / name)
        crops = []
        sample = trainer.dataset.sample_batch

        def recording(rng, device, _sample=sample, _crops=crops, **kwargs):
            batch = _sample(rng, device, **kwargs)
            _crops.append(hashlib.sha1(batch.x_l.numpy().tobytes()).hexdigest())
            return batch

        trainer.dataset.sample_batch = recording
        finished = run_sync(trainer.run(previews=False))
        record = {
            "rank": trainer.dist.rank, "world_size": trainer.dist.world_size, "writes": trainer.out_dir is not None,
            "reason": finished.reason, "error": finished.error, "steps": trainer.step,
            "totals": [h["total"] for h in trainer.history], "crops": crops,
            "weights": _checksum(trainer.model, trainer.method.modules, trainer.method.teacher),
        }
        path = Path(out) / f"{name}_rank{trainer.dist.rank}.json"
        path.write_text(json.dumps(record), encoding="utf-8")
    rank, training = trainer.dist.rank, _gloo_workers()
    del trainer, sample, recording
    shutdown()  # what a CLI command does at its end (and atexit does for a script)
    threads = {"training": training, "after_shutdown": _gloo_workers()}
    (Path(out) / f"threads_rank{rank}.json").write_text(json.dumps(threads), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
