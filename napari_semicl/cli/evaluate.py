"""``napari-semicl evaluate``: Dice, HD95 and ASD of a mask against a reference, as JSON."""

from __future__ import annotations

import json

from ..engine import evaluate_segmentation
from ..io import read_labels
from .common import Command


def arguments(e) -> None:
    e.add_argument("--pred", required=True)
    e.add_argument("--reference", required=True)
    e.add_argument("--voxels", action="store_true", help="distances in voxels even if spacing is known")


def cmd_evaluate(args) -> int:
    pred = read_labels(args.pred)
    ref = read_labels(args.reference, like=pred)
    spacing = None if args.voxels else ref.metadata.get("spacing") or None
    if spacing is not None and ref.metadata.get("format") != "nifti":
        spacing = None
    result = evaluate_segmentation(pred.data, ref.data, spacing=spacing)
    print(json.dumps(result, indent=2))
    return 0


COMMAND = Command("evaluate", "Dice, HD95 and ASD of a mask against a reference (JSON)", arguments, cmd_evaluate)
