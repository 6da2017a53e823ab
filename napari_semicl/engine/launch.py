"""A training run on several devices from a front end: ``torchrun`` children, one event stream.

:class:`DistributedRun` is what the Train dock holds instead of a
:class:`~napari_semicl.engine.trainer.Trainer` when it trains on more than one device. Its
:meth:`~DistributedRun.run` is a generator of the same events as ``Trainer.run()``: it starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m napari_semicl job JOB_DIR

as a child process (the Python and the package of this process, first on the children's
path), and yields rank 0's events as they arrive. The job folder (a temporary one) carries
everything between the two sides, all plain data:

- ``job.json`` and ``pairN_image.npy`` / ``pairN_labels.npy``: the config and the snapshots;
- ``events.jsonl``: rank 0's events, one JSON line each; arrays (previews) as ``.npy`` files
  beside it, written before their line and removed once read;
- ``stop``: created by :meth:`~DistributedRun.request_stop`; rank 0 sees it after its next
  event and every rank leaves at the same step (:meth:`Distributed.agree`), rank 0 checkpoints;
- ``pids/rankN``: every rank's process id, so that :meth:`~DistributedRun.kill` reaches ranks
  that ``torchrun`` started in sessions of their own.

Rank 0 also stops when the process that started the job is gone (napari killed), so no rank
outlives its viewer; closing the generator (the dock closing) stops, waits briefly and kills
whatever is left; so does the end of this process (``atexit``).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Generator

import numpy as np
import torch

from ..data import AnnotatedPair
from ..data.tiles import make_dataset
from ..errors import ConfigError, DataError
from ..io import atomic_path
from ..methods import get_method
from . import events as events_module
from .apply import Predictor
from .config import TrainConfig
from .inbox import dispatch
from .events import Finished, StepDone

log = logging.getLogger(__name__)

#: On a machine without several GPUs, this environment variable (a number of processes)
#: offers the dock's "devices" setting anyway: CPU processes with gloo (tests, demos).
CPU_RANKS_ENV = "NAPARI_SEMICL_CPU_RANKS"
JOB_FILE, EVENTS_FILE, STOP_FILE, PIDS_DIR = "job.json", "events.jsonl", "stop", "pids"
#: How long a stopped job may take to checkpoint and end before it is killed.
STOP_GRACE_S = 30.0
#: The same when the front end closes (the viewer is closing: a checkpoint is worth a short wait).
CLOSE_GRACE_S = 10.0

_live: set["DistributedRun"] = set()
_live_lock = threading.Lock()


def visible_devices() -> tuple[int, str]:
    """(how many devices a run may use, 'cuda' or 'cpu'): the visible GPUs, else the
    processes :data:`CPU_RANKS_ENV` allows on the CPU (1 when unset)."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return torch.cuda.device_count(), "cuda"
    try:
        return max(1, int(os.environ.get(CPU_RANKS_ENV, "1"))), "cpu"
    except ValueError:
        return 1, "cpu"


# --- events as plain data ------------------------------------------------------------------------
def _encode(value, folder: Path, names: list):
    if isinstance(value, np.ndarray):
        name = f"array{len(names)}_{time.monotonic_ns()}.npy"
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:  # whole before its line is written
            np.save(fh, value, allow_pickle=False)
        names.append(name)
        return {"__npy__": name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _encode(v, folder, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, folder, names) for v in value]
    return value


def _decode(value, folder: Path):
    if isinstance(value, dict):
        if set(value) == {"__npy__"}:
            path = folder / value["__npy__"]
            array = np.load(path, allow_pickle=False)
            path.unlink(missing_ok=True)
            return array
        return {k: _decode(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, folder) for v in value]
    return value


def encode_event(event, folder: Path) -> str:
    """One JSON line for ``event``; its arrays are saved as ``.npy`` files in ``folder``."""
    fields = {f.name: _encode(getattr(event, f.name), folder, []) for f in dataclasses.fields(event)}
    return json.dumps({"type": type(event).__name__, "fields": fields})


def decode_event(line: str, folder: Path):
    """The event of a line :func:`encode_event` wrote (its array files are read and removed)."""
    data = json.loads(line)
    cls = getattr(events_module, data["type"])
    return cls(**_decode(data["fields"], folder))


