"""A child process that runs functions for the viewer (the figures of the review docks):
``python -m napari_semicl.analysis.render_server``.

:class:`RenderClient` starts it and sends it jobs; each gives a
:class:`concurrent.futures.Future`. Not :mod:`multiprocessing`: its "spawn" start runs the
parent's main script again in the child (as ``__mp_main__``), and a napari script without an
``if __name__ == "__main__":`` guard would open a second viewer there. This child imports
only what the jobs need.

Protocol: length-prefixed pickles over the child's stdin and stdout. The first message is the
parent's ``sys.path`` (so the child finds what the parent finds); then ``(job id, pickled
(function, args))``, answered by ``(job id, ok, result or exception)``. The function is
pickled by reference, so it must be a module-level function. The child ends when its stdin
closes (the parent ended or closed it).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
#: How much lower than the viewer's the child's OS priority is (nice steps).
RENDER_NICE = 10
#: Set (to "1") in the child's environment.
CHILD_ENV = "NAPARI_SEMICL_RENDER_PROCESS"


class RenderProcessDied(RuntimeError):
    """The render process ended (or could not start) before it answered a job."""


def _send(fh: BinaryIO, data: bytes) -> None:
    fh.write(_HEADER.pack(len(data)))
    fh.write(data)
    fh.flush()


def _receive(fh: BinaryIO) -> Any:
    header = fh.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(header)
    data = fh.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class RenderClient:
    """The parent's end: starts the child and sends it jobs.

    Parameters
    ----------
    nice : int
        Nice levels the child lowers itself by (where the OS has them).
    """

    def __init__(self, nice: int = RENDER_NICE) -> None:
        env = dict(os.environ, MPLBACKEND="Agg", **{CHILD_ENV: "1"})
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(int(nice))],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._lock = threading.Lock()
        self._jobs: dict[int, Future] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox.put(pickle.dumps(list(sys.path)))
        threading.Thread(target=self._write_loop, name="semicl-render-writer", daemon=True).start()
        threading.Thread(target=self._read_loop, name="semicl-render-reader", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` in the child; the future fails with :class:`RenderProcessDied`
        if the child ends first. Raises RenderProcessDied when it has already ended."""
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                raise RenderProcessDied(str(self._dead))
            job = next(self._ids)
            self._jobs[job] = future
        self._outbox.put((job, fn, args))
        return future

    def close(self, timeout: float = 2.0) -> None:
        """Let the child end (its stdin closes) and wait up to ``timeout`` s, then kill it."""
        self._outbox.put(None)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)
        self._fail_all(RenderProcessDied("the render process was closed"))

    # ------------------------------------------------------------------ threads
    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = exc
            jobs, self._jobs = self._jobs, {}
        for future in jobs.values():
            if not future.done():
                future.set_exception(exc)

    def _write_loop(self) -> None:
        stdin = self._proc.stdin
        while True:
            item = self._outbox.get()
            if item is None:
                break
            if isinstance(item, bytes):  # the first message, pickled already
                data = item
            else:
                job, fn, args = item
                try:  # pickled here, so that an unpicklable job fails alone
                    data = pickle.dumps((job, pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)),
                                        protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:  # noqa: BLE001 - reported through the job's future
                    with self._lock:
                        future = self._jobs.pop(job, None)
                    if future is not None:
                        future.set_exception(exc)
                    continue
            try:
                _send(stdin, data)
            except (OSError, ValueError) as exc:  # the child is gone
                self._fail_all(RenderProcessDied(f"the render process ended ({exc})"))
                break
        try:
            stdin.close()
        except OSError:
            pass

    def _read_loop(self) -> None:
        stdout = self._proc.stdout
        while True:
            try:
                job, ok, value = _receive(stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                code = self._proc.wait()
                self._fail_all(RenderProcessDied(f"the render process ended (exit code {code}; {type(exc).__name__})"))
                return
            with self._lock:
                future = self._jobs.pop(job, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


# ---------------------------------------------------------------------- the child
def _answer(job: int, ok: bool, value: Any) -> bytes:
    try:
        return pickle.dumps((job, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception
        return pickle.dumps((job, False, RuntimeError(f"{type(value).__name__}: {value} ({exc})")))


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer jobs from ``stdin`` on ``stdout`` until ``stdin`` ends."""
    try:
        sys.path[:] = _receive(stdin)
    except EOFError:
        return
    while True:
        try:
            job, payload = _receive(stdin)
        except EOFError:
            return
        try:
            fn, args = pickle.loads(payload)
            reply = _answer(job, True, fn(*args))
        except Exception as exc:  # noqa: BLE001 - sent back to the caller
            reply = _answer(job, False, exc)
        try:
            _send(stdout, reply)
        except OSError:  # the parent is gone
            return


def lower_process_priority(steps: int = RENDER_NICE) -> None:
    """Put this process ``steps`` nice levels lower (where the OS has them), so that its work
    never takes a core from the viewer's event loop."""
    if hasattr(os, "nice") and steps > 0:
        try:
            os.nice(steps)
        except OSError:
            log.debug("could not lower the render process's priority", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lower_process_priority(int(argv[0]) if argv else RENDER_NICE)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    serve(stdin, stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover - the child's entry point
    sys.exit(main())
