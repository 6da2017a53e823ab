"""The network's masks of the training pairs, fused with the painted-slice prior.

One part the loop, its refresh steps and :meth:`Trainer.predict_pair` share
(:class:`PairPredictions`): the prior (:class:`~napari_semicl.engine.prior.SlicePrior`,
built at its first use, in the training thread, and again after new annotations), the
network's agreement with it next to the painted slices (measured once a step), and a 3D
network's whole-volume class probabilities (predicted once a step, shared by the agreement,
the previews and validation, released when the refresh that asked for them ends).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from ..data.annotation import decode_classes
from ..data.tiles import TileDataset
from ..errors import DataError
from .events import Notice
from .inference import Prediction, classes_from_probabilities, predict_slices, predict_volume_probabilities
from .prior import SlicePrior

log = logging.getLogger(__name__)


def build_prior(pairs, dataset, cfg, notices: list, previous=None) -> SlicePrior | None:
    """The painted-slice prior of ``dataset`` (``cfg`` is ``config.prior``), or None.

    Volumes without one (scribbles, 2D images) are named in a notice (appended to
    ``notices``, with a summary); training goes on without a prior for them. A volume with
    nothing painted yet (one just opened, a cohort's next volume) is said to get the
    network's mask. ``previous``: (pairs, prior) of the last build, whose fills are kept for
    the pairs that did not change (:func:`same_annotation`). In ``'targets'`` mode the
    dataset's dense targets are set here."""
    if not cfg.active or isinstance(dataset, TileDataset):
        return None
    t0 = time.perf_counter()
    kept: dict[int, int] = {}
    if previous is not None and previous[1] is not None:
        old_pairs, old_prior = previous
        kept = {p: p for p, pair in enumerate(pairs)
                if p < len(old_pairs) and p in old_prior and same_annotation(old_pairs[p], pair)}
    unpainted = {p for p, pair in enumerate(pairs) if pair.labels is not None and not np.any(pair.labels)}
    # those the prior skips (no labels): kept ones are taken over, unpainted ones have none
    prior = SlicePrior([replace(pair, labels=None) if p in kept or p in unpainted else pair
                        for p, pair in enumerate(pairs)], dataset, cfg)
    if kept:
        prior.take_over(previous[1], kept)
    notices.extend(Notice("warning", note) for note in prior.notes)
    notices.extend(Notice("info", f"'{pairs[p].name}': nothing painted yet, its mask is the network's prediction")
                   for p in sorted(unpainted))
    if not any(p in prior for p in range(len(pairs))):
        return None
    if cfg.mode == "targets":
        dataset.set_dense_targets(prior.dense_targets(dataset.unlabelled))
    n_dense = len(getattr(dataset, "dense_targets", {}))
    message = (f"painted-slice prior ({cfg.interpolation} interpolation, {time.perf_counter() - t0:.1f} s): "
               f"dense targets on {n_dense} unpainted slices")
    for p, cal in sorted(prior.calibration.items()):
        if cal.loo:
            dice = ", ".join(f"{q:.2f}" for _, q, _ in cal.loo)
            message += (f"; '{pairs[p].name}': inner painted slices filled from the others score Dice "
                        f"{dice}, so the targets leave out {cal.band_px:.1f} px a slice around the filled boundary")
    if cfg.fuse:
        message += "; the predicted mask falls back on it where the network is unsure"
    notices.append(Notice("info", message))  # one line: the caller logs or shows its notices (issue 27)
    return prior


def same_annotation(a, b) -> bool:
    """Whether two snapshots of a pair hold the same image, labels and validation slices."""
    if (a.image.shape != b.image.shape or tuple(a.validation_slices) != tuple(b.validation_slices)
            or a.spacing != b.spacing or a.rgb != b.rgb or (a.labels is None) != (b.labels is None)):
        return False
    if a.labels is not None and not np.array_equal(a.labels, b.labels):
        return False
    return a.image is b.image or np.array_equal(a.image, b.image)


def to_pair_layout(arr: np.ndarray, pair, axis: int) -> np.ndarray:
    """A (S, H, W) array in slice layout back in the pair's own layout."""
    if len(pair.spatial_shape) == 2:
        return arr[0]
    return np.ascontiguousarray(np.moveaxis(arr, 0, axis))


class PairPredictions:
    """The prior and the fused predictions of a trainer's pairs (see the module doc).

    Reads the trainer's current ``pairs``, ``dataset``, ``method``, ``device`` and ``step``
    at every call, so a data update or a step needs nothing but :meth:`invalidate`."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self._prior: SlicePrior | None = None
        self._built_from: list = []  # the pairs the prior was built from
        self._stale = True
        #: (step, pair) -> the network's agreement with the prior: measured once per step, for
        #: the refresh's previews and its validation alike (cleared when the prior is rebuilt)
        self.agreements: dict[tuple[int, int], float] = {}
        #: (step, pair) -> a 3D network's class probabilities (S, K, H, W) of the whole pair,
        #: unfused, and the notes of their prediction
        self.volume_probs: dict[tuple[int, int], tuple[torch.Tensor, tuple[str, ...]]] = {}

    # --- the prior -------------------------------------------------------------------------
    @property
    def prior(self) -> SlicePrior | None:
        if self._stale:
            t = self.trainer
            self._prior = build_prior(t.pairs, t.dataset, t.config.prior, t._notices,
                                      previous=(self._built_from, self._prior))
            self._built_from = list(t.pairs)
            self._stale = False
            self.agreements.clear()
        return self._prior

    def invalidate(self) -> None:
        """New data: the prior is rebuilt at its next use; predictions of the old images go."""
        self._stale = True
        self.volume_probs.clear()

    def release(self) -> None:
        """Drop the shared volume probabilities (a volume a pair: not kept while training goes on)."""
        self.volume_probs.clear()

    # --- fusion ----------------------------------------------------------------------------
    def fuser(self, pair_index: int, offset: int = 0):
        """The prior's fusion for slices of pair ``pair_index`` (starting at ``offset``), or
        None. The network's agreement with the prior next to the painted slices is measured
        once a step (one prediction of those slices)."""
        prior = self.prior
        if prior is None or pair_index not in prior or not prior.config.fuse:
            return None
        fuse = prior.fuser(pair_index, self.agreement(pair_index))
        if offset == 0:
            return fuse
        return lambda start, stop, probs: fuse(start + offset, stop + offset, probs)

    def agreement(self, pair_index: int) -> float:
        t = self.trainer
        key = (t.step, pair_index)
        if key not in self.agreements:
            self.agreements = _this_step(self.agreements, t.step)
            near = self.prior.near_slices(pair_index)
            if len(near) == 0:
                self.agreements[key] = 1.0
            else:
                if t.config.model.spatial_dims == 3:  # the whole volume (shared), then those slices
                    idx, _ = classes_from_probabilities(self.volume_probabilities(pair_index)[torch.as_tensor(near)])
                else:
                    images = t.dataset.images[pair_index]
                    idx, _ = predict_slices(t.method.inference_model(), images[near], device=t.device)
                self.agreements[key] = self.prior.agreement(pair_index, idx, near)
        return self.agreements[key]

    def volume_probabilities(self, pair_index: int, notes: list | None = None) -> torch.Tensor:
        """A 3D network's class probabilities (S, K, H, W) of a whole training pair, unfused
        (read-only): predicted once a step and shared by the prior's agreement, the previews,
        validation and :meth:`Trainer.predict_pair`. Only the current step's are kept.
        Out-of-memory notes of that prediction go to ``notes`` at every use."""
        t = self.trainer
        key = (t.step, pair_index)
        if key not in self.volume_probs:
            self.volume_probs = _this_step(self.volume_probs, t.step)
            said: list[str] = []
            probs = predict_volume_probabilities(t.method.inference_model(), t.dataset.images[pair_index],
                                                 device=t.device, notes=said,
                                                 adapt_batch_norm=t.config.predict.adapt_batch_norm)
            self.volume_probs[key] = (probs, tuple(said))
        probs, said = self.volume_probs[key]
        if notes is not None:
            notes.extend(said)
        return probs

    def pair_classes(self, pair_index: int, *, with_entropy: bool = False, notes: list | None = None):
        """Class indices (S, H, W) and, with ``with_entropy``, the normalised entropy of a
        whole training pair in slice layout, fused with the prior where it is on. A 2D
        network predicts the slices; a 3D network's come from this step's shared
        probabilities (:meth:`volume_probabilities`)."""
        t = self.trainer
        fuse = self.fuser(pair_index)
        if t.config.model.spatial_dims == 3:
            return classes_from_probabilities(self.volume_probabilities(pair_index, notes), fuse=fuse,
                                              with_entropy=with_entropy)
        return predict_slices(t.method.inference_model(), t.dataset.images[pair_index], device=t.device,
                              with_entropy=with_entropy, notes=notes, fuse=fuse,
                              adapt_batch_norm=t.config.predict.adapt_batch_norm)

    # --- what the user gets ----------------------------------------------------------------
    def labels(self, idx: np.ndarray, pair_index: int) -> np.ndarray:
        """Class indices in slice layout as label values in the pair's layout."""
        return self.in_pair_layout(decode_classes(idx, self.trainer.dataset.class_values), pair_index)

    def in_pair_layout(self, arr: np.ndarray, pair_index: int) -> np.ndarray:
        """An array in slice layout (S, H, W) in the layout of pair ``pair_index``."""
        t = self.trainer
        return to_pair_layout(arr, t.pairs[pair_index], t.config.data.axis)

    def prior_mask(self, pair_index: int = 0) -> np.ndarray | None:
        idx = None if self.prior is None else self.prior.mask(pair_index)
        return None if idx is None else self.labels(idx, pair_index)

    def predict_pair(self, pair_index: int = 0, *, with_entropy: bool = False) -> Prediction:
        t = self.trainer
        if isinstance(t.dataset, TileDataset):
            raise DataError("slides are predicted tile by tile: use predict_slide_pair")
        notes: list[str] = []
        try:
            idx, ent = self.pair_classes(pair_index, with_entropy=with_entropy, notes=notes)
        finally:
            self.release()
        entropy = None if ent is None else self.in_pair_layout(ent, pair_index)
        return Prediction(self.labels(idx, pair_index), entropy, notes)


def _this_step(cache: dict, step: int) -> dict:
    """The entries of a (step, pair)-keyed cache made at ``step``."""
    return {k: v for k, v in cache.items() if k[0] == step}
