"""Issue 26: a saved cohort network alone on new volumes, with and without
``predict.adapt_batch_norm`` (AdaBN), paired: the same checkpoint predicts each test volume
both ways; whole-volume Dice, raw and with the largest piece kept.

    python benchmarks/cohort_adabn.py --data ../shared/data/la/train --skip 4 --volumes 4 \
        --out cohort_adabn.json CHECKPOINT [CHECKPOINT ...]

``--skip 4 --volumes 4`` are the test volumes of ``cohort_transfer.py``'s defaults (the 5th
to 8th by name); the checkpoints are its ``--save`` folders' ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from napari_semicl.bench.common import find_cases, score
from napari_semicl.engine.apply import Predictor
from napari_semicl.engine.device import set_threads
from napari_semicl.engine.postprocess import keep_largest_component


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--skip", type=int, default=4, help="volumes (by name) before the test volumes")
    ap.add_argument("--volumes", type=int, default=4, help="test volumes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    cases = find_cases(args.data)[args.skip: args.skip + args.volumes]
    out = {"protocol": "cohort_adabn", "data": args.data, "test": [c.name for c in cases], "runs": {}}
    for ckpt in args.checkpoints:
        rows = []
        for adapt in (False, True):
            predictor = Predictor.from_checkpoint(ckpt)
            predictor.config.predict.adapt_batch_norm = adapt
            predictor.config.predict.largest_component = False  # both scores from one prediction
            for c in cases:
                t0 = time.process_time()
                labels = predictor.predict(c.image.data).labels
                cpu = time.process_time() - t0
                rows.append({"name": c.name, "adapt": adapt, "dice": float(score(labels, c.reference.data)["dice"]),
                             "dice_lcc": float(score(keep_largest_component(labels), c.reference.data)["dice"]),
                             "predict_cpu_s": cpu})
        summary = {}
        for adapt in (False, True):
            picked = [r for r in rows if r["adapt"] == adapt]
            for key in ("dice", "dice_lcc"):
                values = [r[key] for r in picked]
                summary[f"{'adapted' if adapt else 'plain'}_{key}"] = [float(np.mean(values)), float(np.std(values))]
        out["runs"][ckpt] = {"rows": rows, "summary": summary}
        print(ckpt, json.dumps(summary))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
