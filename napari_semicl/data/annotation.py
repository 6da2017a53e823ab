"""The annotation model: what a painted Labels array means for training.

Conventions (written once, used everywhere):

* ``UNLABELLED = 0``: a label value of 0 is *unpainted*. A slice (along the slicing axis)
  with any non-zero pixel is a *labelled slice*; the other slices are unlabelled.
* Every non-zero label value is a class of its own, as in ilastik: scribble "background"
  with a label value of its own (e.g. 1) and objects with others.
* ``unpainted='ignore'`` (default): unpainted pixels of labelled slices never reach a loss.
  ``unpainted='background'``: they are class value 0 (for fully painted slices), so the class
  table gains the value 0.
* The *class table* is the sorted list of label values the network predicts; network class
  ``i`` is label value ``class_values[i]``. Targets use ``IGNORE_INDEX`` for pixels that
  must not reach a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

UNLABELLED = 0
IGNORE_INDEX = -1
#: what 0 means on a painted slice: 'ignore' (scribbles: unpainted, no loss) or 'background'
#: (complete slices: class 0); ``data.unpainted`` in the config
UNPAINTED_CHOICES = ("ignore", "background")


@dataclass
class AnnotatedPair:
    """A snapshot of one image and its annotations (copies, never live layers).

    Parameters
    ----------
    image : ndarray
        (Z, Y, X) or (Y, X) grey, or (Y, X, 3) / (Z, Y, X, 3) with ``rgb=True``.
    labels : ndarray or None
        Integer array of the image's spatial shape; ``None`` for an unlabelled image.
    rgb : bool
        Whether the last image axis holds colour channels.
    name : str
        A display name (used in messages).
    validation_slices : sequence of int
        Slices (along the slicing axis) held out for validation Dice, never trained on.
    spacing : tuple of float, optional
        Voxel spacing of the spatial axes, for metrics.
    complete : bool
        The labels are a complete segmentation (e.g. a benchmark's reference): with
        ``unpainted='background'`` every slice is a labelled slice, the ones without a
        non-zero value too (they are all background); by default such slices are unpainted.
    """

    image: np.ndarray
    labels: np.ndarray | None = None
    rgb: bool = False
    name: str = "image"
    validation_slices: tuple[int, ...] = ()
    spacing: tuple[float, ...] | None = None
    metadata: dict = field(default_factory=dict)
    complete: bool = False

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[:-1] if self.rgb else self.image.shape)

    def check(self) -> None:
        """Raise :class:`DataError` for shapes or dtypes that cannot be trained on."""
        shape = self.spatial_shape
        if self.rgb and self.image.shape[-1] not in (3, 4):
            raise DataError(f"{self.name}: an RGB image needs 3 channels last, got shape {self.image.shape}")
        if len(shape) not in (2, 3):
            raise DataError(
                f"{self.name}: only 2D images and 3D volumes are supported, got {len(shape)} spatial "
                f"dimensions {shape}; split 4D/5D data into 3D volumes first"
            )
        if self.labels is not None:
            if tuple(self.labels.shape) != shape:
                raise DataError(
                    f"{self.name}: labels shape {tuple(self.labels.shape)} does not match the image's "
                    f"spatial shape {shape}; create the labels layer from this image"
                )
            if not np.issubdtype(self.labels.dtype, np.integer):
                raise DataError(f"{self.name}: labels must be integers, got {self.labels.dtype}")
            if self.labels.size and self.labels.min() < 0:
                raise DataError(f"{self.name}: labels must be >= 0 (0 = unpainted), found {self.labels.min()}")


def labelled_slice_indices(labels: np.ndarray, axis: int = 0) -> np.ndarray:
    """Indices of slices along ``axis`` holding any painted (non-zero) pixel.

    Parameters
    ----------
    labels : ndarray
        Integer labels, 0 = unpainted.
    axis : int
        The slicing axis.

    Returns
    -------
    ndarray of int
        Sorted slice indices.

    Examples
    --------
    >>> lab = np.zeros((4, 3, 3), int); lab[2, 1, 1] = 5
    >>> labelled_slice_indices(lab, 0).tolist()
    [2]
    """
    if labels.ndim == 2:
        return np.array([0] if np.any(labels != UNLABELLED) else [], dtype=int)
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return np.flatnonzero(np.any(labels != UNLABELLED, axis=other))


def build_class_table(label_slices, unpainted: str = "ignore") -> list[int]:
    """The sorted label values painted in ``label_slices`` (plus 0 with ``'background'``).

    Raises
    ------
    DataError
        When fewer than two classes result (a network needs at least two).
    """
    values: set[int] = set()
    for lab in label_slices:
        values.update(int(v) for v in np.unique(lab) if v != UNLABELLED)
    if not values:
        raise DataError("no painted pixels: paint at least one slice (any non-zero label) before training")
    if unpainted == "background":
        values.add(UNLABELLED)
    if len(values) < 2:
        hint = (
            "paint a second class (e.g. the background with its own label value), "
            "or tick 'unpainted means background' if the painted slices are complete"
        )
        raise DataError(f"only one class is painted (label value {values.pop()}): {hint}")
    return sorted(values)


def encode_targets(labels: np.ndarray, class_values, unpainted: str = "ignore") -> np.ndarray:
    """Map label values to network class indices, ``IGNORE_INDEX`` where no loss applies.

    Unpainted pixels become class value 0's index with ``unpainted='background'`` (when 0
    is in the table) and ``IGNORE_INDEX`` otherwise; values outside the class table are
    ignored too (they were painted after the table was fixed).
    """
    lut_size = max(int(labels.max(initial=0)), max(class_values)) + 1
    lut = np.full(lut_size, IGNORE_INDEX, dtype=np.int64)
    for i, v in enumerate(class_values):
        lut[v] = i
    if unpainted != "background":
        lut[UNLABELLED] = IGNORE_INDEX
    return lut[labels.astype(np.int64, copy=False)]


def decoded_dtype(class_values) -> np.dtype:
    """The dtype :func:`decode_classes` gives for ``class_values``: the smallest that fits."""
    top = np.asarray(class_values).max()
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32)


def decode_classes(class_indices: np.ndarray, class_values) -> np.ndarray:
    """Map network class indices back to label values (the smallest dtype that fits)."""
    return np.asarray(class_values).astype(decoded_dtype(class_values))[class_indices]
