"""Supervised baseline (METHODS.md §0): CE + Dice on painted pixels only."""

from __future__ import annotations

import torch

from .base import Method, strong_augment, weak_augment
from .losses import supervised_loss


class Supervised(Method):
    """Trains on labelled slices alone; unpainted pixels are ignored, never background
    (unless the user chose 'unpainted means background')."""

    name = "supervised"

    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = weak_augment(batch.x_l, batch.y_l, generator=generator)
        p = self.config.data.intensity_augment
        if p > 0:  # gamma, contrast, brightness, blur and noise of the labelled crops (no cutout)
            x = strong_augment(x, generator=generator, p=p, cutout=0.0)
        return supervised_loss(self.student(x), y)
