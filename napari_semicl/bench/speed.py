"""``bench speed``: step time per method, achieved FLOP/s against a measured matmul peak,
and whole-volume inference throughput and peak memory. All figures from one process run."""

from __future__ import annotations

import logging
import statistics
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data import AnnotatedPair
from ..data.reveal import reveal_slices
from ..engine import TrainConfig, Trainer, describe_device, pick_device
from ..engine.inference import predict_volume
from ..methods import available_methods
from .common import machine_info

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, *, n: int = 2048, repeats: int = 10) -> float:
    """Best achieved FLOP/s of an n x n float32 matmul on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(2):
        a @ b
    _sync(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _PeakRSS:
    """Samples the process RSS in a thread; ``peak - start`` is the extra memory used."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def speed(*, methods=None, image=None, reference=None, patch_size: int = 128, batch: int = 4,
          steps: int = 10, warmup: int = 2, device=None, threads: int | None = None, spatial_dims: int = 2,
          patch_depth: int = 0) -> dict:
    """Measure every method's step and the whole-volume inference on ``image``.

    Defaults to the bundled sample volume with three revealed slices. ``spatial_dims = 3``
    times the 3D network on (patch_depth or patch_size, patch_size, patch_size) patches.
    """
    device = device or pick_device()
    if threads:
        torch.set_num_threads(threads)
    if image is None:
        from ..io.sample import load_sample_volume

        img, ref = load_sample_volume()
        image, reference = img.data, ref.data
    methods = list(methods or available_methods())
    painted = reveal_slices(reference, [reference.shape[0] // 4, reference.shape[0] // 2, 3 * reference.shape[0] // 4], 0)
    out = {"device": describe_device(device), "machine": machine_info(), "patch_size": patch_size,
           "spatial_dims": spatial_dims, "patch_depth": patch_depth,
           "batch_labelled": batch, "batch_unlabelled": batch, "threads": torch.get_num_threads(),
           "volume_shape": list(image.shape), "methods": {}}
    out["matmul_peak_flops"] = matmul_peak(device)
    runs = [(name, name, batch) for name in methods]
    if "supervised" in methods:
        # "equal batch": supervised on as many images per step as the semi-supervised methods
        runs.insert(methods.index("supervised") + 1, ("supervised_equal_batch", "supervised", 2 * batch))
    for label, name, n_labelled in runs:
        cfg = TrainConfig(method=name, iterations=10**6, refresh_every=10**9, seed=0)
        cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = patch_size, n_labelled, batch
        cfg.data.unpainted = "background"
        cfg.model.spatial_dims, cfg.data.patch_depth = spatial_dims, patch_depth
        cfg.forced += ["data.patch_size", "data.patch_depth", "data.batch_labelled", "data.batch_unlabelled"]
        section = getattr(cfg, name, None)
        if section is not None and hasattr(section, "warmup_steps"):
            section.warmup_steps = 0  # time the full loss, contrastive terms included
        trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=device)
        for _ in range(warmup):
            trainer.train_step()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step()
        flops = counter.get_total_flops()
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        out["methods"][label] = {"batch_labelled": n_labelled, "step_s_median": median, "step_s_all": times, "flops_per_step": flops,
                                "achieved_flops": flops / median,
                                "fraction_of_matmul_peak": flops / median / out["matmul_peak_flops"]}
        log.info("%s: %.3f s/step, %.2f GFLOP/s", label, median, flops / median / 1e9)
    base = out["methods"].get("supervised", {}).get("step_s_median")
    equal = out["methods"].get("supervised_equal_batch", {}).get("step_s_median")
    for row in out["methods"].values():
        row["ratio_to_supervised"] = row["step_s_median"] / base if base else None
        row["ratio_to_supervised_equal_batch"] = row["step_s_median"] / equal if equal else None
    # whole-volume inference with the last trained network
    model = trainer.method.inference_model()
    predict_volume(model, image[:4], class_values=trainer.dataset.class_values, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS() as rss:
        _sync(device)
        t0 = time.perf_counter()
        predict_volume(model, image, class_values=trainer.dataset.class_values, device=device)
        _sync(device)
        seconds = time.perf_counter() - t0
    out["inference"] = {
        "seconds": seconds, "slices": int(image.shape[0]), "slices_per_s": image.shape[0] / seconds,
        "peak_rss_increase_mb": (rss.peak - rss.start) / 2**20,
        "peak_rss_mb": rss.peak / 2**20,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    return out
