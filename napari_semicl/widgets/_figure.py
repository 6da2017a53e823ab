"""A matplotlib figure drawn off the Qt thread, in a render process.

matplotlib's Qt canvas draws on the Qt thread: a figure with a legend and a few hundred
points took 0.3-0.8 s there while training held the GIL (``bench ui --review-docks``), far
above the 100 ms the review docks may block the event loop. Drawn in a background *thread*
instead, matplotlib's Python still held the GIL for 100-200 ms per draw, and every draw of
the training curves (once a second) stalled the viewer by 100-170 ms while napari waited for
the GIL. :class:`FigureView` therefore draws in one *render process* shared by every view
(:mod:`napari_semicl.analysis.render_server`, started with the first view, at a lower OS
priority) and hands the finished RGBA image to the Qt thread, which only paints it.

The figure is described by a *snapshot*: a plain picklable object built on the Qt thread
(copies of the data, never live widgets) and passed to ``draw(figure, snapshot)``, a
module-level function (see :mod:`napari_semicl.analysis.plots`) that runs in the render
process, clears and fills the figure and may return information the widget needs afterwards
(e.g. the display coordinates of points, for clicks). Only the newest snapshot is drawn:
requests that arrive while a render runs replace each other. A resize draws the last snapshot
again at the new size. A ``draw`` that cannot be sent to another process (a closure), or a
render process that cannot start or keeps dying, falls back to one background render thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from qtpy.QtCore import QSize, Qt, QTimer, Signal
from qtpy.QtGui import QImage, QPainter
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..analysis.plots import new_figure, render_figure, render_in_process
from ..analysis.render_server import RenderClient, RenderProcessDied

log = logging.getLogger(__name__)

_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
_PROCESS: RenderClient | None = None
_PROCESS_FAILURES = 0
_KEYS = itertools.count()
#: After this many render processes died or failed to start, views draw in the thread.
MAX_PROCESS_FAILURES = 3

#: Wait this long after the last resize before drawing at the new size (ms).
RESIZE_DEBOUNCE_MS = 150


def _executor() -> ThreadPoolExecutor:
    """The one render thread of every FigureView (matplotlib is not thread-safe)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            from ._worker import lower_thread_priority

            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semicl-figure",
                                           initializer=lower_thread_priority)
        return _EXECUTOR


def _render_process() -> RenderClient | None:
    """The one render process of every FigureView (started at the first call; None once it
    failed :data:`MAX_PROCESS_FAILURES` times)."""
    global _PROCESS, _PROCESS_FAILURES
    with _EXECUTOR_LOCK:
        if _PROCESS is None and _PROCESS_FAILURES < MAX_PROCESS_FAILURES:
            try:
                _PROCESS = RenderClient()
            except OSError as exc:
                _PROCESS_FAILURES += 1
                log.warning("could not start the figure render process: %s", exc)
        return _PROCESS


@atexit.register
def _close_render_process() -> None:
    if _PROCESS is not None:
        _PROCESS.close(timeout=1.0)


def _process_failed(pool: RenderClient, exc: BaseException) -> None:
    """Forget a render process that died (the next draw starts a new one)."""
    global _PROCESS, _PROCESS_FAILURES
    with _EXECUTOR_LOCK:
        if _PROCESS is not pool:
            return  # already replaced
        _PROCESS = None
        _PROCESS_FAILURES += 1
        failures = _PROCESS_FAILURES
    pool.close(timeout=0.5)
    if failures >= MAX_PROCESS_FAILURES:
        log.warning("the figure render process failed %d times (%s); figures are drawn in a thread now",
                    failures, exc)
    else:
        log.warning("the figure render process stopped (%s); starting a new one", exc)


def _picklable(draw: Callable) -> bool:
    try:
        pickle.dumps(draw)
    except Exception:  # noqa: BLE001 - a lambda, a closure, a bound method of a widget...
        return False
    return True


