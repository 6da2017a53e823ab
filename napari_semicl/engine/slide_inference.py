"""Whole-slide inference: tile by tile, blended where tiles overlap, written into a zarr pyramid.

The slide's level is covered by the tile grid of :class:`~napari_semicl.data.tiles.TileGrid`.
Every tissue tile is predicted from a window of the tile plus ``overlap`` pixels of context
on each side, so neighbouring windows overlap by ``2 * overlap`` pixels; their softmax
outputs are blended with Gaussian weights (MONAI's importance map) and the label of each
pixel is the arg-max of the blend. Background tiles are never read and stay 0.

Memory: windows are processed one row of tiles at a time; the blend of one row (classes x
(tile + 2 overlap) x level width, float32) and a batch of windows are all that is held.
The labels go to a zarr array (on disk) tile row by tile row, and the lower pyramid levels
are built from it block by block (:func:`napari_semicl.io.wsi.build_pyramid_levels`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from ..data.annotation import decoded_dtype
from ..data.tiles import (
    SlidePair,
    TileGrid,
    normalise_tile,
    slide_intensity_range,
    tissue_mask,
    tissue_tiles,
)
from ..io.wsi import build_pyramid_levels, create_label_pyramid, finish_ome_zarr

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_level(
    model: torch.nn.Module,
    level,
    out,
    *,
    class_values,
    lo: np.ndarray,
    hi: np.ndarray,
    rgb: bool,
    device: torch.device,
    tile: int = 512,
    overlap: int = 64,
    tiles: set | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Predict one pyramid level into ``out`` (a zarr or numpy array of the level's shape).

    Parameters
    ----------
    model : torch.nn.Module
        Maps (B, C, S, S) to (B, K, S, S) logits, S = tile + 2 * overlap (a multiple of
        the network's size multiple).
    level : array-like
        ``(Y, X[, 3])`` raw slide level, read window by window.
    out : array-like
        Receives label values (0 where nothing was predicted).
    class_values : sequence of int
        Network class i is label value ``class_values[i]``.
    lo, hi : ndarray
        Per-channel intensity range (:func:`~napari_semicl.data.tiles.slide_intensity_range`).
    tiles : set of (row, col), optional
        Grid tiles to predict (tissue); all when None.
    batch_size : int
        Windows per forward pass. 1 keeps CPU memory lowest (a U-Net's activations for a
        640 x 640 window are some hundred MB); raise it on a GPU.
    progress : callable, optional
        ``progress(done, total)`` after every batch of tiles.

    Returns
    -------
    dict
        ``tiles`` predicted, ``seconds``.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    h, w = int(level.shape[0]), int(level.shape[1])
    grid = TileGrid((h, w), tile)
    m = int(overlap)
    win = tile + 2 * m
    multiple = int(getattr(model, "multiple", 16))
    if win % multiple:
        raise ValueError(f"tile + 2 * overlap = {win} must be a multiple of {multiple}")
    weight = compute_importance_map((win, win), mode="gaussian", sigma_scale=0.125, device="cpu").numpy()
    weight = np.maximum(weight.astype(np.float32), 1e-6)
    k = len(class_values)
    values = np.asarray(class_values)
    dtype = decoded_dtype(class_values)
    todo = set(grid.tiles()) if tiles is None else set(tiles)
    total, done = len(todo), 0
    band_h = tile + 2 * m
    acc = np.zeros((k, band_h, w), np.float32)
    wsum = np.zeros((band_h, w), np.float32)
    try:
        for r in range(grid.n_rows):
            band_lo = r * tile - m  # absolute row of acc[:, 0]
            cols = [c for c in range(grid.n_cols) if (r, c) in todo]
            for start in range(0, len(cols), batch_size):
                chunk = cols[start:start + batch_size]
                xs, places = [], []
                for c in chunk:
                    y0, x0 = r * tile - m, c * tile - m
                    ya, yb, xa, xb = max(y0, 0), min(y0 + win, h), max(x0, 0), min(x0 + win, w)
                    x = np.zeros((3 if rgb else 1, win, win), np.float32)
                    x[:, ya - y0:yb - y0, xa - x0:xb - x0] = normalise_tile(level[ya:yb, xa:xb], lo, hi, rgb=rgb)
                    xs.append(x)
                    places.append((y0, x0, ya, yb, xa, xb))
                logits = model(torch.from_numpy(np.stack(xs)).to(device))
                probs = logits.float().softmax(dim=1).cpu().numpy()
                for prob, (y0, x0, ya, yb, xa, xb) in zip(probs, places):
                    wy = weight[ya - y0:yb - y0, xa - x0:xb - x0]
                    acc[:, ya - band_lo:yb - band_lo, xa:xb] += prob[:, ya - y0:yb - y0, xa - x0:xb - x0] * wy
                    wsum[ya - band_lo:yb - band_lo, xa:xb] += wy
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            # rows [band_lo, band_lo + tile) get nothing more from later rows: write them
            last = r == grid.n_rows - 1
            rows_hi = band_lo + (band_h if last else tile)
            ra, rb = max(band_lo, 0), min(rows_hi, h)
            if ra < rb:
                seg_w = wsum[ra - band_lo:rb - band_lo]
                if seg_w.any():
                    seg = acc[:, ra - band_lo:rb - band_lo].argmax(axis=0)
                    labels = np.where(seg_w > 0, values[seg], 0).astype(dtype)
                    out[ra:rb, :] = labels
            if not last:
                acc[:, :band_h - tile] = acc[:, tile:]
                acc[:, band_h - tile:] = 0
                wsum[:band_h - tile] = wsum[tile:]
                wsum[band_h - tile:] = 0
    finally:
        model.train(was_training)
    return {"tiles": total, "seconds": time.perf_counter() - t0}


def predict_slide(
    model: torch.nn.Module,
    levels,
    path,
    *,
    class_values,
    level: int = 0,
    rgb: bool = True,
    device: torch.device,
    tile: int = 512,
    overlap: int = 64,
    tissue_min: float = 0.05,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
    batch_size: int = 1,
    overwrite: bool = True,
    progress: Callable[[int, int], None] | None = None,
):
    """Predict a slide's ``level`` into an OME-Zarr label pyramid at ``path``.

    Tissue tiles are found on the smallest level (:func:`~napari_semicl.data.tiles.tissue_mask`);
    the intensity range is the smallest level's unless ``lo``/``hi`` are given.

    Returns
    -------
    (list, dict)
        The zarr arrays of the label pyramid (its level 0 has the shape of the slide's
        ``level``) and a summary (``tiles``, ``tissue_tiles``, ``seconds``).
    """
    if not 0 <= level < len(levels):
        raise ValueError(f"level {level} does not exist (the slide has {len(levels)} levels)")
    src = levels[level]
    thumb = np.asarray(levels[-1][...])
    if lo is None or hi is None:
        lo, hi = slide_intensity_range(thumb, rgb=rgb)
    shape = (int(src.shape[0]), int(src.shape[1]))
    grid = TileGrid(shape, tile)
    tissue = tissue_tiles(grid, tissue_mask(thumb, rgb=rgb), tissue_min)
    group = create_label_pyramid(path, shape, dtype=decoded_dtype(class_values), tile=tile, overwrite=overwrite)
    info = predict_level(model, src, group["0"], class_values=class_values, lo=lo, hi=hi, rgb=rgb, device=device,
                         tile=tile, overlap=overlap, tiles=tissue, batch_size=batch_size, progress=progress)
    pyramid = build_pyramid_levels(group, labels=True)
    finish_ome_zarr(group, labels=True, name="prediction")
    info.update(tissue_tiles=len(tissue), grid_tiles=len(grid.tiles()))
    log.info("slide predicted: %d of %d tiles in %.1f s", len(tissue), len(grid.tiles()), info["seconds"])
    return pyramid, info


def predict_slide_pair(model, pair: SlidePair, path, *, class_values, device, overlap: int = 64,
                       batch_size: int = 1, progress=None):
    """:func:`predict_slide` with a training snapshot's level, grid, tissue and range."""
    group = create_label_pyramid(path, pair.grid.shape, dtype=decoded_dtype(class_values), tile=pair.grid.tile,
                                 overwrite=True)
    info = predict_level(model, pair.levels[pair.level], group["0"], class_values=class_values, lo=pair.lo,
                         hi=pair.hi, rgb=pair.rgb, device=device, tile=pair.grid.tile, overlap=overlap,
                         tiles=set(pair.tissue), batch_size=batch_size, progress=progress)
    pyramid = build_pyramid_levels(group, labels=True)
    finish_ome_zarr(group, labels=True, name=f"{pair.name} prediction")
    return pyramid, info
