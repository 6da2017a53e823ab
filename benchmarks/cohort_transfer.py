"""Issue 26: what a network trained on painted volumes is worth on the next volume.

A cohort of ``--train-volumes`` left-atrium volumes, each with ``--k-train`` slices painted
strictly inside the structure, trains one network (the dock's recommended configuration: the
fill of the painted slices as dense targets). At every ``--eval-every`` steps the network
alone predicts the ``--test-volumes`` other volumes (whole-volume Dice: a volume nobody
painted). Then each test volume gets ``--k-new`` painted slices and four masks are scored on
its unpainted slices (and, ``_whole``, the whole volume, also after keeping the largest
component, ``_whole_lcc``, as the session benchmark's ``predict.largest_component``):

- ``fill``: the fill between the painted slices alone (flow);
- ``network``: the cohort network alone;
- ``cohort_fused``: the cohort network fused with that fill (engine.prior's fusion), after
  ``--finetune-steps`` more steps from the cohort's weights on the new volume;
- ``scratch_fused``: the same steps from scratch on the new volume alone (the recommended
  configuration), fused the same way.

Budgets are steps (robust on a shared machine); wall and process CPU seconds are recorded.
``--method`` picks the training method (default: the recommended supervised configuration);
``--unlabelled-test`` gives the test volumes' images, nothing painted, to the cohort run as
unlabelled data (for the semi-supervised methods; their labels are never read in training).
``--oracle`` trains the cohort on its volumes' whole references instead (an upper bound: what
the painted slices and their fill cost the network). ``--save DIR`` keeps the cohort checkpoint and each test volume's network-alone prediction
(``NAME.npy``, label values) for later analyses without retraining; ``--load DIR`` takes the cohort
network from such a folder instead of training one (the same network for paired comparisons of
the fusion: the ``--set prior.*`` fusion settings, ``engine.prior.FUSION_SETTINGS``, apply to
the fused masks either way); ``--with-cohort`` fuses the new volumes in one run that also holds
the cohort's painted volumes (no fine-tuning), so that the fusion sees a cohort's network as
the dock and the session do (``SlicePrior.cohort``); ``--positions`` paints the new volumes' slices at those fractions
of the structure's slice range instead of ``--k-new`` evenly inside it; ``--network-only`` stops
after that (no fill, fine-tuning or scratch runs). ``--tta`` averages the network's
probabilities over the image and its flips along the two in-plane axes (4 passes); the
network-alone Dice is also reported after :func:`~napari_semicl.engine.postprocess.keep_largest_component`
(``network_lcc``).

    python benchmarks/cohort_transfer.py --data ../shared/data/la/train --steps 1500 \
        --eval-every 500 --finetune-steps 150 --out docs/results/cohort_transfer.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_semicl.bench.common import find_cases, machine_info, score, thinnest_axis
from napari_semicl.bench.label_efficiency import apply_overrides
from napari_semicl.cli.common import set_items
from napari_semicl.data import AnnotatedPair, augment
from napari_semicl.data.interpolation import interpolate_labels
from napari_semicl.data.reveal import choose_reveal_slices, foreground_slice_range, reveal_slices
from napari_semicl.engine import Trainer, recommended_config
from napari_semicl.engine.device import describe_device, set_threads
from napari_semicl.engine.events import Finished, StepDone
from napari_semicl.engine.inference import predict_volume
from napari_semicl.engine.precision import MODEL_ATTRIBUTE
from napari_semicl.engine.prior import FUSION_SETTINGS
from napari_semicl.engine.postprocess import keep_largest_component
from napari_semicl.io import atomic_path

log = logging.getLogger("cohort_transfer")


def _config(steps: int, axis: int, seed: int, settings: dict, method: str = "supervised"):
    cfg = recommended_config()
    cfg.method = method
    cfg.seed, cfg.refresh_every, cfg.budget, cfg.iterations = seed, 10**9, "iterations", steps
    cfg.data.axis = axis
    apply_overrides(cfg, cfg.method, settings)
    return cfg


class FlipAveraged(torch.nn.Module):
    """``model`` averaged over its input and the input flipped along the last two axes
    (h, v, both): returns the log of the mean softmax, so that the softmax the
    inference takes of it is that mean."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spatial_dims = getattr(model, "spatial_dims", 2)
        self.multiple = getattr(model, "multiple", 16)
        setattr(self, MODEL_ATTRIBUTE, getattr(model, MODEL_ATTRIBUTE, "fp32"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in ((), (-1,), (-2,), (-2, -1)):
            xi = x.flip(dims) if dims else x
            p = self.model(xi).float().softmax(dim=1)
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return (total / 4).clamp_min(1e-8).log()


def predict_flip_averaged(trainer: Trainer, image: np.ndarray) -> np.ndarray:
    cfg = trainer.config.data
    return predict_volume(FlipAveraged(trainer.method.inference_model()), image,
                          class_values=trainer.dataset.class_values, axis=cfg.axis, normalise=cfg.normalise,
                          device=trainer.device, context_slices=cfg.context_slices).labels


def _predict(trainer: Trainer, image: np.ndarray, tta: bool) -> np.ndarray:
    """The network's label values for ``image``; with ``tta`` the argmax of the softmax
    averaged over the image and its flips along the two in-plane axes."""
    if not tta:
        return trainer.predict(image).labels
    return predict_flip_averaged(trainer, image)


def _network_alone(trainer: Trainer, cases, tta: bool = False) -> tuple[list[float], list[float], list[np.ndarray]]:
    """Whole-volume Dice of the network alone on each case, raw and after keeping the
    largest component per class; and the predictions."""
    preds = [_predict(trainer, c.image.data, tta) for c in cases]
    raw = [float(score(p, c.reference.data)["dice"]) for p, c in zip(preds, cases)]
    lcc = [float(score(keep_largest_component(p), c.reference.data)["dice"]) for p, c in zip(preds, cases)]
    return raw, lcc, preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-volumes", type=int, default=4)
    ap.add_argument("--test-volumes", type=int, default=4)
    ap.add_argument("--k-train", type=int, default=5)
    ap.add_argument("--k-new", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="cohort training steps (required unless --load)")
    ap.add_argument("--eval-every", type=int, default=0, help="network-alone Dice on the test volumes every N steps")
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", help="SECTION.KEY=VALUE for the cohort and fine-tune configs")
    ap.add_argument("--method", default="supervised", help="training method of the cohort run (default supervised)")
    ap.add_argument("--unlabelled-test", action="store_true",
                    help="give the test volumes' images (nothing painted) to the cohort run as unlabelled data")
    ap.add_argument("--tta", action="store_true", help="network alone: average over in-plane flips (4 passes)")
    ap.add_argument("--spatial", metavar="ROT,SCALE",
                    help="weak augmentation's largest rotation (degrees; default 15) and zoom (0.2: factors "
                         "1/1.2..1.2; default 0) for every method of this run")
    ap.add_argument("--load", help="folder of an earlier --save: its checkpoint instead of training (no --steps run)")
    ap.add_argument("--positions", help="paint the new volumes at these fractions of the structure's slice range "
                    "(e.g. 0.25 or 0.3,0.7) instead of --k-new slices evenly inside it")
    ap.add_argument("--with-cohort", action="store_true",
                    help="with --finetune-steps 0: fuse each new volume in one run that also holds the cohort's "
                         "painted volumes (as the dock and the session do: a cohort's network, SlicePrior.cohort)")
    ap.add_argument("--save", help="folder for the cohort checkpoint and the network-alone predictions (NAME.npy)")
    ap.add_argument("--calibrate", action="store_true",
                    help="train, report the process CPU seconds per step (past the first 100) and stop")
    ap.add_argument("--oracle", action="store_true",
                    help="an upper bound: the cohort volumes train on their whole references (every slice "
                         "painted, complete) instead of --k-train painted slices and the fill")
    ap.add_argument("--network-only", action="store_true", help="stop after the cohort run's network-alone scores")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not args.load and args.steps <= 0:
        ap.error("--steps is required (or --load DIR of a saved cohort network)")
    if args.load and not (Path(args.load) / "checkpoint.pt").is_file():
        ap.error(f"--load {args.load}: no checkpoint.pt there (write one with --save)")
    if args.with_cohort and (args.finetune_steps or args.oracle):
        ap.error("--with-cohort fuses without fine-tuning (--finetune-steps 0), with painted cohort volumes "
                 "(no --oracle)")
    if args.load and (args.calibrate or args.eval_every):
        ap.error("--load evaluates a saved network: --calibrate and --eval-every need a training run")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_threads(args.threads)
    settings = dict(set_items(args, sections=True))
    if args.spatial:  # the methods call weak_augment with its defaults: change those for this process
        rot, zoom = (float(v) for v in args.spatial.split(","))
        augment.weak_augment.__kwdefaults__.update(max_rotation_deg=rot, max_scale=zoom)

    cases = find_cases(args.data)
    train, test = cases[: args.train_volumes], cases[args.train_volumes: args.train_volumes + args.test_volumes]
    axis = thinnest_axis(train[0].reference.data.shape)
    device = torch.device("cpu")
    result = {"protocol": "cohort_transfer", "data": args.data, "train": [c.name for c in train],
              "test": [c.name for c in test], "k_train": args.k_train, "k_new": args.k_new, "steps": args.steps,
              "finetune_steps": args.finetune_steps, "threads": args.threads, "settings": settings,
              "method": args.method, "spatial": args.spatial, "unlabelled_test": args.unlabelled_test,
              "tta": args.tta, "seed": args.seed, "oracle": args.oracle, "loaded": args.load,
              "positions": args.positions, "with_cohort": args.with_cohort,
              "device": describe_device(device, args.threads), "machine": machine_info(), "curve": [], "new": []}

    def write():
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))

    pairs = []
    for c in train:
        if args.oracle:  # every slice painted exactly: what the painted slices and their fill are short of
            pairs.append(AnnotatedPair(c.image.data, c.reference.data, name=c.name, spacing=c.image.scale,
                                       complete=True))
            continue
        slices = choose_reveal_slices(c.reference.data, args.k_train, axis, "inside")
        pairs.append(AnnotatedPair(c.image.data, reveal_slices(c.reference.data, slices, axis), name=c.name,
                                   spacing=c.image.scale))
    if args.unlabelled_test:  # images only: the semi-supervised methods' unlabelled data
        pairs += [AnnotatedPair(c.image.data, None, name=c.name, spacing=c.image.scale) for c in test]
    fusion_cfg = _config(max(args.steps, 1), axis, args.seed, settings, args.method).prior
    if args.load:
        trainer = Trainer.from_checkpoint(Path(args.load) / "checkpoint.pt", pairs, device=device,
                                          num_threads=args.threads)
    else:
        trainer = Trainer(_config(args.steps, axis, args.seed, settings, args.method), pairs, device=device,
                          num_threads=args.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train_cpu = 0.0
    last_eval = None
    result["step_cpu"] = []  # (step, process CPU s since the start, evaluations excluded) every 100 steps
    for event in ([] if args.load else trainer.run(previews=False)):
        if isinstance(event, StepDone) and event.step % 100 == 0:
            result["step_cpu"].append((event.step, train_cpu + time.process_time() - cpu0))
        if isinstance(event, StepDone) and args.eval_every and event.step % args.eval_every == 0:
            t_eval = time.process_time()
            train_cpu += t_eval - cpu0
            dice, lcc, preds = _network_alone(trainer, test, args.tta)
            last_eval = (event.step, dice, lcc, preds, time.process_time() - t_eval)
            result["curve"].append({"step": event.step, "train_cpu_s": train_cpu,
                                    "wall_s": time.perf_counter() - wall0, "dice": dice,
                                    "mean": float(np.mean(dice)), "std": float(np.std(dice)),
                                    "eval_cpu_s": time.process_time() - t_eval, "dice_lcc": lcc,
                                    "mean_lcc": float(np.mean(lcc)), "std_lcc": float(np.std(lcc))})
            log.info("step %d: network alone on new volumes %.4f +- %.4f, largest component %.4f +- %.4f "
                     "(train CPU %.0f s)", event.step, np.mean(dice), np.std(dice), np.mean(lcc), np.std(lcc),
                     train_cpu)
            cpu0 = time.process_time()
            write()
        if isinstance(event, Finished) and event.reason == "error":
            raise SystemExit(f"cohort training failed: {event.error}")
    train_cpu += time.process_time() - cpu0
    result["train_cpu_s"], result["train_steps"] = train_cpu, trainer.step
    if args.calibrate:  # the cost of a step: the slope of step_cpu past the first 100 steps
        (s0, c0), (s1, c1) = result["step_cpu"][0], result["step_cpu"][-1]
        result["cpu_per_step"] = (c1 - c0) / max(1, s1 - s0)
        write()
        print(json.dumps({"cpu_per_step": result["cpu_per_step"], "train_cpu_s": train_cpu}))
        return 0
    work = Path(args.save) if args.save else Path(tempfile.mkdtemp(prefix="cohort_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.load and work.resolve() == Path(args.load).resolve():
        ckpt = work / "checkpoint.pt"  # already there
    else:
        ckpt = trainer.save(work / "checkpoint.pt")
    if args.save or args.network_only:
        t_eval = time.process_time()
        if last_eval is not None and last_eval[0] == trainer.step:  # the last evaluation was at the end
            _, dice, lcc, preds, eval_cpu = last_eval
            t_eval -= eval_cpu
        else:
            dice, lcc, preds = _network_alone(trainer, test, args.tta)
        result["network_alone"] = {"dice": dice, "mean": float(np.mean(dice)), "std": float(np.std(dice)),
                                   "dice_lcc": lcc, "mean_lcc": float(np.mean(lcc)), "std_lcc": float(np.std(lcc)),
                                   "eval_cpu_s": time.process_time() - t_eval}
        if args.save:
            for c, p in zip(test, preds):
                np.save(work / f"{c.name}.npy", p)
            result["saved"] = str(work)
        write()
        log.info("network alone: %.4f +- %.4f, largest component %.4f +- %.4f", np.mean(dice), np.std(dice),
                 np.mean(lcc), np.std(lcc))
    if args.network_only:
        print(json.dumps(result["network_alone"], indent=1))
        return 0

    new_slices = []
    for c in test:
        if args.positions:
            first, last = foreground_slice_range(c.reference.data, axis)
            fractions = [float(f) for f in args.positions.split(",")]
            new_slices.append(sorted({int(round(first + f * (last - first))) for f in fractions}))
        else:
            new_slices.append(choose_reveal_slices(c.reference.data, args.k_new, axis, "inside"))
    new_pairs = [AnnotatedPair(c.image.data, reveal_slices(c.reference.data, s, axis), name=c.name,
                               spacing=c.image.scale) for c, s in zip(test, new_slices)]
    joint = None
    if args.with_cohort:  # one run holds the cohort's painted volumes and the new ones, as the dock does
        joint = Trainer.from_checkpoint(ckpt, [*pairs[: len(train)], *new_pairs], device=device,
                                        num_threads=args.threads)
        for name in FUSION_SETTINGS:
            setattr(joint.config.prior, name, getattr(fusion_cfg, name))
    for i, (c, slices, pair) in enumerate(zip(test, new_slices, new_pairs)):
        ref = c.reference.data
        painted = pair.labels
        keep = np.setdiff1d(np.arange(ref.shape[axis]), slices)
        row = {"name": c.name, "painted": slices}
        fill = interpolate_labels(painted, axis=axis, spacing=c.image.scale, image=c.image.data, method="flow").labels
        row["fill"] = score(fill, ref, keep_slices=keep, axis=axis)["dice"]
        net = _predict(trainer, c.image.data, args.tta)
        row["network"] = score(net, ref, keep_slices=keep, axis=axis)["dice"]
        row["network_whole"] = score(net, ref)["dice"]
        row["network_whole_lcc"] = score(keep_largest_component(net), ref)["dice"]
        if joint is not None:
            fused = joint.predict_pair(len(train) + i).labels
        else:
            tuned = Trainer.from_checkpoint(ckpt, [pair], device=device, num_threads=args.threads)
            tuned.config.iterations = args.finetune_steps
            for name in FUSION_SETTINGS:  # the fusion asked for (a loaded network's own config may differ)
                setattr(tuned.config.prior, name, getattr(fusion_cfg, name))
            if args.finetune_steps:
                for _ in tuned.run(previews=False):
                    pass
            fused = tuned.predict_pair(0).labels
        row["cohort_fused"] = score(fused, ref, keep_slices=keep, axis=axis)["dice"]
        row["cohort_fused_whole"] = score(fused, ref)["dice"]
        row["cohort_fused_whole_lcc"] = score(keep_largest_component(fused), ref)["dice"]
        if args.finetune_steps:
            scratch = Trainer(_config(args.finetune_steps, axis, args.seed, settings), [pair], device=device,
                              num_threads=args.threads)
            for _ in scratch.run(previews=False):
                pass
            row["scratch_fused"] = score(scratch.predict_pair(0).labels, ref, keep_slices=keep, axis=axis)["dice"]
        log.info("%s: %s", c.name, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        result["new"].append(row)
        write()
    for key in ("fill", "network", "cohort_fused", "scratch_fused", "network_whole", "network_whole_lcc",
                "cohort_fused_whole", "cohort_fused_whole_lcc"):
        values = [r[key] for r in result["new"] if key in r]
        if values:
            result[f"{key}_mean"], result[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    write()
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_mean", "_std"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