class FigureView(QWidget):
    """A widget showing a matplotlib figure drawn in the background.

    Parameters
    ----------
    draw : callable
        ``draw(figure, snapshot) -> info``; runs in the render process (the render thread if
        ``draw`` cannot be pickled). When ``info`` is callable it is called after the figure
        is drawn (e.g. to read final axis limits) and its result is the info, which must be
        picklable in the process.
    min_height : int
        Minimum height in pixels.
    parent : QWidget, optional
    in_process : bool
        Draw in the render process (default) rather than the render thread.

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

    def __init__(self, draw: Callable[[Figure, Any], Any], min_height: int = 240, parent=None,
                 in_process: bool = True) -> None:
        super().__init__(parent)
        self._draw = draw
        #: drawn by render_now and, without the render process, by the render thread
        self.figure = new_figure()
        self.in_process = bool(in_process) and _picklable(draw)
        if self.in_process:
            _render_process()  # started with the dock, so that it is ready for the first draw
        self._key = f"view-{next(_KEYS)}"
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
        rgba, info = render_figure(self.figure, self._draw, self._snapshot, self._pixel_size())
        self._show(_to_qimage(rgba), info, self._generation)
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
        pool = _render_process() if self.in_process else None
        if pool is not None:
            try:
                future = pool.submit(render_in_process, self._key, self._draw, snapshot, size)
            except RenderProcessDied as exc:  # it ended since the last draw
                _process_failed(pool, exc)
            else:
                future.add_done_callback(lambda f: self._deliver_from_process(pool, f, generation))
                return

        def job():
            try:
                rgba, info = render_figure(self.figure, self._draw, snapshot, size)
                self._deliver(_to_qimage(rgba), info, None, generation)
            except Exception as exc:  # reported on the Qt thread
                self._deliver(None, None, exc, generation)

        _executor().submit(job)

    def _deliver_from_process(self, pool: RenderClient, future: Future, generation: int) -> None:
        """In the thread that reads the render process's answers."""
        try:
            rgba, info = future.result()
        except RenderProcessDied as exc:  # the process died: try again (a new one, or the thread)
            _process_failed(pool, exc)
            self._deliver(None, None, None, generation, retry=True)
        except Exception as exc:  # the draw failed: reported on the Qt thread
            self._deliver(None, None, exc, generation)
        else:
            self._deliver(_to_qimage(rgba), info, None, generation)

    def _deliver(self, image, info, error, generation: int, retry: bool = False) -> None:
        try:
            self._finished.emit(image, info, error, -generation if retry else generation)
        except RuntimeError:  # the widget was deleted meanwhile
            pass

    def _on_finished(self, image, info, error, generation: int) -> None:
        self._busy = False
        if generation < 0:  # the render process died during this draw: draw it again
            if not self._pending and -generation == self._generation:
                self._pending = True
            self._start()
            return
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
        # Qt 6: position() (a QPointF; pos() is deprecated there); Qt 5: pos()
        pos = event.position() if hasattr(event, "position") else event.pos()
        ratio = self.devicePixelRatioF() if hasattr(self, "devicePixelRatioF") else 1.0
        height = self._image.height() if self._image is not None else self.height() * ratio
        button = {Qt.LeftButton: 1, Qt.MiddleButton: 2, Qt.RightButton: 3}.get(event.button(), 0)
        self.clicked.emit(pos.x() * ratio, height - pos.y() * ratio, button)

    def closeEvent(self, event) -> None:
        self._closed = True
        super().closeEvent(event)


def _to_qimage(rgba: np.ndarray) -> QImage:
    """A QImage owning a copy of ``rgba`` ((h, w, 4) uint8); safe to make in any thread."""
    h, w = rgba.shape[:2]
    return QImage(np.ascontiguousarray(rgba).tobytes(), w, h, 4 * w, QImage.Format_RGBA8888).copy()
