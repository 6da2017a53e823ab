"""Synthetic-layout slides from real tiles, and the whole-slide benchmark (``bench wsi``).

A :class:`Mosaic` lays real H&E tiles (e.g. MoNuSeg's) on a grid of cells; cells outside
the tissue layout are glass (a constant near-white colour, as on a scanned slide). It is a
lazy array: any window of any pyramid level is composed on demand from the tiles
downsampled by 2 x 2 means, so a 20000 x 20000 RGB pyramidal TIFF is written tile by
tile without ever holding the slide. The label mosaic of the tiles' masks is built the
same way (nearest neighbour).

The benchmark writes such a slide and its painted labels (a few tissue cells carry their
masks), opens it lazily, trains a fixed number of steps on the painted tiles, predicts
the tissue tile by tile into a label pyramid and exports it as a pyramidal OME-TIFF, and
reports the time of each stage and the process's peak resident memory.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import numpy as np

#: Glass colour of the empty cells (RGB, near-white as scanned slides are).
GLASS_RGB = (242, 242, 240)

log = logging.getLogger(__name__)


def _half(img: np.ndarray, labels: bool) -> np.ndarray:
    if labels:
        return img[::2, ::2]
    h, w = img.shape[:2]
    b = np.pad(img.astype(np.float32), [(0, h % 2), (0, w % 2)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    return np.round(0.25 * (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2])).astype(img.dtype)


class Mosaic:
    """A lazy ``(Y, X, 3)`` (or ``(Y, X)`` label) array: tiles on a grid of cells, at a level.

    Parameters
    ----------
    tiles : list of ndarray
        Equal-shape ``(h, w, 3)`` uint8 tiles (or ``(h, w)`` masks with ``labels=True``).
    layout : ndarray of int, shape (rows, cols)
        Tile index per cell; -1 is glass (or 0 for labels).
    level : int
        Pyramid level: the mosaic is ``2**level`` times smaller than level 0.
    """

    def __init__(self, tiles, layout: np.ndarray, *, level: int = 0, labels: bool = False, _cache=None) -> None:
        self.tiles = tiles
        self.layout = np.asarray(layout)
        self.level = level
        self.labels = labels
        self._cache = {} if _cache is None else _cache
        th, tw = tiles[0].shape[:2]
        self.cell = (th, tw)
        h0, w0 = self.layout.shape[0] * th, self.layout.shape[1] * tw
        h, w = h0, w0
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.shape = (h, w) if labels else (h, w, 3)
        self.dtype = np.dtype(tiles[0].dtype)
        self.ndim = len(self.shape)

    def at_level(self, level: int) -> Mosaic:
        return Mosaic(self.tiles, self.layout, level=level, labels=self.labels, _cache=self._cache)

    def _tile(self, index: int) -> np.ndarray:
        key = (index, self.level)
        if key not in self._cache:
            img = self.tiles[index]
            for _ in range(self.level):
                img = _half(img, self.labels)
            self._cache[key] = img
        return self._cache[key]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        ys, xs = (list(key) + [slice(None), slice(None)])[:2]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        fill = 0 if self.labels else np.array(GLASS_RGB, self.dtype)
        out = np.empty((max(y1 - y0, 0), max(x1 - x0, 0), *self.shape[2:]), self.dtype)
        out[...] = fill
        f = 2 ** self.level
        ch, cw = self.cell
        for r in range(self.layout.shape[0]):
            cy0, cy1 = (r * ch) // f, ((r + 1) * ch) // f
            if cy1 <= y0 or cy0 >= y1:
                continue
            for c in range(self.layout.shape[1]):
                index = int(self.layout[r, c])
                if index < 0:
                    continue
                cx0, cx1 = (c * cw) // f, ((c + 1) * cw) // f
                if cx1 <= x0 or cx0 >= x1:
                    continue
                tile = self._tile(index)
                ya, yb, xa, xb = max(y0, cy0), min(y1, cy1), max(x0, cx0), min(x1, cx1)
                src = tile[ya - cy0:yb - cy0, xa - cx0:xb - cx0]
                out[ya - y0:ya - y0 + src.shape[0], xa - x0:xa - x0 + src.shape[1]] = src
        if len(key) > 2:
            out = out[(slice(None), slice(None), *key[2:])]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def tissue_layout(rows: int, cols: int, n_tiles: int, *, fraction: float, seed: int = 0) -> np.ndarray:
    """An elliptical tissue region covering about ``fraction`` of the cells, tiles cycled
    through it in a seeded random order; -1 elsewhere (glass)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    r = np.sqrt(((yy - cy) / (rows / 2)) ** 2 + ((xx - cx) / (cols / 2)) ** 2)
    order = np.argsort(r.ravel(), kind="stable")
    n = max(1, round(fraction * rows * cols))
    layout = np.full(rows * cols, -1, dtype=np.int64)
    layout[order[:n]] = rng.permutation(np.arange(n) % n_tiles)
    return layout.reshape(rows, cols)


