"""The method interface: a method is the losses it adds to the one training loop.

A method gets the student network and the whole config, may own a teacher and buffers,
and for each step returns its *weighted* losses by name; the trainer sums them, steps the
optimiser and calls :meth:`Method.after_step`. What a method exposes for review (maps,
embeddings) comes from :meth:`Method.review`.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from torch import nn


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

    def __init__(self, config, student: nn.Module) -> None:
        self.config = config
        self.student = student
        self.teacher: nn.Module | None = None
        if self.uses_teacher:
            self.teacher = copy.deepcopy(student)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.train()

    # --- the step -----------------------------------------------------------------------
    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Weighted losses by name for one step (their sum is optimised)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimiser step (e.g. the EMA update of a teacher)."""

    # --- inference and review -------------------------------------------------------------
    def inference_model(self) -> nn.Module:
        """The network that predicts: the teacher when there is one (the EMA is steadier)."""
        return self.teacher if self.teacher is not None else self.student

    def review(self) -> dict[str, np.ndarray]:
        """Arrays the method exposes for the review docks (empty for the baselines)."""
        return {}

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
