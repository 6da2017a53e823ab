"""The "Training curves" dock: every loss by name and the validation Dice against steps.

The Train dock keeps the run's :class:`~napari_semicl.analysis.TrainingHistory` (so a dock
opened later draws the whole run); events only mark the figure out of date; a timer redraws
the figure at most once per ``REDRAW_MS`` when something changed, and the drawing itself
runs in the render process of :class:`~napari_semicl.widgets._figure.FigureView`, so the Qt
thread only copies the series and paints the finished image.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QVBoxLayout

from ..analysis import TrainingHistory
from ..analysis.plots import DICE, draw_curves  # noqa: F401 - DICE: the Dice series name, re-exported
from ..engine.events import Evaluated, StepDone
from ._figure import FigureView
from ._link import ReviewDock, StatusLabel

#: Redraw interval (ms) while new values come in.
REDRAW_MS = 1000


class CurvesWidget(ReviewDock):
    """Dock plotting the losses (log scale) and validation Dice of the current run.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    train_widget : TrainWidget, optional
    """

    def __init__(self, napari_viewer, train_widget=None) -> None:
        self._own_history = TrainingHistory()  # empty until linked to a Train dock
        self._dirty = False
        self._status = ""
        super().__init__(napari_viewer, train_widget)
        self._build_ui()
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()

    @property
    def history(self) -> TrainingHistory:
        """The Train dock's history of the current run (all its steps, also those before
        this dock was opened); empty without a Train dock."""
        train = self.train_widget
        return self._own_history if train is None else train.history

    def _replay(self) -> None:
        self._dirty = True  # the whole history so far, at the next tick
        steps = self.history.series("total")[0]
        if len(steps):
            self._status = f"steps {steps[0]}-{steps[-1]} of the current run"
        super()._replay()

    def snapshot(self) -> dict:
        """A copy of what the figure shows (built on the Qt thread, drawn in the render process)."""
        return {"series": {n: self.history.series(n) for n in self.history.names()},
                "log": self.log_check.isChecked()}

    def redraw(self, wait: bool = False) -> None:
        """Draw the history now: in the render process, or here when ``wait``."""
        self._dirty = False
        if wait:
            self.view.render_now(self.snapshot())
        else:
            self.view.submit(self.snapshot())

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        self.log_check = QCheckBox("log scale for the losses")
        self.log_check.setChecked(True)
        self.log_check.toggled.connect(self.redraw)
        layout.addWidget(self.log_check)
        # drawn with Agg in the render process: on the Qt thread a draw took 0.3-0.8 s while
        # training ran, and in a thread its Python kept napari from the GIL for 100-170 ms
        self.view = FigureView(draw_curves, min_height=220)
        self.figure = self.view.figure
        layout.addWidget(self.view, 1)
        self.status_label = StatusLabel("Curves appear when training starts.", lines=2)
        layout.addWidget(self.status_label)

    def on_train_event(self, event) -> None:
        # the Train dock records the values in its history (before passing the event on)
        if isinstance(event, StepDone):
            self._dirty = True
            # shown with the next redraw: one repaint a second, not one per step (every repaint
            # composites the whole window; with software OpenGL that alone costs 20-70 ms)
            self._status = f"step {event.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in event.losses.items())
        elif isinstance(event, Evaluated):
            self._dirty = True

    def _on_timer(self) -> None:
        if self._dirty and self.isVisible() and not self.view.busy:
            self.redraw()
            if self._status:
                self.status_label.setText(self._status)

    def closeEvent(self, event) -> None:
        self._timer.stop()
        super().closeEvent(event)