def write_mosaic_slide(path, tiles, layout, *, tile: int = 512, min_size: int = 1024, labels: bool = False,
                       overwrite: bool = True) -> Path:
    """Write a :class:`Mosaic` as a pyramidal OME-TIFF (or OME-Zarr), tile by tile; levels
    halve until the longer side is at most ``min_size``."""
    from ..io.wsi import write_pyramid

    base = Mosaic(tiles, layout, labels=labels)
    levels = [base]
    while max(levels[-1].shape[:2]) > min_size:
        levels.append(base.at_level(len(levels)))
    return write_pyramid(path, levels, rgb=not labels, tile=tile, labels=labels, overwrite=overwrite,
                         name=Path(path).name.split(".")[0])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def wsi_benchmark(tile_folder, out, *, size: int = 20000, tissue_fraction: float = 0.15, painted_cells: int = 3,
                  level: int = 1, steps: int = 100, method: str = "mean_teacher", tile: int = 512,
                  work_dir=None, seed: int = 0, device=None, reuse: bool = False) -> dict:
    """Build a ``size`` x ``size`` RGB slide from real tiles, then open/train/predict/export it.

    Parameters
    ----------
    tile_folder : path
        ``NAME.png`` + ``NAME_gt.png`` H&E tiles (MoNuSeg).
    out : path
        Results JSON.
    painted_cells : int
        Tissue cells whose masks are 'painted' (the rest of the labels are 0).
    level : int
        Pyramid level trained on and predicted.
    steps : int
        Training steps (fixed budget).
    reuse : bool
        Keep a slide already written in ``work_dir`` by an earlier run with the same
        settings (its writing time is then not measured again).
    """
    import tempfile

    from ..data.tiles import WSIConfig, snapshot_slide
    from ..engine import Finished, TrainConfig, Trainer, describe_device, pick_device
    from ..engine.slide_inference import predict_slide_pair
    from ..io.wsi import open_slide, write_pyramid
    from .common import machine_info
    from .histology import find_tiles

    device = device or pick_device()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="semicl_wsi_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    cases = find_tiles(tile_folder)
    tiles = [np.ascontiguousarray(c.image.data) for c in cases]
    masks = [np.ascontiguousarray(c.reference.data.astype(np.uint8)) for c in cases]
    th = tiles[0].shape[0]
    cells = -(-size // th)
    layout = tissue_layout(cells, cells, len(tiles), fraction=tissue_fraction, seed=seed)
    # labels: 'painted' = the masks of a few tissue cells (+1, so that background is class 1, nuclei 2)
    tissue_cells = np.argwhere(layout >= 0)
    rng = np.random.default_rng(seed)
    chosen = tissue_cells[rng.choice(len(tissue_cells), painted_cells, replace=False)]
    painted_layout = np.full_like(layout, -1)
    for r, c in chosen:
        painted_layout[r, c] = layout[r, c]
    shifted = [m + 1 for m in masks]
    times, rss = {}, {}
    t0 = time.perf_counter()
    slide_path, labels_path = work / "slide.ome.tif", work / "painted.ome.tif"
    if not (reuse and slide_path.exists() and labels_path.exists()):
        write_mosaic_slide(slide_path, tiles, layout, tile=tile)
        write_pyramid(labels_path, [Mosaic(shifted, painted_layout, labels=True)], tile=tile, labels=True,
                      overwrite=True)
        times["write_slide_s"] = time.perf_counter() - t0
    rss["after_write_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    slide = open_slide(slide_path)
    painted = open_slide(labels_path)
    times["open_s"] = time.perf_counter() - t0
    cfg = TrainConfig(method=method, iterations=steps, budget="iterations", seed=seed, refresh_every=10**9)
    cfg.data.unpainted = "ignore"
    cfg.wsi = WSIConfig(level=level, tile_size=tile)
    t0 = time.perf_counter()
    pair = snapshot_slide(slide.levels, painted.levels[0], rgb=slide.rgb, wsi=cfg.wsi, name=slide.name)
    times["snapshot_s"] = time.perf_counter() - t0
    trainer = Trainer(cfg, [pair], device=device)
    summary = trainer.dataset.summary()
    t0 = time.perf_counter()
    finished = None
    for event in trainer.run(previews=False):
        if isinstance(event, Finished):
            finished = event
    times["train_s"] = time.perf_counter() - t0
    rss["after_train_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        if done == total or time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log.info("predicted %d / %d tiles", done, total)

    pyramid, info = predict_slide_pair(trainer.method.inference_model(), pair, work / "prediction.zarr",
                                       class_values=trainer.dataset.class_values, device=device,
                                       overlap=cfg.wsi.overlap, progress=progress)
    times["predict_s"] = time.perf_counter() - t0
    rss["after_predict_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    export = write_pyramid(work / "prediction.ome.tif", pyramid, tile=tile, labels=True, overwrite=True)
    times["export_s"] = time.perf_counter() - t0
    rss["peak_mb"] = peak_rss_mb()
    # nuclei Dice on the tissue cells that were not painted, at the prediction's level

    ref = Mosaic(shifted, np.where(painted_layout >= 0, -1, layout), labels=True).at_level(level)
    inter = pred_n = ref_n = 0
    pred0 = pyramid[0]
    for y in range(0, ref.shape[0], 2048):
        for x in range(0, ref.shape[1], 2048):
            r = ref[y:y + 2048, x:x + 2048]
            p = np.asarray(pred0[y:y + 2048, x:x + 2048])
            scored = r > 0
            inter += int(((p == 2) & (r == 2) & scored).sum())
            pred_n += int(((p == 2) & scored).sum())
            ref_n += int(((r == 2) & scored).sum())
    dice = 2 * inter / (pred_n + ref_n) if pred_n + ref_n else float("nan")
    result = {
        "slide": {"shape": list(slide.levels[0].shape), "levels": [list(lv.shape) for lv in slide.levels],
                  "file_mb": slide_path.stat().st_size / 2**20, "tissue_fraction": tissue_fraction,
                  "tiles_from": str(tile_folder)},
        "train": {"method": method, "steps": finished.step, "level": level, "tile": tile, "reason": finished.reason,
                  "dataset": summary, "losses": finished.losses},
        "predict": {**info, "level_shape": list(pyramid[0].shape), "pyramid_levels": len(pyramid)},
        "export": {"path": str(export), "mb": export.stat().st_size / 2**20},
        "dice_nuclei_unpainted_tissue": dice,
        "times": times, "peak_rss_mb": rss, "device": describe_device(device), "machine": machine_info(),
    }
    slide.close()
    painted.close()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
