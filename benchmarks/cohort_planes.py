"""Issue 26: does a tri-planar slice network fix the cohort network's errors at the ends?

The cohort network of :mod:`cohort_transfer` (``--train-volumes`` left-atrium volumes, each
with ``--k-train`` slices painted strictly inside the structure, the recommended supervised
configuration with the painted-slice prior's dense targets) sees one axial slice at a time:
along the slicing axis it cannot tell where it is, and its errors are at the structure's
ends (docs/benchmarks.md, "The cohort network alone"). Here the same 2D network also trains
on the slices of each painted volume along the two other axes, where the structure's end
along the slicing axis is an in-plane boundary, and predicts a new volume along all three
axes, averaging the class probabilities.

Training (``--planes 3``): the engine's :class:`~napari_semicl.engine.Trainer` on the
painted volumes, exactly as ``cohort_transfer.py`` builds it; its prior is built first (its
dense targets set on the dataset), then each painted volume's 3D target is assembled in the
dataset's slice layout: the painted slices' own labels, the prior's dense target on every
other slice (``IGNORE`` in its band, whatever it gives past the painted range), ``IGNORE``
where it gives nothing. The volume and that target, moved so that axis 0 or 1 is the slicing
axis (as :func:`~napari_semicl.data.dataset.to_slices` moves an image), give the other two
orientations' slices. Each labelled crop of a step is drawn from the slicing axis with
probability ``--axial-share`` (default 1/3: the three orientations equally), through the
dataset's own ``sample_labelled`` (painted slices and dense targets as the prior's schedule
says), else from one of the two other orientations (equally): a random crop of a random
slice with any known target pixel. The batch size, the step and everything else are the
engine's. ``--planes 1`` is the engine unchanged (the paired baseline). The sampling is
hooked on the dataset instance here; no engine code changes.

Prediction: the network alone on each of the ``--test-volumes`` new volumes, slice by slice
along each axis (:func:`~napari_semicl.engine.inference.predict_slices`, its ``fuse`` hook
used to keep the class probabilities), then scored (whole-volume Dice, raw and after
:func:`~napari_semicl.engine.postprocess.keep_largest_component`): ``axial`` (the slicing
axis alone: what ``cohort_transfer.py`` measures), ``tri`` (the mean of the three axes'
probabilities, argmax), and each other axis alone. Process CPU seconds of training
(the prior's build included, evaluations excluded) and of each axis's prediction per volume
are recorded.

Measured (2026-12-08, seed 0, 1 thread, bf16, the recipe below; mean ± sd over the 4 new
volumes, the largest piece kept): at 3000 steps the axial network 0.761 ± 0.028, the tri-planar
one 0.691 ± 0.097 (``--axial-share 0.6``: 0.707 ± 0.095; ``--oracle``: 0.583 ± 0.213); at 9500
steps (846 training CPU-s) 0.688 ± 0.105 against the axial network's 0.830 ± 0.074 (its
checkpoint, ``--checkpoint``). Tri-planar training does not fix the ends: a negative result.

    PYTHONPATH=. python benchmarks/cohort_planes.py --data ../shared/data/la/train --steps 3000 \
        --planes 3 --threads 1 --set prior.beyond_length=2 --set data.intensity_augment=0.8 \
        --out out/planes3_3000.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cohort_transfer beside this file

from cohort_transfer import _config  # noqa: E402

from napari_semicl.bench.common import find_cases, machine_info, score, thinnest_axis  # noqa: E402
from napari_semicl.cli.common import set_items  # noqa: E402
from napari_semicl.data import AnnotatedPair  # noqa: E402
from napari_semicl.data.annotation import IGNORE_INDEX, decode_classes  # noqa: E402
from napari_semicl.data.dataset import normalise_image, to_slices  # noqa: E402
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices  # noqa: E402
from napari_semicl.engine import Trainer  # noqa: E402
from napari_semicl.engine.device import describe_device, set_threads  # noqa: E402
from napari_semicl.engine.events import Finished, StepDone  # noqa: E402
from napari_semicl.engine.inference import predict_slices  # noqa: E402
from napari_semicl.engine.postprocess import keep_largest_component  # noqa: E402
from napari_semicl.io import atomic_path  # noqa: E402

log = logging.getLogger("cohort_planes")


class PlaneSampler:
    """``dataset.sample_labelled`` with the two other orientations of each painted volume.

    ``axis``: the dataset's slicing axis; ``axial_share``: the probability that a crop comes
    from the dataset's own sampling (the slicing axis), else from the other two axes equally.
    Call after the prior has set the dataset's dense targets."""

    def __init__(self, dataset, axis: int, axial_share: float) -> None:
        if dataset.cfg.context_slices:
            raise SystemExit("--planes 3 supports 2D slices only (data.context_slices = 0)")
        self.dataset, self.axial_share = dataset, float(axial_share)
        self.own = dataset.sample_labelled  # the bound method: the slicing axis as the engine samples it
        #: orientation axis -> list of (C, H, W) image slices and (H, W) int64 targets
        self.images: dict[int, list[np.ndarray]] = {}
        self.targets: dict[int, list[np.ndarray]] = {}
        by_pair: dict[int, dict[int, np.ndarray]] = {}
        for p, s in dataset.labelled:
            by_pair.setdefault(p, {})[s] = dataset.target(p, s)
        for (p, s), t in dataset.dense_targets.items():
            by_pair.setdefault(p, {})[s] = t
        self.known_share: dict[int, float] = {}
        others = [a for a in range(3) if a != axis]
        for a in others:
            self.images[a], self.targets[a] = [], []
        for p, slices in sorted(by_pair.items()):
            img = dataset.images[p]  # (S, C, H, W): the volume moved so that ``axis`` is first
            target = np.full((img.shape[0], *img.shape[2:]), IGNORE_INDEX, np.int64)
            for s, t in slices.items():
                target[s] = t
            self.known_share[p] = float(np.mean(target != IGNORE_INDEX))
            volume = np.moveaxis(img, 0, axis + 1)  # (C, X0, X1, X2)
            target = np.moveaxis(target, 0, axis)  # (X0, X1, X2)
            for a in others:
                ai = np.moveaxis(volume, a + 1, 0)  # as to_slices moves an image for axis a
                at = np.moveaxis(target, a, 0)
                for i in range(ai.shape[0]):
                    if np.any(at[i] != IGNORE_INDEX):
                        self.images[a].append(np.ascontiguousarray(ai[i]))
                        self.targets[a].append(np.ascontiguousarray(at[i]))
        self.others = [a for a in others if self.images[a]]
        self.drawn = {a: 0 for a in range(3)}

    def summary(self) -> dict:
        return {"axial_share": self.axial_share, "slices": {a: len(v) for a, v in self.images.items()},
                "known_share": self.known_share, "drawn": dict(self.drawn)}

    def __call__(self, n: int, rng: np.random.Generator, dense_share: float = 0.0):
        xs, ys = [], []
        for _ in range(n):
            if not self.others or rng.random() < self.axial_share:
                x, y = self.own(1, rng, dense_share)
                x, y = x[0], y[0]
                self.drawn[int(self.dataset.cfg.axis)] += 1
            else:
                a = self.others[int(rng.integers(len(self.others)))]
                i = int(rng.integers(len(self.images[a])))
                x, y = self.dataset._crop(self.images[a][i], self.targets[a][i], None, rng)
                self.drawn[a] += 1
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)


