"""A trainer's persistence: its state in a checkpoint, resuming from one, a predictor from
one, the periodic checkpoint of the loop and the autosave of the annotations it uses.

The file format and its safe loading are :mod:`~napari_semicl.engine.checkpoint`'s; this
module says what a trainer puts in it and takes out of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError, SemiclError
from ..io import atomic_path
from ..models import build_model
from .precision import MixedPrecision
from .autosave import save_annotations
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .device import pick_device
from .events import Checkpointed, Notice

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


def trainer_state(trainer) -> dict:
    """What a checkpoint holds: config (JSON text), student, method state, optimiser, step."""
    return {
        "config": trainer.config.to_json(),
        "student": trainer.model.state_dict(),
        "method": trainer.method.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "step": trainer.step,
    }


def save_trainer(trainer, path=None) -> Path:
    """Checkpoint (atomic) plus ``config.json`` beside it; returns the checkpoint path."""
    if path is None:
        if trainer.out_dir is None:
            raise ValueError("no out_dir given: pass a path")
        path = trainer.out_dir / CHECKPOINT_NAME
    path = save_checkpoint(path, trainer_state(trainer))
    with atomic_path(path.parent / "config.json") as tmp:  # never a half-written config beside it
        trainer.config.to_json(tmp)
    return path


def read_resume(path) -> tuple[TrainConfig, dict]:
    """(config, checkpoint data) of a checkpoint to resume from."""
    data = load_checkpoint(path)
    try:
        config = TrainConfig.from_json(data["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} holds no valid config: {exc}") from None
    return config, data


def check_resumable(trainer, config: TrainConfig) -> None:
    """CheckpointError when the data of ``trainer`` do not fit the checkpoint's ``config``."""
    have, want = trainer.config.model, config.model
    if have.in_channels != want.in_channels:
        kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
        raise CheckpointError(
            f"the checkpoint was trained on {kind.get(want.in_channels, want.in_channels)} "
            f"images, these are {kind.get(have.in_channels, have.in_channels)}: "
            "resume with images like the ones it was trained on"
        )
    if have.n_classes != want.n_classes:
        raise CheckpointError(f"the checkpoint has {want.n_classes} classes, the annotations give {have.n_classes}")


def load_trainer_state(trainer, data: dict) -> None:
    """Weights, method state (teacher, heads), optimiser and step from checkpoint ``data``."""
    try:
        trainer.model.load_state_dict(data["student"])
        trainer.method.load_state_dict(data.get("method", {}))
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint does not fit this network: {str(exc).splitlines()[0]}") from None
    if data.get("optimizer"):
        trainer.optimizer.load_state_dict(data["optimizer"])
    trainer.step = int(data.get("step", 0))


def load_predictor(path, *, device=None):
    """(network, config) from a checkpoint, ready to predict (the teacher when saved)."""
    data = load_checkpoint(path)
    config = TrainConfig.from_json(data["config"])
    device = device if device is not None else pick_device()
    model = build_model(config.model)
    state = (data.get("method") or {}).get("teacher") or data["student"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint does not fit its own config: {str(exc).splitlines()[0]}") from None
    return MixedPrecision(config.model.precision, device, config.model.spatial_dims).prepare(model.to(device)).eval(), config


class AnnotationsAutosave:
    """Writes the annotations a run uses to ``out_dir/annotations`` when they changed
    (:mod:`~napari_semicl.engine.autosave`): :meth:`changed` on new snapshots, :meth:`save`
    at the start, with each periodic checkpoint and at the end."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.version = 0   # bumped when new snapshots arrive
        self.saved = -1    # the version last written

    def changed(self) -> None:
        self.version += 1

    def save(self, pairs) -> Notice | None:
        """A warning :class:`Notice` when the write fails (training goes on), else None."""
        if self.out_dir is None or self.saved == self.version:
            return None
        try:
            save_annotations(self.out_dir, pairs)
        except (SemiclError, OSError, ValueError) as exc:
            log.warning("autosave of the annotations failed", exc_info=True)
            return Notice("warning", f"could not autosave the annotations to {self.out_dir}: {exc}")
        self.saved = self.version
        return None


class PeriodicCheckpoint:
    """The loop's checkpoint every ``minutes``: the loop passes the clock's readings."""

    def __init__(self, trainer, minutes: float, now: float) -> None:
        self.trainer, self.seconds, self.last = trainer, minutes * 60.0, now

    def due(self, now: float) -> bool:
        return self.trainer.out_dir is not None and now - self.last > self.seconds

    def write(self) -> list:
        """A :class:`Checkpointed` event, and a notice if the annotations' autosave failed."""
        events: list = [Checkpointed(self.trainer.step, str(self.trainer.save()))]
        notice = self.trainer.autosave_annotations()
        if notice is not None:
            events.append(notice)
        return events

    def written(self, now: float) -> None:
        self.last = now
