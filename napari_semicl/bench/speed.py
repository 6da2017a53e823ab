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


#: ``compare_defaults``' variants: (name, model.precision, channels_last, threads) where
#: threads 'one' is one thread (the dock's until issue 26), 'all' every core of the process,
#: 'default' the CLI's and the benchmarks' count now (the idle cores,
#: :func:`~napari_semicl.engine.device.default_cpu_threads`) and 'gui' the dock's
#: (:func:`~napari_semicl.engine.device.gui_thread_count`)
COMPARE_VARIANTS = (
    ("today", "fp32", False, "one"),
    ("bf16", "bf16", False, "one"),
    ("channels_last", "fp32", True, "one"),
    ("bf16+channels_last", "bf16", True, "one"),
    ("threads", "fp32", False, "all"),
    ("new_default", "auto", True, "default"),
    ("new_default_all_cores", "auto", True, "all"),
    ("new_default_dock", "auto", True, "gui"),
)


def _memory_format(trainer, channels_last: bool) -> None:
    """Put the trainer's network (and teacher) in channels_last or contiguous format, in place."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in (trainer.model, getattr(trainer.method, "teacher", None)):
        if module is not None:
            module.to(memory_format=fmt)


def compare_defaults(*, image=None, reference=None, method: str = "recommended", rounds: int = 3, steps: int = 4,
                     device=None, inference_slices: int = 32, variants=COMPARE_VARIANTS) -> dict:
    """Training steps and inference per minute of today's default (fp32, contiguous, one
    thread) against the new defaults and each factor alone, in one process.

    Every variant gets its own trainer on the same data (``method``: 'recommended', the Train
    dock's default, or a registered method) and the variants take turns: ``rounds`` rounds,
    each a warm-up step and ``steps`` timed steps per variant, then one whole-volume
    prediction of the first ``inference_slices`` slices per variant, so that a change in the
    machine's load (it is shared) falls on every variant alike. Wall-clock seconds (what a
    user waits) and this process's CPU seconds (``time.process_time``: all its threads) are
    both recorded; the load average before and after says how busy the machine was. The
    baseline (the first variant) predicts as before batch normalisation was folded into the
    convolutions for prediction and steps AdamW's loop over the parameters; the others
    predict folded and step the fused AdamW, as the plugin does now.
    """
    import os

    from ..engine.config import recommended_config
    from ..engine.device import cpu_thread_count, default_cpu_threads, gui_thread_count, set_threads
    from ..engine.precision import make_optimizer, resolve_precision

    device = device or pick_device()
    if image is None:
        from ..io.sample import load_sample_volume

        img, ref = load_sample_volume()
        image, reference = img.data, ref.data
    n = reference.shape[0]
    painted = reveal_slices(reference, [n // 4, n // 2, 3 * n // 4], 0)
    counts = {"one": 1, "all": cpu_thread_count(), "default": default_cpu_threads(), "gui": gui_thread_count()}
    before = os.getloadavg()
    trainers, rows = {}, {}
    for name, setting, last, threads in variants:
        cfg = recommended_config() if method == "recommended" else TrainConfig(method=method)
        cfg.iterations, cfg.refresh_every, cfg.seed = 10**6, 10**9, 0
        cfg.data.unpainted = "background"
        cfg.model.precision = setting
        trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=device)
        _memory_format(trainer, last)
        baseline = name == variants[0][0]
        if baseline:  # today's optimiser: AdamW's loop over the parameters, not the fused kernel
            trainer.optimizer = make_optimizer(trainer.optimizer.param_groups[0]["params"], cfg.optim, device,
                                               fused=False)
        trainers[name] = trainer
        rows[name] = {"precision": resolve_precision(setting, device).describe(), "channels_last": last,
                      "threads": counts[threads], "batch_norm_folded": not baseline,  # the baseline: today's
                      "optimizer": "AdamW" + ("" if baseline or not trainer.optimizer.defaults.get("fused")
                                              else " (fused)"),
                      "step_wall_s": [], "step_cpu_s": [], "inference_wall_s": [],
                      "inference_cpu_s": []}
    sub = image[:inference_slices]
    try:
        for r in range(rounds):
            for name, row in rows.items():
                trainer = trainers[name]
                set_threads(row["threads"])
                for _ in range(2 if r == 0 else 1):
                    trainer.train_step()  # warm-up (the prior's fill is built at the first)
                for _ in range(steps):
                    _sync(device)
                    w0, c0 = time.perf_counter(), time.process_time()
                    trainer.train_step()
                    _sync(device)
                    row["step_wall_s"].append(time.perf_counter() - w0)
                    row["step_cpu_s"].append(time.process_time() - c0)
            for name, row in rows.items():
                set_threads(row["threads"])
                model = trainers[name].method.inference_model()
                fold = row["batch_norm_folded"]
                if r == 0:
                    predict_volume(model, sub[:4], class_values=trainers[name].dataset.class_values, device=device,
                                   fold=fold)
                w0, c0 = time.perf_counter(), time.process_time()
                predict_volume(model, sub, class_values=trainers[name].dataset.class_values, device=device,
                               fold=fold)
                _sync(device)
                row["inference_wall_s"].append(time.perf_counter() - w0)
                row["inference_cpu_s"].append(time.process_time() - c0)
            log.info("round %d of %d done", r + 1, rounds)
    finally:
        set_threads(default_cpu_threads())
    for row in rows.values():
        wall, cpu = statistics.median(row["step_wall_s"]), statistics.median(row["step_cpu_s"])
        iw, ic = statistics.median(row["inference_wall_s"]), statistics.median(row["inference_cpu_s"])
        row.update({"steps_per_minute": 60.0 / wall, "steps_per_cpu_minute": 60.0 / cpu,
                    "step_wall_s_median": wall, "step_cpu_s_median": cpu,
                    "step_wall_s_spread": [min(row["step_wall_s"]), max(row["step_wall_s"])],
                    "inference_slices_per_minute": 60.0 * len(sub) / iw,
                    "inference_slices_per_cpu_minute": 60.0 * len(sub) / ic,
                    "inference_wall_s_spread": [min(row["inference_wall_s"]), max(row["inference_wall_s"])]})
    base = rows[variants[0][0]]
    for row in rows.values():
        for key in ("steps_per_minute", "steps_per_cpu_minute", "inference_slices_per_minute",
                    "inference_slices_per_cpu_minute"):
            row[f"{key}_x"] = row[key] / base[key]
    return {"protocol": "speed_compare", "method": method, "device": describe_device(device),
            "machine": machine_info(), "cpu_bf16": resolve_precision("auto", device).name == "bf16",
            "volume_shape": list(image.shape), "inference_slices": int(len(sub)),
            "patch_size": trainers[variants[0][0]].config.data.patch_size,
            "batch_labelled": trainers[variants[0][0]].config.data.batch_labelled,
            "rounds": rounds, "steps_per_round": steps, "thread_counts": counts, "load_average_before": list(before),
            "load_average_after": list(os.getloadavg()), "baseline": variants[0][0], "variants": rows}
