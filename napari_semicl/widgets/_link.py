"""What the review docks share: finding the Train dock, listening to its events, asking
its trainer for analyses, and moving the viewer to a slice or pixel.

A review dock never owns a trainer: it listens to
:attr:`~napari_semicl.widgets.train.TrainWidget.event_received` and asks the Train
dock's trainer for :class:`~napari_semicl.engine.events.Analysed` results, served between
training steps while training runs (:meth:`Trainer.request_analysis`) or computed in a
worker thread when idle (:meth:`Trainer.analyse`).
"""

from __future__ import annotations

import logging

import numpy as np
from napari.utils import notifications
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QLabel, QWidget

from ..errors import SemiclError
from . import _layers
from ._worker import _RUNNING, start_worker  # noqa: F401 - the review docks' import path

log = logging.getLogger(__name__)


class StatusLabel(QLabel):
    """A word-wrapped status line of a fixed height (``lines`` lines of text).

    A label that grows and shrinks with its text re-lays out its dock at every message; when
    that dock shares a side with napari's canvas, the canvas is resized and redrawn as well
    (~0.1-0.5 s with software OpenGL). The full text is also the tooltip, for messages
    longer than the lines shown.
    """

    def __init__(self, text: str = "", lines: int = 2, parent=None) -> None:
        super().__init__(text, parent)
        self.setWordWrap(True)
        self.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        m = self.contentsMargins()
        self.setFixedHeight(lines * self.fontMetrics().lineSpacing() + m.top() + m.bottom() + 2)
        self.setToolTip(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt's name)
        super().setText(text)
        self.setToolTip(text)


#: How often a dock without a Train dock looks for one (ms).
FIND_INTERVAL_MS = 1000


def find_train_widget(viewer):
    """The first Train dock docked in ``viewer``'s window, or None."""
    from .train import TrainWidget  # imported when needed: the Train dock imports torch

    window = getattr(viewer, "window", None)
    docks = getattr(window, "dock_widgets", {}) if window is not None else {}
    for widget in list(docks.values()):
        widget = getattr(widget, "native", widget)
        if isinstance(widget, TrainWidget):
            return widget
    return None


def _dock_of(widget):
    """The QDockWidget holding ``widget`` (None when it is not docked)."""
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def watch_layers(viewer, callback, *, connect: bool = True) -> None:
    """Call ``callback`` when layers are added, removed, moved or renamed (``connect=False``
    undoes it; a dock calls that when it closes)."""
    events = viewer.layers.events
    for emitter in (events.inserted, events.removed, events.moved):
        (emitter.connect if connect else emitter.disconnect)(callback)
    for layer in viewer.layers:
        (layer.events.name.connect if connect else layer.events.name.disconnect)(callback)


def tabify_with_train_dock(widget) -> bool:
    """Put ``widget``'s dock in a tab beside the Train dock (same side of the window).

    napari stacks the docks a plugin menu opens one under the other, which squeezes the
    Train dock to a sliver on a 1000-pixel-high screen; tabs keep every dock its full
    height. Does nothing for a floating dock, without a Train dock, or when already tabbed.
    Returns True when tabified.
    """
    from qtpy.QtWidgets import QMainWindow

    try:
        own = _dock_of(widget)
        viewer = getattr(widget, "viewer", None)
        train = find_train_widget(viewer) if viewer is not None else None
        train_dock = _dock_of(train) if train is not None and train is not widget else None
        if own is None or train_dock is None or own is train_dock or own.isFloating() or train_dock.isFloating():
            return False
        window = own.parent()
        if not isinstance(window, QMainWindow) or train_dock.parent() is not window:
            return False
        if window.dockWidgetArea(own) != window.dockWidgetArea(train_dock) or own in window.tabifiedDockWidgets(train_dock):
            return False
        window.tabifyDockWidget(train_dock, own)
        own.show()
        own.raise_()
        return True
    except RuntimeError:  # a widget deleted meanwhile
        return False


def slice_index_tuple(ndim: int, axis: int, index: int) -> tuple:
    """Index of slice ``index`` along ``axis`` of an ``ndim``-D array (all of a 2D one)."""
    if ndim == 2:
        return (slice(None), slice(None))
    key = [slice(None)] * ndim
    key[axis] = int(index)
    return tuple(key)


def go_to(viewer, layer, slice_index: int, axis: int, pixel=None) -> None:
    """Move the viewer to slice ``slice_index`` of ``layer`` along data axis ``axis`` and,
    given ``pixel`` = (row, col) in that slice, centre the camera on it."""
    shape = _layers.spatial_shape(layer)
    ndim = len(shape)
    data = np.asarray([s / 2.0 for s in shape], dtype=float)
    if ndim == 3:
        data[axis] = slice_index
    in_plane = [a for a in range(ndim) if ndim == 2 or a != axis]
    if pixel is not None:
        data[in_plane[0]], data[in_plane[1]] = float(pixel[0]), float(pixel[1])
    world = np.asarray(layer.data_to_world(data), dtype=float)
    offset = viewer.dims.ndim - len(world)
    if ndim == 3:
        viewer.dims.set_point(offset + axis, world[axis])
    if pixel is not None:
        displayed = [d for d in viewer.dims.displayed if d >= offset]
        scene = getattr(viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None else viewer.camera
        camera.center = tuple(world[d - offset] for d in displayed)


class ReviewDock(QWidget):
    """Base of the review docks: the link to the Train dock and its trainer.

    Subclasses implement :meth:`on_train_event` (every trainer event, on the Qt thread,
    and the :class:`Analysed` results of :meth:`request`).

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    train_widget : TrainWidget, optional
        Found among the viewer's docks when not given (and looked for again every second
        until there is one).
    """

    def __init__(self, napari_viewer, train_widget=None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.train_widget = None
        self._find_timer = QTimer(self)
        self._find_timer.setInterval(FIND_INTERVAL_MS)
        self._find_timer.timeout.connect(self._on_find_timeout)
        if train_widget is not None:
            self.connect_train_widget(train_widget)
        elif not self._find():
            self._find_timer.start()
        # once napari has docked us (right after this constructor)
        QTimer.singleShot(0, self._on_docked)

    def _on_docked(self) -> None:
        tabify_with_train_dock(self)

    # --- the link ---------------------------------------------------------------------------
    def connect_train_widget(self, train_widget) -> None:
        """Listen to ``train_widget``'s events (replacing any previous link)."""
        self._find_timer.stop()
        if self.train_widget is train_widget:
            return
        self.disconnect_train_widget()
        self.train_widget = train_widget
        train_widget.event_received.connect(self._on_train_event)
        train_widget.run_starting.connect(self._on_run_starting)
        # a dock opened after (or during) a run shows where it is: once its UI is built
        QTimer.singleShot(0, self._replay)

    def _replay(self) -> None:
        """Hand the Train dock's newest state (:meth:`TrainWidget.replay_events`) to
        :meth:`on_train_event`; later events then come live."""
        if self.train_widget is None:
            return
        try:
            events = self.train_widget.replay_events()
        except RuntimeError:  # the Train dock was deleted meanwhile
            return
        for event in events:
            self._on_train_event(event)

    def disconnect_train_widget(self) -> None:
        if self.train_widget is not None:
            try:
                self.train_widget.event_received.disconnect(self._on_train_event)
                self.train_widget.run_starting.disconnect(self._on_run_starting)
            except (TypeError, RuntimeError):
                pass
        self.train_widget = None

    def _find(self) -> bool:
        widget = find_train_widget(self.viewer)
        if widget is not None:
            self.connect_train_widget(widget)
            return True
        return False

    def _on_find_timeout(self) -> None:
        self._find()

    @property
    def trainer(self):
        return None if self.train_widget is None else self.train_widget.trainer

    @property
    def axis(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.config.data.axis)

    def run_image(self, pair_index: int):
        """The image layer of pair ``pair_index`` of the current run (None if gone)."""
        return self._run_layer(pair_index, 0)

    def run_labels(self, pair_index: int):
        """The labels layer of pair ``pair_index`` of the current run (None if none or gone)."""
        return self._run_layer(pair_index, 1)

    def _run_layer(self, pair_index: int, which: int):
        if self.train_widget is None:
            return None
        layers = self.train_widget.run_layers
        if not 0 <= pair_index < len(layers):
            return None
        layer = layers[pair_index][which]
        return layer if layer is not None and layer in self.viewer.layers else None

    def active_pair_index(self) -> int:
        """The run pair whose image or labels is the active layer (0 otherwise)."""
        if self.train_widget is None:
            return 0
        active = self.viewer.layers.selection.active
        for i, (image, labels) in enumerate(self.train_widget.run_layers):
            if _layers.same_layer(active, image) or _layers.same_layer(active, labels):
                return i
        return 0

    def current_slice(self, pair_index: int) -> int | None:
        image = self.run_image(pair_index)
        if image is None:
            return None
        try:
            return _layers.current_slice(self.viewer, image, self.axis)
        except SemiclError as exc:
            notifications.show_warning(str(exc))
            return None

    # --- analyses ---------------------------------------------------------------------------
    def request(self, kind: str, **params) -> bool:
        """Ask the trainer for an analysis; the :class:`Analysed` event comes to
        :meth:`on_train_event`. Returns False (with a notification) without a trainer."""
        trainer = self.trainer
        if trainer is None:
            notifications.show_info("Train first (Train dock): the review needs a network.")
            return False
        if self.train_widget.is_training:
            trainer.request_analysis(kind, **params)
            return True
        start_worker(trainer.analyse, kind, returned=self._on_train_event, errored=self._on_idle_error, **params)
        return True

    def _on_idle_error(self, exc: Exception) -> None:
        log.warning("review analysis failed", exc_info=(type(exc), exc, exc.__traceback__))
        notifications.show_warning(f"Review failed: {exc}")

    def _on_train_event(self, event) -> None:
        try:
            self.on_train_event(event)
        except (SemiclError, ValueError, RuntimeError, KeyError, IndexError) as exc:
            log.warning("%s could not show %s", type(self).__name__, type(event).__name__, exc_info=True)
            notifications.show_warning(f"{type(self).__name__}: {exc}")

    def on_train_event(self, event) -> None:
        """Override: one trainer event (or an Analysed result), on the Qt thread."""

    def _on_run_starting(self, trainer) -> None:
        try:
            self.on_run_starting(trainer)
        except (SemiclError, ValueError, RuntimeError) as exc:
            log.warning("%s could not prepare its layers", type(self).__name__, exc_info=True)
            notifications.show_warning(f"{type(self).__name__}: {exc}")

    def on_run_starting(self, trainer) -> None:
        """Override: Train was pressed (Qt thread, before the first step): create layers now."""

    def closeEvent(self, event) -> None:
        self._find_timer.stop()
        self.disconnect_train_widget()
        super().closeEvent(event)
