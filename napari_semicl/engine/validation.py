"""Validation marks: which slices of which image are held out of training for Dice.

A Qt-free record that the Train dock (and scripts) keep. Images are identified by a
stable key chosen by the caller (the dock uses the layer's ``unique_id``, which survives
renames and napari's proxies), never by object identity: napari hands a plugin dock new
proxy objects for the same layer at every access.
"""

from __future__ import annotations

from collections.abc import Hashable


class ValidationMarks:
    """Slices marked for validation, one set per image key.

    Examples
    --------
    >>> marks = ValidationMarks()
    >>> marks.mark("a", "t1", 14); marks.mark("a", "t1", 14)
    >>> marks.slices("a")
    [14]
    >>> marks.unmark("a", 14); marks.slices("a")
    []
    """

    def __init__(self) -> None:
        self._slices: dict[Hashable, set[int]] = {}
        self._names: dict[Hashable, str] = {}

    def mark(self, key: Hashable, name: str, index: int) -> None:
        """Hold slice ``index`` of image ``key`` (shown as ``name``) out for validation."""
        self._slices.setdefault(key, set()).add(int(index))
        self._names[key] = str(name)

    def unmark(self, key: Hashable, index: int) -> bool:
        """Give slice ``index`` of image ``key`` back to training; False if it was not marked."""
        slices = self._slices.get(key)
        if slices is None or int(index) not in slices:
            return False
        slices.discard(int(index))
        return True

    def slices(self, key: Hashable) -> list[int]:
        """The marked slices of image ``key``, sorted (empty when none)."""
        return sorted(self._slices.get(key, ()))

    def rename(self, key: Hashable, name: str) -> None:
        """The image ``key`` is now called ``name`` (its marks stay)."""
        if key in self._names:
            self._names[key] = str(name)

    def describe(self, keys=None) -> str:
        """'name: s1, s2; other: s3' for the images with marks (among ``keys``), or 'none'."""
        parts = [
            f"{self._names[k]}: {', '.join(str(s) for s in sorted(v))}"
            for k, v in self._slices.items() if v and (keys is None or k in keys)
        ]
        return "; ".join(parts) if parts else "none"
