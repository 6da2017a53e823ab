"""A matplotlib figure drawn off the Qt thread.

matplotlib's Qt canvas draws on the Qt thread: a figure with a legend and a few hundred
points took 0.3-0.8 s there while training held the GIL (``bench ui --review-docks``), far
above the 100 ms the review docks may block the event loop. :class:`FigureView` instead
draws the figure with Agg in one background thread shared by every view and hands the
finished RGBA image to the Qt thread, which only paints it (a copy of a few hundred KB).

The figure is described by a *snapshot*: a plain object built on the Qt thread (copies of the
data, never live widgets) and passed to ``draw(figure, snapshot)``, a function that runs in the
render thread, clears and fills the figure and may return information the widget needs
afterwards (e.g. the display coordinates of points, for clicks). Only the newest snapshot is
drawn: requests that arrive while a render runs replace each other. A resize draws the last
snapshot again at the new size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QSize, Qt, QTimer, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QSizePolicy, QWidget

log = logging.getLogger(__name__)

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()

#: Wait this long after the last resize before drawing at the new size (ms).
RESIZE_DEBOUNCE_MS = 150


def _executor() -> ThreadPoolExecutor:
    """The one render thread of every FigureView (matplotlib is not thread-safe)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semicl-figure")
        return _EXECUTOR


class FigureView(QWidget):
    """A widget showing a matplotlib figure drawn in a background thread.

    Parameters
    ----------
    draw : callable
        ``draw(figure, snapshot) -> info``; runs in the render thread. When ``info`` is
        callable it is called after the figure is drawn (e.g. to read final axis limits) and
        its result is the info.
    min_height : int
        Minimum height in pixels.
    parent : QWidget, optional

    Signals
    -------
    rendered(object)
        Emitted on the Qt thread after a new image is shown, with ``draw``'s return value.
    clicked(float, float, int)
        A mouse press at figure display coordinates (x, y; matplotlib's origin, bottom left)
        with the Qt button number (1 = left).
    """

    rendered = Signal(object)
    clicked = Signal(float, float, int)
    _finished = Signal(object, object, object, int)  # image, info, error, generation

    def __init__(self, draw: Callable[[Figure, Any], Any], min_height: int = 240, parent=None) -> None:
        super().__init__(parent)
        self._draw = draw
        self.figure = Figure(figsize=(4, 3), dpi=100)
        FigureCanvasAgg(self.figure)
        self.info: Any = None
        self._image: QImage | None = None
        self._snapshot: Any = None
        self._pending = False
        self._busy = False
        self._closed = False
        self._generation = 0  # of the last render started
        self._shown = 0  # generation of the image shown
        self.setMinimumHeight(min_height)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self._finished.connect(self._on_finished, Qt.QueuedConnection)
        self._resize_timer = QTimer(self)
        self._resize_timer.setSingleShot(True)
        self._resize_timer.setInterval(RESIZE_DEBOUNCE_MS)
        self._resize_timer.timeout.connect(self._on_resized)

    # ------------------------------------------------------------------ public API
    @property
    def busy(self) -> bool:
        """True while a render runs or waits."""
        return self._busy or self._pending

    def submit(self, snapshot: Any) -> None:
        """Draw ``snapshot`` in the background (the newest one wins)."""
        self._snapshot = snapshot
        self._pending = True
        self._start()

    def render_now(self, snapshot: Any = None) -> Any:
        """Draw synchronously on the calling thread (tests, screenshots); returns the info.

        Waits for a render in flight first, so the figure is never drawn by two threads.
        """
        if snapshot is not None:
            self._snapshot = snapshot
        _executor().submit(lambda: None).result()  # drain the render thread
        self._pending = False
        self._generation += 1
        image, info = self._render(self._snapshot, self._pixel_size())
        self._show(image, info, self._generation)
        return info

    def pixel_size(self) -> tuple[int, int]:
        """The size (width, height) in device pixels the figure is drawn at."""
        return self._pixel_size()

    # ------------------------------------------------------------------ rendering
    def _pixel_size(self) -> tuple[int, int]:
        ratio = self.devicePixelRatioF() if hasattr(self, "devicePixelRatioF") else 1.0
        w = max(int(round(self.width() * ratio)), 50)
        h = max(int(round(self.height() * ratio)), 50)
        return w, h

    def _start(self) -> None:
        if self._busy or not self._pending or self._closed:
            return
        self._pending = False
        self._busy = True
        self._generation += 1
        generation, snapshot, size = self._generation, self._snapshot, self._pixel_size()

        def job():
            try:
                image, info = self._render(snapshot, size)
                error = None
            except Exception as exc:  # reported on the Qt thread
                image, info, error = None, None, exc
            try:
                self._finished.emit(image, info, error, generation)
            except RuntimeError:  # the widget was deleted meanwhile
                pass

        _executor().submit(job)

    def _render(self, snapshot: Any, size: tuple[int, int]) -> tuple[QImage, Any]:
        fig = self.figure
        fig.set_size_inches(size[0] / fig.dpi, size[1] / fig.dpi)
        info = self._draw(fig, snapshot) if snapshot is not None else None
        if snapshot is None:
            fig.clear()
        fig.canvas.draw()
        if callable(info):  # information that needs the drawn figure (final limits)
            info = info()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        h, w = rgba.shape[:2]
        image = QImage(rgba.tobytes(), w, h, 4 * w, QImage.Format_RGBA8888).copy()
        return image, info

    def _on_finished(self, image, info, error, generation: int) -> None:
        self._busy = False
        if error is not None:
            log.warning("could not draw the figure: %s", error, exc_info=error)
        else:
            self._show(image, info, generation)
        self._start()

    def _show(self, image: QImage, info: Any, generation: int) -> None:
        if generation < self._shown:
            return  # an older render finishing after a newer one (render_now) was shown
        self._shown = generation
        ratio = self.devicePixelRatioF() if hasattr(self, "devicePixelRatioF") else 1.0
        image.setDevicePixelRatio(ratio)
        self._image = image
        self.info = info
        self.update()
        self.rendered.emit(info)

    # ------------------------------------------------------------------ Qt
    def sizeHint(self) -> QSize:
        return QSize(400, max(self.minimumHeight(), 300))

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.white)
        if self._image is not None:
            painter.drawImage(0, 0, self._image)
        painter.end()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._snapshot is not None:
            self._resize_timer.start()

    def _on_resized(self) -> None:
        if self._snapshot is not None and self._image is not None:
            ratio = self._image.devicePixelRatio() or 1.0
            if (round(self._image.width() / ratio), round(self._image.height() / ratio)) != (self.width(), self.height()):
                self.submit(self._snapshot)

    def mousePressEvent(self, event) -> None:
        pos = event.pos()
        ratio = self.devicePixelRatioF() if hasattr(self, "devicePixelRatioF") else 1.0
        height = self._image.height() if self._image is not None else self.height() * ratio
        button = {Qt.LeftButton: 1, Qt.MiddleButton: 2, Qt.RightButton: 3}.get(event.button(), 0)
        self.clicked.emit(pos.x() * ratio, height - pos.y() * ratio, button)

    def closeEvent(self, event) -> None:
        self._closed = True
        super().closeEvent(event)
