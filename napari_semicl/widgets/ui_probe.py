"""``napari-semicl bench ui``: event-loop latency of a real napari viewer, idle and training.

A QTimer fires every ``interval_ms``; its lateness (actual minus expected interval) is the
time the Qt thread was blocked. Run under a display (Xvfb on a headless machine):

    python -m napari_semicl.widgets.ui_probe --out ui.json --seconds 30
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

log = logging.getLogger(__name__)


def _percentiles(lateness_ms: list[float]) -> dict:
    arr = np.asarray(lateness_ms) if lateness_ms else np.zeros(1)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max()), "samples": len(lateness_ms)}


class LatencyProbe:
    """Records how late a repeating QTimer fires (ms) while the event loop runs."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        self.lateness_ms: list[float] = []
        self._last = None
        self._timer = QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._on_timeout)

    def _on_timeout(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.lateness_ms.append(max(0.0, (now - self._last) * 1000 - self.interval_ms))
        self._last = now

    def start(self) -> None:
        self.lateness_ms, self._last = [], None
        self._timer.start()

    def stop(self) -> dict:
        self._timer.stop()
        return _percentiles(self.lateness_ms)


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
    from .train_widget import TrainWidget

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
              interval_ms: int = 10, review_docks: bool = False, image_path=None, reference_path=None) -> dict:
    """Open napari with the sample and the Train dock; probe idle, then while training.

    ``review_docks`` also opens the review docks (pseudo-labels, annotate next with the
    teacher/student disagreement at each refresh, t-SNE every ``2 * refresh_every`` steps,
    curves) so that they all refresh while the probe runs. ``image_path`` and
    ``reference_path`` replace the sample (3 slices of the reference revealed).
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
            review[cls.__name__] = cls(viewer, dock)
            viewer.window.add_dock_widget(review[cls.__name__], name=cls.__name__, tabify=True)
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

        review["FeaturePlotWidget"]._on_tsne_done = counted_done
    probe = LatencyProbe(interval_ms)
    spin_events(1.0)
    probe.start()
    spin_events(seconds)
    idle = probe.stop()
    if not dock.start_training():
        raise RuntimeError("the Train dock refused to start (see the notification)")
    spin_events(2.0)  # start-up (first refresh) is reported separately from the steady state
    probe.start()
    spin_events(seconds)
    training = probe.stop()
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
    parser.add_argument("--review-docks", action="store_true", help="also open the review docks, refreshing")
    parser.add_argument("--image", help="an image file instead of the sample")
    parser.add_argument("--reference", help="its reference labels (3 slices are revealed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = run_probe(seconds=args.seconds, method=args.method, refresh_every=args.refresh_every,
                       review_docks=args.review_docks, image_path=args.image, reference_path=args.reference)
    from ..bench.common import machine_info

    result["machine"] = machine_info()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
