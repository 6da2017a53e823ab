"""``napari-semicl bench ui``: event-loop latency of a real napari viewer, idle and training.

A QTimer fires every ``interval_ms``; its lateness (actual minus expected interval) is the
time the Qt thread was blocked. Run under a display (Xvfb on a headless machine):

    python -m napari_semicl.widgets.ui_probe --out ui.json --seconds 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger(__name__)


#: Lateness (ms) above which a tick counts as a stall (the review docks' criterion).
STALL_MS = 100.0


def _percentiles(lateness_ms: list[float], times_s: list[float] | None = None) -> dict:
    arr = np.asarray(lateness_ms) if lateness_ms else np.zeros(1)
    out = {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
           "max_ms": float(arr.max()), "samples": len(lateness_ms),
           f"over_{STALL_MS:.0f}ms": int(np.count_nonzero(arr > STALL_MS))}
    if times_s is not None and lateness_ms:
        worst = np.argsort(arr)[::-1][:5]
        out["worst"] = [{"t_s": round(float(times_s[i]), 3), "ms": round(float(arr[i]), 1)} for i in worst]
    return out


def _proc_counters(tid: int | None) -> tuple[float, float, float] | None:
    """(ms the thread ``tid`` ran on a CPU, ms it waited for one, ms of CPU the host stole)
    so far, from Linux's /proc; None elsewhere."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as fh:
            run_ns, wait_ns = (int(v) for v in fh.read().split()[:2])
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        steal_ms = int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    except (OSError, ValueError, TypeError):
        return None
    return run_ns / 1e6, wait_ns / 1e6, steal_ms


class StallTracer:
    """A watchdog thread that records the Qt thread's Python stack while it is blocked.

    The probe calls :meth:`tick` at every timer shot; when no tick came for ``threshold_ms``
    the watchdog takes the main thread's stack (``sys._current_frames``) once per stall.
    The stacks name what blocked the event loop (the watchdog needs the GIL, so a stack is
    taken when the blocking code next lets go of it: a frame inside the culprit or just after).

    On Linux each stall also gets, from the scheduler's counters sampled every
    ``period_s``, how long the Qt thread ran on a CPU (``qt_cpu_ms``: its own work, Python or
    C++), how long it was runnable but waited for a core (``qt_runqueue_ms``: the cores were
    busy with other threads or processes) and how much CPU the host stole from this machine
    (``steal_ms``); the rest of the stall the thread slept: waiting for the GIL, a lock or the
    X server. The counters span the watchdog's samples around the stall (up to
    ``period_s`` wider on each side).
    """

    def __init__(self, threshold_ms: float = 80.0, depth: int = 12, period_s: float = 0.02) -> None:
        import threading

        self.threshold_s = threshold_ms / 1000
        self.depth = depth
        self.period_s = period_s
        self.main_id = threading.main_thread().ident
        self.main_native_id = threading.main_thread().native_id
        self.stacks: list[dict] = []
        self._last = time.perf_counter()
        self._taken = False
        self._stall_start = 0.0
        self._stall_end: float | None = None
        self._history: list[tuple[float, tuple[float, float, float] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="semicl-stall-tracer", daemon=True)

    def tick(self) -> None:
        self._last = time.perf_counter()
        if self._taken:  # the first tick after a recorded stall: its end
            self._stall_end = self._last
        self._taken = False

    def start(self) -> None:
        self.tick()
        self._thread.start()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(1.0)
        return self.stacks

    def _counters_over(self, start: float, end: float) -> dict:
        """Deltas of the scheduler counters from the last sample before ``start`` to the first
        after ``end``."""
        before = [c for t, c in self._history if t <= start and c is not None]
        after = [c for t, c in self._history if t >= end and c is not None]
        if not before or not after:
            return {}
        (r0, w0, s0), (r1, w1, s1) = before[-1], after[0]
        return {"qt_cpu_ms": round(r1 - r0, 1), "qt_runqueue_ms": round(w1 - w0, 1), "steal_ms": round(s1 - s0, 1)}

    def _watch(self) -> None:
        import traceback

        pending: dict | None = None  # the last stall, until it ended and its counters are in
        while not self._stop.wait(self.period_s):
            now = time.perf_counter()
            self._history.append((now, _proc_counters(self.main_native_id)))
            del self._history[:-200]
            end = self._stall_end
            if pending is not None and end is not None and now >= end + self.period_s:
                # the stall ended, and a sample after its end is in
                pending["stall_ms"] = round((end - self._stall_start) * 1000, 1)
                pending.update(self._counters_over(self._stall_start, end))
                pending = None
            blocked = now - self._last
            if blocked > self.threshold_s and not self._taken:
                frame = sys._current_frames().get(self.main_id)
                if frame is None:
                    continue
                self._stall_start, self._stall_end = self._last, None
                self._taken = True
                lines = [f"{fs.filename.rsplit('site-packages/', 1)[-1]}:{fs.lineno} {fs.name}"
                         for fs in traceback.extract_stack(frame)[-self.depth:]]
                pending = {"blocked_ms": round(blocked * 1000, 1), "stack": lines}
                self.stacks.append(pending)


class LatencyProbe:
    """Records how late a repeating QTimer fires (ms) while the event loop runs."""

    def __init__(self, interval_ms: int = 10, tracer: StallTracer | None = None) -> None:
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        self.tracer = tracer
        self.lateness_ms: list[float] = []
        self.times_s: list[float] = []
        self._last = None
        self._t0 = 0.0
        self.running = False
        self._timer = QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._on_timeout)

    def _on_timeout(self) -> None:
        now = time.perf_counter()
        if self.tracer is not None:
            self.tracer.tick()
        if self._last is not None:
            self.lateness_ms.append(max(0.0, (now - self._last) * 1000 - self.interval_ms))
            self.times_s.append(now - self._t0)
        self._last = now

    def start(self) -> None:
        self.lateness_ms, self.times_s, self._last = [], [], None
        self._t0 = time.perf_counter()
        self.running = True
        self._timer.start()

    def stop(self) -> dict:
        self.running = False
        self._timer.stop()
        return _percentiles(self.lateness_ms, self.times_s)


