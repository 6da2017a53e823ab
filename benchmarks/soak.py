"""Soak benchmark: train for a long time in a real napari viewer with the UI probe running.

A user session, compressed: the bundled sample volume in napari, the Train dock training
``--method`` with whole-volume refreshes every ``--refresh-every`` steps and autosave every
``--checkpoint-minutes``, while a script acts like a user once per window (moves the slice
slider, which asks for a review of the slice in view, and paints a stroke on a new slice,
which the dock hands to the trainer at the next refresh). Every ``--window`` seconds it
records the Qt event loop's lateness (p50/p99/max of a 10 ms QTimer), the process's
resident memory (RSS), the count of Python objects, the number of layers and the training
steps done. The JSON is rewritten after every window, so a run cut short keeps its data.

Run under a display (Xvfb on a headless machine), niced on a shared machine::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 xvfb-run -a \
        python benchmarks/soak.py --minutes 60 --out docs/results/soak.json

The summary gives RSS growth as a least-squares slope (MB per hour) over the windows after
``--warmup-minutes``, and the latency of the first and last quarter of those windows.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("soak")


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def summarise(windows: list[dict], warmup_s: float) -> dict:
    """RSS slope (MB/h) after warm-up, and latency of the first vs last quarter of windows."""
    steady = [w for w in windows if w["t_end_s"] >= warmup_s] or windows
    out: dict = {"windows": len(windows), "steady_windows": len(steady)}
    if not steady:
        return out
    t = np.array([w["t_end_s"] for w in steady]) / 3600.0
    rss = np.array([w["rss_mb"] for w in steady])
    out["rss_start_mb"] = float(windows[0]["rss_mb"])
    out["rss_steady_first_mb"] = float(rss[0])
    out["rss_end_mb"] = float(rss[-1])
    out["rss_max_mb"] = float(max(w["rss_mb"] for w in windows))
    out["rss_slope_mb_per_h"] = float(np.polyfit(t, rss, 1)[0]) if len(steady) >= 3 else None
    q = max(1, len(steady) // 4)
    for name, part in (("first_quarter", steady[:q]), ("last_quarter", steady[-q:])):
        out[f"latency_{name}"] = {
            "p50_ms": float(np.median([w["latency"]["p50_ms"] for w in part])),
            "p99_ms": float(np.median([w["latency"]["p99_ms"] for w in part])),
            "max_ms": float(max(w["latency"]["max_ms"] for w in part)),
            "steps_per_s": float(np.mean([w["steps_per_s"] for w in part])),
        }
    out["objects_steady_first"] = steady[0]["py_objects"]
    out["objects_end"] = steady[-1]["py_objects"]
    return out


def run_soak(*, seconds: float, window_s: float, method: str, refresh_every: int,
             checkpoint_minutes: float, warmup_s: float, out: Path, run_dir: Path) -> dict:
    import napari

    from napari_semicl.bench.common import machine_info
    from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
    from napari_semicl.engine.events import Checkpointed, Finished, Notice
    from napari_semicl.widgets.launch import add_sample_layers
    from napari_semicl.widgets.ui_probe import LatencyProbe, spin_events, train_dock_on

    viewer = napari.Viewer(show=True)
    image, reference, painted = add_sample_layers(viewer)
    revealed = choose_reveal_slices(reference.data, 3, 0)
    painted.data[:] = reveal_slices(reference.data, revealed, 0)
    painted.refresh()
    dock = train_dock_on(viewer, image, painted, method=method, iterations=10_000_000, refresh_every=refresh_every)
    dock.run_folder_edit.setText(str(run_dir))
    build = dock.build_config

    def build_with_autosave():
        cfg = build()
        cfg.checkpoint_minutes = checkpoint_minutes
        return cfg

    dock.build_config = build_with_autosave
    probe = LatencyProbe(10)
    spin_events(1.0)
    probe.start()
    spin_events(min(window_s, 30.0))
    idle = probe.stop()
    counts = {"checkpoints": 0, "notices": 0}
    errors: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, Checkpointed):
            counts["checkpoints"] += 1
        elif isinstance(event, Notice):
            counts["notices"] += 1
        elif isinstance(event, Finished) and event.reason == "error":
            errors.append(event.error or "")

    if not dock.start_training():
        raise RuntimeError("the Train dock refused to start (see the notification)")
    dock.worker.yielded.connect(on_event)
    trainer = dock.trainer
    rng = np.random.default_rng(0)
    n_slices = image.data.shape[0]
    t0 = time.perf_counter()
    windows: list[dict] = []
    result: dict = {
        "method": method, "refresh_every": refresh_every, "window_s": window_s,
        "checkpoint_minutes": checkpoint_minutes, "requested_s": seconds, "idle": idle,
        "training_threads": dock.num_threads, "machine": machine_info(),
        "pid": os.getpid(), "windows": windows,
    }
    last_step = trainer.step
    while time.perf_counter() - t0 < seconds and dock.is_training:
        # a user: look at another slice (a review request at the next refresh) and paint a stroke
        z = int(rng.integers(n_slices))
        viewer.dims.set_current_step(0, z)
        y, x = (int(v) for v in rng.integers(10, min(image.data.shape[1:]) - 10, size=2))
        painted.data[z, y - 2:y + 3, x - 2:x + 3] = reference.data[z, y, x] or 1
        painted.refresh()
        w0 = time.perf_counter()
        probe.start()
        spin_events(window_s)
        latency = probe.stop()
        gc_objects = len(gc.get_objects())
        step = trainer.step
        row = {
            "t_end_s": round(time.perf_counter() - t0, 2),
            "rss_mb": round(_rss_mb(), 1),
            "py_objects": gc_objects,
            "layers": len(viewer.layers),
            "step": step,
            "steps_per_s": round((step - last_step) / (time.perf_counter() - w0), 4),
            "checkpoints": counts["checkpoints"],
            "latency": latency,
        }
        last_step = step
        windows.append(row)
        log.info("t=%.0fs rss=%.0f MB step=%d p99=%.1f ms max=%.1f ms", row["t_end_s"], row["rss_mb"], step,
                 latency["p99_ms"], latency["max_ms"])
        result["summary"] = summarise(windows, warmup_s)
        result["trained_s"] = row["t_end_s"]
        _write_json(out, result)
    t_stop = time.perf_counter()
    dock.stop_training()
    while dock.is_training and time.perf_counter() - t_stop < 120:
        spin_events(0.05)
    result["stop_s"] = round(time.perf_counter() - t_stop, 3)
    result["final_step"] = trainer.step
    result["errors"] = errors
    result["notices"] = counts["notices"]
    result["checkpoint_exists"] = (run_dir / "checkpoint.pt").is_file()
    result["summary"] = summarise(windows, warmup_s)
    _write_json(out, result)
    dock.shutdown()
    viewer.close()
    return result


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training time")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per measurement window")
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--method", default="mean_teacher")
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--run-dir", help="checkpoint folder (default: a temporary folder)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="semicl-soak-"))
    result = run_soak(seconds=args.minutes * 60, window_s=args.window, method=args.method,
                      refresh_every=args.refresh_every, checkpoint_minutes=args.checkpoint_minutes,
                      warmup_s=args.warmup_minutes * 60, out=Path(args.out), run_dir=run_dir)
    print(json.dumps(result["summary"], indent=2))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
