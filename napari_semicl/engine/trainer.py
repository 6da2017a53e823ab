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

Model wrapping, seeding and checkpoint I/O live here and nowhere else; under ``torchrun``
the trainer asks :mod:`~napari_semicl.engine.distributed` (the one module with the
distributed pieces) for the process group, the DDP wrapper, per-rank random streams and the
few collectives between steps, and writes on rank 0 only.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from ..data.annotation import decode_classes
from ..data.tiles import TileDataset, make_dataset
from ..errors import CheckpointError, DataError, SemiclError
from ..io import atomic_path
from ..methods import get_method
from ..models import build_model
from .autosave import save_annotations
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .device import describe_device, pick_device, set_threads
from .distributed import setup as setup_distributed
from .events import (
    Analysed,
    Checkpointed,
    DataUpdated,
    Evaluated,
    Finished,
    Notice,
    Preview,
    Reviewed,
    ReviewSlice,
    Started,
    StepDone,
    Stop,
    UpdateData,
)
from .memory import fit_training_memory
from .inference import (
    Prediction,
    classes_from_probabilities,
    is_out_of_memory,
    predict_slices,
    predict_volume,
    predict_volume_probabilities,
)
from .metrics import dice_per_class
from .prior import SlicePrior, dense_share
from .review import padded_slice, run_analysis

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


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
        self.model = build_model(self.config.model).to(self.device)
        self.method = get_method(self.config.method)(self.config, self.model)
        self.optimizer = torch.optim.AdamW(
            [*self.model.parameters(), *self.method.extra_parameters()], lr=self.config.optim.lr, weight_decay=self.config.optim.weight_decay
        )
        if self.dist.active:  # the same weights on every rank (above), each rank its own crops
            self._rng, self._torch_gen = self.dist.rank_streams(self.config.seed)
        #: the DDP wrapper of student and heads, built at the first step (after any resume)
        self._ddp = None
        self.step = 0
        self.last_losses: dict[str, float] = {}
        self.history: list[dict] = []
        self._stop = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending_pairs: list | None = None
        self._pending_review: tuple[int, int] | None = None
        self._pending_analyses: dict[str, dict] = {}
        self._notices: list[Notice] = [
            Notice("warning", f"'{self.pairs[p].name}': {n} NaN/Inf voxel(s) are treated as the image minimum")
            for p, n in sorted(getattr(self.dataset, "non_finite", {}).items())
        ]
        self._notices += fit_training_memory(self.config, self.dataset, self.device)  # before any big allocation
        self._annotations_version = 0  # bumped when new snapshots arrive
        self._annotations_saved = -1   # the version last autosaved
        self._preview_root: Path | None = None
        self._previews: dict[int, list[Path]] = {}
        if self.method.uses_unlabelled and not self.dataset.unlabelled:
            self._notices.append(Notice("warning", "no unlabelled slice: the consistency term uses labelled slices"))
        # the painted-slice prior is built at its first use (run() builds it in the training
        # thread: the optical-flow fill takes seconds, never on the caller's (Qt) thread)
        self._prior: SlicePrior | None = None
        self._prior_stale = True
        #: (step, pair) -> the network's agreement with the prior: measured once per step, for
        #: the refresh's previews and its validation alike (cleared when the prior is rebuilt)
        self._agreements: dict[tuple[int, int], float] = {}
        #: (step, pair) -> a 3D network's class probabilities (S, K, H, W) of the whole pair,
        #: unfused, and the notes of their prediction: predicted once a step for the prior's
        #: agreement, the previews and validation alike; released when the refresh (or
        #: predict_pair) that predicted them ends, stale ones dropped at the next prediction
        self._volume_probs: dict[tuple[int, int], tuple[torch.Tensor, tuple[str, ...]]] = {}

    # --- construction from a checkpoint ----------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, pairs, *, device=None, out_dir=None, num_threads=None) -> "Trainer":
        """Resume: the checkpoint's config, weights, teacher, optimiser and step."""
        data = load_checkpoint(path)
        try:
            config = TrainConfig.from_json(data["config"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} holds no valid config: {exc}") from None
        trainer = cls(config, pairs, device=device, out_dir=out_dir, num_threads=num_threads)
        if trainer.config.model.in_channels != config.model.in_channels:
            kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
            raise CheckpointError(
                f"the checkpoint was trained on {kind.get(config.model.in_channels, config.model.in_channels)} "
                f"images, these are {kind.get(trainer.config.model.in_channels, trainer.config.model.in_channels)}: "
                "resume with images like the ones it was trained on"
            )
        if trainer.config.model.n_classes != config.model.n_classes:
            raise CheckpointError(
                f"the checkpoint has {config.model.n_classes} classes, the annotations give "
                f"{trainer.config.model.n_classes}"
            )
        trainer._load_state(data)
        return trainer

    def _load_state(self, data: dict) -> None:
        try:
            self.model.load_state_dict(data["student"])
            self.method.load_state_dict(data.get("method", {}))
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this network: {str(exc).splitlines()[0]}") from None
        if data.get("optimizer"):
            self.optimizer.load_state_dict(data["optimizer"])
        self.step = int(data.get("step", 0))

    @property
    def prior(self) -> SlicePrior | None:
        """The painted-slice prior of the current data (``config.prior``), or None; built
        on first access and again after new annotations."""
        if self._prior_stale:
            self._prior = self._build_prior()
            self._prior_stale = False
            self._agreements.clear()
        return self._prior

    def _build_prior(self) -> SlicePrior | None:
        """The painted-slice prior of the current dataset (``config.prior``), or None.

        Volumes without one (scribbles, 2D images) are named in a notice; training goes on
        without a prior for them."""
        cfg = self.config.prior
        if not cfg.active or isinstance(self.dataset, TileDataset):
            return None
        t0 = time.perf_counter()
        prior = SlicePrior(self.pairs, self.dataset, cfg)
        self._notices.extend(Notice("warning", note) for note in prior.notes)
        if not any(p in prior for p in range(len(self.pairs))):
            return None
        if cfg.mode == "targets":
            self.dataset.set_dense_targets(prior.dense_targets(self.dataset.unlabelled))
        n_dense = len(getattr(self.dataset, "dense_targets", {}))
        message = (f"painted-slice prior ({cfg.interpolation} interpolation, {time.perf_counter() - t0:.1f} s): "
                   f"dense targets on {n_dense} unpainted slices")
        for p, cal in sorted(prior.calibration.items()):
            if cal.loo:
                dice = ", ".join(f"{q:.2f}" for _, q, _ in cal.loo)
                message += (f"; '{self.pairs[p].name}': inner painted slices filled from the others score Dice "
                            f"{dice}, so the targets leave out {cal.band_px:.1f} px a slice around the filled boundary")
        if cfg.fuse:
            message += "; the predicted mask falls back on it where the network is unsure"
        log.info(message)
        self._notices.append(Notice("info", message))
        return prior

    # --- thread-safe controls -----------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (safe from any thread)."""
        self._stop.set()

    def submit_data(self, pairs) -> None:
        """Queue new annotation snapshots; they replace the data before the next step."""
        with self._pending_lock:
            self._pending_pairs = list(pairs)

    def request_review(self, pair_index: int, slice_index: int) -> None:
        """Ask for a :class:`Reviewed` event of one slice before the next step.

        Safe from any thread; a newer request replaces one not yet served. ``slice_index``
        indexes the pair's slices along ``config.data.axis`` (0 for a 2D image). Methods
        without a review (the baselines) answer nothing.
        """
        with self._pending_lock:
            self._pending_review = (int(pair_index), int(slice_index))

    def request_analysis(self, kind: str, **params) -> None:
        """Ask for an :class:`Analysed` event of ``kind`` before the next step.

        Safe from any thread; a newer request of the same kind replaces one not yet served.
        ``kind`` and ``params`` as in :func:`~napari_semicl.engine.review.run_analysis`.
        """
        with self._pending_lock:
            self._pending_analyses[str(kind)] = dict(params)

    def analyse(self, kind: str, **params) -> Analysed:
        """Run one review analysis now, in the calling thread (for an idle trainer)."""
        with torch.no_grad():
            arrays = run_analysis(self.method, self.dataset, kind, device=self.device, **params)
        return Analysed(self.step, kind, dict(params), arrays)

    def _apply_analyses(self) -> list:
        """Serve the pending analyses; a failing one becomes a :class:`Notice`."""
        with self._pending_lock:
            pending, self._pending_analyses = self._pending_analyses, {}
        events: list = []
        for kind, params in pending.items():
            try:
                events.append(self.analyse(kind, **params))
            except (SemiclError, RuntimeError, ValueError, IndexError, TypeError) as exc:
                log.warning("analysis %s failed", kind, exc_info=True)
                events.append(Notice("warning", f"could not compute {kind}: {str(exc).splitlines()[0]}"))
        return events

    # --- the loop ----------------------------------------------------------------------------
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
        total.backward()
        self.optimizer.step()
        self.method.after_step(self.step)
        self.step += 1
        return out

    def _apply_pending(self) -> DataUpdated | None:
        with self._pending_lock:
            pairs, self._pending_pairs = self._pending_pairs, None
        if pairs is None:
            return None
        dataset = make_dataset(pairs, copy.deepcopy(self.config.data), self.config.wsi,  # class table kept
                               spatial_dims=self.config.model.spatial_dims)
        self.pairs, self.dataset = pairs, dataset
        self._volume_probs.clear()  # predicted from the images being replaced
        self._annotations_version += 1
        self._prior_stale = True  # the new painted slices move the prior: rebuilt at its next use
        if dataset.unknown_values:
            self._notices.append(Notice(
                "warning",
                f"label values {sorted(dataset.unknown_values)} are not in the class table "
                f"{dataset.class_values} of this run and are ignored: press Train (not Resume) to learn them",
            ))
        return DataUpdated(self.step, dataset.summary())

    def _apply_review(self) -> Reviewed | Notice | None:
        """Serve the pending review request, if any (None when there is nothing to show).

        A review that fails says so in a :class:`Notice` and leaves training going.
        """
        with self._pending_lock:
            request, self._pending_review = self._pending_review, None
        if request is None:
            return None
        p_idx, s_idx = request
        if isinstance(self.dataset, TileDataset):
            log.debug("review of slides is not implemented; request ignored")
            return None
        if not (0 <= p_idx < len(self.dataset.images) and 0 <= s_idx < self.dataset.images[p_idx].shape[0]):
            log.debug("review of pair %d slice %d ignored: out of range", p_idx, s_idx)
            return None
        try:
            arrays = self.review_slice(p_idx, s_idx)
        except (RuntimeError, ValueError) as exc:
            log.warning("review of pair %d slice %d failed", p_idx, s_idx, exc_info=True)
            return Notice("warning", f"could not review slice {s_idx}: {str(exc).splitlines()[0]}")
        return Reviewed(self.step, p_idx, s_idx, arrays) if arrays else None

    @torch.no_grad()
    def _warm_up_notice(self, target: int | None) -> Notice | None:
        """A warning when this run ends before the method's warm-up does (its own term,
        e.g. PLGCL's contrastive loss, would never train); None otherwise."""
        section = getattr(self.config, self.config.method, None)
        warm = getattr(section, "warmup_steps", None)
        if target is None or not isinstance(warm, int) or target > warm:
            return None
        return Notice(
            "warning",
            f"{self.config.method}: this run ends at step {target}, within its {warm}-step warm-up, so its "
            f"contrastive term never trains; train more steps or lower the warm-up steps (Advanced)",
        )

    def review_slice(self, pair_index: int, slice_index: int) -> dict:
        """:meth:`Method.review_slice` of one normalised slice, padded to the network's
        size multiple (zeros at the bottom and right; the method limits its output to the
        slice). A 3D network has no per-slice review (ValueError, a notice)."""
        if self.config.model.spatial_dims == 3:
            raise ValueError("the per-slice sampler review is for slice networks; this run trains a 3D network")
        img = self.dataset.images[pair_index][slice_index]  # (C, H, W)
        h, w = img.shape[-2:]
        x = padded_slice(img, int(getattr(self.model, "multiple", 1)), self.device)
        return self.method.review_slice(x, valid_shape=(h, w))

    def _handle(self, message) -> None:
        if isinstance(message, Stop):
            self._stop.set()
        elif isinstance(message, UpdateData):
            self.submit_data(message.pairs)
        elif isinstance(message, ReviewSlice):
            self.request_review(message.pair_index, message.slice_index)

    def _emit(self, event) -> Generator:
        message = yield event
        self._handle(message)

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
        self._stop.clear()
        previews = previews and self.dist.is_main  # rank 0 alone predicts for the user
        threads = set_threads(self.num_threads)
        t0 = time.monotonic()
        start_step = self.step
        if cfg.budget == "iterations":
            target = self.step + cfg.iterations  # N more steps, wherever this call starts
            budget_s = None
        else:
            target, budget_s = None, cfg.minutes * 60.0
        where = describe_device(self.device, threads)
        if self.dist.active:
            where += f" x {self.dist.world_size} processes"
        yield from self._emit(Started(where, self.step, target, budget_s, self.dataset.summary()))
        warm_up = self._warm_up_notice(target)
        if warm_up is not None:
            self._notices.append(warm_up)
        prior = self.prior  # built here, in the training thread
        for notice in self._notices:
            yield from self._emit(notice)
        self._notices.clear()
        if prior is not None and previews and not isinstance(self.dataset, TileDataset):
            # the filled shape at once: what the user sees until the first refresh
            for p_idx in range(len(self.pairs)):
                mask = self.prior_mask(p_idx)
                if mask is not None:
                    yield from self._emit(Preview(self.step, "prediction", p_idx, mask))
        reason, error, last_save = "budget", None, t0
        notice = self.autosave_annotations()
        if notice is not None:
            yield from self._emit(notice)
        try:
            while True:
                # every rank leaves at the same step and runs on rank 0's clock (one process: as is)
                stop, elapsed = self.dist.agree(self._stop.is_set(), time.monotonic() - t0)
                if stop:
                    self._stop.set()
                    break
                # the learning-rate schedule runs over the whole iteration budget, or this run's time
                if target is not None:
                    if self.step >= target:
                        break
                    lr_fraction = self.step / max(target, 1)
                else:
                    if elapsed >= budget_s:
                        break
                    lr_fraction = elapsed / budget_s
                update = self._apply_pending()
                if update is not None:
                    yield from self._emit(update)
                    for notice in self._notices:
                        yield from self._emit(notice)
                    self._notices.clear()
                reviewed = self._apply_review()
                if reviewed is not None:
                    yield from self._emit(reviewed)
                for analysed in self._apply_analyses():
                    yield from self._emit(analysed)
                if self._stop.is_set() and not self.dist.active:  # asked while those events were handled
                    break  # (several ranks agree on it at the top of the next step)
                losses = self.train_step(lr_fraction)
                while self._notices:  # e.g. a method's stage change in that step
                    yield from self._emit(self._notices.pop(0))
                self.last_losses = losses
                self.history.append({"step": self.step, **losses})
                elapsed = time.monotonic() - t0
                done = self.step - start_step
                if target is not None:
                    fraction = done / max(target - start_step, 1)
                    eta = elapsed / done * (target - self.step)
                else:
                    fraction = min(elapsed / budget_s, 1.0)
                    eta = max(budget_s - elapsed, 0.0)
                yield from self._emit(StepDone(self.step, losses, self.optimizer.param_groups[0]["lr"], elapsed, fraction, eta))
                if previews and self.step % cfg.refresh_every == 0 and not self._stop.is_set():
                    for event in self.refresh_events():
                        yield from self._emit(event)
                if self.out_dir is not None and time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                    yield from self._emit(Checkpointed(self.step, str(self.save())))
                    notice = self.autosave_annotations()
                    if notice is not None:
                        yield from self._emit(notice)
                    last_save = time.monotonic()
            if self._stop.is_set():
                reason = "stopped"
        except GeneratorExit:
            # the consumer closed us (e.g. a worker's quit): keep the model, say nothing more
            if self.out_dir is not None:
                self.save()
                self.autosave_annotations()
            raise
        except (SemiclError, FloatingPointError, RuntimeError, ValueError, MemoryError) as exc:
            reason, error, explained = "error", str(exc), False
            if is_out_of_memory(exc):
                d = cfg.data
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

    # --- previews, validation, prediction ------------------------------------------------------
    def refresh_events(self) -> list:
        """Whole-pair predictions (and entropy) plus validation Dice at the current step."""
        model = self.method.inference_model()
        events: list = []
        if isinstance(self.dataset, TileDataset):
            return self._slide_previews(model)
        notes: list[str] = []
        try:  # a 3D network predicts each pair once, for the agreement, the preview and validation
            for p_idx in range(len(self.dataset.images)):
                idx, ent = self._predict_pair_classes(p_idx, with_entropy=True, notes=notes)
                labels = self._to_pair_layout(decode_classes(idx, self.dataset.class_values), p_idx)
                events.append(Preview(self.step, "prediction", p_idx, labels))
                events.append(Preview(self.step, "entropy", p_idx, self._to_pair_layout(ent, p_idx)))
            events.extend(Notice("warning", note) for note in dict.fromkeys(notes))
            metrics = self.validate()
        finally:
            self._volume_probs.clear()  # a volume a pair: not kept while training goes on
        if metrics:
            events.append(Evaluated(self.step, metrics))
        return events

    def _slide_previews(self, model) -> list:
        """Stitched tile-by-tile predictions of every slide, as zarr label pyramids.

        Each refresh writes a new OME-Zarr under ``out_dir/previews`` (or a temporary
        folder) and removes the one before the last, so a viewer still reading the last
        preview never sees it change. The event's array is the list of pyramid levels.
        """
        import shutil
        import tempfile

        from .slide_inference import predict_slide_pair

        if self._preview_root is None:
            if self.out_dir is not None:
                self._preview_root = self.out_dir / "previews"
                self._preview_root.mkdir(parents=True, exist_ok=True)
            else:
                self._preview_root = Path(tempfile.mkdtemp(prefix="semicl_previews_"))
        events = []
        for p_idx, pair in enumerate(self.dataset.pairs):
            path = self._preview_root / f"pair{p_idx}_step{self.step}.zarr"
            pyramid, _ = predict_slide_pair(model, pair, path, class_values=self.dataset.class_values,
                                            device=self.device, overlap=self.config.wsi.overlap)
            self._previews.setdefault(p_idx, []).append(path)
            while len(self._previews[p_idx]) > 2:
                shutil.rmtree(self._previews[p_idx].pop(0), ignore_errors=True)
            events.append(Preview(self.step, "prediction", p_idx, pyramid))
        return events

    def _to_pair_layout(self, arr: np.ndarray, p_idx: int) -> np.ndarray:
        pair = self.pairs[p_idx]
        if len(pair.spatial_shape) == 2:
            return arr[0]
        return np.ascontiguousarray(np.moveaxis(arr, 0, self.config.data.axis))

    def validate(self) -> dict:
        """Dice per class (label value) on the validation slices; {} when there are none."""
        if not self.dataset.validation:
            return {}
        model = self.method.inference_model()
        preds, refs = [], []
        volumes: dict[int, np.ndarray] = {}  # a 3D network predicts each pair once
        for p_idx, s_idx in self.dataset.validation:
            if self.config.model.spatial_dims == 3:
                if p_idx not in volumes:
                    volumes[p_idx] = self._predict_pair_classes(p_idx)[0]
                idx = volumes[p_idx][s_idx:s_idx + 1]
            else:
                img = self.dataset.images[p_idx][s_idx:s_idx + 1]
                idx, _ = predict_slices(model, img, device=self.device, fuse=self._fuser(p_idx, offset=s_idx))
            ref = self.dataset.targets[p_idx][s_idx]
            pred = decode_classes(idx[0], self.dataset.class_values)
            if self.config.data.unpainted == "ignore":
                painted = ref != 0
                pred, ref = pred[painted], ref[painted]
            preds.append(pred.ravel())
            refs.append(ref.ravel())
        per_class = dice_per_class(np.concatenate(preds), np.concatenate(refs), self.dataset.class_values)
        mean = float(np.mean(list(per_class.values()))) if per_class else math.nan
        return {"dice": mean, "dice_per_class": per_class, "slices": len(self.dataset.validation)}

    def _fuser(self, pair_index: int, offset: int = 0):
        """The prior's fusion for slices of pair ``pair_index`` (starting at ``offset``), or
        None. The network's agreement with the prior next to the painted slices is measured
        once a step (one prediction of those slices)."""
        if self.prior is None or pair_index not in self.prior or not self.prior.config.fuse:
            return None
        fuse = self.prior.fuser(pair_index, self._prior_agreement(pair_index))
        if offset == 0:
            return fuse
        return lambda start, stop, probs: fuse(start + offset, stop + offset, probs)

    def _prior_agreement(self, pair_index: int) -> float:
        key = (self.step, pair_index)
        if key not in self._agreements:
            self._agreements = self._this_step(self._agreements)
            near = self.prior.near_slices(pair_index)
            if len(near) == 0:
                self._agreements[key] = 1.0
            else:
                if self.config.model.spatial_dims == 3:  # the whole volume (shared), then those slices
                    idx, _ = classes_from_probabilities(self._volume_probabilities(pair_index)[torch.as_tensor(near)])
                else:
                    images = self.dataset.images[pair_index]
                    idx, _ = predict_slices(self.method.inference_model(), images[near], device=self.device)
                self._agreements[key] = self.prior.agreement(pair_index, idx, near)
        return self._agreements[key]

    def _this_step(self, cache: dict) -> dict:
        """The entries of a (step, pair)-keyed cache made at the current step."""
        return {k: v for k, v in cache.items() if k[0] == self.step}

    def _volume_probabilities(self, pair_index: int, notes: list | None = None) -> torch.Tensor:
        """A 3D network's class probabilities (S, K, H, W) of a whole training pair, unfused
        (read-only): predicted once a step and shared by the prior's agreement, the previews,
        validation and :meth:`predict_pair`. Only the current step's are kept (one volume a
        pair at most; the refresh or prediction that asks for them releases them). Out-of-memory
        notes of that prediction go to ``notes`` at every use."""
        key = (self.step, pair_index)
        if key not in self._volume_probs:
            self._volume_probs = self._this_step(self._volume_probs)
            said: list[str] = []
            probs = predict_volume_probabilities(self.method.inference_model(), self.dataset.images[pair_index],
                                                 device=self.device, notes=said)
            self._volume_probs[key] = (probs, tuple(said))
        probs, said = self._volume_probs[key]
        if notes is not None:
            notes.extend(said)
        return probs

    def _predict_pair_classes(self, pair_index: int, *, with_entropy: bool = False, notes: list | None = None):
        """Class indices (S, H, W) and, with ``with_entropy``, the normalised entropy of a
        whole training pair in slice layout, fused with the painted-slice prior where it is
        on. A 2D network predicts the slices; a 3D network's come from this step's shared
        probabilities (:meth:`_volume_probabilities`)."""
        fuse = self._fuser(pair_index)
        if self.config.model.spatial_dims == 3:
            return classes_from_probabilities(self._volume_probabilities(pair_index, notes), fuse=fuse,
                                              with_entropy=with_entropy)
        return predict_slices(self.method.inference_model(), self.dataset.images[pair_index], device=self.device,
                              with_entropy=with_entropy, notes=notes, fuse=fuse)

    def prior_mask(self, pair_index: int = 0) -> np.ndarray | None:
        """The painted-slice prior's mask of a training pair (label values, the pair's
        layout), or None without a prior: what the user sees before the first refresh."""
        idx = None if self.prior is None else self.prior.mask(pair_index)
        if idx is None:
            return None
        return self._to_pair_layout(decode_classes(idx, self.dataset.class_values), pair_index)

    def predict_pair(self, pair_index: int = 0, *, with_entropy: bool = False) -> Prediction:
        """The mask of a training pair as the user gets it: the network's prediction, fused
        with the painted-slice prior where there is one (:mod:`~napari_semicl.engine.prior`)."""
        if isinstance(self.dataset, TileDataset):
            raise DataError("slides are predicted tile by tile: use predict_slide_pair")
        notes: list[str] = []
        try:
            idx, ent = self._predict_pair_classes(pair_index, with_entropy=with_entropy, notes=notes)
        finally:
            self._volume_probs.clear()
        labels = self._to_pair_layout(decode_classes(idx, self.dataset.class_values), pair_index)
        return Prediction(labels, None if ent is None else self._to_pair_layout(ent, pair_index), notes)

    def predict(self, image: np.ndarray, *, rgb: bool = False, with_entropy: bool = False) -> Prediction:
        """Predict any image with the trained network (the teacher when there is one)."""
        return predict_volume(
            self.method.inference_model(), image, class_values=self.dataset.class_values,
            axis=self.config.data.axis, rgb=rgb, normalise=self.config.data.normalise,
            device=self.device, with_entropy=with_entropy, context_slices=self.config.data.context_slices,
        )

    # --- persistence -------------------------------------------------------------------------
    def autosave_annotations(self) -> Notice | None:
        """Write the annotations this run uses to ``out_dir/annotations`` if they changed
        since the last autosave (see :mod:`~napari_semicl.engine.autosave`).

        Returns a warning :class:`Notice` when the write fails (training goes on), else None.
        """
        if self.out_dir is None or self._annotations_saved == self._annotations_version:
            return None
        try:
            save_annotations(self.out_dir, self.pairs)
        except (SemiclError, OSError, ValueError) as exc:
            log.warning("autosave of the annotations failed", exc_info=True)
            return Notice("warning", f"could not autosave the annotations to {self.out_dir}: {exc}")
        self._annotations_saved = self._annotations_version
        return None

    def state(self) -> dict:
        return {
            "config": self.config.to_json(),
            "student": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def save(self, path=None) -> Path:
        """Checkpoint (atomic) plus ``config.json`` beside it; returns the checkpoint path."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("no out_dir given: pass a path")
            path = self.out_dir / CHECKPOINT_NAME
        path = save_checkpoint(path, self.state())
        with atomic_path(path.parent / "config.json") as tmp:  # never a half-written config beside it
            self.config.to_json(tmp)
        return path


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
    return model.to(device).eval(), config


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
