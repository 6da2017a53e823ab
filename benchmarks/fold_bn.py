"""Whole-slice prediction with and without batch normalisation folded into the convolutions
(``models.ops.fold_batch_norm``, what ``engine.inference.predict_slices`` predicts with).

    python benchmarks/fold_bn.py [--threads 1] [--size 512] [--batch 8] [--repeat 6]

The 2D U-Net (base 16, depth 4, channels_last, bf16 autocast where the CPU has it, as the
plugin trains on this machine), one batch of ``--size``^2 slices a pass, the two networks
alternating (which goes first alternates too); CPU seconds a pass (``time.process_time``) and
the ratio unfolded / folded per pair, mean and sd; the largest difference of the logits.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from napari_semicl.engine.precision import resolve_precision
from napari_semicl.models.ops import fold_batch_norm
from napari_semicl.models.unet import UNet2D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = UNet2D(1, 2)
    with torch.no_grad():  # running statistics of real use, not the identity
        net.train()
        for _ in range(3):
            net(torch.randn(4, 1, 64, 64) * 2 + 1)
    net = net.to(memory_format=torch.channels_last).eval()
    folded = fold_batch_norm(net)
    precision = resolve_precision("auto", torch.device("cpu"))
    x = torch.randn(args.batch, 1, args.size, args.size)
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    with torch.no_grad(), precision.autocast():
        diff = float((net(x).float() - folded(x).float()).abs().max())
        for i in range(args.repeat):
            order = (("unfolded", net), ("folded", folded))
            for name, model in order if i % 2 == 0 else order[::-1]:
                t = time.process_time()
                model(x)
                times[name].append(time.process_time() - t)
    ratio = np.array(times["unfolded"]) / np.array(times["folded"])
    print(json.dumps({"precision": precision.describe(), "threads": args.threads, "slices": [args.batch, args.size],
                      "cpu_seconds": times, "ratio_mean": float(ratio.mean()), "ratio_sd": float(ratio.std()),
                      "max_logit_difference": diff, "load": list(np.round(__import__("os").getloadavg(), 2))},
                     indent=1))


if __name__ == "__main__":
    main()
