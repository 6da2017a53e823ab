"""Whole-slide training data: a tile grid, a tissue mask and a dataset of lazily read tiles.

A slide is a list of lazy levels (``io.wsi.Slide.levels``, level 0 first). Training runs at
one level (``WSIConfig.level``) on a grid of ``tile_size`` tiles over that level:

* the *tissue mask* is Otsu's threshold on the HSV saturation of the smallest level
  (glass is grey/white, stained tissue is coloured); a tile is tissue when at least
  ``tissue_min`` of its area is tissue, and background tiles are never read;
* a tile with any painted (non-zero) label pixel is *labelled*; tissue tiles without paint
  are the *unlabelled pool*;
* intensities are scaled per channel with the 0.5/99.5 percentiles of the smallest level,
  so that every tile (and inference) sees the same scaling as the whole slide.

:func:`snapshot_slide` turns a slide and its (level-0, possibly lazy) label map into a
:class:`SlidePair`: the label pixels of the painted tiles are copied (a snapshot), the
image is not (it never changes). :class:`TileDataset` samples training crops from it with
the same interface as :class:`~napari_semicl.data.dataset.SliceDataset`; memory is bounded
by a small cache of decoded tiles, never by the slide.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError
from .annotation import IGNORE_INDEX, UNLABELLED, build_class_table, encode_targets
from .dataset import SliceDataset
from .volume_patches import VolumePatchDataset

log = logging.getLogger(__name__)

#: Saturation above which a pixel is always tissue, whatever Otsu says (H&E tissue is
#: clearly coloured; a slide that is all tissue would otherwise be split in two by Otsu).
MAX_TISSUE_THRESHOLD = 0.15
#: Lowest saturation threshold (flat, noise-only thumbnails).
MIN_TISSUE_THRESHOLD = 0.02


@dataclass
class WSIConfig:
    """Whole-slide settings (used when the training images are slides).

    ``level``: the pyramid level trained on and predicted (0 = full resolution);
    ``tile_size``: the grid's tile side in pixels of that level (a multiple of 16);
    ``tissue_min``: fraction of a tile that must be tissue for it to be used;
    ``overlap``: context margin in pixels added on each side of a tile at inference; the
    windows of neighbouring tiles overlap by twice this and are blended with Gaussian
    weights; ``cache_tiles``: decoded tiles kept in memory while training.
    """

    level: int = 0
    tile_size: int = 512
    tissue_min: float = 0.05
    overlap: int = 64
    cache_tiles: int = 64

    def validate(self, path: str = "wsi") -> None:
        if self.level < 0:
            raise ConfigError(f"{path}.level must be >= 0, got {self.level}")
        if self.tile_size < 64 or self.tile_size % 16:
            raise ConfigError(f"{path}.tile_size must be a multiple of 16 and >= 64, got {self.tile_size}")
        if not 0 <= self.tissue_min <= 1:
            raise ConfigError(f"{path}.tissue_min must be in [0, 1], got {self.tissue_min}")
        if self.overlap < 0 or self.overlap % 8 or self.overlap >= self.tile_size:
            raise ConfigError(f"{path}.overlap must be a multiple of 8 in [0, tile_size), got {self.overlap}")
        if self.cache_tiles < 1:
            raise ConfigError(f"{path}.cache_tiles must be >= 1, got {self.cache_tiles}")


# --------------------------------------------------------------------------- tissue


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an ``(H, W, 3)`` image, in [0, 1]."""
    x = np.asarray(rgb, dtype=np.float32)
    hi = x.max(axis=-1)
    lo = x.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0).astype(np.float32)


