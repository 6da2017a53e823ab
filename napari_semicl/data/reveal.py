"""Simulated annotation: reveal K reference slices, as the benchmarks and the demo do.

Convention (../shared/data/SOURCES.md): K slices evenly spaced between the first and the
last slice that contain foreground, along the slicing axis; everything else stays
unpainted (0). "Between" is read two ways (``placement``):

- ``"ends"`` (the default, and every result before issue 16's protocol): the first and the
  last foreground slice are among the K, so K = 2 paints the structure's two tips;
- ``"inside"``: K slices evenly spaced strictly inside the range (at i / (K + 1) of it,
  i = 1..K), as a user paints representative slices rather than the tips. The left-atrium
  interpolation figures of issue 16's table (K = 2/3/5/10: 0.719/0.799/0.890/0.949) are
  reproduced by this reading (0.711/0.794/0.887/0.949), not by ``"ends"`` (0.111 at K = 2).
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


PLACEMENTS = ("ends", "inside")


def choose_reveal_slices(reference: np.ndarray, k: int, axis: int, placement: str = "ends") -> list[int]:
    """``k`` slice indices evenly spaced over the foreground range: endpoints included
    (``placement="ends"``) or strictly inside it (``"inside"``); see the module docstring.

    Examples
    --------
    >>> ref = np.zeros((10, 2, 2), int); ref[2:8] = 1
    >>> choose_reveal_slices(ref, 3, 0)
    [2, 4, 7]
    >>> choose_reveal_slices(ref, 2, 0, "inside")
    [4, 5]
    """
    if k < 1:
        raise DataError(f"reveal at least one slice, got k={k}")
    if placement not in PLACEMENTS:
        raise DataError(f"reveal placement must be one of {PLACEMENTS}, got {placement!r}")
    first, last = foreground_slice_range(reference, axis)
    if placement == "inside":
        positions = np.linspace(first, last, k + 2)[1:-1]
        return sorted(set(int(round(p)) for p in positions))
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
