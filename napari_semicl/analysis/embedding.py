"""Bounded samples of embeddings and their 2D t-SNE map (scikit-learn), no Qt.

The feature plot shows a few thousand points at most: :func:`bounded_sample` picks them
(stratified by class, so that a small class is not drowned) and :func:`tsne_2d` maps them
to the plane. :func:`nearest_point` finds the point under a click.
"""

from __future__ import annotations

import numpy as np

#: Default bound on the points of one t-SNE (t-SNE is O(N log N) with Barnes-Hut).
DEFAULT_MAX_POINTS = 2000


def bounded_sample(
    classes: np.ndarray, max_points: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of at most ``max_points`` items, spread evenly over the classes.

    Each class gets ``max_points // n_classes`` places (classes with fewer items give
    their spare places to the others); within a class the items are drawn uniformly
    without replacement.

    Parameters
    ----------
    classes : ndarray of int
        (N,) class of each item.
    max_points : int
        The bound (>= 1).
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of int64
        Sorted indices into ``classes``; all of them when N <= ``max_points``.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    classes = np.asarray(classes).reshape(-1)
    n = classes.shape[0]
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    values, counts = np.unique(classes, return_counts=True)
    quota = np.zeros(len(values), dtype=np.int64)
    left, remaining = max_points, len(values)
    # water-filling: small classes take all they have, the larger ones share what remains
    for i in np.argsort(counts, kind="stable"):
        quota[i] = min(int(counts[i]), left // remaining)
        left -= quota[i]
        remaining -= 1
    for i in np.argsort(-counts, kind="stable"):  # rounding leftovers, largest classes first
        extra = min(left, int(counts[i] - quota[i]))
        quota[i] += extra
        left -= extra
    picked = []
    for value, q in zip(values, quota):
        members = np.flatnonzero(classes == value)
        picked.append(rng.choice(members, size=min(int(q), len(members)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def tsne_2d(embeddings: np.ndarray, *, perplexity: float = 30.0, seed: int = 0,
            n_threads: int | None = None) -> np.ndarray:
    """(N, 2) t-SNE map of (N, D) embeddings (scikit-learn, PCA initialisation).

    The perplexity is lowered to ``(N - 1) / 3`` for small N, as t-SNE requires it to be
    below N. Fewer than 3 points are placed on a line (nothing to learn). ``n_threads``
    caps the OpenMP/BLAS threads of the fit (scikit-learn's gradient otherwise takes every
    core); the review dock uses 1, leaving the other cores to training and the viewer.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if n < 3:
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)], axis=1)
    perp = float(min(perplexity, max((n - 1) / 3.0, 1.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, n_jobs=1)
    if n_threads is None:
        return tsne.fit_transform(x).astype(np.float32)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n_threads)):
        return tsne.fit_transform(x).astype(np.float32)


def nearest_point(points: np.ndarray, xy, max_distance: float | None = None) -> int | None:
    """Index of the row of (N, 2) ``points`` nearest to ``xy``; None when there is none
    within ``max_distance`` (same units)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(points):
        return None
    d = np.hypot(points[:, 0] - xy[0], points[:, 1] - xy[1])
    i = int(np.argmin(d))
    if max_distance is not None and d[i] > max_distance:
        return None
    return i
