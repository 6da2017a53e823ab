"""The bridge between the trainer's event generator and napari's ``thread_worker``.

:func:`iterate_training` is a plain generator (no Qt): it forwards the trainer's events
and, when :class:`RunControl` says the dock is going away, closes the trainer's generator
at the next event. Closing raises ``GeneratorExit`` inside ``Trainer.run``, which
checkpoints and returns, so the worker thread ends within one training step and the
model is kept. :func:`start_training_worker` runs it in napari's worker thread pool;
:func:`start_worker` runs any other background call of the docks (fills, analyses) there.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Generator

from ..analysis.render_server import RENDER_NICE

log = logging.getLogger(__name__)

#: Background workers still running. They are kept here, not by the dock that started them:
#: a worker whose dock was closed meanwhile would otherwise lose its Qt signals and raise
#: in its thread when it finishes.
_RUNNING: set = set()

_frozen_runs = 0
_freeze_lock = threading.Lock()

#: How much lower than the Qt thread's the OS priority of background work is (nice steps):
#: the same as the render process's.
BACKGROUND_NICE = RENDER_NICE


def lower_thread_priority(steps: int = BACKGROUND_NICE) -> tuple[int, int] | None:
    """Lower the calling thread's OS scheduling priority by ``steps`` nice levels.

    Training and the docks' analyses compete with the event loop (and with the X server and
    the OpenGL rasteriser of a software-rendered viewer) for the cores; below them, they only
    get what the viewer leaves. Linux only (threads have their own nice value there); elsewhere
    nothing changes. Returns (thread id, previous nice value) for
    :func:`restore_thread_priority`, or None when nothing changed.
    """
    import os
    import sys

    if steps <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + steps))
    except OSError:
        return None
    return tid, before


def restore_thread_priority(token: tuple[int, int] | None) -> None:
    """Give the thread lowered by :func:`lower_thread_priority` its nice value back (pool
    threads are reused); only from that thread itself. Where the OS does not let an
    unprivileged thread raise its priority again, it stays low."""
    if token is None or token[0] != threading.get_native_id():
        return
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, token[0], token[1])
    except OSError:
        log.debug("could not restore the thread's priority", exc_info=True)


@contextlib.contextmanager
def background_priority():
    """Run the body at :func:`lower_thread_priority`, restored afterwards where allowed."""
    before = lower_thread_priority()
    try:
        yield
    finally:
        restore_thread_priority(before)


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's sight until
    :func:`thaw_heap` (``gc.freeze``).

    A full collection walks the whole heap (napari, Qt wrappers, torch, matplotlib: millions
    of objects) while holding the GIL; during training one took 0.3 s and froze the viewer
    (``bench ui --trace-stalls``). Frozen, the collections during training only walk what
    training allocated. :func:`start_training_worker` freezes, and the worker thaws when it
    ends; runs in several viewers are counted.
    """
    global _frozen_runs
    with _freeze_lock:
        gc.collect(1)  # the young generations: cheap, and their garbage is not frozen
        gc.freeze()
        _frozen_runs += 1


def thaw_heap() -> None:
    """Undo one :func:`freeze_heap`; the last one gives the frozen objects back to the
    collector (garbage among them is collected at the next full collection)."""
    global _frozen_runs
    with _freeze_lock:
        if _frozen_runs == 0:
            return
        _frozen_runs -= 1
        if _frozen_runs == 0:
            gc.unfreeze()


class RunControl:
    """Thread-safe flags shared by the Qt thread and one training worker."""

    def __init__(self) -> None:
        self.abandon = threading.Event()   # set by the dock when it closes
        self.done = threading.Event()      # set in the worker thread once it left the generator
        self._gen: Generator | None = None
        self._priority: tuple[int, int] | None = None  # the worker thread's lowered priority

    def restore_priority(self) -> None:
        """Give the worker thread its priority back; a no-op from any other thread. Connected
        to the worker's ``finished`` in that thread: a worker that napari quit leaves the
        generator suspended, so its ``finally`` would run later, in another thread."""
        restore_thread_priority(self._priority)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker to finish; True if it did."""
        return self.done.wait(timeout)

    def close_generator(self) -> None:
        """Close the trainer generator if a worker abandoned it (e.g. a napari cancel).

        Only call this once the worker thread has left the generator (after ``finished``).
        """
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()  # the trainer checkpoints on GeneratorExit
            except ValueError:  # still executing in the worker thread: leave it to GC
                log.debug("trainer generator still running; not closed here")
                return
        self.done.set()


def iterate_training(trainer, control: RunControl) -> Generator:
    """Yield ``trainer.run()``'s events until it finishes or ``control.abandon`` is set."""
    control._priority = lower_thread_priority()
    gen = trainer.run()
    control._gen = gen
    try:
        for event in gen:
            yield event
            if control.abandon.is_set():
                log.info("training abandoned at step %d; checkpointing", trainer.step)
                control._gen = None
                gen.close()
                return
        control._gen = None
    finally:
        control.done.set()
        control.restore_priority()


def start_training_worker(
    trainer,
    *,
    on_event: Callable,
    on_error: Callable,
    on_finished: Callable,
):
    """Start :func:`iterate_training` in napari's thread pool; returns (worker, control).

    ``on_event`` gets every event on the Qt thread (``yielded``); ``on_error`` the
    exception of a crash (the worker's own traceback dialog is switched off);
    ``on_finished`` is called once the thread is done (normally, on error or aborted).
    """
    from napari.qt.threading import create_worker
    from qtpy.QtCore import Qt

    control = RunControl()
    freeze_heap()  # no full garbage collections through napari's heap while training
    try:
        worker = create_worker(
            iterate_training, trainer, control, _start_thread=False, _ignore_errors=True
        )
    except BaseException:
        thaw_heap()
        raise
    # thawed from the worker thread when it ends however it ends, dock or no dock
    worker.finished.connect(thaw_heap, Qt.DirectConnection)
    # Set `done` from the worker thread itself, also when the worker was quit (napari's
    # cancel, or closing the viewer) and left the generator suspended: a Qt thread that
    # waits on `done` must not depend on its own (blocked) event queue.
    worker.finished.connect(control.done.set, Qt.DirectConnection)
    worker.finished.connect(control.restore_priority, Qt.DirectConnection)  # pool threads are reused
    worker.yielded.connect(on_event)
    worker.errored.connect(on_error)
    worker.finished.connect(on_finished)
    worker.start()
    return worker, control


def start_worker(fn, *args, returned=None, errored=None, **kwargs):
    """Run ``fn(*args, **kwargs)`` in napari's thread pool; ``returned(value)`` and
    ``errored(exc)`` are called on the Qt thread, and skipped quietly when the widget they
    belong to was deleted meanwhile."""
    from napari.qt.threading import create_worker

    def deliver(callback):
        def call(value) -> None:
            try:
                callback(value)
            except RuntimeError as exc:  # "wrapped C/C++ object ... has been deleted"
                if "deleted" not in str(exc):
                    raise
                log.debug("result of %s dropped: its widget is gone", getattr(fn, "__name__", fn))
        return call

    def background(*a, **kw):  # below the event loop for the OS scheduler
        with background_priority():
            return fn(*a, **kw)

    worker = create_worker(background, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    if returned is not None:
        worker.returned.connect(deliver(returned))
    if errored is not None:
        worker.errored.connect(deliver(errored))
    _RUNNING.add(worker)
    worker.finished.connect(lambda: _RUNNING.discard(worker))
    worker.start()
    return worker
