"""A 2D U-Net (Ronneberger et al., MICCAI 2015, arXiv:1505.04597) for slices.

Layout: input (B, C_in, H, W) with H and W multiples of ``2**depth``; output logits
(B, n_classes, H, W). ``forward(x, return_features=True)`` also returns the last decoder
feature map (B, base_channels, H, W), which the contrastive methods project and pool.
"""

from __future__ import annotations

import torch
from torch import nn


class _ConvBlock(nn.Sequential):
    """(conv 3x3 -> BN -> LeakyReLU) x 2, with optional dropout between the convolutions."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        super().__init__(*layers)


class UNet2D(nn.Module):
    """2D U-Net with ``depth`` down-sampling stages and channel doubling.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for grey, 3 for RGB).
    n_classes : int
        Output classes (>= 2, background included).
    base_channels : int, optional
        Channels of the first stage; stage i has ``base_channels * 2**i``.
    depth : int, optional
        Number of 2x down-sampling stages; inputs must be multiples of ``2**depth``.
    dropout : float, optional
        Dropout in the bottleneck block (a source of stochasticity for the teacher).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        *,
        base_channels: int = 16,
        depth: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.depth = depth
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(chans):
            self.encoders.append(_ConvBlock(c_prev, c, dropout if i == depth else 0.0))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.ups.append(nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2))
            self.decoders.append(_ConvBlock(2 * chans[i - 1], chans[i - 1]))
        self.head = nn.Conv2d(chans[0], n_classes, 1)
        self.feature_channels = chans[0]

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be a multiple of {self.multiple}; pad the input"
            )
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        logits = self.head(x)
        return (logits, x) if return_features else logits


def build_model(cfg) -> UNet2D:
    """Build the network described by a :class:`~napari_semicl.engine.config.ModelConfig`."""
    return UNet2D(
        cfg.in_channels,
        cfg.n_classes,
        base_channels=cfg.base_channels,
        depth=cfg.depth,
        dropout=cfg.dropout,
    )
