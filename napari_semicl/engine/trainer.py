"""The one training loop, for every method, as a generator of events.

``Trainer.run()`` yields :mod:`~napari_semicl.engine.events` after every step and at every
refresh (whole-volume predictions, validation Dice). Between steps it honours, in this
order: a :class:`~napari_semicl.engine.events.Stop` sent into the generator or
:meth:`Trainer.request_stop` (thread-safe), and new annotation snapshots sent as
:class:`~napari_semicl.engine.events.UpdateData` or passed to :meth:`Trainer.submit_data`,
and a slice to review (:class:`~napari_semicl.engine.events.ReviewSlice` or
:meth:`Trainer.request_review`), answered with a
:class:`~napari_semicl.engine.events.Reviewed` event before the next step.
Closing the generator (a worker's quit) also stops cleanly and checkpoints.
:func:`run_sync` drives the generator for the CLI and tests.

The loop is this module; what it calls are parts of their own (as MONAI Label's and
Ignite's loops call handlers):

* :mod:`~napari_semicl.engine.inbox`: the requests from other threads (stop, data, review,
  analyses) and how they are served;
* :mod:`~napari_semicl.engine.budget`: when the run ends, the learning-rate fraction, the ETA;
* :mod:`~napari_semicl.engine.fusion`: the painted-slice prior and the fused masks of the pairs;
* :mod:`~napari_semicl.engine.refresh`: the refresh, a list of steps (``refresh_steps``);
* :mod:`~napari_semicl.engine.persistence`: checkpoints (state, resume, the periodic one),
  the annotations' autosave, :func:`load_predictor`.

Model wrapping and seeding live here; under ``torchrun`` the trainer asks
:mod:`~napari_semicl.engine.distributed` (the one module with the distributed pieces) for the
process group, the DDP wrapper, per-rank random streams and the few collectives between
steps, and writes on rank 0 only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from ..data.tiles import TileDataset, make_dataset
from ..errors import ConfigError, DataError, SemiclError
from ..methods import get_method
from ..models import build_model
from . import inbox as _inbox
from . import refresh as _refresh
from .apply import Predictor
from .budget import Budget, warm_up_notice
from .config import MEMORY_SETTINGS, TrainConfig
from .device import describe_device, pick_device, set_threads
from .precision import MixedPrecision, make_optimizer
from .distributed import setup as setup_distributed
from .events import Analysed, DataUpdated, Finished, Notice, Preview, Reviewed, Started, StepDone
from .fusion import PairPredictions, same_annotation
from .inference import Prediction, is_out_of_memory
from .memory import fit_training_memory
from .persistence import (
    CHECKPOINT_NAME,
    AnnotationsAutosave,
    PeriodicCheckpoint,
    check_resumable,
    load_predictor,
    load_trainer_state,
    read_resume,
    save_trainer,
    trainer_state,
)
from .postprocess import finish_prediction
from .prior import SlicePrior, dense_share

__all__ = ["CHECKPOINT_NAME", "Trainer", "load_predictor", "run_sync"]

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


class Trainer:
    """Train a method on snapshots of annotated pairs.

    Parameters
    ----------
    config : TrainConfig
        Validated here; the class table and channels are filled from the data.
    pairs : list of AnnotatedPair
        Snapshots (copies) of images and their labels.
    device : torch.device, optional
        Defaults to :func:`~napari_semicl.engine.device.pick_device`.
    out_dir : path, optional
        Where ``checkpoint.pt`` and ``config.json`` go (on stop, finish and every
        ``checkpoint_minutes``), and the annotations the run uses (``annotations/``, see
        :mod:`~napari_semicl.engine.autosave`; at the start, with each autosave when they
        changed, and at the end).
    num_threads : int, optional
        CPU threads for torch while :meth:`run` trains (process-wide); ``None`` keeps
        torch's setting. Behind a GUI use :func:`~napari_semicl.engine.device.gui_thread_count`.
    """

    def __init__(
        self, config: TrainConfig, pairs, *, device: torch.device | None = None, out_dir=None,
        num_threads: int | None = None,
    ) -> None:
        self.config = copy.deepcopy(config).validate()
        #: this process's place among torchrun's ranks (engine.distributed.SINGLE without it)
        self.dist, self.device = setup_distributed(device if device is not None else pick_device())
        self.num_threads = num_threads
        # rank 0 alone writes (checkpoints, annotations, previews): the others have no folder
        self.out_dir = None if out_dir is None or not self.dist.is_main else Path(out_dir)
        self._torch_gen = _seed_everything(self.config.seed)
        self._rng = np.random.default_rng(self.config.seed)
        self.pairs = list(pairs)
        self.dataset = make_dataset(self.pairs, self.config.data, self.config.wsi,
                                    spatial_dims=self.config.model.spatial_dims)
        if getattr(self.dataset, "unknown_values", None):
            raise DataError(
                f"label values {sorted(self.dataset.unknown_values)} are painted but are not in the class "
                f"table {self.dataset.class_values} this network is set up for (data.class_values): erase "
                "them, or train a new network (not a resume) to learn them"
            )
        self.config.model.in_channels = self.dataset.in_channels
        self.config.model.n_classes = self.dataset.n_classes
        self.amp = MixedPrecision(self.config.model.precision, self.device, self.config.model.spatial_dims)
        self.model = self.amp.prepare(build_model(self.config.model).to(self.device))  # channels_last in 2D
        self.method = get_method(self.config.method)(self.config, self.model)
        self.optimizer = make_optimizer([*self.model.parameters(), *self.method.extra_parameters()],
                                        self.config.optim, self.device)
        if self.dist.active:  # the same weights on every rank (above), each rank its own crops
            self._rng, self._torch_gen = self.dist.rank_streams(self.config.seed)
        #: the DDP wrapper of student and heads, built at the first step (after any resume)
        self._ddp = None
        self.step = 0
        self.last_losses: dict[str, float] = {}
        self.history: list[dict] = []
        #: requests from other threads (stop, data, review, analyses), served between steps
        self.inbox = _inbox.Inbox()
        self._notices: list[Notice] = [
            Notice("warning", f"'{self.pairs[p].name}': {n} NaN/Inf voxel(s) are treated as the image minimum")
            for p, n in sorted(getattr(self.dataset, "non_finite", {}).items())
        ]
        # memory estimated before it is spent: defaults shrink (with a notice), forced settings are refused
        self._notices += fit_training_memory(self.config, self.dataset, self.device)
        self._autosave = AnnotationsAutosave(self.out_dir)
        if self.method.uses_unlabelled and not self.dataset.unlabelled:
            self._notices.append(Notice("warning", "no unlabelled slice: the consistency term uses labelled slices"))
        #: the painted-slice prior and the fused masks of the pairs (the prior is built at its
        #: first use: run() builds it in the training thread, never on the caller's Qt thread)
        self.predictions = PairPredictions(self)
        #: what every refresh runs, in order (engine.refresh): a new step is one callable here
        self.refresh_steps: list[_refresh.RefreshStep] = _refresh.default_steps(self.dataset, self.out_dir)

    # --- construction from a checkpoint ----------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, pairs, *, device=None, out_dir=None, num_threads=None) -> "Trainer":
        """Resume: the checkpoint's config, weights, teacher, optimiser and step."""
        config, data = read_resume(path)
        trainer = cls(config, pairs, device=device, out_dir=out_dir, num_threads=num_threads)
        check_resumable(trainer, config)
        load_trainer_state(trainer, data)
        return trainer

    @property
    def prior(self) -> SlicePrior | None:
        """The painted-slice prior of the current data (``config.prior``), or None; built
        on first access and again after new annotations."""
        return self.predictions.prior

    # --- thread-safe controls (the inbox) ----------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (safe from any thread)."""
        self.inbox.request_stop()

    def submit_data(self, pairs) -> None:
        """Queue new annotation snapshots; they replace the data before the next step."""
        self.inbox.submit_data(pairs)

    def request_review(self, pair_index: int, slice_index: int) -> None:
        """Ask for a :class:`Reviewed` event of one slice before the next step.

        Safe from any thread; a newer request replaces one not yet served. ``slice_index``
        indexes the pair's slices along ``config.data.axis`` (0 for a 2D image). Methods
        without a review (the baselines) answer nothing.
        """
        self.inbox.request_review(pair_index, slice_index)

    def request_analysis(self, kind: str, **params) -> None:
        """Ask for an :class:`Analysed` event of ``kind`` before the next step.

        Safe from any thread; a newer request of the same kind replaces one not yet served.
        ``kind`` and ``params`` as in :func:`~napari_semicl.engine.review.run_analysis`.
        """
        self.inbox.request_analysis(kind, **params)

    def analyse(self, kind: str, **params) -> Analysed:
        """Run one review analysis now, in the calling thread (for an idle trainer)."""
        return _inbox.analyse(self, kind, **params)

    def review_slice(self, pair_index: int, slice_index: int) -> dict:
        """:meth:`Method.review_slice` of one slice (see :func:`~napari_semicl.engine.inbox.review_slice`)."""
        return _inbox.review_slice(self, pair_index, slice_index)

    def _apply_review(self) -> Reviewed | Notice | None:
        return _inbox.serve_review(self, self.inbox.take_review())

    def _apply_analyses(self) -> list:
        return _inbox.serve_analyses(self, self.inbox.take_analyses())

    def _apply_pending(self) -> DataUpdated | None:
        pairs = self.inbox.take_pairs()
        return None if pairs is None else self.replace_data(pairs)

    def replace_data(self, pairs) -> DataUpdated:
        """New annotation snapshots replace the training data (the class table is kept);
        weights, optimiser and step go on: a volume joins a running cohort (with nothing
        painted it is unlabelled data, and its mask the network's; with painted slices, the
        network fused with their fill). The prior is rebuilt at its next use, its fills kept
        for the pairs that did not change."""
        pairs, old = list(pairs), self.pairs
        changed = tuple(p for p, pair in enumerate(pairs) if p >= len(old) or not same_annotation(old[p], pair))
        dataset = make_dataset(pairs, copy.deepcopy(self.config.data), self.config.wsi,  # class table kept
                               spatial_dims=self.config.model.spatial_dims)
        if not self._fits_in_memory(dataset, pairs, changed):
            return DataUpdated(self.step, self.dataset.summary(), ())
        self.pairs, self.dataset = pairs, dataset
        self.predictions.invalidate()  # predicted from the images being replaced; the new painted slices move the prior
        self._autosave.changed()
        if dataset.unknown_values:
            self._notices.append(Notice(
                "warning",
                f"label values {sorted(dataset.unknown_values)} are not in the class table "
                f"{dataset.class_values} of this run and are ignored: press Train (not Resume) to learn them",
            ))
        return DataUpdated(self.step, dataset.summary(), changed)

    def _fits_in_memory(self, dataset, pairs, changed) -> bool:
        """The memory check of the trainer's start (:func:`~napari_semicl.engine.memory.fit_training_memory`)
        for ``dataset``, which is to replace the current one: a bigger volume grows the prior's
        arrays and the refresh's prediction. Settings left at their defaults shrink to fit (a
        notice says so; ``dataset``'s data settings and the run's config both take them);
        when a forced setting cannot fit, the data is not taken (a warning names the new
        volumes and why) and training goes on with what it had. Returns whether it fits."""
        data_cfg = getattr(dataset, "cfg", None)
        if data_cfg is None:  # slides' tiles: no whole-volume arrays grow with a slide
            return True
        cfg = copy.copy(self.config)
        cfg.data = data_cfg
        try:
            notices = fit_training_memory(cfg, dataset, self.device)
        except ConfigError as exc:
            names = ", ".join(f"'{pairs[p].name}'" for p in changed) or "the new data"
            self._notices.append(Notice(
                "warning", f"{names} not added to this run: {exc}. Training goes on with the data it had"))
            return False
        self._notices += [n for n in notices if n.level == "warning"]  # the 3D defaults were said at the start
        for key in MEMORY_SETTINGS:
            name = key.split(".")[1]
            setattr(self.config.data, name, getattr(data_cfg, name))
        return True

    # --- the step ------------------------------------------------------------------------------
    def _lr(self, fraction: float) -> float:
        o = self.config.optim
        return o.lr * (1.0 - min(fraction, 0.95)) ** o.poly_power

    def train_step(self, fraction: float = 0.0) -> dict[str, float]:
        """One optimisation step; returns the losses by name (and 'total')."""
        change = self.method.before_step(self.step)
        if change is not None:
            if change.reset_optimizer:
                self.optimizer.state.clear()
            log.info("step %d: %s", self.step, change.message)
            self._notices.append(Notice("info", change.message))
            # a method may have re-drawn weights from this rank's stream: rank 0's for all
            self.dist.broadcast_modules(self.model, self.method.modules, self.method.teacher)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(fraction)
        self.model.train()
        share = dense_share(self.config.prior, fraction) if self.prior is not None else 0.0
        batch = self.dataset.sample_batch(self._rng, self.device, with_unlabelled=self.method.uses_unlabelled,
                                          dense_share=share)
        def compute() -> dict:
            with self.amp.autocast():  # bf16/fp16 autocast, or nothing (engine.precision)
                return self.method.compute_losses(batch, step=self.step, generator=self._torch_gen)

        if self.dist.active and self._ddp is None:
            self._ddp = self.dist.wrap(self.model, self.method.modules, self.device)
        losses = compute() if self._ddp is None else self._ddp(compute)
        total = sum(losses.values())
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        out = self.dist.mean_losses(out)  # every rank's losses (and stops together on a NaN)
        if not math.isfinite(out["total"]):
            raise FloatingPointError(
                f"the loss became {out['total']} at step {self.step}: lower the learning rate "
                "(optim.lr) or check the image for extreme values"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.step(total, self.optimizer)  # backward and step (the loss scaled for fp16)
        self.method.after_step(self.step)
        self.step += 1
        return out

    # --- the loop ------------------------------------------------------------------------------
    def _emit(self, event) -> Generator:
        message = yield event
        self.inbox.handle(message)

    def _emit_notices(self) -> Generator:
        while self._notices:
            yield from self._emit(self._notices.pop(0))

    def run(self, *, previews: bool = True) -> Generator:
        """Train until the budget is spent or a stop is asked; yields events.

        The budget is always counted from where this call starts: ``iterations`` more steps
        (``budget='iterations'``) or ``minutes`` more of wall-clock time (``'minutes'``). A
        fresh trainer starts at step 0, so its first call trains ``iterations`` steps; a
        resumed one (after a stop, or from a checkpoint) trains that many more. ``previews=False`` skips the whole-volume
        predictions of the refreshes (the CLI predicts once at the end itself). Returns (and yields last) a
        :class:`Finished` event.
        """
        cfg = self.config
        self.inbox.clear_stop()
        previews = previews and self.dist.is_main  # rank 0 alone predicts for the user
        threads = set_threads(self.num_threads)
        t0 = time.monotonic()
        budget = Budget.of(cfg, self.step)
        where = describe_device(self.device, threads, self.amp.precision)
        if self.dist.active:
            where += f" x {self.dist.world_size} processes"
        yield from self._emit(Started(where, self.step, budget.target, budget.seconds, self.dataset.summary()))
        warm_up = warm_up_notice(cfg, budget.target)
        if warm_up is not None:
            self._notices.append(warm_up)
        prior = self.prior  # built here, in the training thread
        yield from self._emit_notices()
        if prior is not None and previews and not isinstance(self.dataset, TileDataset):
            # the filled shape at once: what the user sees until the first refresh
            for p_idx in range(len(self.pairs)):
                mask = self.prior_mask(p_idx)
                if mask is not None:
                    yield from self._emit(Preview(self.step, "prediction", p_idx, mask))
        reason, error = "budget", None
        checkpoints = PeriodicCheckpoint(self, cfg.checkpoint_minutes, t0)
        notice = self.autosave_annotations()
        if notice is not None:
            yield from self._emit(notice)
        try:
            while True:
                # every rank leaves at the same step and runs on rank 0's clock (one process: as is)
                stop, elapsed = self.dist.agree(self.inbox.stop_requested, time.monotonic() - t0)
                if stop:
                    self.inbox.request_stop()
                    break
                if budget.spent(self.step, elapsed):
                    break
                lr_fraction = budget.lr_fraction(self.step, elapsed)
                update = self._apply_pending()
                if update is not None:
                    yield from self._emit(update)
                    if previews and update.changed and not isinstance(self.dataset, TileDataset):
                        # the mask of a new or repainted pair at once, not at the next refresh
                        for event in _refresh.refresh(self, [partial(_refresh.volume_previews, pairs=update.changed)]):
                            yield from self._emit(event)
                    yield from self._emit_notices()
                reviewed = self._apply_review()
                if reviewed is not None:
                    yield from self._emit(reviewed)
                for analysed in self._apply_analyses():
                    yield from self._emit(analysed)
                if self.inbox.stop_requested and not self.dist.active:  # asked while those events were handled
                    break  # (several ranks agree on it at the top of the next step)
                losses = self.train_step(lr_fraction)
                yield from self._emit_notices()  # e.g. a method's stage change in that step
                self.last_losses = losses
                self.history.append({"step": self.step, **losses})
                elapsed = time.monotonic() - t0
                fraction, eta = budget.progress(self.step, elapsed)
                yield from self._emit(StepDone(self.step, losses, self.optimizer.param_groups[0]["lr"], elapsed, fraction, eta))
                if previews and self.step % cfg.refresh_every == 0 and not self.inbox.stop_requested:
                    for event in self.refresh_events():
                        yield from self._emit(event)
                if checkpoints.due(time.monotonic()):
                    for event in checkpoints.write():
                        yield from self._emit(event)
                    checkpoints.written(time.monotonic())
            if self.inbox.stop_requested:
                reason = "stopped"
        except GeneratorExit:
            # the consumer closed us (e.g. a worker's quit): keep the model, say nothing more
            if self.out_dir is not None:
                self.save()
                self.autosave_annotations()
            raise
        except (SemiclError, FloatingPointError, RuntimeError, ValueError, MemoryError) as exc:
            reason, error = "error", self._explain(exc)
        ckpt = None
        if self.out_dir is not None:
            self.autosave_annotations()  # the annotations survive an error too
        if self.out_dir is not None and reason != "error":
            ckpt = str(self.save())
        elif self.out_dir is not None and (self.out_dir / CHECKPOINT_NAME).exists():
            ckpt = str(self.out_dir / CHECKPOINT_NAME)  # the last good one is kept as it was
        if reason != "error" and previews:
            for event in self.refresh_events():
                yield from self._emit(event)
        finished = Finished(self.step, reason, time.monotonic() - t0, dict(self.last_losses), ckpt, error)
        yield finished
        return finished

    def _explain(self, exc: BaseException) -> str:
        """The message of an error that ended the run (logged here, with a traceback unless
        it is said in words)."""
        error, explained = str(exc), False
        if is_out_of_memory(exc):
            d = self.config.data
            error = (
                f"out of memory on {describe_device(self.device)} at step {self.step}: lower the training "
                f"crop (data.patch_size, now {d.patch_size}) or the batch sizes (data.batch_labelled "
                f"{d.batch_labelled}, data.batch_unlabelled {d.batch_unlabelled}); the last checkpoint is kept"
            )
        elif self.dist.active:
            error = self.dist.explain_failure(exc, self.step)
            explained = error != str(exc)
        if explained:  # a lost rank, said in words: no traceback
            log.error("training stopped at step %d: %s", self.step, error)
        else:
            log.exception("training stopped by an error at step %d", self.step)
        return error

    # --- refresh, validation, prediction (engine.refresh, engine.fusion) -----------------------
    def refresh_events(self) -> list:
        """The events of one refresh: each of ``refresh_steps`` in turn (by default the
        whole-pair predictions and entropy, then validation Dice)."""
        return _refresh.refresh(self, self.refresh_steps)

    def validate(self) -> dict:
        """Dice per class (label value) on the validation slices; {} when there are none."""
        return _refresh.validate(self)

    def prior_mask(self, pair_index: int = 0) -> np.ndarray | None:
        """The painted-slice prior's mask of a training pair (label values, the pair's
        layout), or None without a prior: what the user sees before the first refresh."""
        return self.predictions.prior_mask(pair_index)

    def predict_pair(self, pair_index: int = 0, *, with_entropy: bool = False) -> Prediction:
        """The mask of a training pair as the user gets it: the network's prediction, fused
        with the painted-slice prior where there is one (:mod:`~napari_semicl.engine.prior`)."""
        return finish_prediction(self.predictions.predict_pair(pair_index, with_entropy=with_entropy),
                                 self.config.predict)

    def predictor(self) -> Predictor:
        """The trained network (the teacher when there is one) as a :class:`Predictor` that
        shares this trainer's weights: predicting between steps costs no copy.
        :meth:`Predictor.from_trainer` gives an independent copy, to predict while training
        goes on in another thread."""
        return Predictor(self.method.inference_model(), self.config, self.device, "the current run", shared=True)

    def predict(self, image: np.ndarray, *, rgb: bool = False, with_entropy: bool = False) -> Prediction:
        """Predict any image with the trained network, finished as the user gets it (the same
        path as the Apply dock and ``napari-semicl predict``: :meth:`Predictor.predict`)."""
        return self.predictor().predict(image, rgb=rgb, with_entropy=with_entropy)

    # --- persistence (engine.persistence) ------------------------------------------------------
    def autosave_annotations(self) -> Notice | None:
        """Write the annotations this run uses to ``out_dir/annotations`` if they changed
        since the last autosave (see :mod:`~napari_semicl.engine.autosave`).

        Returns a warning :class:`Notice` when the write fails (training goes on), else None.
        """
        return self._autosave.save(self.pairs)

    def state(self) -> dict:
        return trainer_state(self)

    def save(self, path=None) -> Path:
        """Checkpoint (atomic) plus ``config.json`` beside it; returns the checkpoint path."""
        return save_trainer(self, path)


def run_sync(gen: Generator, callback: Callable | None = None):
    """Drive a trainer generator to the end, calling ``callback(event)`` for each event;
    returns the final :class:`Finished` event."""
    last = None
    try:
        while True:
            event = next(gen)
            last = event
            if callback is not None:
                callback(event)
    except StopIteration as stop:
        return stop.value if stop.value is not None else last
