"""The Train dock's presenter: trainer events -> progress bar, text lines and layers.

Listens to :class:`.model.TrainRun` (``event_received``, on the Qt thread) and shows each
event: the progress bar, step/ETA, losses, validation Dice, the status line, the
'<image> prediction' / '<image> entropy' layers and the method's review layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from napari.layers import Labels
from napari.utils import notifications
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from ...engine import describe_device
from ...engine.events import Checkpointed, DataUpdated, Evaluated, Finished, Notice, Preview, Reviewed, Started, StepDone
from .. import _layers
from .model import TrainRun, format_seconds

log = logging.getLogger(__name__)


class RunPresenter(QWidget):
    """Progress bar and the run's text lines; draws the events into the viewer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    run : TrainRun
        The model whose events are shown.
    class_names : callable
        ``class_names() -> {label value: name}`` of the classes in the dock's table.
    refreshed : callable
        ``refreshed()``: called after the last pair's prediction of a refresh was drawn while
        training runs (the dock hands the trainer new labels and the slice to review then).
    """

    def __init__(self, viewer, run: TrainRun, *, class_names: Callable[[], dict], refreshed: Callable[[], None],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.run = run
        self._class_names = class_names
        self._refreshed = refreshed
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%p%")
        layout.addWidget(self.progress_bar)
        self.eta_label = QLabel("")
        self.loss_label = QLabel("")
        self.dice_label = QLabel("")
        self.status_label = QLabel("Paint a few slices (two classes at least), then press Train.")
        self.review_label = QLabel("")  # which slice the review layers show
        for label in (self.eta_label, self.loss_label, self.dice_label, self.status_label, self.review_label):
            label.setWordWrap(True)  # long lines wrap: the dock is never widened by a message
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            layout.addWidget(label)
        run.event_received.connect(self.show_event)
        run.run_starting.connect(self._on_run_starting)

    # --- a run starts ----------------------------------------------------------------------
    def _on_run_starting(self, trainer) -> None:
        self.prepare_output_layers(trainer)
        self.dice_label.setText("Validation Dice: mark a painted slice for validation to see it")

    def prepare_output_layers(self, trainer, images=None) -> None:
        """Create the prediction/entropy layers and the method's review layers (patch
        entropy, sampled pixels) now, empty, not in the middle of training (of the run's
        images, or of ``images``: those that just joined the run).

        Adding a layer costs napari a noticeable pause (visuals, shaders, layer controls:
        0.1-1 s measured by ``bench ui``); paying it when Train is pressed keeps the viewer
        smooth while the user paints during training. The refreshes then write into them.
        """
        from ...data import decoded_dtype

        dtype = decoded_dtype(trainer.dataset.class_values)
        wanted = set(getattr(trainer.method, "review_layers", ()))
        axis, k = trainer.config.data.axis, len(trainer.dataset.class_values)
        for image in [image for image, _ in self.run.run_layers] if images is None else images:
            if image.multiscale:
                continue  # a slide: its prediction pyramid arrives with the first refresh
            shape = _layers.spatial_shape(image)
            # until the run's first Preview (with the painted-slice prior: the filled shape, sent
            # as soon as the training thread has computed it) a layer there already, e.g. from
            # Fill between slices, is kept; else an empty one
            existing = _layers._find(self.viewer, f"{image.name}{_layers.PREDICTION_SUFFIX}", Labels)
            if existing is None or tuple(existing.data.shape) != tuple(shape) or existing.multiscale:
                _layers.show_prediction(self.viewer, image, np.zeros(shape, dtype=dtype))
            _layers.show_entropy(self.viewer, image, np.zeros(shape, dtype=np.float32))
            if "patch_entropy" in wanted:
                maps = np.zeros((k, *_layers.slice_shape(image, axis)), np.float32)
                _layers.show_patch_entropy(self.viewer, image, maps, 0, axis)
            if "sampled_pixels" in wanted:
                _layers.show_sampled_pixels(self.viewer, image, np.zeros((0, 2)), np.zeros(0, np.int64), 0, axis)

    def starting(self, device: str) -> None:
        """The worker is being started on ``device``."""
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Starting on {device}...")

    # --- events ----------------------------------------------------------------------------
    def show_event(self, event) -> None:
        """One trainer event, on the Qt thread."""
        if isinstance(event, StepDone):
            self.progress_bar.setValue(int(round(1000 * min(max(event.fraction, 0.0), 1.0))))
            eta = "" if event.eta_s is None else f" · ETA {format_seconds(event.eta_s)}"
            self.eta_label.setText(f"step {event.step} · {format_seconds(event.elapsed_s)} elapsed{eta}")
            self.loss_label.setText("loss: " + " · ".join(f"{k} {v:.4f}" for k, v in event.losses.items()))
        elif isinstance(event, Preview):
            self._on_preview(event)
        elif isinstance(event, Reviewed):
            self._on_reviewed(event)
        elif isinstance(event, Evaluated):
            self._on_evaluated(event)
        elif isinstance(event, Started):
            self._show_summary(event.device, event.summary)
        elif isinstance(event, DataUpdated):
            trainer = self.run.trainer
            self._show_summary(describe_device(trainer.device, trainer.num_threads), event.summary)
        elif isinstance(event, Notice):
            show = notifications.show_warning if event.level == "warning" else notifications.show_info
            show(event.text)
        elif isinstance(event, Checkpointed):
            self.status_label.setText(f"step {event.step}: checkpoint saved to {event.path}")
        elif isinstance(event, Finished):
            self._on_finished(event)

    def _on_preview(self, event: Preview) -> None:
        run_layers = self.run.run_layers
        if not 0 <= event.pair_index < len(run_layers):
            return
        image = run_layers[event.pair_index][0]
        if image not in self.viewer.layers:
            return  # the user removed the image: nothing to draw on
        if event.kind == "prediction":
            layer = _layers.show_prediction(self.viewer, image, event.array)
            names = self._class_names()
            if names:
                _layers.apply_class_names(layer, names)
            if event.pair_index == len(run_layers) - 1 and self.run.running and not self.run.stopping:
                self._refreshed()  # labels painted meanwhile join now; the slice in view is reviewed
        elif event.kind == "entropy":
            _layers.show_entropy(self.viewer, image, event.array)

    def _on_reviewed(self, event: Reviewed) -> None:
        run_layers, trainer = self.run.run_layers, self.run.trainer
        if not 0 <= event.pair_index < len(run_layers) or trainer is None:
            return
        image = run_layers[event.pair_index][0]
        if image not in self.viewer.layers:
            return
        axis = trainer.config.data.axis
        shown = []
        maps = event.arrays.get("patch_entropy")
        if maps is not None:
            _layers.show_patch_entropy(self.viewer, image, maps, event.slice_index, axis)
            shown.append(f"patch entropy of {maps.shape[0]} classes")
        pixels = event.arrays.get("sampled_pixels")
        if pixels is not None:
            classes = event.arrays.get("sampled_classes")
            _layers.show_sampled_pixels(self.viewer, image, pixels, classes, event.slice_index, axis)
            shown.append(f"{len(pixels)} sampled pixels")
        if shown:
            self.review_label.setText(
                f"Review of '{image.name}' slice {event.slice_index} at step {event.step}: {', '.join(shown)}"
            )

    def _on_evaluated(self, event: Evaluated) -> None:
        m = event.metrics
        per_class = m.get("dice_per_class", {})
        names = self.run.class_names
        detail = ", ".join(
            f"{names.get(int(v), v)} {d:.3f}" for v, d in per_class.items()
            if not (isinstance(d, float) and math.isnan(d))
        )
        self.dice_label.setText(
            f"Validation Dice {m.get('dice', float('nan')):.3f} at step {event.step} "
            f"({m.get('slices', 0)} slice(s)){': ' + detail if detail else ''}"
        )

    def _show_summary(self, device: str, summary: dict) -> None:
        self.status_label.setText(
            f"Device: {device} · {summary.get('unit', 'slices')}: {summary.get('labelled', 0)} labelled, "
            f"{summary.get('unlabelled', 0)} unlabelled, {summary.get('validation', 0)} validation"
        )

    def _on_finished(self, event: Finished) -> None:
        if event.reason == "error":
            notifications.show_error(f"Training stopped by an error: {event.error}")
            self.status_label.setText(f"Error at step {event.step}: {event.error}")
            return
        if event.reason == "budget":
            self.progress_bar.setValue(1000)
        where = f"; checkpoint: {event.checkpoint}" if event.checkpoint else ""
        verb = "Stopped" if event.reason == "stopped" else "Finished"
        self.status_label.setText(f"{verb} at step {event.step} after {format_seconds(event.seconds)}{where}")
