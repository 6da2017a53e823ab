"""The trainer's inbox: requests from other threads, served between two steps.

Four kinds of request reach a running loop, from any thread (the dock's Qt thread, a
script) or sent into its generator as messages (:mod:`~napari_semicl.engine.events`):

* stop (:meth:`Inbox.request_stop`, :class:`Stop`): leave after the current step;
* new data (:meth:`Inbox.submit_data`, :class:`UpdateData`): annotation snapshots that
  replace the training pairs before the next step (the latest wins);
* a slice review (:meth:`Inbox.request_review`, :class:`ReviewSlice`), answered with a
  :class:`Reviewed` event (the latest wins);
* analyses (:meth:`Inbox.request_analysis`), answered with :class:`Analysed` events (the
  latest of each kind wins).

The inbox only holds them; the loop takes them (``take_*``) and serves them with
:func:`serve_review` and :func:`serve_analyses` below (the data with
:meth:`Trainer.replace_data`).
"""

from __future__ import annotations

import logging
import threading

import torch

from ..data.tiles import TileDataset
from ..errors import SemiclError
from .events import Analysed, Notice, Reviewed, ReviewSlice, Stop, UpdateData
from .review import padded_slice, run_analysis

log = logging.getLogger(__name__)



def dispatch(message, target) -> None:
    """Turn a message sent into a training generator (:class:`Stop`, :class:`UpdateData`,
    :class:`ReviewSlice`; None: nothing was sent) into the call on ``target`` that asks for
    it: ``request_stop()``, ``submit_data(pairs)`` or ``request_review(pair, slice)``. The
    inbox and a distributed run (engine.launch) both take messages this way."""
    if isinstance(message, Stop):
        target.request_stop()
    elif isinstance(message, UpdateData):
        target.submit_data(message.pairs)
    elif isinstance(message, ReviewSlice):
        target.request_review(message.pair_index, message.slice_index)


class Inbox:
    """Thread-safe holder of the requests a training loop serves between steps."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list | None = None
        self._review: tuple[int, int] | None = None
        self._analyses: dict[str, dict] = {}

    # --- asked from any thread -------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def clear_stop(self) -> None:
        self._stop.clear()

    def submit_data(self, pairs) -> None:
        with self._lock:
            self._pairs = list(pairs)

    def request_review(self, pair_index: int, slice_index: int) -> None:
        with self._lock:
            self._review = (int(pair_index), int(slice_index))

    def request_analysis(self, kind: str, **params) -> None:
        with self._lock:
            self._analyses[str(kind)] = dict(params)

    def handle(self, message) -> None:
        """A message sent into the trainer's generator (None: nothing was sent)."""
        dispatch(message, self)

    # --- taken by the loop -----------------------------------------------------------------
    def take_pairs(self) -> list | None:
        with self._lock:
            pairs, self._pairs = self._pairs, None
        return pairs

    def take_review(self) -> tuple[int, int] | None:
        with self._lock:
            request, self._review = self._review, None
        return request

    def take_analyses(self) -> dict[str, dict]:
        with self._lock:
            pending, self._analyses = self._analyses, {}
        return pending


# --- serving the requests -----------------------------------------------------------------
def review_slice(trainer, pair_index: int, slice_index: int) -> dict:
    """:meth:`Method.review_slice` of one normalised slice, padded to the network's size
    multiple (zeros at the bottom and right; the method limits its output to the slice).
    A 3D network has no per-slice review (ValueError, a notice)."""
    if trainer.config.model.spatial_dims == 3:
        raise ValueError("the per-slice sampler review is for slice networks; this run trains a 3D network")
    img = trainer.dataset.images[pair_index][slice_index]  # (C, H, W)
    h, w = img.shape[-2:]
    x = padded_slice(img, int(getattr(trainer.model, "multiple", 1)), trainer.device)
    return trainer.method.review_slice(x, valid_shape=(h, w))


def serve_review(trainer, request: tuple[int, int] | None) -> Reviewed | Notice | None:
    """Answer one review request (None when there is nothing to show); a review that fails
    says so in a :class:`Notice` and leaves training going."""
    if request is None:
        return None
    p_idx, s_idx = request
    dataset = trainer.dataset
    if isinstance(dataset, TileDataset):
        log.debug("review of slides is not implemented; request ignored")
        return None
    if not (0 <= p_idx < len(dataset.images) and 0 <= s_idx < dataset.images[p_idx].shape[0]):
        log.debug("review of pair %d slice %d ignored: out of range", p_idx, s_idx)
        return None
    try:
        arrays = trainer.review_slice(p_idx, s_idx)
    except (RuntimeError, ValueError) as exc:
        log.warning("review of pair %d slice %d failed", p_idx, s_idx, exc_info=True)
        return Notice("warning", f"could not review slice {s_idx}: {str(exc).splitlines()[0]}")
    return Reviewed(trainer.step, p_idx, s_idx, arrays) if arrays else None


def analyse(trainer, kind: str, **params) -> Analysed:
    """One review analysis now, in the calling thread."""
    with torch.no_grad():
        arrays = run_analysis(trainer.method, trainer.dataset, kind, device=trainer.device, **params)
    return Analysed(trainer.step, kind, dict(params), arrays)


def serve_analyses(trainer, pending: dict[str, dict]) -> list:
    """Answer the pending analyses; a failing one becomes a :class:`Notice`."""
    events: list = []
    for kind, params in pending.items():
        try:
            events.append(trainer.analyse(kind, **params))
        except (SemiclError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            log.warning("analysis %s failed", kind, exc_info=True)
            events.append(Notice("warning", f"could not compute {kind}: {str(exc).splitlines()[0]}"))
    return events
