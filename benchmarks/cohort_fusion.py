"""A cohort that learns (issue 26, item 2): the mask of a new volume from a cohort network.

A network trains on ``--cohort`` volumes with ``--k-cohort`` painted slices each (the Train
dock's recommended config: supervised, the painted-slice prior as dense targets) for
``--steps`` steps. Then, for each of ``--new`` other volumes, the same trainer goes back to the
cohort's weights, optimiser and step, and the volume joins its pairs (``Trainer.replace_data``,
as a volume joins a running trainer; the cohort's fills are kept):

* ``network``: the volume joins with nothing painted; its mask is the network's alone;
* ``fill``: ``--k-new`` slices are painted (strictly inside the structure); the fill alone;
* ``fused_0``: the same, the cohort network fused with the fill, before any more training;
* ``fused_beyond_0``: fused with ``prior.beyond_length = --beyond``; ``fused_beyond_nogate_0``:
  that and no agreement gate (``prior.agreement_power = 0``);
* after ``--tune`` more steps from the cohort weights (the new volume among the pairs):
  ``tuned_network`` (network alone), ``tuned_fused``, ``tuned_fused_beyond``,
  ``tuned_fused_beyond_nogate``;
* ``scratch_fused``: a new network trained ``--tune`` steps on the new volume alone, fused.

Dice (foreground) on the unpainted slices of the new volume. Steps, not seconds, are the
budget (the machine is shared); CPU seconds are recorded. Results go to ``--out`` (JSON)
after every volume.

    python benchmarks/cohort_fusion.py /work/shared/data/la/train --out /tmp/cohort.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_semicl.bench.common import find_cases, thinnest_axis  # noqa: E402
from napari_semicl.data import AnnotatedPair  # noqa: E402
from napari_semicl.data.annotation import decode_classes  # noqa: E402
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices  # noqa: E402
from napari_semicl.engine import Trainer, recommended_config, run_sync  # noqa: E402
from napari_semicl.engine.inference import predict_slices  # noqa: E402
from napari_semicl.engine.metrics import dice_per_class  # noqa: E402
from napari_semicl.engine.persistence import load_trainer_state  # noqa: E402

log = logging.getLogger("cohort_fusion")


def foreground_dice(pred, ref, keep, axis) -> float:
    pred, ref = np.take(pred, keep, axis=axis), np.take(ref, keep, axis=axis)
    per_class = dice_per_class(pred.ravel(), ref.ravel(), sorted(int(v) for v in np.unique(ref)))
    return float(np.mean(list(per_class.values())))


def masks(trainer: Trainer, p_idx: int, variants: dict) -> dict:
    """The network's probabilities of pair ``p_idx`` once; each variant's mask from them.

    ``variants``: name -> prior settings ({} the current; {'fuse': False} the network alone)."""
    chunks = []

    def capture(start, stop, probs):
        chunks.append((start, stop, probs.clone()))
        return probs

    images = trainer.dataset.images[p_idx]
    predict_slices(trainer.method.inference_model(), images, device=trainer.device, fuse=capture)
    out = {}
    prior_cfg = trainer.config.prior
    saved = copy.copy(prior_cfg)
    for name, settings in variants.items():
        for key, value in settings.items():
            setattr(prior_cfg, key, value)
        fuser = trainer.predictions.fuser(p_idx)
        idx = torch.cat([(fuser(a, b, p) if fuser else p).argmax(1) for a, b, p in chunks]).numpy()
        out[name] = trainer.predictions.labels(idx, p_idx)
        for key in settings:
            setattr(prior_cfg, key, getattr(saved, key))
    return out


def VARIANTS(args) -> dict:
    """The fusions compared: the default; the fill trusted less past the outermost painted
    slices; that and no agreement gate."""
    return {"fused": {}, "fused_beyond": {"beyond_length": args.beyond},
            "fused_beyond_nogate": {"beyond_length": args.beyond, "agreement_power": 0.0}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--cohort", type=int, default=4)
    ap.add_argument("--k-cohort", type=int, default=5)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--k-new", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tune", type=int, default=40)
    ap.add_argument("--beyond", type=float, default=2.0)
    ap.add_argument("--patch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cases = find_cases(args.data, limit=args.cohort + args.new)
    axis = thinnest_axis(cases[0].reference.data.shape)

    def pair(case, k):
        ref = case.reference.data
        ax = thinnest_axis(ref.shape)
        revealed = choose_reveal_slices(ref, k, ax, "inside") if k else []
        labels = reveal_slices(ref, revealed, ax) if k else np.zeros_like(ref)
        return AnnotatedPair(case.image.data, labels, name=case.name, spacing=case.image.scale), revealed

    def config(steps):
        cfg = recommended_config()
        cfg.seed, cfg.refresh_every, cfg.iterations, cfg.budget = 0, 10**9, steps, "iterations"
        cfg.data.axis, cfg.data.patch_size = axis, args.patch_size
        return cfg

    result = {"args": vars(args), "cohort": [c.name for c in cases[:args.cohort]], "volumes": []}
    cohort_pairs = [pair(c, args.k_cohort)[0] for c in cases[:args.cohort]]
    c0, t0 = time.process_time(), time.perf_counter()
    cohort = Trainer(config(args.steps), cohort_pairs, device=device)
    run_sync(cohort.run(previews=False))
    result["cohort_cpu_s"], result["cohort_wall_s"] = time.process_time() - c0, time.perf_counter() - t0
    log.info("cohort: %d steps, %.0f CPU s", cohort.step, result["cohort_cpu_s"])
    state = copy.deepcopy(cohort.state())  # each new volume starts from the cohort's weights
    trainer = cohort  # one trainer: the cohort's fills are kept (engine.fusion), the new volume's made
    for case in cases[args.cohort:]:
        ref = case.reference.data
        ax = thinnest_axis(ref.shape)
        empty, _ = pair(case, 0)
        painted, revealed = pair(case, args.k_new)
        keep = np.setdiff1d(np.arange(ref.shape[ax]), revealed)
        row = {"name": case.name, "painted": revealed}
        load_trainer_state(trainer, copy.deepcopy(state))
        trainer.replace_data([*cohort_pairs, empty])
        p = len(cohort_pairs)
        row["network"] = foreground_dice(masks(trainer, p, {"n": {}})["n"], ref, keep, ax)
        trainer.replace_data([*cohort_pairs, painted])
        row["fill"] = foreground_dice(trainer.prior_mask(p), ref, keep, ax)
        at_once = masks(trainer, p, VARIANTS(args))
        for name, mask in at_once.items():
            row[f"{name}_0"] = foreground_dice(mask, ref, keep, ax)
        trainer.config.iterations = args.tune  # N more steps from the cohort's
        c0 = time.process_time()
        run_sync(trainer.run(previews=False))
        row["tune_cpu_s"], row["tuned_step"] = time.process_time() - c0, trainer.step
        tuned = masks(trainer, p, {"network": {"fuse": False}, **VARIANTS(args)})
        for name, mask in tuned.items():
            row[f"tuned_{name}"] = foreground_dice(mask, ref, keep, ax)
        c0 = time.process_time()
        scratch = Trainer(config(args.tune), [painted], device=device)
        run_sync(scratch.run(previews=False))
        row["scratch_cpu_s"] = time.process_time() - c0
        row["scratch_fused"] = foreground_dice(masks(scratch, 0, {"f": {}})["f"], ref, keep, ax)
        result["volumes"].append(row)
        log.info("%s", row)
        Path(args.out).write_text(json.dumps(result, indent=2))
    keys = [k for k in result["volumes"][0] if isinstance(result["volumes"][0][k], float) and not k.endswith("_s")]
    result["summary"] = {k: {"mean": float(np.mean([r[k] for r in result["volumes"]])),
                             "sd": float(np.std([r[k] for r in result["volumes"]])),
                             "min": float(np.min([r[k] for r in result["volumes"]])),
                             "max": float(np.max([r[k] for r in result["volumes"]]))} for k in keys}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
