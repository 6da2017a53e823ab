"""Events the training generator yields, and the messages it accepts through ``send``.

Small frozen dataclasses holding numpy/plain values, never layers: the widgets turn them
into layer updates on the Qt thread, the CLI into log lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Started:
    device: str
    step: int
    target_step: int | None
    budget_s: float | None
    summary: dict


@dataclass(frozen=True)
class StepDone:
    step: int
    losses: dict
    lr: float
    elapsed_s: float
    fraction: float          # of this run's budget, in [0, 1]
    eta_s: float | None


@dataclass(frozen=True)
class Preview:
    """``kind`` 'prediction': label values of a whole pair (spatial shape of its image)."""

    step: int
    kind: str
    pair_index: int
    array: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Reviewed:
    """What the method's sampler does on one slice (:meth:`Method.review_slice`).

    Answers :meth:`Trainer.request_review` / :class:`ReviewSlice`. ``slice_index`` indexes
    the pair's slices along ``config.data.axis`` (0 for a 2D image); ``arrays`` are in that
    slice's pixel coordinates, e.g. PLGCL's 'patch_entropy' (K, H, W) or ARCO's
    'sampled_pixels' (N, 2) (y, x) with 'sampled_classes' (N,).
    """

    step: int
    pair_index: int
    slice_index: int
    arrays: dict = field(repr=False)


@dataclass(frozen=True)
class Analysed:
    """The result of one :meth:`Trainer.request_analysis` (see :mod:`~napari_semicl.engine.review`).

    ``kind`` names the analysis ('embeddings', 'disagreement', 'aleatoric',
    'method_review'), ``params`` are those it was asked with, ``arrays`` what it returned
    (empty when the method has nothing of that kind).
    """

    step: int
    kind: str
    params: dict
    arrays: dict = field(repr=False)


@dataclass(frozen=True)
class Evaluated:
    step: int
    metrics: dict


@dataclass(frozen=True)
class DataUpdated:
    """New snapshots replaced the training data; ``changed``: the pairs that are new or whose
    image, labels or validation slices changed (their masks follow at once as previews)."""

    step: int
    summary: dict
    changed: tuple = ()


@dataclass(frozen=True)
class Notice:
    level: str               # 'info' | 'warning'
    text: str


@dataclass(frozen=True)
class Checkpointed:
    step: int
    path: str


@dataclass(frozen=True)
class Finished:
    step: int
    reason: str              # 'budget' | 'stopped' | 'error'
    seconds: float
    losses: dict
    checkpoint: str | None
    error: str | None = None


# --- messages sent into the generator ------------------------------------------------------
@dataclass(frozen=True)
class UpdateData:
    """New annotation snapshots; they replace the training data before the next step."""

    pairs: list


@dataclass(frozen=True)
class ReviewSlice:
    """Review one slice before the next step (the latest request wins); see :class:`Reviewed`."""

    pair_index: int
    slice_index: int


@dataclass(frozen=True)
class Stop:
    """Stop after the current step, checkpoint, and finish with reason 'stopped'."""
