"""Whole-slide images on the command line (docs/wsi.md): ``train`` and ``predict`` read the
slide tile by tile and write the mask as a pyramid (.ome.tif or .zarr)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..engine import TrainConfig
from ..io import read_image
from ..io.atomic import write_json
from .common import CliError
from .running import exit_code, final_metrics, make_trainer, train_or_fail

log = logging.getLogger("napari_semicl")


def slide_pair(image_path: str, labels_path: str | None, cfg: TrainConfig):
    """A :class:`SlidePair` snapshot: the slide lazily, the labels lazily when they are a
    slide-sized TIFF/OME-Zarr themselves; returns (pair, slide) (close the slide at the end)."""
    from ..data.tiles import snapshot_slide
    from ..io.wsi import is_slide, open_slide

    slide = open_slide(image_path)
    labels = None
    if labels_path is not None:
        if is_slide(labels_path):
            labels = open_slide(labels_path).levels[0]
        else:
            labels = read_image(labels_path, kind="labels").data
    pair = snapshot_slide(slide.levels, labels, rgb=slide.rgb, wsi=cfg.wsi, name=slide.name, metadata=slide.metadata)
    log.info("slide %s: %s; level %d grid %dx%d tiles, %d tissue, %d painted", slide.name,
             [tuple(lv.shape) for lv in slide.levels], cfg.wsi.level, pair.grid.n_rows, pair.grid.n_cols,
             len(pair.tissue), len(pair.painted))
    return pair, slide


def tile_progress(label: str):
    """A ``progress(done, total)`` callback that logs every 5 %."""
    state = {"last": -1}

    def progress(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 5 != state["last"] // 5 or done == total:
            state["last"] = pct
            log.info("%s: %3d%% (%d/%d tiles)", label, pct, done, total)
    return progress


def export_prediction(pyramid, zarr_path: Path, out: Path, *, tile: int, overwrite: bool) -> Path:
    """Write the zarr pyramid to ``out`` (.ome.tif / .tif / .zarr); the zarr is removed
    when it was only a working copy."""
    import shutil

    from ..io.wsi import write_pyramid

    if out.resolve() == zarr_path.resolve():
        return out
    path = write_pyramid(out, pyramid, tile=tile, labels=True, overwrite=overwrite)
    shutil.rmtree(zarr_path, ignore_errors=True)
    return path


def work_zarr(out: Path) -> Path:
    """Where a slide's prediction is written first: ``out`` itself when it is a .zarr,
    else a hidden working zarr beside it."""
    name = out.name.split(".")[0] or "prediction"
    return out if out.suffix.lower() == ".zarr" else out.with_name(f".{name}.work.zarr")


def train_slides(args, cfg: TrainConfig, out: Path, labels: list) -> int:
    """``train`` on whole-slide images: tiles read lazily, prediction exported as a pyramid."""
    from ..engine.slide_inference import predict_slide_pair

    out.mkdir(parents=True, exist_ok=True)
    opened, pairs = [], []
    try:
        for i, path in enumerate(args.image):
            pair, slide = slide_pair(path, labels[i] if i < len(labels) else None, cfg)
            pairs.append(pair)
            opened.append(slide)
        trainer = make_trainer(args, cfg, pairs, out)
        finished = train_or_fail(trainer)
        if not trainer.dist.is_main:  # under torchrun rank 0 alone predicts and writes
            return 0
        outputs = []
        for i, pair in enumerate(pairs):
            name = "prediction" if len(pairs) == 1 else f"prediction_{i}_{pair.name}"
            target = out / f"{name}.ome.tif"
            work = work_zarr(target)
            pyramid, info = predict_slide_pair(
                trainer.method.inference_model(), pair, work, class_values=trainer.dataset.class_values,
                device=trainer.device, overlap=trainer.config.wsi.overlap,
                progress=tile_progress(f"predicting {pair.name}"),
            )
            path = export_prediction(pyramid, work, target, tile=pair.grid.tile, overwrite=True)
            log.info("prediction written to %s (%d tiles in %.1f s)", path, info["tiles"], info["seconds"])
            outputs.append(str(path))
    finally:
        for slide in opened:
            slide.close()
    metrics = {**final_metrics(trainer, finished), "predictions": outputs}
    write_json(out / "metrics.json", metrics)
    print(json.dumps({"out": str(out), "checkpoint": finished.checkpoint, **metrics}, indent=2))
    return exit_code(finished)


def predict_slide(args, model, cfg: TrainConfig) -> int:
    """``predict`` on a whole-slide image, into a pyramid at ``--out``."""
    from ..engine.slide_inference import predict_slide as predict_tiles
    from ..io.wsi import open_slide

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists: pass --overwrite or choose another name")
    if not (out.name.lower().endswith((".tif", ".tiff")) or out.suffix.lower() == ".zarr"):
        raise CliError(f"a slide's mask goes to a pyramid: --out must end in .ome.tif or .zarr, got {out.name}")
    device = next(model.parameters()).device
    w = cfg.wsi
    with open_slide(args.image) as slide:
        work = work_zarr(out)
        pyramid, info = predict_tiles(
            model, slide.levels, work, class_values=cfg.data.class_values, level=w.level, rgb=slide.rgb, device=device,
            tile=w.tile_size, overlap=w.overlap, tissue_min=w.tissue_min, overwrite=True,
            progress=tile_progress(f"predicting {slide.name}"),
        )
        path = export_prediction(pyramid, work, out, tile=w.tile_size, overwrite=args.overwrite)
    print(f"mask written to {path} (level {w.level}: {info['tissue_tiles']} of {info['grid_tiles']} tiles are tissue, "
          f"{info['seconds']:.1f} s)")
    return 0
