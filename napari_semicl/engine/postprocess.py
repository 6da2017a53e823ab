"""Post-processing of a predicted mask that a user can switch on.

:func:`keep_largest_component` keeps, for each foreground label value, only its largest
connected component in the whole volume (3D Slicer's "keep largest island", MONAI's
``KeepLargestConnectedComponent`` applied per class): stray blobs of a class elsewhere in
the image (another chamber, a vessel) become background. A structure that is one piece
in every volume (a left atrium, a ventricle) loses nothing by it.
"""

from __future__ import annotations

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
