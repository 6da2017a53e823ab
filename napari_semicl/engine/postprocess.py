"""Post-processing of a predicted mask that a user can switch on.

:func:`keep_largest_component` keeps, for each foreground label value, only its largest
connected component in the whole volume (3D Slicer's "keep largest island", MONAI's
``KeepLargestConnectedComponent`` applied per class): stray blobs of a class elsewhere in
the image (another chamber, a vessel) become background. A structure that is one piece
in every volume (a left atrium, a ventricle) loses nothing by it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


def keep_largest_component(labels: np.ndarray, *, background: int = 0, connectivity: int = 1) -> np.ndarray:
    """``labels`` with each foreground value reduced to its largest connected component.

    Parameters
    ----------
    labels : ndarray of int
        Label values (2D or 3D; components are found in all its dimensions at once).
    background : int
        The value that is not a class (and that removed voxels become).
    connectivity : int
        1: faces (6-connected in 3D); ``labels.ndim``: faces, edges and corners.

    Returns a new array of the same shape and dtype; ``labels`` is not changed. Ties between
    equally large components keep the first one found (in C order).
    """
    labels = np.asarray(labels)
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    for value in np.unique(labels):
        if value == background:
            continue
        mask = labels == value
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(np.argmax(sizes)))] = background
    return out


def finish_labels(labels: np.ndarray, settings) -> np.ndarray:
    """``labels`` finished as ``settings`` (a :class:`~napari_semicl.engine.config.PredictConfig`)
    says: with ``largest_component`` each class keeps only its largest component."""
    if getattr(settings, "largest_component", False):
        return keep_largest_component(labels)
    return labels


def finish_prediction(prediction, settings):
    """A :class:`~napari_semicl.engine.inference.Prediction` with its labels finished by
    :func:`finish_labels` (the entropy map stays the network's)."""
    if not getattr(settings, "largest_component", False):
        return prediction
    return dataclasses.replace(prediction, labels=finish_labels(prediction.labels, settings))
