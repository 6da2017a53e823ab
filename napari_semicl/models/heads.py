"""Projection heads that turn decoder features into embeddings for contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Per-pixel MLP (1x1 convolutions) to ``out_dim`` channels, L2-normalised over channels.

    Input (B, C, H, W) features; output (B, out_dim, H, W) unit vectors (``normalise=True``).
    Use :meth:`project_vectors` for already pooled (N, C) features.
    """

    def __init__(self, in_channels: int, out_dim: int = 128, hidden: int | None = None, *, normalise: bool = True) -> None:
        super().__init__()
        hidden = hidden or max(in_channels, out_dim)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )
        self.normalise = normalise

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net(features)
        return F.normalize(z, dim=1) if self.normalise else z

    def project_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, out_dim), through the same layers (as 1x1 'images')."""
        z = self.net(vectors[:, :, None, None])[:, :, 0, 0]
        return F.normalize(z, dim=1) if self.normalise else z
