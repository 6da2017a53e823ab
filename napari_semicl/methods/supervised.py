"""Supervised baseline (METHODS.md §0): CE + Dice on painted pixels only."""

from __future__ import annotations

import torch

from .base import Method
from .losses import supervised_loss


class Supervised(Method):
    """Trains on labelled slices alone; unpainted pixels are ignored, never background
    (unless the user chose 'unpainted means background')."""

    name = "supervised"

    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.labelled_view(batch, generator)
        return supervised_loss(self.student(x), y)