def tissue_mask(thumbnail: np.ndarray, *, rgb: bool = True) -> np.ndarray:
    """Boolean tissue mask of a low-resolution image.

    RGB: saturation above ``clip(otsu(saturation), MIN_TISSUE_THRESHOLD,
    MAX_TISSUE_THRESHOLD)``. Grey (brightfield): darker than Otsu's threshold.

    Parameters
    ----------
    thumbnail : ndarray
        ``(H, W, 3)`` RGB or ``(H, W)`` grey, any numeric dtype.
    rgb : bool
        Whether the last axis holds colour.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    from skimage.filters import threshold_otsu

    if rgb:
        sat = saturation(thumbnail[..., :3])
        try:
            t = float(threshold_otsu(sat))
        except ValueError:  # a constant image
            t = MAX_TISSUE_THRESHOLD
        t = float(np.clip(t, MIN_TISSUE_THRESHOLD, MAX_TISSUE_THRESHOLD))
        return sat > t
    grey = np.asarray(thumbnail, dtype=np.float32)
    if grey.max() <= grey.min():
        return np.ones(grey.shape, bool)
    return grey < float(threshold_otsu(grey))


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of side ``tile`` over an image of ``shape`` (the last ones may be cut).

    Tiles are indexed ``(row, col)``; :meth:`bounds` gives their pixel extent.
    """

    shape: tuple[int, int]
    tile: int

    @property
    def n_rows(self) -> int:
        return -(-self.shape[0] // self.tile)

    @property
    def n_cols(self) -> int:
        return -(-self.shape[1] // self.tile)

    def tiles(self) -> list[tuple[int, int]]:
        return [(r, c) for r in range(self.n_rows) for c in range(self.n_cols)]

    def bounds(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of tile ``(row, col)``, clipped to the image."""
        y0, x0 = row * self.tile, col * self.tile
        return y0, min(y0 + self.tile, self.shape[0]), x0, min(x0 + self.tile, self.shape[1])


def tissue_tiles(grid: TileGrid, mask: np.ndarray, min_fraction: float) -> set[tuple[int, int]]:
    """Tiles of ``grid`` whose area is at least ``min_fraction`` tissue in ``mask``.

    ``mask`` may be at any resolution (e.g. the smallest level); each tile is mapped onto
    it by the ratio of the shapes, and covers at least one mask pixel.
    """
    sy = mask.shape[0] / grid.shape[0]
    sx = mask.shape[1] / grid.shape[1]
    out = set()
    for r, c in grid.tiles():
        y0, y1, x0, x1 = grid.bounds(r, c)
        my0, mx0 = int(y0 * sy), int(x0 * sx)
        my1 = max(my0 + 1, int(np.ceil(y1 * sy)))
        mx1 = max(mx0 + 1, int(np.ceil(x1 * sx)))
        if mask[my0:my1, mx0:mx1].mean() >= min_fraction and mask[my0:my1, mx0:mx1].any():
            out.add((r, c))
    return out


def slide_intensity_range(thumbnail: np.ndarray, *, rgb: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel 0.5 and 99.5 percentiles of a low-resolution level: ``(lo, hi)``,
    each of shape (C,); a channel without spread gets ``hi = lo + 1``."""
    x = np.asarray(thumbnail, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1]) if rgb else x.reshape(-1, 1)
    lo, hi = np.percentile(x, [0.5, 99.5], axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    return lo.astype(np.float32), hi.astype(np.float32)


def normalise_tile(block: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, rgb: bool) -> np.ndarray:
    """A raw ``(H, W[, 3])`` block as ``(C, H, W)`` float32 in [0, 1] with the slide's range."""
    x = np.asarray(block, dtype=np.float32)
    x = x[..., :3] if rgb else x[..., None]
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- snapshots


@dataclass
class SlidePair:
    """A snapshot of one slide and its painted tiles at the training level.

    Attributes
    ----------
    levels : list of array-like
        The slide's lazy levels (level 0 first); never copied, never written.
    painted : dict
        ``(row, col) -> (h, w)`` label values of each painted tile at the training level
        (copies; 0 = unpainted).
    grid : TileGrid
        The tile grid over the training level.
    tissue : frozenset of (row, col)
        Tissue tiles (labelled ones included).
    level : int
        The training level; ``downsample`` its size factor relative to level 0.
    lo, hi : ndarray
        The per-channel intensity range (:func:`slide_intensity_range`).
    """

    levels: list
    painted: dict
    grid: TileGrid
    tissue: frozenset
    level: int
    downsample: int
    lo: np.ndarray
    hi: np.ndarray
    rgb: bool = True
    name: str = "slide"
    metadata: dict = field(default_factory=dict)
    validation_slices: tuple[int, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """Spatial shape of level 0 (the shape of a matching labels layer)."""
        return tuple(int(s) for s in self.levels[0].shape[:2])

    @property
    def level_shape(self) -> tuple[int, int]:
        return self.grid.shape

    def same_paint(self, other: SlidePair) -> bool:
        """Whether ``other`` holds exactly the same painted tiles and values."""
        if set(self.painted) != set(other.painted):
            return False
        return all(np.array_equal(self.painted[k], other.painted[k]) for k in self.painted)


def painted_tiles(labels, grid: TileGrid, downsample: int) -> dict:
    """``(row, col) -> label crop at the grid's level`` for every tile with paint.

    ``labels`` is the level-0 label map (numpy or a lazy array); each tile's level-0 region
    is read once, and subsampled by ``downsample`` (nearest neighbour) when painted.
    """
    out = {}
    d = int(downsample)
    for r, c in grid.tiles():
        y0, y1, x0, x1 = grid.bounds(r, c)
        block = np.asarray(labels[y0 * d:y1 * d, x0 * d:x1 * d])
        if not block.any():
            continue
        crop = np.array(block[::d, ::d][: y1 - y0, : x1 - x0], copy=True)
        if crop.any():
            out[(r, c)] = crop
    return out


def snapshot_slide(levels, labels, *, rgb: bool, wsi, name: str = "slide", metadata: dict | None = None,
                   tissue_level: int | None = None) -> SlidePair:
    """Snapshot a slide (lazy levels) and its level-0 labels for training at ``wsi.level``.

    Parameters
    ----------
    levels : list of array-like
        Level 0 first, ``(Y, X, 3)`` or ``(Y, X)``.
    labels : array-like or None
        Integer label map of level 0's spatial shape (0 = unpainted), read tile by tile.
    rgb : bool
    wsi : WSIConfig
    tissue_level : int, optional
        Level for the tissue mask and intensity range (default: the smallest).

    Raises
    ------
    DataError
        The level does not exist, or the labels do not match the slide.
    """
    if not levels:
        raise DataError(f"{name}: the slide has no level")
    if not 0 <= wsi.level < len(levels):
        raise DataError(f"{name}: level {wsi.level} does not exist; the slide has levels 0..{len(levels) - 1}")
    shape0 = tuple(int(s) for s in levels[0].shape[:2])
    if labels is not None and tuple(int(s) for s in labels.shape) != shape0:
        raise DataError(
            f"{name}: labels shape {tuple(labels.shape)} does not match the slide's level-0 shape {shape0}; "
            "create the labels layer from this slide"
        )
    level = levels[wsi.level]
    shape = tuple(int(s) for s in level.shape[:2])
    downsample = max(1, round(shape0[0] / shape[0]))
    t_level = len(levels) - 1 if tissue_level is None else tissue_level
    thumb = np.asarray(levels[t_level][...])
    lo, hi = slide_intensity_range(thumb, rgb=rgb)
    grid = TileGrid(shape, int(wsi.tile_size))
    tissue = tissue_tiles(grid, tissue_mask(thumb, rgb=rgb), wsi.tissue_min)
    painted = {} if labels is None else painted_tiles(labels, grid, downsample)
    return SlidePair(levels, painted, grid, frozenset(tissue | set(painted)), int(wsi.level), downsample, lo, hi,
                     rgb=rgb, name=name, metadata=dict(metadata or {}))


# --------------------------------------------------------------------------- the dataset


class TileDataset:
    """Labelled (painted) and unlabelled (tissue) tiles of one or more slides.

    The interface of :class:`~napari_semicl.data.dataset.SliceDataset` the trainer uses:
    ``labelled``, ``unlabelled``, ``validation`` (empty: slides have no held-out tiles
    yet), ``class_values``, ``n_classes``, ``in_channels``, :meth:`summary` and
    :meth:`sample_batch`. Items are ``(pair index, (row, col))``.

    Labelled crops are centred near a painted pixel (jittered) and may reach beyond their
    tile for context; their target is the tile's paint (``IGNORE_INDEX`` outside the tile
    and, with ``unpainted='ignore'``, on unpainted pixels). Unlabelled crops are random
    windows inside tissue tiles.
    """

    def __init__(self, pairs: list[SlidePair], data_config) -> None:
        if not pairs:
            raise DataError("no slide to train on: open a slide and paint a few tiles")
        self.cfg = data_config
        self.pairs = list(pairs)
        self.labelled: list[tuple[int, tuple[int, int]]] = []
        self.unlabelled: list[tuple[int, tuple[int, int]]] = []
        self.validation: list = []
        channels = {3 if p.rgb else 1 for p in pairs}
        if len(channels) > 1:
            raise DataError("all slides must have the same channels (grey or RGB)")
        self.in_channels = channels.pop()
        for p_idx, pair in enumerate(pairs):
            for key in sorted(pair.painted):
                self.labelled.append((p_idx, key))
            for key in sorted(pair.tissue - set(pair.painted)):
                self.unlabelled.append((p_idx, key))
        if not self.labelled:
            raise DataError(
                "no painted tile: paint a few tiles of the slide (any non-zero label) in the labels layer, "
                f"at the training level {pairs[0].level} grid of {pairs[0].grid.tile}-pixel tiles"
            )
        crops = [pairs[p].painted[k] for p, k in self.labelled]
        if not data_config.class_values:
            data_config.class_values = build_class_table(crops, data_config.unpainted)
        self.class_values = list(data_config.class_values)
        painted = set()
        for crop in crops:
            painted.update(int(v) for v in np.unique(crop))
        painted.discard(UNLABELLED)
        self.unknown_values = painted - set(self.class_values)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = 64
        self._painted_px: dict = {}

    @property
    def n_classes(self) -> int:
        return len(self.class_values)

    def set_cache_size(self, n: int) -> None:
        self._cache_size = max(1, int(n))

    def summary(self) -> dict:
        return {
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "validation": 0,
            "class_values": self.class_values,
            "unit": "tiles",
        }

    # --- reading ----------------------------------------------------------------------
    def read_window(self, p_idx: int, y0: int, x0: int, size: int) -> np.ndarray:
        """Normalised ``(C, size, size)`` window at the training level; zeros outside."""
        pair = self.pairs[p_idx]
        h, w = pair.grid.shape
        out = np.zeros((self.in_channels, size, size), np.float32)
        ya, yb, xa, xb = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
        if ya >= yb or xa >= xb:
            return out
        out[:, ya - y0:yb - y0, xa - x0:xb - x0] = self._tile_cached(p_idx, ya, yb, xa, xb)
        return out

    def _tile_cached(self, p_idx: int, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        """Read a window through a cache of whole decoded grid tiles (LRU, raw values)."""
        pair = self.pairs[p_idx]
        grid = pair.grid
        level = pair.levels[pair.level]
        out = np.empty((self.in_channels, yb - ya, xb - xa), np.float32)
        for r in range(ya // grid.tile, (yb - 1) // grid.tile + 1):
            for c in range(xa // grid.tile, (xb - 1) // grid.tile + 1):
                ty0, ty1, tx0, tx1 = grid.bounds(r, c)
                key = (p_idx, r, c)
                tile = self._cache.get(key)
                if tile is None:
                    tile = np.asarray(level[ty0:ty1, tx0:tx1])  # raw (uint8 for RGB): 4x smaller than float
                    self._cache[key] = tile
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
                else:
                    self._cache.move_to_end(key)
                sy0, sy1 = max(ya, ty0), min(yb, ty1)
                sx0, sx1 = max(xa, tx0), min(xb, tx1)
                out[:, sy0 - ya:sy1 - ya, sx0 - xa:sx1 - xa] = normalise_tile(
                    tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0], pair.lo, pair.hi, rgb=pair.rgb)
        return out

    def target(self, p_idx: int, key: tuple[int, int]) -> np.ndarray:
        """Encoded ``(h, w)`` int64 target of a painted tile."""
        return encode_targets(self.pairs[p_idx].painted[key], self.class_values, self.cfg.unpainted)

    def _painted_pixels(self, p_idx: int, key) -> np.ndarray:
        if (p_idx, key) not in self._painted_px:
            self._painted_px[(p_idx, key)] = np.argwhere(self.target(p_idx, key) != IGNORE_INDEX)
        return self._painted_px[(p_idx, key)]

    # --- sampling ---------------------------------------------------------------------
    def sample_labelled(self, n: int, rng: np.random.Generator, dense_share: float = 0.0):
        """``n`` labelled crops: (n, C, P, P) float32 and (n, P, P) int64 targets.

        ``dense_share`` is accepted for the common interface; slides have no dense targets."""
        p = self.cfg.patch_size
        xs, ys = [], []
        for _ in range(n):
            p_idx, key = self.labelled[int(rng.integers(len(self.labelled)))]
            pair = self.pairs[p_idx]
            ty0, ty1, tx0, tx1 = pair.grid.bounds(*key)
            px = self._painted_pixels(p_idx, key)
            if len(px):
                cy, cx = px[int(rng.integers(len(px)))] + (ty0, tx0)
            else:
                cy, cx = (ty0 + ty1) // 2, (tx0 + tx1) // 2
            jitter = rng.integers(-p // 4, p // 4 + 1, size=2)
            h, w = pair.grid.shape
            y0 = int(np.clip(cy - p // 2 + jitter[0], min(0, h - p), max(h - p, 0)))
            x0 = int(np.clip(cx - p // 2 + jitter[1], min(0, w - p), max(w - p, 0)))
            xs.append(self.read_window(p_idx, y0, x0, p))
            tgt = np.full((p, p), IGNORE_INDEX, np.int64)
            full = self.target(p_idx, key)
            ya, yb = max(y0, ty0), min(y0 + p, ty1)
            xa, xb = max(x0, tx0), min(x0 + p, tx1)
            if ya < yb and xa < xb:
                tgt[ya - y0:yb - y0, xa - x0:xb - x0] = full[ya - ty0:yb - ty0, xa - tx0:xb - tx0]
            ys.append(tgt)
        return np.stack(xs), np.stack(ys)

    def sample_unlabelled(self, n: int, rng: np.random.Generator) -> np.ndarray | None:
        """``n`` random crops inside unlabelled tissue tiles (painted tiles when none)."""
        if n == 0:
            return None
        pool = self.unlabelled or self.labelled
        p = self.cfg.patch_size
        xs = []
        for _ in range(n):
            p_idx, key = pool[int(rng.integers(len(pool)))]
            ty0, ty1, tx0, tx1 = self.pairs[p_idx].grid.bounds(*key)
            y0 = int(rng.integers(ty0, max(ty1 - p, ty0) + 1))
            x0 = int(rng.integers(tx0, max(tx1 - p, tx0) + 1))
            xs.append(self.read_window(p_idx, y0, x0, p))
        return np.stack(xs)

    # the same assembly from this class's sample_labelled / sample_unlabelled
    sample_batch = SliceDataset.sample_batch


def make_dataset(pairs, data_config, wsi_config=None, *, spatial_dims: int = 2):
    """A :class:`TileDataset` when the pairs are slides, a
    :class:`~napari_semicl.data.volume_patches.VolumePatchDataset` for a 3D network
    (``spatial_dims = 3``), else a :class:`SliceDataset`.

    Raises
    ------
    DataError
        Slides mixed with ordinary images; slides or 2D images for a 3D network.
    """
    slides = [isinstance(p, SlidePair) for p in pairs]
    if any(slides):
        if not all(slides):
            raise DataError("slides cannot be trained together with ordinary images: train them separately")
        if spatial_dims == 3:
            raise DataError("slides are 2D: train them with the slice network (model.spatial_dims = 2)")
        dataset = TileDataset(pairs, data_config)
        if wsi_config is not None:
            dataset.set_cache_size(wsi_config.cache_tiles)
        return dataset
    if spatial_dims == 3:
        return VolumePatchDataset(pairs, data_config)
    return SliceDataset(pairs, data_config)
