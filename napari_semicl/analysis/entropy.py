"""Predictive entropy, pseudo-label certainty and sample disagreement (numpy, no Qt).

The entropy of a softmax over K classes, ``H(p) = -sum_k p_k log p_k``, lies in
``[0, log K]``; dividing by ``log K`` puts every map in ``[0, 1]``: 0 for a one-hot
(certain) prediction, 1 for a uniform one. The review docks show it, threshold the
pseudo-labels on ``certainty = 1 - entropy`` and rank slices by its mean.
"""

from __future__ import annotations

import math

import numpy as np

#: The label value of pixels left unknown (unpainted); see :mod:`napari_semicl.data.annotation`.
UNKNOWN = 0


def normalised_entropy(probs: np.ndarray, *, axis: int = 0, eps: float = 1e-12) -> np.ndarray:
    """Predictive entropy divided by ``log K``, in ``[0, 1]``.

    Parameters
    ----------
    probs : ndarray
        Class probabilities (non-negative, summing to 1 along ``axis``), K >= 2 classes.
    axis : int, optional
        The class axis.
    eps : float, optional
        Floor inside the logarithm (``0 log 0`` is taken as 0).

    Returns
    -------
    ndarray of float32
        ``probs``' shape without ``axis``.

    See Also
    --------
    napari_semicl.models.ops.normalised_entropy : the same for torch tensors on the device.

    Examples
    --------
    >>> normalised_entropy(np.array([0.5, 0.5]))
    array(1., dtype=float32)
    """
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[axis]
    if k < 2:
        raise ValueError(f"entropy needs at least 2 classes along axis {axis}, got {k}")
    ent = -(probs * np.log(np.clip(probs, eps, None))).sum(axis=axis) / math.log(k)
    return np.clip(ent, 0.0, 1.0).astype(np.float32)


def sample_disagreement(samples: np.ndarray, n_classes: int) -> np.ndarray:
    """Normalised entropy of the class histogram across S sampled segmentations.

    Parameters
    ----------
    samples : ndarray of int
        (S, ...) class indices in ``[0, n_classes)`` (e.g. aleatoric samples of a slice).
    n_classes : int
        K >= 2.

    Returns
    -------
    ndarray of float32
        (...) in ``[0, 1]``: 0 where every sample agrees, 1 where the samples spread
        evenly over all K classes.
    """
    samples = np.asarray(samples)
    if samples.ndim < 1 or samples.shape[0] == 0:
        raise ValueError("samples must be (S, ...) with S >= 1")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    counts = np.stack([(samples == k).sum(axis=0) for k in range(n_classes)])
    return normalised_entropy(counts / samples.shape[0], axis=0)


def threshold_pseudo_labels(labels: np.ndarray, entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Pseudo-labels with the uncertain pixels set to :data:`UNKNOWN`.

    Parameters
    ----------
    labels : ndarray of int
        Predicted label values.
    entropy : ndarray of float
        Normalised entropy of the same shape, in ``[0, 1]``.
    threshold : float
        Minimum certainty ``1 - entropy`` in ``[0, 1]``; 0 keeps every pixel.

    Returns
    -------
    ndarray
        A new array of ``labels``' dtype.
    """
    labels = np.asarray(labels)
    entropy = np.asarray(entropy)
    if labels.shape != entropy.shape:
        raise ValueError(f"labels {labels.shape} and entropy {entropy.shape} differ in shape")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    out = np.array(labels, copy=True)
    if threshold > 0:
        out[(1.0 - entropy) < threshold] = UNKNOWN
    return out
