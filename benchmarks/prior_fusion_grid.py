"""How the painted-slice prior's fusion settings were chosen (docs/benchmarks.md#painted-slice-prior).

    python benchmarks/prior_fusion_grid.py train --data ../shared/data/la/train --index 0 --k 5 --steps 180 --out la0.npz
    python benchmarks/prior_fusion_grid.py grid la0.npz la2.npz acdc0.npz ...

``train`` trains ``recommended`` (supervised with the prior's dense targets) on one volume with K
revealed slices and saves the network's class probabilities, the prior's scores and the
reference; ``grid`` scores the fusion (engine/prior.py) over a grid of temperature, confidence
length and agreement power, as the Dice gain over the fill itself on the unrevealed slices.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch


def train(args) -> None:
    from napari_semicl.bench.common import find_cases, thinnest_axis
    from napari_semicl.bench.label_efficiency import bench_config, train_network
    from napari_semicl.data import AnnotatedPair
    from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
    from napari_semicl.engine.inference import predict_slices

    torch.set_num_threads(1)
    case = find_cases(args.data)[args.index]
    ref = case.reference.data
    axis = thinnest_axis(ref.shape)
    revealed = choose_reveal_slices(ref, args.k, axis)
    cfg = bench_config("recommended", None, 0, axis, budget_steps=args.steps)
    trainer, _ = train_network(cfg, [AnnotatedPair(case.image.data, reveal_slices(ref, revealed, axis))],
                               torch.device("cpu"))
    probs = []

    def keep(start, stop, p):
        probs.append(p.cpu().numpy().astype(np.float16))
        return p

    predict_slices(trainer.method.inference_model(), trainer.dataset.images[0], device=torch.device("cpu"), fuse=keep)
    _, class_index, dist = trainer.prior._volumes[0]
    scores = trainer.prior.scores(0, 0, len(dist))  # (S, K, H, W): the whole plane (issue 27 keeps a region)
    np.savez_compressed(args.out, probs=np.concatenate(probs), scores=scores.astype(np.float16),
                        class_index=class_index, dist=dist, ref=np.moveaxis(ref, axis, 0),
                        revealed=np.array(revealed))


def _dice(pred, ref, keep) -> float:
    values = [v for v in np.unique(ref[keep]) if v != 0]
    return float(np.mean([2 * np.sum((pred[keep] == v) & (ref[keep] == v))
                          / max(np.sum(pred[keep] == v) + np.sum(ref[keep] == v), 1) for v in values]))


def grid(args) -> None:
    from napari_semicl.engine.prior import fuse_probabilities, prior_probabilities, prior_weight

    gains: dict[tuple, list[float]] = {}
    for path in args.files:
        z = np.load(path)
        p_net = torch.from_numpy(z["probs"].astype(np.float32))
        scores = torch.from_numpy(z["scores"].astype(np.float32))
        dist, ref, ci = z["dist"], z["ref"], z["class_index"]
        keep = np.ones(ref.shape[0], bool)
        keep[z["revealed"]] = False
        fill = ci[scores.argmax(1).numpy()]
        near = (dist > 0) & (dist <= 2)
        agree = _dice(p_net.argmax(1).numpy(), fill, near)  # network vs fill next to painted slices
        base = _dice(fill, ref, keep)
        print(f"{path}: fill {base:.4f}, network {_dice(p_net.argmax(1).numpy(), ref, keep):.4f}, agreement {agree:.3f}")
        d = torch.from_numpy(dist)
        for t, length, power in itertools.product((0.5, 1.0, 2.0), (8.0, 16.0, 64.0), (0.0, 2.0, 4.0, 8.0)):
            fused = fuse_probabilities(p_net, prior_probabilities(scores, d, t), torch.from_numpy(prior_weight(dist, length)),
                                       agree, power)
            gains.setdefault((t, length, power), []).append(_dice(fused.argmax(1).numpy(), ref, keep) - base)
    print("temperature_px, confidence_length, agreement_power: mean gain over the fill (min) per volume")
    for key, g in sorted(gains.items(), key=lambda kv: -np.mean(kv[1])):
        print(key, f"{np.mean(g):+.4f} (min {np.min(g):+.4f})", [round(x, 3) for x in g])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--index", type=int, default=0)
    t.add_argument("--k", type=int, default=5)
    t.add_argument("--steps", type=int, default=180)
    t.add_argument("--out", required=True)
    t.set_defaults(func=train)
    g = sub.add_parser("grid")
    g.add_argument("files", nargs="+")
    g.set_defaults(func=grid)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
