"""Slice datasets: labelled, unlabelled and validation slices from annotated pairs.

Images are normalised per volume, moved so that the slicing axis is first and stored as
float32 (S, C, H, W). Training crops are square ``patch_size`` windows; a labelled crop is
centred near a randomly chosen painted pixel so that sparse scribbles are always seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .annotation import (
    IGNORE_INDEX,
    AnnotatedPair,
    build_class_table,
    encode_targets,
    labelled_slice_indices,
)

log = logging.getLogger(__name__)


def normalise_image(image: np.ndarray, mode: str = "percentile", *, rgb: bool = False) -> np.ndarray:
    """Scale intensities to a range the network expects; NaN/Inf become the minimum.

    Parameters
    ----------
    image : ndarray
        Any numeric dtype (integer CT ranges included).
    mode : {'percentile', 'zscore', 'none'}
        'percentile': clip to the 0.5-99.5 percentiles and scale to [0, 1] (per channel for
        RGB); 'zscore': zero mean and unit variance; 'none': cast only.
    rgb : bool
        Whether the last axis holds colour channels.
    """
    img = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(img)
    if not finite.all():
        n_bad = int((~finite).sum())
        if not finite.any():
            raise DataError("the image holds no finite value (all NaN/Inf): check the file")
        log.warning("%d NaN/Inf voxels replaced by the image minimum", n_bad)
        img = np.where(finite, img, np.nanmin(np.where(finite, img, np.nan)))
    if mode == "none":
        return img
    if rgb:
        return np.stack([normalise_image(img[..., c], mode) for c in range(img.shape[-1])], axis=-1)
    sample = img if img.size <= 2_000_000 else img.reshape(-1)[:: img.size // 2_000_000 + 1]
    if mode == "percentile":
        lo, hi = np.percentile(sample, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(sample.min()), float(sample.max())
        if hi <= lo:
            return np.zeros_like(img)
        return np.clip((img - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
    if mode == "zscore":
        std = float(sample.std())
        return ((img - float(sample.mean())) / (std if std > 0 else 1.0)).astype(np.float32, copy=False)
    raise ValueError(f"mode must be one of {{'percentile', 'zscore', 'none'}}, got {mode!r}")


def to_slices(image: np.ndarray, axis: int, *, rgb: bool = False) -> np.ndarray:
    """(S, C, H, W) float32 view of a 2D image or 3D volume sliced along ``axis``."""
    spatial = image.ndim - (1 if rgb else 0)
    if rgb:
        image = np.moveaxis(image[..., :3], -1, 0)  # (C, *spatial)
    else:
        image = image[None]
    if spatial == 2:
        return np.ascontiguousarray(image[:, None].transpose(1, 0, 2, 3))  # (1, C, H, W)
    if not 0 <= axis < 3:
        raise DataError(f"slicing axis {axis} is out of range for a 3D volume (0, 1 or 2)")
    return np.ascontiguousarray(np.moveaxis(image, axis + 1, 0))


def with_context(slices: np.ndarray, context: int) -> np.ndarray:
    """2.5D input: each slice with its ``context`` neighbours on either side as channels.

    Parameters
    ----------
    slices : ndarray, (S, C, H, W)
    context : int
        Neighbours on each side; 0 returns ``slices`` unchanged. Past the first and the last
        slice the edge slice is repeated.

    Returns
    -------
    ndarray, (S, C * (2 * context + 1), H, W)
        Channels ordered from slice ``s - context`` to ``s + context``.
    """
    if context <= 0:
        return slices
    n = slices.shape[0]
    index = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None], 0, n - 1)  # (S, 2c+1)
    stacked = slices[index]  # (S, 2c+1, C, H, W)
    return np.ascontiguousarray(stacked.reshape(n, -1, *slices.shape[2:]))


def _label_slices(labels: np.ndarray, axis: int) -> np.ndarray:
    if labels.ndim == 2:
        return labels[None]
    return np.moveaxis(labels, axis, 0)


@dataclass
class Batch:
    """One training step's data, on the training device.

    x_l : (B_L, C, P, P) float, labelled crops; y_l : (B_L, P, P) long with IGNORE_INDEX;
    x_u : (B_U, C, P, P) float unlabelled crops or None.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor | None


