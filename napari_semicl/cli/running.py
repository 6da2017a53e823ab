"""A training run from the command line: the trainer (new or resumed), the run to the end
with progress in the log and Ctrl-C as a clean stop, and the metrics it ends with.

``train``, its whole-slide variant and ``demo`` all run through here."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from ..engine import Evaluated, Finished, Notice, StepDone, Trainer, pick_device
from ..engine.config import set_option
from ..engine.prior import FUSION_SETTINGS
from ..engine.trainer import CHECKPOINT_NAME
from .common import CliError, set_items

log = logging.getLogger("napari_semicl")


def progress_printer(every: int = 25):
    """A trainer-event callback that logs every ``every``-th step, validations and notices."""
    def callback(event) -> None:
        if isinstance(event, StepDone) and (event.step % every == 0 or event.fraction >= 1):
            losses = " ".join(f"{k}={v:.4f}" for k, v in event.losses.items())
            eta = f" eta {event.eta_s:.0f}s" if event.eta_s is not None else ""
            log.info("step %d (%3.0f%%) %s%s", event.step, 100 * event.fraction, losses, eta)
        elif isinstance(event, Evaluated):
            log.info("validation dice %.4f at step %d", event.metrics.get("dice", float("nan")), event.step)
        elif isinstance(event, Notice):
            (log.warning if event.level == "warning" else log.info)("%s", event.text)
    return callback


def run_to_end(trainer: Trainer, *, progress_every: int = 25) -> Finished:
    """Run to the end; Ctrl-C (SIGINT) stops after the current step and keeps the model."""
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):  # pragma: no cover - exercised manually
        log.warning("stopping after the current step (press Ctrl-C again to abort)")
        trainer.request_stop()
        signal.signal(signal.SIGINT, previous)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        callback = progress_printer(progress_every)
        finished = None
        for event in trainer.run(previews=False):
            callback(event)
            if isinstance(event, Finished):
                finished = event
        return finished
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def make_trainer(args, cfg, pairs: list, out: Path) -> Trainer:
    """A new trainer from ``cfg``, or with ``--resume`` one restored from a checkpoint (or a
    run folder's last checkpoint) with the budget flags given on the command line."""
    if not args.resume:
        return Trainer(cfg, pairs, device=pick_device(args.device), out_dir=out)
    resume = Path(args.resume)
    if resume.is_dir():  # a run folder: its last (autosaved) checkpoint
        resume = resume / CHECKPOINT_NAME
    trainer = Trainer.from_checkpoint(resume, pairs, device=pick_device(args.device), out_dir=out)
    if args.iterations is not None or args.minutes is not None:  # the budget flags still apply
        trainer.config.iterations, trainer.config.minutes = cfg.iterations, cfg.minutes
        trainer.config.budget = cfg.budget
    for key, raw in set_items(args):  # how the mask fuses network and fill is not the network's: it may change
        section, _, name = key.partition(".")
        if section == "prior" and name in FUSION_SETTINGS:
            set_option(trainer.config, key, raw)
    return trainer


def train_or_fail(trainer: Trainer) -> Finished:
    """Run ``trainer`` to the end; a crash becomes a CliError naming the step."""
    log.info("training %s on %s: %s", trainer.config.method, trainer.device, trainer.dataset.summary())
    finished = run_to_end(trainer)
    if finished.reason == "error":
        said = "checkpoint" in (finished.error or "")  # e.g. the out-of-memory message says it
        kept = f"; the last checkpoint is kept: {finished.checkpoint}" if finished.checkpoint and not said else ""
        raise CliError(f"training failed at step {finished.step}: {finished.error}{kept}")
    return finished


def final_metrics(trainer: Trainer, finished: Finished) -> dict:
    """What ``metrics.json`` records of a finished run."""
    return {
        "losses": finished.losses,
        "steps": finished.step,
        "seconds": round(finished.seconds, 3),
        "device": str(trainer.device),
        "world_size": trainer.dist.world_size,
        "method": trainer.config.method,
        "reason": finished.reason,
        "class_values": trainer.dataset.class_values,
        "data": trainer.dataset.summary(),
    }


def exit_code(finished: Finished) -> int:
    """0 when the run ended by its budget or a stop, 1 otherwise."""
    return 0 if finished.reason in ("budget", "stopped") else 1
