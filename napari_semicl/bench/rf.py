"""The ilastik-style baseline: a random forest on multiscale filter features.

Features: :func:`skimage.feature.multiscale_basic_features` (intensity, edges, texture at
sigmas 1..16) of the whole 2D image or 3D volume; a scikit-learn RandomForestClassifier
trained on (a bounded random sample of) the painted voxels, as ilastik's pixel
classification does.
"""

from __future__ import annotations

import time

import numpy as np
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from ..data.dataset import normalise_image


def rf_segment(
    image: np.ndarray,
    painted: np.ndarray,
    *,
    unpainted: str = "background",
    painted_slices=None,
    axis: int = 0,
    max_samples: int = 200_000,
    n_estimators: int = 100,
    seed: int = 0,
    n_jobs: int = -1,
) -> tuple[np.ndarray, dict]:
    """Train on painted voxels and predict every voxel; returns (labels, timing info).

    With ``unpainted='background'`` unpainted voxels of ``painted_slices`` (along ``axis``)
    train as class 0, matching the networks' fully-painted-slices protocol.
    """
    t0 = time.perf_counter()
    img = normalise_image(image, "percentile")
    feats = multiscale_basic_features(img, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16)
    t_feat = time.perf_counter() - t0
    train_mask = painted != 0
    if unpainted == "background" and painted_slices is not None:
        index = [slice(None)] * painted.ndim
        for s in painted_slices:
            index[axis] = s
            train_mask[tuple(index)] = True
    coords = np.flatnonzero(train_mask.ravel())
    rng = np.random.default_rng(seed)
    if coords.size > max_samples:
        coords = rng.choice(coords, max_samples, replace=False)
    flat = feats.reshape(-1, feats.shape[-1])
    clf = RandomForestClassifier(n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed, max_depth=None)
    clf.fit(flat[coords], painted.ravel()[coords])
    t_fit = time.perf_counter() - t0 - t_feat
    pred = np.empty(flat.shape[0], dtype=painted.dtype)
    for start in range(0, flat.shape[0], 500_000):
        pred[start:start + 500_000] = clf.predict(flat[start:start + 500_000])
    return pred.reshape(painted.shape), {"features_s": t_feat, "fit_s": t_fit, "total_s": time.perf_counter() - t0}
