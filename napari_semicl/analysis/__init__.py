"""Review computations without Qt: entropy maps, slice suggestions, embedding samples and
t-SNE, training history. Imports numpy/scikit-learn only (never the engine)."""

from .embedding import DEFAULT_MAX_POINTS, bounded_sample, nearest_point, tsne_2d
from .entropy import (
    UNKNOWN,
    normalised_entropy,
    sample_disagreement,
    threshold_pseudo_labels,
)
from .history import TrainingHistory
from .suggest import SCORE_HELP, Suggestion, rank_slices, slice_means

__all__ = [
    "DEFAULT_MAX_POINTS",
    "SCORE_HELP",
    "UNKNOWN",
    "Suggestion",
    "TrainingHistory",
    "bounded_sample",
    "nearest_point",
    "normalised_entropy",
    "rank_slices",
    "sample_disagreement",
    "slice_means",
    "threshold_pseudo_labels",
    "tsne_2d",
]
