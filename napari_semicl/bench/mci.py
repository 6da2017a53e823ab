"""ITK's MorphologicalContourInterpolator as a benchmark baseline (``bench session --product mci``).

The morphological contour interpolation of Albu, Beugeling and Laurendeau (IEEE TMI 2008,
doi:10.1109/TMI.2008.919698), as ITK wraps it (Zukić et al., Insight Journal 2016,
http://hdl.handle.net/10380/3563): the anchor of the "fill between slices" of 3D Slicer and
ITK-SNAP. It comes from the PyPI wheels ``itk`` and ``itk-morphologicalcontourinterpolation``,
the optional extra ``bench`` (``pip install "napari-semicl[bench]"``); nothing else in the
plugin needs them.

Its conventions differ from :func:`napari_semicl.data.interpolation.interpolate_labels`:

* 0 is both background and "not painted": a slice is painted for a label when it holds that
  label (so a painted slice without foreground cannot be told from an unpainted one, as
  with ``unpainted='background'``);
* every label is interpolated on its own, only between slices that hold it: nothing is
  extrapolated past the outermost painted slice of a label;
* the painted slices must lie along one axis, given to the filter (``SetAxis``, in ITK's
  index order, the reverse of numpy's); without it the filter also interpolates along the
  other axes wherever a label's slices happen to be empty;
* 3D images of unsigned char, unsigned short or short only.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

INSTALL_HINT = 'pip install "napari-semicl[bench]" (or: pip install itk itk-morphologicalcontourinterpolation)'


def _itk():
    """The ``itk`` module with the MorphologicalContourInterpolator, or a DataError saying how to get it."""
    try:
        import itk
    except ImportError:
        raise DataError(f"the mci baseline needs ITK, which is not installed: {INSTALL_HINT}") from None
    try:
        itk.MorphologicalContourInterpolator  # noqa: B018 - a lazy attribute: loads the module's wrapping
    except AttributeError:
        raise DataError(
            f"ITK is installed without its MorphologicalContourInterpolator module: {INSTALL_HINT}"
        ) from None
    return itk


def mci_available() -> bool:
    """Whether ITK and its MorphologicalContourInterpolator can be imported."""
    try:
        _itk()
    except DataError:
        return False
    return True


def mci_interpolate(labels: np.ndarray, axis: int = 0, *, threads: int | None = None) -> np.ndarray:
    """Fill between the painted slices of ``labels`` with ITK's MorphologicalContourInterpolator.

    Parameters
    ----------
    labels : ndarray of int, shape (Z, Y, X)
        Painted slices (whole slices, along ``axis``) holding label values >= 0; 0 elsewhere.
    axis : int
        The numpy axis the slices were painted along.
    threads : int, optional
        ITK's thread count (process-wide default); ``None`` keeps ITK's.

    Returns
    -------
    ndarray
        The filled labels, same shape and dtype as ``labels``; the painted slices unchanged.

    Examples
    --------
    >>> lab = np.zeros((5, 9, 9), np.uint8)
    >>> lab[0, 3:6, 3:6] = 1; lab[4, 1:8, 1:8] = 1
    >>> out = mci_interpolate(lab, axis=0)  # doctest: +SKIP
    >>> [int(out[s].sum()) > 0 for s in range(5)]  # doctest: +SKIP
    [True, True, True, True, True]
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise DataError(f"the mci baseline fills 3D volumes; got labels of shape {labels.shape}")
    if not -3 <= axis < 3:
        raise DataError(f"axis must be 0, 1 or 2 for a 3D volume, got {axis}")
    axis %= 3
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"the mci baseline takes integer labels, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError("the mci baseline takes label values >= 0 (0 = background and unpainted)")
    if not labels.any():
        return np.zeros_like(labels)
    top = int(labels.max())
    if top > np.iinfo(np.uint16).max:
        raise DataError(f"the mci baseline takes label values up to 65535, got {top}")
    itk = _itk()
    if threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    kind = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16
    image = itk.image_from_array(np.ascontiguousarray(labels, dtype=kind))
    fill = itk.MorphologicalContourInterpolator.New(image)
    fill.SetAxis(labels.ndim - 1 - axis)  # ITK indexes (x, y, z): numpy's axes reversed
    fill.Update()
    return np.asarray(itk.array_from_image(fill.GetOutput())).astype(labels.dtype, copy=False)