def spin_events(duration: float) -> None:
    """Run the Qt event loop for ``duration`` seconds (the probe's timer fires meanwhile)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


def train_dock_on(viewer, image, labels, *, method: str, iterations: int, refresh_every: int):
    """A Train dock docked in ``viewer``, set to train ``method`` on (image, labels) with
    unpainted pixels as background, for ``iterations`` steps, refreshing every
    ``refresh_every``; not started."""
    from .train import TrainWidget

    dock = TrainWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Train")
    dock.set_pair(0, image, labels)
    dock.method_combo.setCurrentText(method)
    dock.budget_combo.setCurrentText("iterations")
    dock.iterations_spin.setValue(iterations)
    dock.refresh_spin.setValue(refresh_every)
    dock.background_check.setChecked(True)
    return dock


def run_probe(*, seconds: float = 20.0, method: str = "mean_teacher", refresh_every: int = 20,
              interval_ms: int = 10, review_docks: bool = False, image_path=None, reference_path=None,
              trace_stalls: bool = False, idle_seconds: float | None = None) -> dict:
    """Open napari with the sample and the Train dock; probe idle, then while training.

    ``review_docks`` also opens the review docks (pseudo-labels, annotate next with the
    teacher/student disagreement at each refresh, t-SNE every ``2 * refresh_every`` steps,
    curves) so that they all refresh while the probe runs. ``image_path`` and
    ``reference_path`` replace the sample (3 slices of the reference revealed).
    ``trace_stalls`` adds the Qt thread's stack during each stall (:class:`StallTracer`).
    """
    import napari

    from ..data.reveal import choose_reveal_slices, reveal_slices
    from ..io._npe2 import sample_volume

    viewer = napari.Viewer(show=True)
    if image_path is not None:
        from ..io import read_image, read_labels

        img = read_image(image_path)
        ref_data = read_labels(reference_path).data
        img_kw = {"name": img.name, "scale": img.scale, "metadata": img.metadata}
        img_data = img.data
    else:
        (img_data, img_kw, _), (ref_data, _, _) = sample_volume()[:2]
    image = viewer.add_image(img_data, **{k: v for k, v in img_kw.items() if k != "rgb"})
    revealed = choose_reveal_slices(ref_data, 3, 0)
    labels = viewer.add_labels(reveal_slices(ref_data, revealed, 0), name="painted", scale=image.scale,
                               metadata=dict(image.metadata))
    dock = train_dock_on(viewer, image, labels, method=method, iterations=100000, refresh_every=refresh_every)
    counts = {"previews": 0, "analysed": 0, "tsne_done": 0}
    review = {}
    if review_docks:
        from ..engine.events import Analysed, Preview
        from .curves_widget import CurvesWidget
        from .feature_plot import FeaturePlotWidget
        from .review_widget import ReviewWidget
        from .suggest_widget import SuggestWidget

        for cls in (ReviewWidget, SuggestWidget, FeaturePlotWidget, CurvesWidget):
            # docked side by side (not tabbed): every dock is visible, so every one redraws
            review[cls.__name__] = cls(viewer, dock)
            viewer.window.add_dock_widget(review[cls.__name__], name=cls.__name__,
                                          area="right" if cls in (ReviewWidget, SuggestWidget) else "bottom")
        review["SuggestWidget"].disagreement_check.setChecked(True)
        review["FeaturePlotWidget"].every_spin.setValue(2 * refresh_every)
        review["FeaturePlotWidget"].points_spin.setValue(1000)

        def count(event) -> None:
            counts["previews"] += isinstance(event, Preview)
            counts["analysed"] += isinstance(event, Analysed)

        dock.event_received.connect(count)
        done = review["FeaturePlotWidget"]._on_tsne_done

        def counted_done(*args) -> None:
            counts["tsne_done"] += 1
            done(*args)
            mark("t-SNE done")

        review["FeaturePlotWidget"]._on_tsne_done = counted_done
    tracer = StallTracer() if trace_stalls else None
    probe = LatencyProbe(interval_ms, tracer)
    timeline: list[dict] = []  # what happened when (seconds from the probe's start), for the stalls

    def mark(what: str) -> None:
        if probe.running:
            timeline.append({"t_s": round(time.perf_counter() - probe._t0, 3), "what": what})

    gc_start = {}

    def on_gc(phase: str, info: dict) -> None:  # in whichever thread collects (it holds the GIL)
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            ms = (time.perf_counter() - gc_start.pop("t")) * 1000
            if ms > 20:
                mark(f"gc generation {info.get('generation')} {ms:.0f} ms")

    if trace_stalls:
        import gc

        gc.callbacks.append(on_gc)
    viewer.layers.events.inserted.connect(lambda e: mark(f"layer added: {e.value.name}"))
    try:  # a resized canvas is redrawn whole (napari's private attributes: best effort)
        viewer.window._qt_viewer.canvas._scene_canvas.events.resize.connect(
            lambda e: mark(f"canvas resized to {tuple(e.size)}"))
    except AttributeError:
        log.info("canvas resizes are not in the timeline (napari's canvas has changed)")
    for name, widget in review.items():
        if hasattr(widget, "view"):
            widget.view.rendered.connect(lambda _info, n=name: mark(f"figure shown: {n}"))
    dock.event_received.connect(lambda e: mark(type(e).__name__ + (f" {e.kind}" if hasattr(e, "kind") else "")))
    spin_events(1.0)
    probe.start()
    spin_events(seconds if idle_seconds is None else idle_seconds)
    idle = probe.stop()
    if not dock.start_training():
        raise RuntimeError("the Train dock refused to start (see the notification)")
    spin_events(2.0)  # start-up (first refresh) is reported separately from the steady state
    probe.start()
    if tracer is not None:
        tracer.start()
    spin_events(seconds)
    training = probe.stop()
    if tracer is not None:
        training["stall_stacks"] = tracer.stop()
        training["timeline"] = [e for e in timeline if not e["what"].startswith("StepDone")]
    steps = dock.trainer.step
    during = dict(counts)
    t0 = time.perf_counter()
    dock.stop_training()
    while dock.is_training and time.perf_counter() - t0 < 60:
        spin_events(0.05)
    stop_s = time.perf_counter() - t0
    result = {"idle": idle, "training": training, "method": method, "refresh_every": refresh_every,
              "interval_ms": interval_ms, "seconds_per_phase": seconds, "steps_during_probe": steps,
              "stop_s": stop_s, "training_threads": dock.num_threads,
              "image_shape": list(image.data.shape), "review_docks": review_docks}
    if review_docks:
        result["review_events_during_probe"] = during
    dock.shutdown()
    viewer.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="napari-semicl bench ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--method", default="mean_teacher")
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, help="length of the idle phase (default: --seconds)")
    parser.add_argument("--review-docks", action="store_true", help="also open the review docks, refreshing")
    parser.add_argument("--image", help="an image file instead of the sample")
    parser.add_argument("--reference", help="its reference labels (3 slices are revealed)")
    parser.add_argument("--trace-stalls", action="store_true",
                        help="record the Qt thread's stack whenever it is blocked (diagnosis)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = run_probe(seconds=args.seconds, method=args.method, refresh_every=args.refresh_every,
                       review_docks=args.review_docks, image_path=args.image, reference_path=args.reference,
                       trace_stalls=args.trace_stalls, idle_seconds=args.idle_seconds)
    from ..bench.common import machine_info

    result["machine"] = machine_info()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
