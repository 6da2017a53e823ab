"""``napari-semicl demo``: the whole loop on the bundled sample volume, headless: reveal a
few reference slices as 'painted', train, predict, score the unrevealed slices."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data import AnnotatedPair
from ..data.reveal import choose_reveal_slices, reveal_slices
from ..engine import TrainConfig, Trainer, evaluate_segmentation, pick_device
from ..io import write_labels
from ..io.atomic import write_json
from .common import CliError, Command, add_training_options
from .running import final_metrics, run_to_end

log = logging.getLogger("napari_semicl")


def arguments(d) -> None:
    d.add_argument("--out", default="semicl_out")
    d.add_argument("--reveal", type=int, default=3, help="reference slices revealed as 'painted'")
    add_training_options(d, method_default="mean_teacher")
    d.set_defaults(iterations=150, seed=0)


def cmd_demo(args) -> int:
    from ..io.sample import load_sample_volume

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
    finished = run_to_end(trainer)
    if finished.reason == "error":
        raise CliError(f"training failed at step {finished.step}: {finished.error}")
    pred = trainer.predict(image.data)
    mask = write_labels(out / "prediction.nii.gz", pred.labels, metadata=image.metadata, overwrite=True)
    keep = np.ones(reference.data.shape[axis], bool)
    keep[slices] = False
    scores = evaluate_segmentation(np.compress(keep, pred.labels, axis), np.compress(keep, reference.data, axis))
    metrics = {**final_metrics(trainer, finished), "revealed_slices": slices, "unrevealed_scores": scores}
    write_json(out / "metrics.json", metrics)
    print(f"Dice on the {int(keep.sum())} unrevealed slices: {scores['mean'].get('dice', float('nan')):.3f}")
    print(f"painted slices: {paths['painted']}")
    print(f"checkpoint: {finished.checkpoint}")
    print(f"mask written to {mask}")
    return 0


COMMAND = Command("demo", "the whole loop on the bundled sample volume, headless", arguments, cmd_demo)
