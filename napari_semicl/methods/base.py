"""The method interface: a method is the losses it adds to the one training loop.

A method gets the student network and the whole config, may own a teacher and buffers,
and for each step returns its *weighted* losses by name; the trainer sums them, steps the
optimiser and calls :meth:`Method.after_step`. What a method exposes for review (maps,
embeddings) comes from :meth:`Method.review`; what its sampler does on one whole slice the
user is looking at comes from :meth:`Method.review_slice`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..data import augment as _augment
from ..models.ops import in_float32

#: the augmentations in float32 under bf16/fp16 autocast (their blur and stain matrices would
#: otherwise round the images the network sees): the methods import them from here
weak_augment = in_float32(_augment.weak_augment)
strong_augment = in_float32(_augment.strong_augment)

@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put ``modules`` (None entries skipped) in eval mode; restore each one's mode after."""
    present = [m for m in modules if m is not None]
    states = [[(sub, sub.training) for sub in m.modules()] for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for pairs in states:
            for sub, training in pairs:
                sub.train(training)


@dataclass(frozen=True)
class StageChange:
    """What a method asks of the training loop before a step (:meth:`Method.before_step`).

    message : said to the user (a :class:`~napari_semicl.engine.events.Notice`).
    reset_optimizer : drop the optimiser's state (moments), e.g. after the method
    re-initialised the network's weights.
    """

    message: str
    reset_optimizer: bool = False


def review_arrays(tensors: dict) -> dict[str, np.ndarray]:
    """Detached numpy copies of a step's review tensors: floats as float32, integers as
    int64, booleans kept (what :meth:`Method.review` returns)."""
    out = {}
    for key, value in tensors.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64, copy=False)
        out[key] = arr
    return out


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`compute_losses`.

    Parameters
    ----------
    config : TrainConfig
        The whole configuration (a method reads its own section).
    student : nn.Module
        The network being optimised.
    """

    name: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = False
    uses_unlabelled: ClassVar[bool] = False
    #: Per-slice maps of :meth:`review_slice` that the GUI shows as layers of their own
    #: ('patch_entropy', 'sampled_pixels', 'aleatoric_disagreement'): it creates them,
    #: empty, when training starts (adding a napari layer pauses the viewer 0.1-1 s).
    review_layers: ClassVar[tuple[str, ...]] = ()
    #: On-demand review analyses the method answers beyond the common ones, e.g.
    #: ('aleatoric',) for a method with ``sample_aleatoric(x, n_samples, valid_shape)``
    #: (see :func:`napari_semicl.engine.review.aleatoric_samples`).
    review_analyses: ClassVar[tuple[str, ...]] = ()
    #: The method's settings: a dataclass with a ``validate(path)`` method, found in
    #: ``TrainConfig`` under the method's ``name`` (``cfg.<name>``). The Train dock builds
    #: its settings form from it; the CLI sets any of its fields with ``--set name.field=V``.
    config_class: ClassVar[type | None] = None
    #: Fields of ``config_class`` the CLI offers as flags of their own (``--field``).
    cli_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, student: nn.Module) -> None:
        self.config = config
        self.student = student
        self.device = next(student.parameters()).device
        self.teacher: nn.Module | None = None
        #: extra trainable modules (projection heads...), optimised with the student and
        #: saved in checkpoints; register them with :meth:`add_module`.
        self.modules = nn.ModuleDict()
        if self.uses_teacher:
            self.teacher = self.make_ema_copy(student)

    @staticmethod
    def make_ema_copy(module: nn.Module) -> nn.Module:
        """A frozen copy of ``module`` (for a teacher or a teacher-side head)."""
        copy_ = copy.deepcopy(module)
        for p in copy_.parameters():
            p.requires_grad_(False)
        return copy_.train()

    def add_module(self, name: str, module: nn.Module) -> nn.Module:
        """Register a trainable module of the method (moved to the training device)."""
        self.modules[name] = module.to(self.device)
        return self.modules[name]

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters beyond the student's (the optimiser includes them)."""
        return [p for p in self.modules.parameters() if p.requires_grad]

    # --- the step -----------------------------------------------------------------------
    def labelled_view(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled crops and targets as every method learns them: flips and rotation
        (the weak view), then, with ``data.intensity_augment`` = p > 0, each of the strong
        view's intensity changes (gamma, contrast, brightness, blur, noise; no cutout) with
        probability p, so that all methods meet the same augmented painted data."""
        x, y = weak_augment(batch.x_l, batch.y_l, generator=generator)
        p = self.config.data.intensity_augment
        if p > 0:
            x = strong_augment(x, generator=generator, p=p, cutout=0.0)
        return x, y

    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Weighted losses by name for one step (their sum is optimised)."""
        raise NotImplementedError

    def before_step(self, step: int) -> StageChange | None:
        """Called by the loop before each step; a method with stages switches here.

        The method may change its own modules and the student's weights in place (the
        optimiser keeps the same parameters); it returns a :class:`StageChange` when the
        loop must tell the user or reset the optimiser, else None.
        """
        return None

    def after_step(self, step: int) -> None:
        """Called after the optimiser step (e.g. the EMA update of a teacher)."""

    # --- inference and review -------------------------------------------------------------
    def inference_model(self) -> nn.Module:
        """The network that predicts: the teacher when there is one (the EMA is steadier)."""
        return self.teacher if self.teacher is not None else self.student

    def review(self) -> dict[str, np.ndarray]:
        """Arrays the method exposes for the review docks (empty for the baselines)."""
        return {}

    def review_slice(self, x: torch.Tensor, *, valid_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """What the method's sampler does on one whole slice, for the review layers.

        Called by the trainer between steps (in the training thread), under
        ``torch.no_grad()``. Implementations use the teacher (or the student, for methods
        without one) in eval mode and restore every module's train/eval mode afterwards
        (:func:`eval_mode`); they must not touch the training RNG streams or any buffer.

        Parameters
        ----------
        x : Tensor
            (1, C, H, W) normalised slice on the training device; the caller pads H and W
            (zeros at the bottom and right) to the network's size multiple
            (:func:`~napari_semicl.models.ops.pad_to_multiple`).
        valid_shape : (int, int), optional
            The slice's size before that padding; pixel maps and coordinates returned are
            limited to it (default: all of ``x``).

        Returns
        -------
        dict of str to ndarray
            Named arrays in slice coordinates (see the subclasses); empty for the
            baselines, which sample nothing.
        """
        return {}

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Teacher, extra modules and buffers (tensors and plain values only)."""
        return {
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "modules": self.modules.state_dict(),
            "buffers": self.buffers_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        if state.get("modules"):
            self.modules.load_state_dict(state["modules"])
        if state.get("buffers"):
            self.load_buffers_state(state["buffers"])

    def buffers_state(self) -> dict:
        """Method buffers to checkpoint (memory queues, running statistics); override."""
        return {}

    def load_buffers_state(self, state: dict) -> None:
        """Restore what :meth:`buffers_state` returned; override."""