# --- the front end's side ----------------------------------------------------------------------------
class DistributedRun:
    """Training on ``n_procs`` devices under ``torchrun``, shaped like a Trainer for the dock.

    Parameters
    ----------
    config : TrainConfig
    pairs : list of AnnotatedPair
        Snapshots (volumes and images; whole slides train on one device).
    n_procs : int
        Processes (one per GPU; on the CPU, gloo processes).
    out_dir : path
        The run folder: rank 0 writes checkpoints and annotations there.
    device : {'cuda', 'cpu'}
    resume : path, optional
        A checkpoint the first run continues from.
    """

    def __init__(self, config: TrainConfig, pairs, *, n_procs: int, out_dir, device: str = "cpu",
                 resume=None, num_threads: int = 1) -> None:
        if n_procs < 2:
            raise ConfigError(f"a distributed run needs at least 2 devices, got {n_procs}")
        if not all(isinstance(p, AnnotatedPair) for p in pairs):
            raise DataError("whole-slide images train on one device: set devices to 1")
        self.config = copy.deepcopy(config).validate()
        self.pairs = list(pairs)
        self.dataset = make_dataset(self.pairs, self.config.data, self.config.wsi)  # the class table
        self.config.model.in_channels = self.dataset.in_channels
        self.config.model.n_classes = self.dataset.n_classes
        self.method = get_method(self.config.method)  # its declarations (review layers)
        self.n_procs = int(n_procs)
        self.device = torch.device(device)
        self.num_threads = max(1, int(num_threads))
        self.out_dir = Path(out_dir)
        self.step = 0
        self._resume = None if resume is None else Path(resume)
        self._proc: subprocess.Popen | None = None
        self._job: Path | None = None
        self._stop = threading.Event()
        self._abandoned = threading.Event()

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def predictor(self) -> Predictor:
        """The network of the last checkpoint the ranks wrote (they train in other processes)."""
        return Predictor.from_checkpoint(self.checkpoint)

    # --- what the dock calls ------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask every rank to stop after the current step (safe from any thread)."""
        self._stop.set()
        job = self._job
        if job is not None:
            (job / STOP_FILE).touch()

    def abandon(self) -> None:
        """The front end goes away (safe from any thread): stop every rank, and let
        :meth:`run` return at once; a background thread waits up to :data:`CLOSE_GRACE_S`
        for the ranks to checkpoint and end, then kills what is left."""
        self._abandoned.set()
        self.request_stop()
        # the ranks end even if run()'s generator never resumes (a worker that napari quit
        # leaves it suspended at a yield, so its own clean-up would not run)
        if self._proc is not None and self._proc.poll() is None:
            threading.Thread(target=self._end, args=(CLOSE_GRACE_S,), name="napari-semicl-job-abandon",
                             daemon=False).start()

    def submit_data(self, pairs) -> None:
        """New snapshots: used by the next :meth:`run` (a running job keeps its data)."""
        self.pairs = list(pairs)

    def request_review(self, pair_index: int, slice_index: int) -> None:
        """Reviews of a slice during a run are served on one device only (ignored here)."""
        log.debug("review of pair %d slice %d ignored: distributed run", pair_index, slice_index)

    def request_analysis(self, kind: str, **params) -> None:
        log.debug("analysis %s ignored during a distributed run", kind)

    def analyse(self, kind: str, **params):
        """An analysis of the last checkpoint, in this process (the run is idle)."""
        from .trainer import Trainer

        if not self.checkpoint.exists():
            raise DataError("no checkpoint yet: train first")
        local = Trainer.from_checkpoint(self.checkpoint, self.pairs, device=torch.device("cpu"))
        return local.analyse(kind, **params)

    # --- the run ---------------------------------------------------------------------------------
    def command(self, job: Path) -> list[str]:
        """The torchrun command line of a job."""
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.n_procs),
                "-m", "napari_semicl", "job", str(job)]

    def _write_job(self) -> Path:
        job = Path(tempfile.mkdtemp(prefix="semicl_job_"))
        (job / PIDS_DIR).mkdir()
        pairs = []
        for i, pair in enumerate(self.pairs):
            np.save(job / f"pair{i}_image.npy", np.asarray(pair.image), allow_pickle=False)
            labels = None
            if pair.labels is not None:
                labels = f"pair{i}_labels.npy"
                np.save(job / labels, np.asarray(pair.labels), allow_pickle=False)
            try:
                metadata = json.loads(json.dumps(pair.metadata))
            except (TypeError, ValueError):
                metadata = {}  # what is not plain data (e.g. a NIfTI header) stays here
            pairs.append({"image": f"pair{i}_image.npy", "labels": labels, "rgb": bool(pair.rgb), "name": pair.name,
                          "validation_slices": [int(s) for s in pair.validation_slices],
                          "spacing": None if pair.spacing is None else [float(s) for s in pair.spacing],
                          "metadata": metadata})
        resume = self._resume if self.step == 0 else (self.checkpoint if self.checkpoint.exists() else None)
        spec = {"config": self.config.to_json(), "pairs": pairs, "out_dir": str(self.out_dir),
                "device": self.device.type, "resume": None if resume is None else str(resume),
                "parent_pid": os.getpid()}
        (job / JOB_FILE).write_text(json.dumps(spec), encoding="utf-8")
        return job

    def _env(self) -> dict:
        import napari_semicl

        env = dict(os.environ, OMP_NUM_THREADS=str(self.num_threads), PYTHONUNBUFFERED="1")
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        root = str(Path(napari_semicl.__file__).resolve().parents[1])  # the code that launches runs
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def run(self, *, previews: bool = True) -> Generator:
        """Start the job and yield rank 0's events until it ends (the last is ``Finished``).

        Accepts :class:`Stop` through ``send()``; closing the generator stops the job (rank 0
        checkpoints) and kills it if it has not ended within :data:`STOP_GRACE_S`.
        """
        self._stop.clear()
        self._abandoned.clear()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._job = job = self._write_job()
        log_file = open(job / "log.txt", "wb")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(self.command(job), env=self._env(), stdout=log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        with _live_lock:
            _live.add(self)
        finished, buffer, last_losses = None, b"", {}
        try:
            with open(job / EVENTS_FILE, "a+b") as events:
                events.seek(0)
                while True:
                    ended = self._proc.poll() is not None
                    buffer += events.read()
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        event = decode_event(line.decode("utf-8"), job)
                        if isinstance(event, StepDone):
                            self.step, last_losses = event.step, event.losses
                        elif isinstance(event, Finished):
                            self.step, finished = event.step, event
                        message = yield event
                        self._handle(message)
                    if ended or self._abandoned.is_set():
                        break
                    time.sleep(0.05)
            if self._abandoned.is_set():
                return None
            if finished is None:  # a rank died, or torchrun ended the job: say why
                finished = Finished(self.step, "error", time.monotonic() - t0, last_losses,
                                    str(self.checkpoint) if self.checkpoint.exists() else None, self._failure(job))
                yield finished
            elif self._proc.returncode != 0:
                log.warning("the distributed run exited with %s after it finished", self._proc.returncode)
        except GeneratorExit:
            self.abandon()  # the consumer went away: rank 0 checkpoints, then every rank ends
            raise
        finally:
            log_file.close()
            if self._abandoned.is_set():  # not on the caller's (Qt) thread; the interpreter waits for it
                threading.Thread(target=self._close_job, args=(job, CLOSE_GRACE_S), name="napari-semicl-job-end",
                                 daemon=False).start()
            else:
                self._close_job(job, STOP_GRACE_S)
        return finished

    def _close_job(self, job: Path, grace_s: float) -> None:
        self._end(grace_s)
        shutil.rmtree(job, ignore_errors=True)
        if self._job == job:
            self._job = None

    def _handle(self, message) -> None:
        dispatch(message, self)

    def _failure(self, job: Path) -> str:
        """Why the job ended without finishing: its last error line, and the exit code."""
        text = (job / "log.txt").read_text(encoding="utf-8", errors="replace") if (job / "log.txt").exists() else ""
        lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
        mine = [ln for ln in lines if "napari-semicl: error" in ln]
        detail = (mine or lines or ["no message"])[-1]
        return (f"the {self.n_procs}-process run ended (exit code {self._proc.returncode}) before it finished: "
                f"{detail}; the last checkpoint is kept (log: {job / 'log.txt'})")

    def _pids(self) -> list[int]:
        pids = [] if self._proc is None else [self._proc.pid]
        job = self._job
        try:  # the job's two ending threads (abandon's, run's) race: the other may remove the folder
            files = list((job / PIDS_DIR).iterdir()) if job is not None else []
        except OSError:
            files = []
        for f in files:
            try:
                pids.append(int(f.read_text()))
            except (OSError, ValueError):
                pass
        return pids

    def _end(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the job to end, then kill what is left."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the distributed run did not end within %.0f s of a stop: killing it", grace_s)
        self.kill()

    def kill(self) -> None:
        """End the job now: torchrun's process group and every rank (no-op when none)."""
        pids = self._pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in pids if _alive(pid)]
            for pid in alive:
                try:
                    if self._proc is not None and pid == self._proc.pid:
                        os.killpg(pid, sig)
                    else:
                        os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + 5
            while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
                if self._proc is not None:
                    self._proc.poll()  # reap torchrun
                time.sleep(0.05)
        if self._proc is not None:
            self._proc.poll()
        with _live_lock:
            _live.discard(self)

    def processes(self) -> list[int]:
        """Process ids of the job still alive (torchrun and ranks)."""
        return [pid for pid in self._pids() if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:  # a zombie has ended
            return fh.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


@atexit.register
def _kill_live_runs() -> None:
    with _live_lock:
        runs = list(_live)
    for run in runs:
        run.kill()


# --- the ranks' side ----------------------------------------------------------------------------------
def run_job(job_dir) -> int:
    """Train the job in ``job_dir`` on this rank (``napari-semicl job``, under torchrun).

    Rank 0 writes the events for the front end and watches for the stop file and for the
    front end's process; every rank trains. Returns the exit status (1 after an error).
    """
    from .device import pick_device
    from .trainer import Trainer

    job = Path(job_dir)
    spec = json.loads((job / JOB_FILE).read_text(encoding="utf-8"))
    pairs = []
    for p in spec["pairs"]:
        pairs.append(AnnotatedPair(
            np.load(job / p["image"], mmap_mode="r"), None if p["labels"] is None else np.load(job / p["labels"]),
            rgb=p["rgb"], name=p["name"], validation_slices=tuple(p["validation_slices"]),
            spacing=None if p["spacing"] is None else tuple(p["spacing"]), metadata=p["metadata"],
        ))
    config = TrainConfig.from_json(spec["config"])
    device = pick_device(spec["device"])
    if spec["resume"]:
        trainer = Trainer.from_checkpoint(spec["resume"], pairs, device=device, out_dir=spec["out_dir"])
        trainer.config.iterations, trainer.config.minutes = config.iterations, config.minutes
        trainer.config.budget, trainer.config.refresh_every = config.budget, config.refresh_every
        trainer.config.data.class_names = config.data.class_names
    else:
        trainer = Trainer(config, pairs, device=device, out_dir=spec["out_dir"])
    (job / PIDS_DIR / f"rank{trainer.dist.rank}").write_text(str(os.getpid()))
    main = trainer.dist.is_main
    parent = int(spec["parent_pid"])
    finished = None
    with open(job / EVENTS_FILE, "ab") if main else open(os.devnull, "wb") as out:
        for event in trainer.run(previews=True):
            if isinstance(event, Finished):
                finished = event
            if not main:
                continue
            out.write(encode_event(event, job).encode("utf-8") + b"\n")
            out.flush()
            if (job / STOP_FILE).exists() or not _alive(parent):
                trainer.request_stop()
    if main and not _alive(parent):  # nobody is left to read or remove the job folder
        shutil.rmtree(job, ignore_errors=True)
    if finished is not None and finished.reason == "error":
        if main:
            print(f"napari-semicl: error: training failed at step {finished.step}: {finished.error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CPU_RANKS_ENV", "DistributedRun", "decode_event", "encode_event", "run_job", "visible_devices"]
