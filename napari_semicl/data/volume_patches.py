"""3D training patches of volumes, for a 3D network (``model.spatial_dims = 3``).

:class:`VolumePatchDataset` keeps :class:`~napari_semicl.data.dataset.SliceDataset`'s
bookkeeping (images as (S, C, H, W) slices along ``data.axis``, labelled, unlabelled and
validation slices, the class table, dense targets of the painted-slice prior) and samples
(D, H, W) patches instead of (H, W) crops:

* a labelled patch is centred near a painted voxel: a labelled slice at random, a painted
  pixel of it at random, plus a jitter of a quarter patch (as the 2D crops); its target
  is the label volume, ``IGNORE_INDEX`` on every slice that is not a (training) labelled
  slice, so painted slices and scribbles are what the loss sees, in 3D;
* with ``dense_share`` the target volume also holds the dense targets of unpainted slices
  (:meth:`set_dense_targets`, e.g. the painted-slice prior's fill), and the patch is
  centred anywhere in a volume that has them;
* an unlabelled patch is centred on an unlabelled slice (the rest of the volumes), at a
  random place in it.

Batches are (B, C, D, H, W) images and (B, D, H, W) targets; D runs along ``data.axis``.
Volumes smaller than the patch are padded with zeros (targets with ``IGNORE_INDEX``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .annotation import IGNORE_INDEX
from .dataset import SliceDataset


class VolumePatchDataset(SliceDataset):
    """Labelled, unlabelled and validation slices of volumes, sampled as 3D patches.

    Parameters
    ----------
    pairs : list of AnnotatedPair
        3D snapshots (2D images raise :class:`~napari_semicl.errors.DataError`).
    data_config : DataConfig
        As for :class:`SliceDataset`; ``patch_shape`` gives the (D, H, W) of a patch.
    """

    spatial_dims = 3

    def __init__(self, pairs, data_config) -> None:
        flat = [getattr(p, "name", str(i)) for i, p in enumerate(pairs) if len(p.spatial_shape) != 3]
        if flat:
            raise DataError(
                f"a 3D network trains on volumes, but {', '.join(map(repr, flat))} is 2D: "
                "choose the slice network (model.spatial_dims = 2) for 2D images"
            )
        super().__init__(pairs, data_config)
        # (S, H, W) int8 encoded targets of the training labelled slices, IGNORE elsewhere
        self._volume_targets: list[np.ndarray | None] = [None] * len(self.images)
        self._dense_volumes: dict[int, np.ndarray] = {}
        by_pair: dict[int, list[int]] = {}
        for p_idx, s_idx in self.labelled:
            by_pair.setdefault(p_idx, []).append(s_idx)
        if self.n_classes > 127:
            raise DataError(f"3D patches support up to 127 classes, the class table has {self.n_classes}")
        for p_idx, slices in by_pair.items():
            vol = self._ignored_volume(p_idx)
            for s_idx in slices:
                vol[s_idx] = self.target(p_idx, s_idx)
            self._volume_targets[p_idx] = vol

    def _ignored_volume(self, p_idx: int) -> np.ndarray:
        """An (S, H, W) int8 target volume of pair ``p_idx`` holding ``IGNORE_INDEX`` only."""
        img = self.images[p_idx]
        return np.full((img.shape[0], *img.shape[2:]), IGNORE_INDEX, np.int8)

    def set_dense_targets(self, targets) -> None:
        """As :meth:`SliceDataset.set_dense_targets`; the dense slices join the pair's label
        volume (a second copy, drawn with ``dense_share``)."""
        super().set_dense_targets(targets)
        self._dense_volumes = {}
        for (p_idx, s_idx), tgt in self.dense_targets.items():
            if p_idx not in self._dense_volumes:
                base = self._volume_targets[p_idx]
                self._dense_volumes[p_idx] = (
                    base.copy() if base is not None
                    else self._ignored_volume(p_idx)
                )
            self._dense_volumes[p_idx][s_idx] = tgt

    def _crop_volume(self, p_idx: int, target: np.ndarray | None, centre, rng: np.random.Generator):
        """(C, D, H, W) float32 and (D, H, W) int64 patch of pair ``p_idx`` around ``centre``
        (z, y, x) with a jitter of a quarter patch, or at random (``centre`` None)."""
        img = self.images[p_idx]  # (S, C, H, W)
        shape = self.cfg.patch_shape
        size = (img.shape[0], img.shape[2], img.shape[3])
        start = []
        for n, p, c in zip(size, shape, centre if centre is not None else (None,) * 3):
            if c is None:
                start.append(int(rng.integers(0, max(n - p, 0) + 1)))
            else:
                jitter = int(rng.integers(-(p // 4), p // 4 + 1))
                start.append(int(np.clip(c - p // 2 + jitter, 0, max(n - p, 0))))
        take = [min(p, n) for p, n in zip(shape, size)]
        off = [(p - t) // 2 for p, t in zip(shape, take)]
        src = tuple(slice(s, s + t) for s, t in zip(start, take))
        dst = tuple(slice(o, o + t) for o, t in zip(off, take))
        out_img = np.zeros((img.shape[1], *shape), np.float32)
        out_img[(slice(None), *dst)] = img[src[0], :, src[1], src[2]].transpose(1, 0, 2, 3)
        out_tgt = np.full(shape, IGNORE_INDEX, np.int64)
        if target is not None:
            out_tgt[dst] = target[src]
        return out_img, out_tgt

    def sample_labelled(self, n: int, rng: np.random.Generator, dense_share: float = 0.0):
        """``n`` labelled patches: (n, C, D, H, W) float32 and (n, D, H, W) int64 targets."""
        xs, ys = [], []
        dense_pairs = sorted(self._dense_volumes)
        for _ in range(n):
            if dense_pairs and dense_share > 0 and rng.random() < dense_share:
                p_idx = dense_pairs[int(rng.integers(len(dense_pairs)))]
                x, y = self._crop_volume(p_idx, self._dense_volumes[p_idx], None, rng)
            else:
                p_idx, s_idx = self.labelled[int(rng.integers(len(self.labelled)))]
                px = self._painted_pixels(p_idx, s_idx)
                centre = (s_idx, *px[int(rng.integers(len(px)))]) if len(px) else (s_idx, None, None)
                x, y = self._crop_volume(p_idx, self._volume_targets[p_idx], centre, rng)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)

    def _unlabelled_crop(self, p_idx: int, s_idx: int, rng: np.random.Generator) -> np.ndarray:
        """A (C, D, H, W) patch centred on slice ``s_idx`` (an unlabelled one: see
        :meth:`SliceDataset.sample_unlabelled`), at a random place in it."""
        return self._crop_volume(p_idx, None, (s_idx, None, None), rng)[0]


__all__ = ["VolumePatchDataset"]
