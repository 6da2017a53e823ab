"""``napari-semicl train``: train on painted labels and predict the whole image.

A new train flag is declared in :func:`arguments` and applied to the config in
:func:`build_config` (both here); a method's own settings get their flags from
``Method.cli_settings`` without a change here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data import AnnotatedPair
from ..engine import TrainConfig
from ..engine.apply import read_input_image
from ..engine.config import UNPAINTED_CHOICES, set_option
from ..engine.prior import INTERPOLATION_CHOICES, PRIOR_MODES
from ..io import ImageData, read_labels, write_labels
from ..io.atomic import write_json
from ..methods import available_methods, get_method
from .common import CliError, Command, add_training_options, set_items
from .running import exit_code, final_metrics, make_trainer, train_or_fail

log = logging.getLogger("napari_semicl")


def arguments(t) -> None:
    t.add_argument("--image", required=True, action="append",
                   help="image file, whole-slide image or folder of tiles (repeat for several pairs)")
    t.add_argument("--labels", action="append", help="painted labels, 0 = unpainted (one per --image)")
    t.add_argument("--unlabelled", action="append", metavar="IMAGE",
                   help="an image with nothing painted: unlabelled data for the semi-supervised methods, and its "
                        "mask predicted at the end (repeatable; with --resume, a cohort's next volumes)")
    add_training_options(t)
    t.add_argument("--unpainted", choices=UNPAINTED_CHOICES,
                   help="unpainted pixels of labelled slices: ignore (scribbles, default) or background")
    t.add_argument("--axis", type=int, help="slicing axis (default 0, the napari slider axis)")
    t.add_argument("--patch-size", type=int, help="training crop size, a multiple of 16 (default 128)")
    t.add_argument("--level", type=int, help="whole-slide images: pyramid level to train and predict (default 0)")
    t.add_argument("--tile-size", type=int, help="whole-slide images: tile grid size at that level (default 512)")
    add_method_flags(t)
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
                   help="3D: patch extent along the slicing axis, a multiple of 16 (default: --patch-size)")
    t.add_argument("--config", help="a config.json to start from (flags override it)")
    t.add_argument("--resume", help="a checkpoint, or a run folder (its last checkpoint), to continue training from; "
                   "the budget (--iterations / --minutes, else the checkpoint's) is trained on top of its steps")
    t.add_argument("--out", required=True, help="output folder")


def add_method_flags(parser) -> None:
    """A flag for each setting a registered method offers on the command line
    (``Method.cli_settings``), with the help text of its config field."""
    import dataclasses

    from ..engine.config import setting_help

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


# flag -> config key, applied in this order after --config and before --set (flags override the file)
_PLAIN_FLAGS = (("seed", "seed"), ("unpainted", "data.unpainted"), ("axis", "data.axis"),
                ("patch_size", "data.patch_size"), ("level", "wsi.level"), ("tile_size", "wsi.tile_size"))
# ... and these after --set (a flag wins over a --set of the same key)
_LATE_FLAGS = (("prior", "prior.mode"), ("interpolation", "prior.interpolation"),
               ("context_slices", "data.context_slices"), ("spatial_dims", "model.spatial_dims"),
               ("patch_depth", "data.patch_depth"))


def _assign(cfg: TrainConfig, key: str, value) -> None:
    *sections, name = key.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)


def build_config(args) -> TrainConfig:
    """The run's config: ``--config`` (or the defaults), then the flags, then ``--set``."""
    cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    if args.method is not None:
        cfg.method = args.method
    if args.iterations is not None:
        cfg.iterations, cfg.budget = args.iterations, "iterations"
    if args.minutes is not None:
        cfg.minutes, cfg.budget = args.minutes, "minutes"
    for flag, key in _PLAIN_FLAGS:
        if getattr(args, flag, None) is not None:
            _assign(cfg, key, getattr(args, flag))
    for method in available_methods():  # the flags each method offers (Method.cli_settings)
        for name in get_method(method).cli_settings:
            value = getattr(args, name, None)
            if value is not None:
                set_option(cfg, f"{method}.{name}", value)
    for key, raw in set_items(args):
        set_option(cfg, key, raw, default_section=cfg.method)
    for flag, key in _LATE_FLAGS:
        if getattr(args, flag, None) is not None:
            _assign(cfg, key, getattr(args, flag))
    return cfg.validate()


def _mask_suffix(image: ImageData) -> str:
    return ".nii.gz" if image.metadata.get("format") == "nifti" else ".tif"


def _pairs(images: list[ImageData], labels: list[str]) -> list[AnnotatedPair]:
    pairs = []
    for i, img in enumerate(images):
        if i < len(labels) and img.metadata.get("format") == "tiles":
            from ..io.wsi import read_tile_folder

            lab = read_tile_folder(labels[i], kind="labels", names=img.metadata["tile_names"]).data
        else:
            lab = read_labels(labels[i], like=img).data if i < len(labels) else None
        pairs.append(AnnotatedPair(img.data, lab, rgb=img.rgb, name=img.name, spacing=img.scale, metadata=img.metadata))
    return pairs


def cmd_train(args) -> int:
    from ..io.wsi import is_slide

    out = Path(args.out)
    labels = args.labels or []
    if len(labels) > len(args.image):
        raise CliError("more --labels than --image: give one --labels per --image (in order)")
    if any(is_slide(p) for p in args.image):
        from .slides import train_slides

        return train_slides(args, build_config(args), out, labels)
    images = [read_input_image(p) for p in [*args.image, *(args.unlabelled or [])]]  # a file, or tiles as a stack
    pairs = _pairs(images, labels)  # those past the --labels given (--unlabelled ones too) have none
    cfg = build_config(args)
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(args, cfg, pairs, out)
    finished = train_or_fail(trainer)
    if not trainer.dist.is_main:  # under torchrun rank 0 alone predicts and writes
        return 0
    for i, img in enumerate(images):
        pred = trainer.predict_pair(i)  # fused with the painted-slice prior where there is one
        name = "prediction" if len(images) == 1 else f"prediction_{i}_{img.name}"
        path = write_labels(out / f"{name}{_mask_suffix(img)}", pred.labels, metadata=img.metadata, overwrite=True)
        log.info("prediction written to %s", path)
    metrics = final_metrics(trainer, finished)
    write_json(out / "metrics.json", metrics)
    print(json.dumps({"out": str(out), "checkpoint": finished.checkpoint, **metrics}, indent=2))
    return exit_code(finished)


COMMAND = Command("train", "train on painted labels and predict the whole image", arguments, cmd_train)
