"""Accepting a slice of pseudo-labels into the user's labels (numpy, no Qt).

An accepted slice trains as a labelled slice from then on, so it must be a complete and
correct slice under the annotation semantics in force (``data.unpainted``):

* ``'ignore'`` (scribbles; 0 = unpainted, ignored by the losses): the confident
  pseudo-labels (and the user's corrections) are copied where the user has not painted;
  uncertain pixels stay 0 and are ignored, as unpainted pixels are.
* ``'background'`` (complete slices; 0 = background): every pixel of a painted slice
  trains, 0 as background. Copying only the confident pixels would turn every uncertain
  foreground pixel into background, so the whole slice is accepted: the network's argmax
  prediction, with the confident pixels the user corrected or erased in the pseudo-labels
  layer taken as shown there. A slice the user has already painted is complete already
  and is refused (its 0 pixels already mean background; correct it with the brush).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .entropy import UNKNOWN

#: data.annotation.UNPAINTED_CHOICES (the import-layer contract keeps analysis off data)
UNPAINTED_CHOICES = ("ignore", "background")


@dataclass(frozen=True)
class AcceptedSlice:
    """The result of :func:`merge_accepted_slice`.

    labels : the new labels slice (the labels layer's dtype).
    labelled : pixels that now carry a label value (non-zero).
    added : pixels that were 0 and are now non-zero.
    uncertain : pixels below the certainty threshold accepted as the network predicted them
        (``'background'`` only; 0 with ``'ignore'``, where they stay unlabelled).
    whole_slice : the slice is accepted whole (``'background'``): its 0 pixels train as
        background.
    """

    labels: np.ndarray
    labelled: int
    added: int
    uncertain: int
    whole_slice: bool

    def describe(self, slice_index: int) -> str:
        """One line for the user saying what was accepted."""
        if self.whole_slice:
            text = f"slice {slice_index}: whole slice accepted, {self.labelled} labelled pixels, the rest background"
            if self.uncertain:
                text += f"; {self.uncertain} uncertain pixels taken as predicted (check them)"
            return text
        return f"slice {slice_index}: {self.added} confident pixels accepted, the uncertain ones stay unlabelled"


def merge_accepted_slice(painted: np.ndarray, prediction: np.ndarray, certainty: np.ndarray, shown: np.ndarray,
                         threshold: float, *, unpainted: str) -> AcceptedSlice:
    """Merge one slice of pseudo-labels into the user's labels slice.

    Parameters
    ----------
    painted : ndarray of int, (H, W)
        The user's labels on the slice (0 = unpainted).
    prediction : ndarray of int, (H, W)
        The network's argmax prediction as label values.
    certainty : ndarray of float, (H, W)
        ``1 - normalised entropy`` of the prediction, in [0, 1].
    shown : ndarray of int, (H, W)
        The pseudo-labels layer's slice as the user sees it: the prediction with pixels
        below ``threshold`` set to 0, plus the user's corrections.
    threshold : float
        The certainty threshold in [0, 1].
    unpainted : {'ignore', 'background'}
        What 0 means on a painted slice.

    Returns
    -------
    AcceptedSlice

    Raises
    ------
    DataError
        With ``'background'`` when the slice is already painted; with ``'ignore'`` when
        nothing is confident enough to accept. The message says what to do.
    """
    if unpainted not in UNPAINTED_CHOICES:
        raise ValueError(f"unpainted must be one of {set(UNPAINTED_CHOICES)}, got {unpainted!r}")
    painted, prediction, shown = np.asarray(painted), np.asarray(prediction), np.asarray(shown)
    certainty = np.asarray(certainty)
    if not painted.shape == prediction.shape == certainty.shape == shown.shape:
        raise ValueError(
            f"shapes differ: painted {painted.shape}, prediction {prediction.shape}, "
            f"certainty {certainty.shape}, shown {shown.shape}"
        )
    if unpainted == "background":
        if np.any(painted != UNKNOWN):
            raise DataError(
                "this slice is already painted: with 'unpainted means background' its unpainted pixels already "
                "train as background, so it is complete; correct it with the brush, or erase it to accept the "
                "prediction instead"
            )
        uncertain_px = certainty < threshold
        # what the user sees wins where it shows a label or where a confident pixel was
        # erased; an uncertain pixel (shown as 0) takes the prediction
        merged = np.where(shown != UNKNOWN, shown, np.where(uncertain_px, prediction, UNKNOWN))
        merged = merged.astype(painted.dtype, copy=False)
        labelled = int(np.count_nonzero(merged))
        uncertain = int(np.count_nonzero(uncertain_px & (shown == UNKNOWN)))
        return AcceptedSlice(merged, labelled, labelled, uncertain, True)
    merged = np.where(painted != UNKNOWN, painted, shown).astype(painted.dtype, copy=False)
    added = int(np.count_nonzero((painted == UNKNOWN) & (shown != UNKNOWN)))
    if added == 0:
        raise DataError(
            "no pseudo-label above the certainty threshold on this slice to accept: lower the threshold, "
            "or paint the slice yourself"
        )
    return AcceptedSlice(merged, int(np.count_nonzero(merged)), added, 0, False)