def axis_probabilities(model, image: np.ndarray, axis: int, *, normalise: str, device) -> np.ndarray:
    """(K, *image.shape) float32 class probabilities of ``model`` slicing ``image`` along
    ``axis`` (the engine's slice prediction; its ``fuse`` hook keeps the probabilities)."""
    slices = to_slices(normalise_image(image, normalise), axis)
    out = None

    def keep(start: int, stop: int, probs: torch.Tensor) -> torch.Tensor:
        nonlocal out
        if out is None:
            out = np.empty((slices.shape[0], probs.shape[1], *slices.shape[2:]), np.float32)
        out[start:stop] = probs.float().cpu().numpy()
        return probs

    predict_slices(model, slices, device=device, fuse=keep)
    return np.moveaxis(np.moveaxis(out, 1, 0), 1, axis + 1)  # (K, X0, X1, X2)


def _dice(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(score(pred, ref)["dice"]), float(score(keep_largest_component(pred), ref)["dice"])


def _errors(pred: np.ndarray, ref: np.ndarray, axis: int) -> dict:
    """False positives and missed voxels as shares of the reference's foreground, and those
    on slices (along ``axis``) outside the reference's slice range."""
    fg, rf = pred != 0, ref != 0
    n = max(int(rf.sum()), 1)
    along = np.flatnonzero(np.any(rf, axis=tuple(a for a in range(ref.ndim) if a != axis)))
    outside = np.ones(ref.shape[axis], bool)
    outside[along.min():along.max() + 1] = False
    shape = [1] * ref.ndim
    shape[axis] = -1
    out_mask = outside.reshape(shape)
    return {"false_pos": float(np.sum(fg & ~rf)) / n, "missed": float(np.sum(~fg & rf)) / n,
            "false_pos_past_ends": float(np.sum(fg & ~rf & out_mask)) / n}


def evaluate(model, class_values, normalise: str, device, cases, axis: int) -> dict:
    """The network alone on ``cases`` along each axis, and the three averaged (``axis``: the
    slicing axis it was trained on; ``class_values``, ``normalise``: its training's)."""
    values = list(class_values)
    rows = []
    for c in cases:
        image, ref = c.image.data, c.reference.data
        probs, cpu = {}, {}
        for a in range(3):
            t0 = time.process_time()
            probs[a] = axis_probabilities(model, image, a, normalise=normalise, device=device)
            cpu[a] = time.process_time() - t0
        row = {"name": c.name, "predict_cpu_s": {str(a): cpu[a] for a in range(3)}}
        for key, p in (("axial", probs[axis]), ("tri", sum(probs.values()) / 3.0),
                       *((f"axis{a}", probs[a]) for a in range(3) if a != axis)):
            labels = decode_classes(np.argmax(p, axis=0), values)
            row[key], row[f"{key}_lcc"] = _dice(labels, ref)
            if key in ("axial", "tri"):
                row[f"{key}_lcc_errors"] = _errors(keep_largest_component(labels), ref, axis)
        rows.append(row)
        log.info("%s: %s", c.name, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    out = {"volumes": rows}
    for key in rows[0]:
        if isinstance(rows[0][key], float):
            v = [r[key] for r in rows]
            out[key] = {"mean": float(np.mean(v)), "std": float(np.std(v))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-volumes", type=int, default=4)
    ap.add_argument("--test-volumes", type=int, default=4)
    ap.add_argument("--k-train", type=int, default=5)
    ap.add_argument("--steps", type=int, help="training steps (required unless --checkpoint)")
    ap.add_argument("--checkpoint", help="no training: evaluate this cohort checkpoint (e.g. cohort_transfer.py "
                                         "--save's) along the three axes")
    ap.add_argument("--planes", type=int, choices=(1, 3), default=3,
                    help="1: the slicing axis only (the engine as it is); 3: the other two axes too")
    ap.add_argument("--axial-share", type=float, default=1 / 3,
                    help="with --planes 3: the share of labelled crops from the slicing axis (the rest from "
                         "the other two axes equally); default 1/3")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps too (CPU excluded)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", help="SECTION.KEY=VALUE for the cohort config")
    ap.add_argument("--oracle", action="store_true",
                    help="an upper bound: the cohort volumes train on their whole references (every slice "
                         "painted, complete; no prior) instead of --k-train painted slices and the fill")
    ap.add_argument("--save", help="folder for the checkpoint")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.steps is None and not args.checkpoint:
        raise SystemExit("give --steps (training steps) or --checkpoint (a trained cohort network)")
    if not 0.0 <= args.axial_share <= 1.0:
        raise SystemExit(f"--axial-share must be in [0, 1], got {args.axial_share}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_threads(args.threads)
    settings = dict(set_items(args, sections=True))
    cases = find_cases(args.data)
    train, test = cases[: args.train_volumes], cases[args.train_volumes: args.train_volumes + args.test_volumes]
    axis = thinnest_axis(train[0].reference.data.shape)
    device = torch.device("cpu")
    result = {"protocol": "cohort_planes", "data": args.data, "train": [c.name for c in train],
              "test": [c.name for c in test], "k_train": args.k_train, "steps": args.steps, "planes": args.planes,
              "axial_share": args.axial_share if args.planes == 3 else 1.0, "axis": axis, "threads": args.threads,
              "settings": settings, "seed": args.seed, "oracle": args.oracle,
              "device": describe_device(device, args.threads),
              "machine": machine_info(), "curve": []}

    def write():
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))

    if args.checkpoint:  # the network of an earlier run, evaluated only
        from napari_semicl.engine.apply import Predictor

        predictor = Predictor.from_checkpoint(args.checkpoint, device=device)
        d = predictor.config.data
        result.update(checkpoint=args.checkpoint, axis=int(d.axis), steps=predictor.config.iterations,
                      seed=predictor.config.seed, planes="checkpoint")
        t_eval = time.process_time()
        result["final"] = evaluate(predictor.model, d.class_values, d.normalise, device, test, int(d.axis))
        result["final"]["eval_cpu_s"] = time.process_time() - t_eval
        write()
        print(json.dumps({k: v for k, v in result["final"].items() if k != "volumes"}, indent=1))
        return 0
    pairs = []
    for c in train:
        if args.oracle:  # as cohort_transfer.py --oracle
            pairs.append(AnnotatedPair(c.image.data, c.reference.data, name=c.name, spacing=c.image.scale,
                                       complete=True))
            continue
        slices = choose_reveal_slices(c.reference.data, args.k_train, axis, "inside")
        pairs.append(AnnotatedPair(c.image.data, reveal_slices(c.reference.data, slices, axis), name=c.name,
                                   spacing=c.image.scale))
    trainer = Trainer(_config(args.steps, axis, args.seed, settings), pairs, device=device, num_threads=args.threads)
    cpu0 = time.process_time()
    train_cpu = 0.0
    sampler = None
    if trainer.prior is None and not args.oracle:  # built now (the run would build it at its start): its dense targets
        raise SystemExit("the cohort run has no painted-slice prior: use the recommended configuration")
    if args.planes == 3:
        sampler = PlaneSampler(trainer.dataset, axis, args.axial_share)
        trainer.dataset.sample_labelled = sampler
    result["sampler_build_cpu_s"] = time.process_time() - cpu0
    result["step_cpu"] = []
    for event in trainer.run(previews=False):
        if isinstance(event, StepDone) and event.step % 500 == 0:
            result["step_cpu"].append((event.step, train_cpu + time.process_time() - cpu0))
        if isinstance(event, StepDone) and args.eval_every and event.step % args.eval_every == 0 \
                and event.step < args.steps:
            train_cpu += time.process_time() - cpu0
            t_eval = time.process_time()
            ev = evaluate(trainer.method.inference_model(), trainer.dataset.class_values,
                          trainer.config.data.normalise, device, test, axis)
            result["curve"].append({"step": event.step, "train_cpu_s": train_cpu,
                                    "eval_cpu_s": time.process_time() - t_eval,
                                    **{k: v for k, v in ev.items() if k != "volumes"}, "volumes": ev["volumes"]})
            log.info("step %d: axial %.4f (lcc %.4f), tri %.4f (lcc %.4f)", event.step, ev["axial"]["mean"],
                     ev["axial_lcc"]["mean"], ev["tri"]["mean"], ev["tri_lcc"]["mean"])
            write()
            cpu0 = time.process_time()
        if isinstance(event, Finished) and event.reason == "error":
            raise SystemExit(f"cohort training failed: {event.error}")
    train_cpu += time.process_time() - cpu0
    result["train_cpu_s"], result["train_steps"] = train_cpu, trainer.step
    if sampler is not None:
        result["sampler"] = sampler.summary()
        del trainer.dataset.sample_labelled  # the engine's own again (the checkpoint never held it)
    if args.save:
        trainer.save(Path(args.save) / "checkpoint.pt")
    t_eval = time.process_time()
    result["final"] = evaluate(trainer.method.inference_model(), trainer.dataset.class_values,
                               trainer.config.data.normalise, device, test, axis)
    result["final"]["eval_cpu_s"] = time.process_time() - t_eval
    # the engine's own prediction path on the first volume: the axial probabilities above must match it
    same = trainer.predict(test[0].image.data).labels
    mine = decode_classes(np.argmax(axis_probabilities(trainer.method.inference_model(), test[0].image.data, axis,
                                                       normalise=trainer.config.data.normalise,
                                                       device=device), axis=0), trainer.dataset.class_values)
    result["axial_matches_engine_predict"] = float(np.mean(same == mine))
    write()
    f = result["final"]
    log.info("network alone after %d steps (%.0f training CPU-s): axial %.4f +- %.4f (lcc %.4f +- %.4f), "
             "tri-planar %.4f +- %.4f (lcc %.4f +- %.4f)", trainer.step, train_cpu, f["axial"]["mean"],
             f["axial"]["std"], f["axial_lcc"]["mean"], f["axial_lcc"]["std"], f["tri"]["mean"], f["tri"]["std"],
             f["tri_lcc"]["mean"], f["tri_lcc"]["std"])
    print(json.dumps({k: v for k, v in f.items() if k != "volumes"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
