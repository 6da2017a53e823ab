"""Segmentation metrics via MONAI: Dice, HD95 and ASD per foreground class.

Conventions (../shared/data/SOURCES.md): scores are over the foreground classes (label
values > 0) present in the reference; HD95/ASD in physical units when ``spacing`` is
given, in voxels otherwise. A class present in the reference but absent from the
prediction has Dice 0 and infinite distances (reported as ``null`` in JSON).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_average_surface_distance


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def evaluate_segmentation(pred: np.ndarray, reference: np.ndarray, *, spacing=None, distances: bool = True) -> dict:
    """Per-class and mean Dice, HD95 and ASD of ``pred`` against ``reference``.

    Parameters
    ----------
    pred, reference : ndarray of int
        Label arrays of the same shape (2D or 3D).
    spacing : sequence of float, optional
        Voxel spacing per axis for HD95/ASD.
    distances : bool
        Compute HD95/ASD (slower) as well as Dice.

    Returns
    -------
    dict
        ``{"classes": {value: {"dice", "hd95", "asd"}}, "mean": {...}, "spacing": ...}``.
    """
    pred = np.asarray(pred)
    reference = np.asarray(reference)
    if pred.shape != reference.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {reference.shape}")
    classes = [int(v) for v in np.unique(reference) if v != 0]
    out: dict = {"classes": {}, "mean": {}, "spacing": None if spacing is None else [float(s) for s in spacing]}
    if not classes:
        return out
    for v in classes:
        p = torch.from_numpy(pred == v)[None, None]
        r = torch.from_numpy(reference == v)[None, None]
        row = {"dice": float(compute_dice(p, r, include_background=True)[0, 0])}
        if distances:
            if p.any():
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                sp = None if spacing is None else [float(s) for s in spacing]
                hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=sp)
                asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=sp)
                row["hd95"] = _finite_or_none(float(hd[0, 0]))
                row["asd"] = _finite_or_none(float(asd[0, 0]))
            else:
                row["hd95"] = row["asd"] = None
        out["classes"][str(v)] = row
    for key in ("dice", "hd95", "asd"):
        vals = [row.get(key) for row in out["classes"].values()]
        if not vals or key not in next(iter(out["classes"].values())):
            continue
        out["mean"][key] = None if any(v is None for v in vals) else float(np.mean(vals))
    return out


def dice_per_class(pred: np.ndarray, reference: np.ndarray, class_values) -> dict:
    """Fast numpy Dice per label value (for live validation), over values in the reference."""
    out = {}
    for v in class_values:
        r = reference == v
        if not r.any() or v == 0:
            continue
        p = pred == v
        out[str(v)] = float(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return out