class SliceDataset:
    """Labelled, unlabelled and validation slices of one or more annotated pairs.

    Parameters
    ----------
    pairs : list of AnnotatedPair
        Snapshots; pairs with ``labels=None`` contribute unlabelled slices only.
    data_config : DataConfig
        Axis, patch size, unpainted semantics, normalisation and the class table (filled
        here from the annotations when empty).

    Raises
    ------
    DataError
        No pair, incompatible channels, no labelled slice, a single class.
    """

    def __init__(self, pairs: list[AnnotatedPair], data_config) -> None:
        if not pairs:
            raise DataError("no image to train on: add an image layer (and a labels layer to paint)")
        self.cfg = data_config
        self.images: list[np.ndarray] = []  # (S, C, H, W) float32 per pair
        self.targets: list[np.ndarray | None] = []  # (S, H, W) raw label values per pair
        self.labelled: list[tuple[int, int]] = []
        self.unlabelled: list[tuple[int, int]] = []
        self.validation: list[tuple[int, int]] = []
        self.unknown_values: set[int] = set()
        #: pair index -> count of NaN/Inf voxels (replaced by the image minimum) where any
        self.non_finite: dict[int, int] = {}
        channels = set()
        for p_idx, pair in enumerate(pairs):
            pair.check()
            if np.issubdtype(np.asarray(pair.image).dtype, np.inexact):
                n_bad = int(np.size(pair.image) - np.count_nonzero(np.isfinite(pair.image)))
                if n_bad:
                    self.non_finite[p_idx] = n_bad
            img = to_slices(normalise_image(pair.image, data_config.normalise, rgb=pair.rgb), data_config.axis, rgb=pair.rgb)
            img = with_context(img, data_config.context_slices if len(pair.spatial_shape) == 3 else 0)
            channels.add(img.shape[1])
            self.images.append(img)
            val = set(int(s) for s in pair.validation_slices)
            val |= set(int(s) for s in data_config.validation_slices.get(str(p_idx), []))
            lab_idx: set[int] = set()
            if pair.labels is not None:
                lab = _label_slices(pair.labels, data_config.axis)
                self.targets.append(lab)
                lab_idx = set(labelled_slice_indices(lab, 0).tolist())
                if pair.complete and data_config.unpainted == "background":  # empty slices are background too
                    lab_idx = set(range(lab.shape[0]))
            else:
                self.targets.append(None)
            for s in range(img.shape[0]):
                if s in val and s in lab_idx:
                    self.validation.append((p_idx, s))
                elif s in lab_idx:
                    self.labelled.append((p_idx, s))
                elif s not in val:
                    self.unlabelled.append((p_idx, s))
        if len(channels) > 1:
            raise DataError(f"all images must have the same channels (grey or RGB), got {sorted(channels)}")
        self.in_channels = channels.pop()
        if not self.labelled:
            raise DataError(
                "no labelled slice: paint at least one slice (any non-zero label) in a labels layer "
                "that is not all marked for validation"
            )
        train_labels = [self.targets[p][s] for p, s in self.labelled]
        if not data_config.class_values:
            data_config.class_values = build_class_table(train_labels, data_config.unpainted)
        self.class_values = list(data_config.class_values)
        painted = set()
        for lab in train_labels:
            painted.update(int(v) for v in np.unique(lab))
        painted.discard(0)
        self.unknown_values = painted - set(self.class_values)
        if self.unknown_values:
            log.warning("label values %s are not in the class table %s and are ignored",
                        sorted(self.unknown_values), self.class_values)
        self._painted_px = {}
        #: (pair, slice) -> dense (H, W) int64 target of an unlabelled slice (IGNORE_INDEX
        #: where unknown), set by the engine (e.g. the painted-slice prior); see sample_labelled
        self.dense_targets: dict[tuple[int, int], np.ndarray] = {}
        self._dense_items: list[tuple[int, int]] = []

    def set_dense_targets(self, targets: dict[tuple[int, int], np.ndarray]) -> None:
        """Give unlabelled slices dense targets (encoded, ``IGNORE_INDEX`` where unknown).

        Labelled and validation slices are never given one: their own labels stay the only
        target they train on."""
        own = set(self.labelled) | set(self.validation)
        self.dense_targets = {k: v for k, v in targets.items() if k not in own}
        self._dense_items = sorted(self.dense_targets)

    # --- summary ----------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.class_values)

    def summary(self) -> dict:
        return {
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "validation": len(self.validation),
            "class_values": self.class_values,
        }

    # --- sampling ---------------------------------------------------------------------
    def target(self, p_idx: int, s_idx: int) -> np.ndarray:
        """Encoded (H, W) int64 target of a labelled or validation slice."""
        return encode_targets(self.targets[p_idx][s_idx], self.class_values, self.cfg.unpainted)

    def _crop(self, img: np.ndarray, tgt: np.ndarray | None, center, rng: np.random.Generator):
        p = self.cfg.patch_size
        c, h, w = img.shape
        out_img = np.zeros((c, p, p), np.float32)
        out_tgt = np.full((p, p), IGNORE_INDEX, np.int64)
        if center is None:
            y0 = int(rng.integers(0, max(h - p, 0) + 1))
            x0 = int(rng.integers(0, max(w - p, 0) + 1))
        else:
            jitter = rng.integers(-p // 4, p // 4 + 1, size=2)
            y0 = int(np.clip(center[0] - p // 2 + jitter[0], 0, max(h - p, 0)))
            x0 = int(np.clip(center[1] - p // 2 + jitter[1], 0, max(w - p, 0)))
        hh, ww = min(p, h), min(p, w)
        oy, ox = (p - hh) // 2, (p - ww) // 2
        out_img[:, oy:oy + hh, ox:ox + ww] = img[:, y0:y0 + hh, x0:x0 + ww]
        if tgt is not None:
            out_tgt[oy:oy + hh, ox:ox + ww] = tgt[y0:y0 + hh, x0:x0 + ww]
        return out_img, out_tgt

    def _painted_pixels(self, p_idx: int, s_idx: int) -> np.ndarray:
        key = (p_idx, s_idx)
        if key not in self._painted_px:
            tgt = self.target(p_idx, s_idx)
            self._painted_px[key] = np.argwhere(tgt != IGNORE_INDEX)
        return self._painted_px[key]

    def sample_labelled(self, n: int, rng: np.random.Generator, dense_share: float = 0.0):
        """``n`` labelled crops: (n, C, P, P) float32 and (n, P, P) int64 targets.

        With ``dense_share`` > 0 and :attr:`dense_targets` set, each crop comes from a slice
        with a dense target with that probability (a random crop of it), else from a
        labelled slice (centred near a painted pixel)."""
        xs, ys = [], []
        for _ in range(n):
            if self._dense_items and dense_share > 0 and rng.random() < dense_share:
                key = self._dense_items[int(rng.integers(len(self._dense_items)))]
                x, y = self._crop(self.images[key[0]][key[1]], self.dense_targets[key], None, rng)
                xs.append(x)
                ys.append(y)
                continue
            p_idx, s_idx = self.labelled[int(rng.integers(len(self.labelled)))]
            px = self._painted_pixels(p_idx, s_idx)
            center = px[int(rng.integers(len(px)))] if len(px) else None
            x, y = self._crop(self.images[p_idx][s_idx], self.target(p_idx, s_idx), center, rng)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)

    def sample_unlabelled(self, n: int, rng: np.random.Generator) -> np.ndarray | None:
        """``n`` unlabelled crops (n, C, P, P); labelled slices stand in when none is left."""
        if n == 0:
            return None
        pool = self.unlabelled or self.labelled
        return np.stack([self._unlabelled_crop(*pool[int(rng.integers(len(pool)))], rng) for _ in range(n)])

    def _unlabelled_crop(self, p_idx: int, s_idx: int, rng: np.random.Generator) -> np.ndarray:
        """A random (C, P, P) crop of slice ``s_idx`` of pair ``p_idx``."""
        return self._crop(self.images[p_idx][s_idx], None, None, rng)[0]

    def sample_batch(self, rng: np.random.Generator, device: torch.device, *, with_unlabelled: bool = True,
                     dense_share: float = 0.0) -> Batch:
        x_l, y_l = self.sample_labelled(self.cfg.batch_labelled, rng, dense_share)
        x_u = self.sample_unlabelled(self.cfg.batch_unlabelled, rng) if with_unlabelled else None
        return Batch(
            torch.from_numpy(x_l).to(device),
            torch.from_numpy(y_l).to(device),
            None if x_u is None else torch.from_numpy(x_u).to(device),
        )
