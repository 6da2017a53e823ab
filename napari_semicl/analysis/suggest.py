"""Where to annotate next: slices ranked by how unsure the network is about them.

Score 1 (``entropy``): the mean normalised predictive entropy of a slice, in [0, 1].
Score 2 (``disagreement``): a second opinion, the fraction of a slice's pixels where the
teacher's and the student's arg-max differ (or, for methods with an aleatoric head, the
mean sample disagreement), also in [0, 1]. Labelled and validation slices are left out:
they are annotated already.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: What each score means (the docks show it as a tooltip).
SCORE_HELP = {
    "entropy": (
        "Mean predictive entropy of the slice, divided by log K (number of classes): "
        "0 = the network is certain of every pixel, 1 = it spreads its belief evenly over all classes."
    ),
    "disagreement": (
        "Fraction of the slice's pixels where the teacher (EMA) and the student networks predict "
        "different classes: high where training has not settled."
    ),
}


@dataclass(frozen=True)
class Suggestion:
    """One slice to annotate: its index along the slicing axis and its scores."""

    slice_index: int
    entropy: float
    disagreement: float | None = None

    def score(self, by: str = "entropy") -> float:
        value = getattr(self, by)
        return float("nan") if value is None else float(value)


def slice_means(volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of ``volume`` over every axis but ``axis``: one value per slice (float64)."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return np.array([float(volume.mean())])
    other = tuple(a for a in range(volume.ndim) if a != axis)
    return volume.mean(axis=other, dtype=np.float64)


def rank_slices(
    entropy_scores, *, disagreement_scores=None, exclude=(), by: str = "entropy", top: int | None = None
) -> list[Suggestion]:
    """Slices ordered from the most to the least uncertain.

    Parameters
    ----------
    entropy_scores : array-like of float
        (S,) mean normalised entropy per slice (:func:`slice_means`).
    disagreement_scores : array-like of float, optional
        (S,) second score per slice; NaN where unknown.
    exclude : iterable of int
        Slices left out (labelled, validation).
    by : {'entropy', 'disagreement'}
        Which score orders the list; ties and missing values keep slice order.
    top : int, optional
        Keep only the first ``top``.
    """
    if by not in SCORE_HELP:
        raise ValueError(f"by must be one of {sorted(SCORE_HELP)}, got {by!r}")
    ent = np.asarray(entropy_scores, dtype=np.float64).reshape(-1)
    dis = None if disagreement_scores is None else np.asarray(disagreement_scores, dtype=np.float64).reshape(-1)
    if dis is not None and dis.shape != ent.shape:
        raise ValueError(f"disagreement_scores has {dis.shape[0]} slices, entropy_scores {ent.shape[0]}")
    if by == "disagreement" and dis is None:
        raise ValueError("by='disagreement' needs disagreement_scores")
    skip = {int(s) for s in exclude}
    keep = [s for s in range(ent.shape[0]) if s not in skip]
    key = ent if by == "entropy" else dis
    # stable sort on the negated score; NaN (unknown) last
    order = sorted(keep, key=lambda s: (np.isnan(key[s]), -key[s] if not np.isnan(key[s]) else 0.0, s))
    out = [
        Suggestion(s, float(ent[s]), None if dis is None or np.isnan(dis[s]) else float(dis[s]))
        for s in order
    ]
    return out if top is None else out[:top]
