"""Simulated annotation: reveal K reference slices, as the benchmarks and the demo do.

Convention (../shared/data/SOURCES.md): K slices evenly spaced between the first and the
last slice that contain foreground, along the slicing axis; everything else stays
unpainted (0).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def foreground_slice_range(reference: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last slice index along ``axis`` with a non-zero reference voxel."""
    other = tuple(a for a in range(reference.ndim) if a != axis)
    idx = np.flatnonzero(np.any(reference != 0, axis=other))
    if idx.size == 0:
        raise DataError("the reference holds no foreground: nothing to reveal")
    return int(idx[0]), int(idx[-1])


def choose_reveal_slices(reference: np.ndarray, k: int, axis: int) -> list[int]:
    """``k`` slice indices evenly spaced over the foreground range (endpoints included).

    Examples
    --------
    >>> ref = np.zeros((10, 2, 2), int); ref[2:8] = 1
    >>> choose_reveal_slices(ref, 3, 0)
    [2, 4, 7]
    """
    if k < 1:
        raise DataError(f"reveal at least one slice, got k={k}")
    first, last = foreground_slice_range(reference, axis)
    if k == 1:
        return [int(round((first + last) / 2))]
    positions = np.linspace(first, last, k)
    return sorted(set(int(round(p)) for p in positions))


def reveal_slices(reference: np.ndarray, slices, axis: int, *, shift: int = 0) -> np.ndarray:
    """A labels array holding ``reference`` on ``slices`` (along ``axis``) and 0 elsewhere.

    ``shift`` adds a constant to every revealed value (e.g. 1 to turn background 0 into a
    painted class 1 for scribble-style annotation).
    """
    painted = np.zeros_like(reference)
    index = [slice(None)] * reference.ndim
    for s in slices:
        index[axis] = s
        painted[tuple(index)] = reference[tuple(index)] + shift
    return painted
