"""Issue 26: where one painted slice lowers a cohort network's mask (the fusion, measured).

A saved cohort checkpoint (``cohort_transfer.py --save DIR``) predicts each test volume once
per painted set; the network's probabilities and the prior's (the fill of the painted slices,
``SlicePrior.probabilities``) are kept, and the fusion rule is then applied to them under
several variants (:func:`variant_masks`), with no retraining and no second prediction: the same network,
paired. Painted sets: one slice at each ``--positions`` fraction of the structure's slice range
(0.5: the middle, the ``even`` strategy's first slice), and ``--k`` slices evenly inside it
(the ``even`` strategy's sets). For each volume, set and variant: whole-volume Dice, Dice on
the unpainted slices, and the per-slice Dice of the network, the fill and the fused mask with
each slice's distance to the nearest painted slice and whether it lies past the outermost
painted slices (``--per-slice``). ``--keep DIR`` saves each capture (``NAME_SET.npz``) for
other variants later; ``--scratch-steps N`` trains the recommended configuration from scratch on
each test volume alone instead (a lone volume: no cohort, engine.prior's default fusion for it).
Run it from the repository root with the checkout first on the path (``PYTHONPATH=.``).

    python benchmarks/one_slice_fusion.py --load /tmp/ckpt --data ../shared/data/la/train \\
        --positions 0.25,0.5,0.75 --k 2,3 --out one_slice.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_semicl.bench.common import find_cases, thinnest_axis
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.interpolation import default_shrink
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Trainer, recommended_config, run_sync
from napari_semicl.engine.device import set_threads
from napari_semicl.engine.inference import predict_slices
from napari_semicl.engine.postprocess import keep_largest_component
from napari_semicl.engine.prior import fusion_weight
from napari_semicl.io import atomic_path

log = logging.getLogger("one_slice_fusion")


def _entropy(p: np.ndarray) -> np.ndarray:
    """Normalised binary entropy of foreground probabilities ``p``."""
    q = np.clip(p.astype(np.float32), 1e-6, 1 - 1e-6)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q)) / np.log(2)


def _fused(net, prior, weight, agreement, power, trust):
    """Foreground probability of the fusion rule: n = (1 - w)(1 - r H_net) a ** power, with
    ``trust`` r broadcastable to (S, H, W)."""
    share = (1.0 - weight[:, None, None]) * (1.0 - trust * _entropy(net)) * float(max(agreement, 0.0)) ** power
    return (1.0 - share) * prior + share * net


def variant_masks(cap: dict, cfg, shrink: float = 1.5) -> dict[str, np.ndarray]:
    """(S, H, W) bool masks from one capture: the network, the fill, and the fusion with
    ``r`` (the entropy's trust in the fill, engine.prior.fuse_probabilities) as

    - ``before``: 1 everywhere (the rule before issue 26);
    - ``no_entropy_beyond``: 0 past the outermost painted slices;
    - ``decayL``: exp(-d / L) past them, every pixel;
    - ``footL_M``: exp(-d / L) past them within M px of the outermost painted shape as the
      fill carries it (the fill's signed distance, from its two-class probability, plus
      ``shrink`` px a slice), 1 farther out: ``foot8_15`` is engine.prior's default.
    """
    dist, net, prior, a = cap["dist"], cap["net"], cap["prior"], cap["agreement"]
    painted = np.flatnonzero(dist == 0)
    idx = np.arange(len(dist))
    beyond = ((idx < painted[0]) | (idx > painted[-1]))[:, None, None]
    weight = fusion_weight(dist, cfg.confidence_length, cfg.beyond_length)
    d = dist.astype(np.float64)[:, None, None]
    q = np.clip(prior.astype(np.float64), 1e-12, 1 - 1e-12)
    # the fill's signed distance is T / 2 * logit(p) (T = temperature_px (1 + d), two classes)
    carried = cfg.temperature_px / 2 * (1 + d) * np.log(q / (1 - q)) + shrink * d

    def rule(trust):
        return _fused(net, prior, weight, a, cfg.agreement_power, trust) > 0.5

    out = {"network": net > 0.5, "fill": prior > 0.5, "before": rule(np.float32(1.0)),
           "no_entropy_beyond": rule(np.where(beyond, 0.0, 1.0))}
    for length in (2, 4, 8, 16):
        out[f"decay{length}"] = rule(np.where(beyond, np.exp(-d / length), 1.0))
    for length, margin in ((8, 5), (8, 15), (8, 30), (4, 15)):
        out[f"foot{length}_{margin}"] = rule(np.where(beyond & (carried > -margin), np.exp(-d / length), 1.0))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else 1.0


def capture(trainer: Trainer) -> dict:
    """Network and prior foreground probabilities (S, H, W) of the trainer's one pair, its
    slice distances and the network's agreement with the prior (what the fusion used)."""
    prior = trainer.prior
    agreement = trainer.predictions.agreement(0)
    nets, priors = [], []

    def keep(start, stop, probs):
        nets.append(probs[:, 1].float().numpy().astype(np.float16))
        priors.append(prior.probabilities(0, start, stop, probs)[:, 1].float().numpy().astype(np.float16))
        return probs

    predict_slices(trainer.method.inference_model(), trainer.dataset.images[0], device=trainer.device, fuse=keep)
    return {"net": np.concatenate(nets).astype(np.float32), "prior": np.concatenate(priors).astype(np.float32),
            "dist": prior.slice_distance(0).copy(), "agreement": agreement}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", help="folder of cohort_transfer.py --save (checkpoint.pt)")
    ap.add_argument("--scratch-steps", type=int, default=0,
                    help="instead of --load: train the recommended configuration from scratch on each test "
                         "volume with its painted slices for this many steps (a lone volume, no cohort)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-volumes", type=int, default=4)
    ap.add_argument("--test-volumes", type=int, default=4)
    ap.add_argument("--positions", default="0.25,0.5,0.75", help="one painted slice at these fractions of the range")
    ap.add_argument("--k", default="2", help="also these numbers of slices evenly inside the range (even)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="prior.KEY=VALUE for the fusion (beyond_length ...)")
    ap.add_argument("--per-slice", action="store_true", help="record per-slice Dice and distances")
    ap.add_argument("--keep", help="folder to keep each capture in (NAME_SET.npz: net, prior, dist, ref, agreement)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if bool(args.load) == bool(args.scratch_steps):
        ap.error("give --load DIR (a cohort network) or --scratch-steps N (a lone volume)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_threads(args.threads)
    cases = find_cases(args.data)
    train, test = cases[: args.train_volumes], cases[args.train_volumes: args.train_volumes + args.test_volumes]
    axis = thinnest_axis(train[0].reference.data.shape)
    ckpt = Path(args.load) / "checkpoint.pt" if args.load else None
    result = {"protocol": "one_slice_fusion", "checkpoint": str(ckpt), "rows": []}
    for c in test:
        ref = c.reference.data
        ref_s = np.moveaxis(ref != 0, axis, 0)
        fg = np.flatnonzero(ref_s.any(axis=(1, 2)))
        lo, hi = int(fg[0]), int(fg[-1])
        fractions = [float(f) for f in args.positions.split(",") if f]
        sets = [("pos%g" % f, [int(round(lo + f * (hi - lo)))]) for f in fractions]
        for k in (int(v) for v in args.k.split(",") if v):
            sets.append((f"k{k}", [int(round(p)) for p in np.linspace(lo, hi, k + 2)[1:-1]]))
        for name, slices in sets:
            pair = AnnotatedPair(c.image.data, reveal_slices(ref, slices, axis), name=c.name, spacing=c.image.scale)
            if ckpt is not None:
                trainer = Trainer.from_checkpoint(ckpt, [pair], device=torch.device("cpu"), num_threads=args.threads)
            else:
                cfg = recommended_config()
                cfg.seed, cfg.refresh_every, cfg.budget = args.seed, 10**9, "iterations"
                cfg.iterations = args.scratch_steps
                cfg.data.axis = axis
                trainer = Trainer(cfg, [pair], device=torch.device("cpu"), num_threads=args.threads)
                run_sync(trainer.run(previews=False))
            for item in args.set:
                key, value = item.split("=", 1)
                assert key.startswith("prior.")
                field = key.split(".", 1)[1]
                setattr(trainer.config.prior, field, None if value in ("null", "none") else type(
                    getattr(trainer.config.prior, field) or 0.0)(value))
            if ckpt is not None:  # a cohort's network takes part from the first painted slice
                trainer.config.prior = replace(trainer.config.prior, network_min_painted=1)
            with torch.no_grad():
                cap = capture(trainer)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                np.savez(Path(args.keep) / f"{c.name}_{name}.npz", net=cap["net"].astype(np.float16),
                         prior=cap["prior"].astype(np.float16), dist=cap["dist"], ref=ref_s,
                         agreement=cap["agreement"], confidence_length=trainer.config.prior.confidence_length,
                         beyond_length=trainer.config.prior.beyond_length or 0.0)
            masks = variant_masks(cap, trainer.config.prior,
                                  default_shrink(c.image.scale, ref.ndim, axis))
            painted = np.flatnonzero(cap["dist"] == 0)
            unpainted = np.setdiff1d(np.arange(len(cap["dist"])), painted)
            row = {"name": c.name, "set": name, "painted": painted.tolist(), "range": [lo, hi],
                   "agreement": cap["agreement"], "whole": {}, "unpainted": {}}
            row["whole_lcc"] = {}
            for v, m in masks.items():
                row["whole"][v] = dice(m, ref_s)
                row["unpainted"][v] = dice(m[unpainted], ref_s[unpainted])
                row["whole_lcc"][v] = dice(keep_largest_component(m.astype(np.uint8)) != 0, ref_s)
            if args.per_slice:
                idx = np.arange(len(cap["dist"]))
                row["per_slice"] = {
                    "slice": idx.tolist(), "dist": cap["dist"].tolist(),
                    "beyond": ((idx < painted[0]) | (idx > painted[-1])).tolist(),
                    "ref_px": ref_s.sum(axis=(1, 2)).tolist(),
                    **{v: [dice(m[i], ref_s[i]) for i in idx] for v, m in masks.items()},
                    **{f"wrong_{v}": [int((m[i] != ref_s[i]).sum()) for i in idx] for v, m in masks.items()},
                }
            log.info("%s %s %s agreement %.3f: %s", c.name[:6], name, painted.tolist(), cap["agreement"],
                     " ".join(f"{v}={row['whole'][v]:.3f}" for v in masks))
            result["rows"].append(row)
            with atomic_path(args.out) as tmp:
                Path(tmp).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
