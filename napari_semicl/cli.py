"""Command line: everything the train dock does, without Qt.

    napari-semicl train --image IMG --labels LAB [--method NAME] [--iterations N] --out DIR
    napari-semicl predict --checkpoint CKPT --image IMG --out MASK [--entropy OUT]
        (IMG may be a whole-slide image: pyramidal TIFF/SVS/OME-TIFF or OME-Zarr, predicted
        tile by tile into MASK = *.ome.tif or *.zarr; or a folder of equal-size tiles)
    napari-semicl evaluate --pred P --reference R
    napari-semicl interpolate --labels PAINTED --image IMG --out MASK [--axis N] [--method sdf|flow]
        (fill between fully painted slices, as 3D Slicer / ITK-SNAP do; no training)
    napari-semicl demo [--out DIR]      (the whole loop on the bundled sample volume)

Errors a user can cause print one line, ``napari-semicl: error: ...``, and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from . import __version__
from .data import AnnotatedPair
from .data.reveal import PLACEMENTS, choose_reveal_slices, reveal_slices
from .engine import (
    Evaluated,
    Finished,
    Notice,
    StepDone,
    TrainConfig,
    Trainer,
    evaluate_segmentation,
    load_predictor,
    pick_device,
)
from .engine.apply import Predictor, predict_file, read_input_image
from .engine.config import UNPAINTED_CHOICES, set_option
from .engine.distributed import env_rank, env_world_size
from .engine.distributed import shutdown as shutdown_distributed
from .engine.prior import INTERPOLATION_CHOICES, PRIOR_MODES
from .engine.trainer import CHECKPOINT_NAME
from .errors import ConfigError, DataError, SemiclError
from .io import (
    ImageData,
    atomic_path,
    read_image,
    read_labels,
    write_labels,
)
from .methods import available_methods, get_method

log = logging.getLogger("napari_semicl")


class CliError(Exception):
    """A usage problem reported as one line."""


# --- helpers ----------------------------------------------------------------------------------
def _mask_suffix(image: ImageData) -> str:
    return ".nii.gz" if image.metadata.get("format") == "nifti" else ".tif"


def _build_config(args) -> TrainConfig:
    cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    if args.method is not None:
        cfg.method = args.method
    if args.iterations is not None:
        cfg.iterations, cfg.budget = args.iterations, "iterations"
    if args.minutes is not None:
        cfg.minutes, cfg.budget = args.minutes, "minutes"
    if args.seed is not None:
        cfg.seed = args.seed
    if args.unpainted is not None:
        cfg.data.unpainted = args.unpainted
    if args.axis is not None:
        cfg.data.axis = args.axis
    if args.patch_size is not None:  # set_option: forced, never shrunk to fit (engine/memory.py)
        set_option(cfg, "data.patch_size", str(args.patch_size))
    if getattr(args, "level", None) is not None:
        cfg.wsi.level = args.level
    if getattr(args, "tile_size", None) is not None:
        cfg.wsi.tile_size = args.tile_size
    for method in available_methods():  # the flags each method offers (Method.cli_settings)
        for name in get_method(method).cli_settings:
            value = getattr(args, name, None)
            if value is not None:
                set_option(cfg, f"{method}.{name}", value)
    for key, raw in _set_items(args):
        set_option(cfg, key, raw, default_section=cfg.method)
    if getattr(args, "prior", None) is not None:
        cfg.prior.mode = args.prior
    if getattr(args, "interpolation", None) is not None:
        cfg.prior.interpolation = args.interpolation
    if getattr(args, "context_slices", None) is not None:
        cfg.data.context_slices = args.context_slices
    if getattr(args, "spatial_dims", None) is not None:
        cfg.model.spatial_dims = args.spatial_dims
    if getattr(args, "patch_depth", None) is not None:
        set_option(cfg, "data.patch_depth", str(args.patch_depth))
    return cfg.validate()


# --- whole-slide images (docs/wsi.md) -----------------------------------------------------------
def _read_any(path: str) -> ImageData:
    """An image file, or a folder of equal-size tiles as a stack (one tile per slice)."""
    return read_input_image(path)


def _slide_pair(image_path: str, labels_path: str | None, cfg: TrainConfig):
    """A :class:`SlidePair` snapshot: the slide lazily, the labels lazily when they are a
    slide-sized TIFF/OME-Zarr themselves; returns (pair, slide) (close the slide at the end)."""
    from .data.tiles import snapshot_slide
    from .io.wsi import is_slide, open_slide

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


def _tile_progress(label: str):
    state = {"last": -1}

    def progress(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 5 != state["last"] // 5 or done == total:
            state["last"] = pct
            log.info("%s: %3d%% (%d/%d tiles)", label, pct, done, total)
    return progress


def _export_slide_prediction(pyramid, zarr_path: Path, out: Path, *, tile: int, overwrite: bool) -> Path:
    """Write the zarr pyramid to ``out`` (.ome.tif / .tif / .zarr); the zarr is removed
    when it was only a working copy."""
    import shutil

    from .io.wsi import write_pyramid

    if out.resolve() == zarr_path.resolve():
        return out
    path = write_pyramid(out, pyramid, tile=tile, labels=True, overwrite=overwrite)
    shutil.rmtree(zarr_path, ignore_errors=True)
    return path


def _work_zarr(out: Path) -> Path:
    name = out.name.split(".")[0] or "prediction"
    return out if out.suffix.lower() == ".zarr" else out.with_name(f".{name}.work.zarr")


def _progress_printer(every: int = 25):
    def callback(event) -> None:
        if isinstance(event, StepDone) and (event.step % every == 0 or event.fraction >= 1):
            losses = " ".join(f"{k}={v:.4f}" for k, v in event.losses.items())
            eta = f" eta {event.eta_s:.0f}s" if event.eta_s is not None else ""
            log.info("step %d (%3.0f%%) %s%s", event.step, 100 * event.fraction, losses, eta)
        elif isinstance(event, Evaluated):
            log.info("validation dice %.4f at step %d", event.metrics.get("dice", float("nan")), event.step)
        elif isinstance(event, Notice):
            (log.warning if event.level == "warning" else log.info)("%s", event.text)
    return callback


def _train(trainer: Trainer, *, progress_every: int = 25) -> Finished:
    """Run to the end; Ctrl-C (SIGINT) stops after the current step and keeps the model."""
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):  # pragma: no cover - exercised manually
        log.warning("stopping after the current step (press Ctrl-C again to abort)")
        trainer.request_stop()
        signal.signal(signal.SIGINT, previous)

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        callback = _progress_printer(progress_every)
        finished = None
        for event in trainer.run(previews=False):
            callback(event)
            if isinstance(event, Finished):
                finished = event
        return finished
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _final_metrics(trainer: Trainer, finished: Finished) -> dict:
    return {
        "losses": finished.losses,
        "steps": finished.step,
        "seconds": round(finished.seconds, 3),
        "device": str(trainer.device),
        "world_size": trainer.dist.world_size,
        "method": trainer.config.method,
        "reason": finished.reason,
        "class_values": trainer.dataset.class_values,
        "data": trainer.dataset.summary(),
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# --- subcommands -----------------------------------------------------------------------------
def _make_trainer(args, cfg, pairs: list, out: Path) -> Trainer:
    """A new trainer from ``cfg``, or with ``--resume`` one restored from a checkpoint (or a
    run folder's last checkpoint) with the budget flags given on the command line."""
    if not args.resume:
        return Trainer(cfg, pairs, device=pick_device(args.device), out_dir=out)
    resume = Path(args.resume)
    if resume.is_dir():  # a run folder: its last (autosaved) checkpoint
        resume = resume / CHECKPOINT_NAME
    trainer = Trainer.from_checkpoint(resume, pairs, device=pick_device(args.device), out_dir=out)
    if args.iterations is not None or args.minutes is not None:  # the budget flags still apply
        trainer.config.iterations, trainer.config.minutes = cfg.iterations, cfg.minutes
        trainer.config.budget = cfg.budget
    return trainer


def _train_or_fail(trainer: Trainer) -> Finished:
    """Run ``trainer`` to the end; a crash becomes a CliError naming the step."""
    log.info("training %s on %s: %s", trainer.config.method, trainer.device, trainer.dataset.summary())
    finished = _train(trainer)
    if finished.reason == "error":
        said = "checkpoint" in (finished.error or "")  # e.g. the out-of-memory message says it
        kept = f"; the last checkpoint is kept: {finished.checkpoint}" if finished.checkpoint and not said else ""
        raise CliError(f"training failed at step {finished.step}: {finished.error}{kept}")
    return finished


def cmd_train(args) -> int:
    from .io.wsi import is_slide

    out = Path(args.out)
    labels = args.labels or []
    if len(labels) > len(args.image):
        raise CliError("more --labels than --image: give one --labels per --image (in order)")
    if any(is_slide(p) for p in args.image):
        return _train_slides(args, out, labels)
    images = [_read_any(p) for p in args.image]
    pairs = []
    for i, img in enumerate(images):
        if i < len(labels) and img.metadata.get("format") == "tiles":
            from .io.wsi import read_tile_folder

            lab = read_tile_folder(labels[i], kind="labels", names=img.metadata["tile_names"]).data
        else:
            lab = read_labels(labels[i], like=img).data if i < len(labels) else None
        pairs.append(AnnotatedPair(img.data, lab, rgb=img.rgb, name=img.name, spacing=img.scale, metadata=img.metadata))
    cfg = _build_config(args)
    out.mkdir(parents=True, exist_ok=True)
    trainer = _make_trainer(args, cfg, pairs, out)
    finished = _train_or_fail(trainer)
    if not trainer.dist.is_main:  # under torchrun rank 0 alone predicts and writes
        return 0
    for i, img in enumerate(images):
        pred = trainer.predict_pair(i)  # fused with the painted-slice prior where there is one
        name = "prediction" if len(images) == 1 else f"prediction_{i}_{img.name}"
        path = write_labels(out / f"{name}{_mask_suffix(img)}", pred.labels, metadata=img.metadata, overwrite=True)
        log.info("prediction written to %s", path)
    metrics = _final_metrics(trainer, finished)
    _write_json_atomic(out / "metrics.json", metrics)
    print(json.dumps({"out": str(out), "checkpoint": finished.checkpoint, **metrics}, indent=2))
    return 0 if finished.reason in ("budget", "stopped") else 1


def _train_slides(args, out: Path, labels: list) -> int:
    """``train`` on whole-slide images: tiles read lazily, prediction exported as a pyramid."""
    from .engine.slide_inference import predict_slide_pair

    cfg = _build_config(args)
    out.mkdir(parents=True, exist_ok=True)
    opened, pairs = [], []
    try:
        for i, path in enumerate(args.image):
            pair, slide = _slide_pair(path, labels[i] if i < len(labels) else None, cfg)
            pairs.append(pair)
            opened.append(slide)
        trainer = _make_trainer(args, cfg, pairs, out)
        finished = _train_or_fail(trainer)
        if not trainer.dist.is_main:  # under torchrun rank 0 alone predicts and writes
            return 0
        outputs = []
        for i, pair in enumerate(pairs):
            name = "prediction" if len(pairs) == 1 else f"prediction_{i}_{pair.name}"
            target = out / f"{name}.ome.tif"
            work = _work_zarr(target)
            pyramid, info = predict_slide_pair(
                trainer.method.inference_model(), pair, work, class_values=trainer.dataset.class_values,
                device=trainer.device, overlap=trainer.config.wsi.overlap, progress=_tile_progress(f"predicting {pair.name}"),
            )
            path = _export_slide_prediction(pyramid, work, target, tile=pair.grid.tile, overwrite=True)
            log.info("prediction written to %s (%d tiles in %.1f s)", path, info["tiles"], info["seconds"])
            outputs.append(str(path))
    finally:
        for slide in opened:
            slide.close()
    metrics = {**_final_metrics(trainer, finished), "predictions": outputs}
    _write_json_atomic(out / "metrics.json", metrics)
    print(json.dumps({"out": str(out), "checkpoint": finished.checkpoint, **metrics}, indent=2))
    return 0 if finished.reason in ("budget", "stopped") else 1


def _predict_slide(args, model, cfg) -> int:
    from .engine.slide_inference import predict_slide
    from .io.wsi import open_slide

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists: pass --overwrite or choose another name")
    if not (out.name.lower().endswith((".tif", ".tiff")) or out.suffix.lower() == ".zarr"):
        raise CliError(f"a slide's mask goes to a pyramid: --out must end in .ome.tif or .zarr, got {out.name}")
    device = next(model.parameters()).device
    w = cfg.wsi
    with open_slide(args.image) as slide:
        work = _work_zarr(out)
        pyramid, info = predict_slide(
            model, slide.levels, work, class_values=cfg.data.class_values, level=w.level, rgb=slide.rgb, device=device,
            tile=w.tile_size, overlap=w.overlap, tissue_min=w.tissue_min, overwrite=True,
            progress=_tile_progress(f"predicting {slide.name}"),
        )
        path = _export_slide_prediction(pyramid, work, out, tile=w.tile_size, overwrite=args.overwrite)
    print(f"mask written to {path} (level {w.level}: {info['tissue_tiles']} of {info['grid_tiles']} tiles are tissue, "
          f"{info['seconds']:.1f} s)")
    return 0


def cmd_predict(args) -> int:
    from .io.wsi import is_slide

    model, cfg = load_predictor(args.checkpoint, device=pick_device(args.device))
    if is_slide(args.image):
        return _predict_slide(args, model, cfg)
    result = predict_file(
        Predictor(model, cfg, next(model.parameters()).device, str(args.checkpoint)), args.image, args.out,
        entropy=args.entropy, with_entropy=bool(args.suggest), overwrite=args.overwrite,
    )
    pred = result.prediction
    print(f"mask written to {result.mask}")
    if result.entropy_map is not None:
        print(f"entropy map written to {result.entropy_map}")
    if args.suggest:
        from .analysis import rank_slices, slice_means

        ranked = rank_slices(slice_means(pred.entropy, cfg.data.axis), top=args.suggest)
        print(json.dumps({"axis": cfg.data.axis, "annotate_next": [
            {"slice": s.slice_index, "mean_entropy": round(s.entropy, 6)} for s in ranked]}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    pred = read_labels(args.pred)
    ref = read_labels(args.reference, like=pred)
    spacing = None if args.voxels else ref.metadata.get("spacing") or None
    if spacing is not None and ref.metadata.get("format") != "nifti":
        spacing = None
    result = evaluate_segmentation(pred.data, ref.data, spacing=spacing)
    print(json.dumps(result, indent=2))
    return 0


def cmd_interpolate(args) -> int:
    import time

    from .data.interpolation import interpolate_labels

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} already exists: pass --overwrite or choose another name")
    img = read_image(args.image)
    if img.rgb:
        raise DataError(f"{Path(args.image).name} is an RGB image: interpolation needs a grey image or volume")
    labels = read_labels(args.labels, like=img)
    axis = int(np.argmin(labels.data.shape)) if args.axis is None else args.axis
    spacing = img.scale if img.metadata.get("format") == "nifti" else None
    t0 = time.perf_counter()
    result = interpolate_labels(labels.data, axis=axis, spacing=spacing, method=args.method, image=img.data,
                                unpainted=args.unpainted, shrink=args.shrink)
    seconds = time.perf_counter() - t0
    path = write_labels(out, result.labels, metadata=img.metadata, overwrite=args.overwrite)
    print(f"{len(result.painted)} painted slice(s) along axis {result.axis}: {result.painted.tolist()}; "
          f"classes {result.class_values} (background {result.class_values[0]})")
    print(f"interpolated ({result.method}, fall-off {result.shrink:.2f} px/slice) in {seconds:.2f} s")
    print(f"mask written to {path}")
    return 0


def cmd_demo(args) -> int:
    from .io.sample import load_sample_volume

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, reference = load_sample_volume()
    axis = 0
    slices = choose_reveal_slices(reference.data, args.reveal, axis)
    painted = reveal_slices(reference.data, slices, axis)
    paths = {
        "reference": write_labels(out / "reference.nii.gz", reference.data, metadata=image.metadata, overwrite=True),
        "painted": write_labels(out / "painted.nii.gz", painted, metadata=image.metadata, overwrite=True),
    }
    cfg = TrainConfig(method=args.method, iterations=args.iterations, seed=args.seed)
    cfg.data.unpainted = "background"  # revealed slices are fully labelled
    cfg.data.axis = axis
    pair = AnnotatedPair(image.data, painted, name=image.name, spacing=image.scale, metadata=image.metadata)
    log.info("demo: %s, %d revealed slices %s along axis %d, %s for %d steps",
             image.name, len(slices), slices, axis, args.method, args.iterations)
    trainer = Trainer(cfg, [pair], device=pick_device(args.device), out_dir=out)
    finished = _train(trainer)
    if finished.reason == "error":
        raise CliError(f"training failed at step {finished.step}: {finished.error}")
    pred = trainer.predict(image.data)
    mask = write_labels(out / "prediction.nii.gz", pred.labels, metadata=image.metadata, overwrite=True)
    keep = np.ones(reference.data.shape[axis], bool)
    keep[slices] = False
    scores = evaluate_segmentation(np.compress(keep, pred.labels, axis), np.compress(keep, reference.data, axis))
    metrics = {**_final_metrics(trainer, finished), "revealed_slices": slices, "unrevealed_scores": scores}
    _write_json_atomic(out / "metrics.json", metrics)
    print(f"Dice on the {int(keep.sum())} unrevealed slices: {scores['mean'].get('dice', float('nan')):.3f}")
    print(f"painted slices: {paths['painted']}")
    print(f"checkpoint: {finished.checkpoint}")
    print(f"mask written to {mask}")
    return 0


def _set_items(args, *, sections: bool = False) -> list[tuple[str, str]]:
    """(key, value) of each ``--set KEY=VALUE``; ``sections``: the key must name its
    section (``SECTION.KEY``, for settings that apply to every method)."""
    items = []
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or (sections and "." not in key):
            raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        items.append((key.strip(), raw.strip()))
    return items


def _bench_settings(args) -> dict[str, str]:
    """The settings ``bench within-volume`` and ``bench cohort`` apply to every trained
    method: the network and batch flags, then ``--set KEY=VALUE``."""
    out = {}
    for flag, key in (("spatial_dims", "model.spatial_dims"), ("patch_size", "data.patch_size"),
                      ("patch_depth", "data.patch_depth"), ("batch_labelled", "data.batch_labelled"),
                      ("batch_unlabelled", "data.batch_unlabelled")):
        if getattr(args, flag, None) is not None:
            out[key] = str(getattr(args, flag))
    for key, raw in _set_items(args, sections=True):
        out[key] = raw
    return out


def cmd_bench(args) -> int:
    from .bench import label_efficiency, speed as speed_mod

    device = pick_device(getattr(args, "device", "auto"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if getattr(args, "methods", None) else None
    if args.bench == "report":
        from .bench.report import dice_vs_k_plot, render

        print(render(args.results))
        if args.plot:
            print(f"plot written to {dice_vs_k_plot(args.results, args.plot)}", file=sys.stderr)
        return 0
    if args.bench == "wsi":
        from .bench.slides import wsi_benchmark

        result = wsi_benchmark(args.tiles, args.out, size=args.size, tissue_fraction=args.tissue_fraction,
                               level=args.level, steps=args.steps, method=args.method, work_dir=args.work_dir,
                               seed=args.seed, device=device, reuse=args.reuse)
        print(json.dumps({"out": args.out, "times": result["times"], "peak_rss_mb": result["peak_rss_mb"]}, indent=2))
        return 0
    if args.bench == "histology":
        from .bench.histology import monuseg

        data = monuseg(args.data, labelled=args.labelled, methods=methods, budget_steps=args.budget_steps,
                       seed=args.seed, out=args.out, device=device, patch_size=args.patch_size)
    elif args.bench == "within-volume":
        data = label_efficiency.within_volume(args.data, k=args.k, methods=methods, budget_s=args.budget_s,
                                              seed=args.seed, out=args.out, limit=args.limit, device=device,
                                              budget_steps=args.budget_steps, placement=args.placement,
                                              offset=args.offset, settings=_bench_settings(args))
    elif args.bench == "cohort":
        data = label_efficiency.cohort(args.train, args.test, labelled=args.labelled, methods=methods,
                                       budget_s=args.budget_s, seed=args.seed, out=args.out, device=device,
                                       limit_test=args.limit_test, budget_steps=args.budget_steps,
                                       labelled_names=args.labelled_names.split(",") if args.labelled_names else None,
                                       settings=_bench_settings(args), skip_labelled=args.skip_labelled,
                                       complete_labels=args.complete_labels)
    elif args.bench == "ui":
        import subprocess

        cmd = [sys.executable, "-m", "napari_semicl.widgets.ui_probe", "--out", args.out,
               "--seconds", str(args.seconds), "--method", args.method, "--refresh-every", str(args.refresh_every)]
        if args.review_docks:
            cmd.append("--review-docks")
        if args.trace_stalls:
            cmd.append("--trace-stalls")
        for flag, value in (("--image", args.image), ("--reference", args.reference)):
            if value:
                cmd += [flag, value]
        return subprocess.call(cmd)  # a separate process: Qt and napari stay out of the CLI
    else:
        image = reference = None
        if args.image or args.reference:
            if not (args.image and args.reference):
                raise DataError("bench speed: give both --image and --reference (its labels), or neither")
            from .io import read_image, read_labels

            image, reference = read_image(args.image).data, read_labels(args.reference).data
            if image.shape != reference.shape:
                raise DataError(f"bench speed: image {image.shape} and reference {reference.shape} differ in shape")
        data = speed_mod.speed(methods=methods, steps=args.steps, device=device, threads=args.threads,
                               image=image, reference=reference, patch_size=args.patch_size, batch=args.batch,
                               spatial_dims=args.spatial_dims, patch_depth=args.patch_depth)
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if env_rank() != 0:  # under torchrun: rank 0 reports
        return 0
    summary = {m: {k: v for k, v in row.items() if k != "per_volume" and k != "step_s_all"}
               for m, row in data["methods"].items()}
    print(json.dumps({"out": args.out, "methods": summary}, indent=2))
    return 0


def cmd_job(args) -> int:
    """One rank of a run the Train dock started on several devices (engine.launch)."""
    from .engine.launch import run_job

    return run_job(args.job_dir)


# --- parser ----------------------------------------------------------------------------------
def _add_method_flags(parser) -> None:
    """A flag for each setting a registered method offers on the command line
    (``Method.cli_settings``), with the help text of its config field."""
    import dataclasses

    from .engine.config import setting_help

    seen = set()
    for method in available_methods():
        cls = get_method(method)
        if cls.config_class is None:
            continue
        section = cls.config_class()
        helps = setting_help(section)
        choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(section)}
        for name in cls.cli_settings:
            if name in seen:
                continue
            seen.add(name)
            default = getattr(section, name)
            kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices.get(name),
                                help=f"{method}: {helps[name][1].splitlines()[0]} (default {default!r})")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-semicl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"napari-semicl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_training_options(p, *, method_default=None):
        p.add_argument("--method", choices=available_methods(), default=method_default,
                       help="learning method (default: supervised, or the --config's)")
        p.add_argument("--iterations", type=int, help="training steps (with --resume: steps more)")
        p.add_argument("--minutes", type=float, help="wall-clock budget instead of --iterations")
        p.add_argument("--seed", type=int)
        p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])

    t = sub.add_parser("train", help="train on painted labels and predict the whole image")
    t.add_argument("--image", required=True, action="append",
                   help="image file, whole-slide image or folder of tiles (repeat for several pairs)")
    t.add_argument("--labels", action="append", help="painted labels, 0 = unpainted (one per --image)")
    add_training_options(t)
    t.add_argument("--unpainted", choices=UNPAINTED_CHOICES,
                   help="unpainted pixels of labelled slices: ignore (scribbles, default) or background")
    t.add_argument("--axis", type=int, help="slicing axis (default 0, the napari slider axis)")
    t.add_argument("--patch-size", type=int, help="training crop size, a multiple of 16 (default 128, 3D: 64, shrunk "
                                                  "to fit in memory; a size given here is refused if it cannot fit)")
    t.add_argument("--level", type=int, help="whole-slide images: pyramid level to train and predict (default 0)")
    t.add_argument("--tile-size", type=int, help="whole-slide images: tile grid size at that level (default 512)")
    _add_method_flags(t)
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set data.patch_size=96 --set prior.mode=targets; a bare KEY is a "
                        "setting of the chosen --method (repeatable)")
    t.add_argument("--prior", choices=PRIOR_MODES,
                   help="painted slices as a dense prior (fully painted slices; docs/prior.md): 'targets' trains "
                        "on the shape interpolated between them and falls back on it where the network is unsure")
    t.add_argument("--interpolation", choices=INTERPOLATION_CHOICES, help="how the prior fills between painted slices")
    t.add_argument("--context-slices", type=int,
                   help="2.5D: neighbouring slices on either side the network sees as channels (default 0)")
    t.add_argument("--spatial-dims", type=int, choices=(2, 3),
                   help="the network: 2 = slices (default), 3 = 3D patches of volumes (MONAI BasicUNet, "
                        "sliding-window prediction)")
    t.add_argument("--patch-depth", type=int,
                   help="3D: patch extent along the slicing axis, a multiple of 16 (default 64, shrunk to fit in memory)")
    t.add_argument("--config", help="a config.json to start from (flags override it)")
    t.add_argument("--resume", help="a checkpoint, or a run folder (its last checkpoint), to continue training from; "
                   "the budget (--iterations / --minutes, else the checkpoint's) is trained on top of its steps")
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict an image with a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="mask file (.nii.gz, .nii, .tif; for a slide .ome.tif or .zarr)")
    p.add_argument("--entropy", help="also write the normalised entropy map here")
    p.add_argument("--suggest", type=int, default=0, metavar="N",
                   help="also print (JSON) the N slices with the highest mean entropy: where to annotate next")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="Dice, HD95 and ASD of a mask against a reference (JSON)")
    e.add_argument("--pred", required=True)
    e.add_argument("--reference", required=True)
    e.add_argument("--voxels", action="store_true", help="distances in voxels even if spacing is known")
    e.set_defaults(func=cmd_evaluate)

    ip = sub.add_parser("interpolate", help="fill between fully painted slices (no training), like 3D Slicer")
    ip.add_argument("--labels", required=True, help="painted labels: a few whole slices")
    ip.add_argument("--image", required=True, help="the image: gives the geometry, and the intensities for --method flow")
    ip.add_argument("--out", required=True, help="mask file (.nii.gz, .nii, .tif), written with the image's geometry")
    ip.add_argument("--axis", type=int, help="slicing axis (default: the axis with the fewest slices)")
    ip.add_argument("--method", choices=INTERPOLATION_CHOICES, default="flow",
                    help="flow (default): carry the painted shapes along the image by optical flow, then blend "
                         "their signed distance maps; sdf: blend the maps directly (faster, ignores the image)")
    ip.add_argument("--unpainted", choices=UNPAINTED_CHOICES, default="background",
                    help="background (default): 0 is background on painted slices; ignore: 0 is unpainted, so "
                         "painted slices must be painted in every pixel")
    ip.add_argument("--shrink", type=float,
                    help="fall-off past the outermost painted slice, in-plane pixels per slice (default 1.5 x slice "
                         "spacing / pixel size)")
    ip.add_argument("--overwrite", action="store_true", help="replace an existing mask")
    ip.set_defaults(func=cmd_interpolate)

    d = sub.add_parser("demo", help="the whole loop on the bundled sample volume, headless")
    d.add_argument("--out", default="semicl_out")
    d.add_argument("--reveal", type=int, default=3, help="reference slices revealed as 'painted'")
    add_training_options(d, method_default="mean_teacher")
    d.set_defaults(iterations=150, seed=0)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: label efficiency and speed (docs/benchmarks.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    w = bsub.add_parser("within-volume", help="reveal K slices per volume, score the rest")
    w.add_argument("--data", required=True, help="folder of NAME.nii.gz + NAME_gt.nii.gz")
    w.add_argument("--k", type=int, required=True)
    w.add_argument("--placement", choices=PLACEMENTS, default="ends",
                   help="the K slices: 'ends' includes the first and last foreground slice (the tips), "
                        "'inside' spaces them strictly inside that range")
    w.add_argument("--limit", type=int, help="only the first N volumes")
    w.add_argument("--offset", type=int, default=0, help="skip the first N volumes (by name)")
    c = bsub.add_parser("cohort", help="N fully labelled training volumes, the rest unlabelled")
    c.add_argument("--train", required=True)
    c.add_argument("--test", required=True)
    c.add_argument("--labelled", type=int, required=True,
                   help="how many training volumes are fully labelled (evenly spaced through the sorted list)")
    c.add_argument("--labelled-names", help="comma-separated names of the labelled volumes (instead of evenly spaced)")
    c.add_argument("--limit-test", type=int, help="only the first N test volumes")
    c.add_argument("--skip-labelled", action="store_true",
                   help="leave the labelled training volumes out of the scores (when --test is the --train folder)")
    c.add_argument("--complete-labels", action="store_true",
                   help="train on every slice of the labelled volumes, slices without foreground as background "
                        "(the papers' setting; by default such slices are unlabelled)")
    for q in (w, c):
        q.add_argument("--methods", required=True,
                       help="comma-separated: registered methods, rf, full (and within-volume: interp, interp_flow)")
        budget = q.add_mutually_exclusive_group(required=q is c)  # within-volume: baselines alone need none
        budget.add_argument("--budget-s", type=float, help="wall-clock training budget per method")
        budget.add_argument("--budget-steps", type=int, help="step budget per method (robust on a busy machine)")
        q.add_argument("--spatial-dims", type=int, choices=(2, 3),
                       help="2: slice network (default), 3: 3D network on volume patches")
        q.add_argument("--patch-size", type=int, help="training crop side (default 128)")
        q.add_argument("--patch-depth", type=int, help="3D: patch depth along the slicing axis (default: --patch-size)")
        q.add_argument("--batch-labelled", type=int, help="labelled crops per step (default 4)")
        q.add_argument("--batch-unlabelled", type=int, help="unlabelled crops per step (default 4)")
        q.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="any setting for every trained method, e.g. --set mean_teacher.ema_alpha=0.99 (repeatable)")
    s_ = bsub.add_parser("speed", help="step time, FLOP/s, inference throughput and memory")
    s_.add_argument("--methods", help="comma-separated (default: every registered method)")
    s_.add_argument("--steps", type=int, default=10)
    s_.add_argument("--threads", type=int, help="torch CPU threads")
    s_.add_argument("--patch-size", type=int, default=128, help="training crop side (default 128)")
    s_.add_argument("--batch", type=int, default=4, help="labelled and unlabelled crops per step (default 4 each)")
    s_.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2, help="2: slice network, 3: 3D patches")
    s_.add_argument("--patch-depth", type=int, default=0, help="3D: patch depth (default: --patch-size)")
    s_.add_argument("--image", help="a volume to train on and infer (default: the bundled sample)")
    s_.add_argument("--reference", help="its labels (three slices are revealed for training)")
    r = bsub.add_parser("report", help="markdown tables from results JSON files (and a Dice-vs-K plot)")
    r.add_argument("results", nargs="+")
    r.add_argument("--plot", help="PNG path for Dice against K (within-volume files)")
    u = bsub.add_parser("ui", help="Qt event-loop latency in a real viewer, idle and training (needs a display)")
    u.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    u.add_argument("--method", default="mean_teacher")
    u.add_argument("--refresh-every", type=int, default=20)
    u.add_argument("--review-docks", action="store_true", help="also open the review docks, refreshing")
    u.add_argument("--image", help="an image file instead of the sample")
    u.add_argument("--reference", help="its reference labels (3 slices are revealed)")
    u.add_argument("--trace-stalls", action="store_true",
                   help="record the Qt thread's stack whenever it is blocked (diagnosis)")
    u.add_argument("--out", required=True)
    hs = bsub.add_parser("histology", help="H&E tiles (MoNuSeg): N labelled, the rest unlabelled and scored")
    hs.add_argument("--data", required=True, help="folder of NAME.png + NAME_gt.png tiles")
    hs.add_argument("--labelled", type=int, default=2)
    hs.add_argument("--methods", required=True, help="comma-separated: registered methods and rf")
    hs.add_argument("--budget-steps", type=int, required=True, help="training steps per method")
    hs.add_argument("--patch-size", type=int, default=128)
    ws = bsub.add_parser("wsi", help="a slide built from real tiles: open, train, predict, export; peak memory")
    ws.add_argument("--tiles", required=True, help="folder of NAME.png + NAME_gt.png H&E tiles")
    ws.add_argument("--size", type=int, default=20000, help="slide side in pixels")
    ws.add_argument("--tissue-fraction", type=float, default=0.15)
    ws.add_argument("--level", type=int, default=1, help="pyramid level trained and predicted")
    ws.add_argument("--steps", type=int, default=100)
    ws.add_argument("--method", default="mean_teacher")
    ws.add_argument("--work-dir", help="where the slide and masks are written (default: a temporary folder)")
    ws.add_argument("--reuse", action="store_true", help="keep a slide an earlier run wrote in --work-dir")
    for q in (w, c, s_, hs, ws):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
        q.add_argument("--out", required=True, help="results JSON (written as results arrive)")
    b.set_defaults(func=cmd_bench)

    j = sub.add_parser("job", help=argparse.SUPPRESS)  # a rank of the Train dock's torchrun run (engine/launch.py)
    j.add_argument("job_dir")
    j.set_defaults(func=cmd_job)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # under torchrun: rank 0 logs progress, the other ranks only warnings and errors, named
    ranks = env_world_size() > 1
    where = f" (rank {env_rank()})" if ranks else ""
    logging.basicConfig(
        level=logging.WARNING if args.quiet or (ranks and env_rank() != 0) else logging.INFO,
        format=f"%(asctime)s %(levelname)s{where} %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (SemiclError, CliError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"napari-semicl: error{where}: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
