"""U-Nets (Ronneberger et al., MICCAI 2015, arXiv:1505.04597): 2D for slices, 3D for
volume patches.

Layout: input (B, C_in, H, W) (2D) or (B, C_in, D, H, W) (3D) with every spatial size a
multiple of ``model.multiple``; output logits (B, n_classes, *spatial), float32 also under
autocast (the layers compute in bf16/fp16 there, see :mod:`napari_semicl.engine.precision`).
``forward(x, return_features=True)`` also returns the last decoder feature map
(B, feature_channels, *spatial), which the contrastive methods project and pool. Both
networks carry ``spatial_dims``, ``multiple`` and ``feature_channels``.

The 2D network is written here (its speed on CPU and its checkpoints are what the 2D
figures rest on); the 3D one is MONAI's ``BasicUNet`` (:class:`UNet3D`), only its forward
pass is repeated to hand out the decoder features.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
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
    spatial_dims = 2

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
        logits = self.head(x).float()  # float32 out, also under autocast (engine.precision)
        return (logits, x.float()) if return_features else logits


class UNet3D(BasicUNet):
    """MONAI's ``BasicUNet`` with ``spatial_dims=3`` (four 2x down-sampling stages), whose
    forward pass also returns the last decoder stage's features.

    Channels per stage are ``(b, b, 2b, 4b, 8b, b)`` with ``b = base_channels`` (MONAI's
    default is b = 32); instance normalisation and LeakyReLU as MONAI's default; ``dropout``
    in every convolution block (MONAI's choice: the teacher's perturbation in the seeds'
    V-Nets). Input sizes must be multiples of 16 along D, H and W.
    """

    spatial_dims = 3
    depth = 4

    def __init__(self, in_channels: int = 1, n_classes: int = 2, *, base_channels: int = 16,
                 dropout: float = 0.1) -> None:
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        b = base_channels
        super().__init__(spatial_dims=3, in_channels=in_channels, out_channels=n_classes,
                         features=(b, b, 2 * b, 4 * b, 8 * b, b), dropout=dropout)
        self.feature_channels = b

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if any(n % self.multiple for n in x.shape[2:]):
            raise ValueError(
                f"input size {tuple(x.shape[2:])} must be a multiple of {self.multiple}; pad the input"
            )
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        u = self.upcat_4(self.down_4(x3), x3)
        u = self.upcat_1(self.upcat_2(self.upcat_3(u, x2), x1), x0)
        logits = self.final_conv(u).float()  # float32 out, also under autocast (engine.precision)
        return (logits, u.float()) if return_features else logits


def build_model(cfg) -> nn.Module:
    """Build the network described by a :class:`~napari_semicl.engine.config.ModelConfig`:
    :class:`UNet2D` for ``spatial_dims = 2``, :class:`UNet3D` for 3."""
    if cfg.spatial_dims == 3:
        return UNet3D(cfg.in_channels, cfg.n_classes, base_channels=cfg.base_channels, dropout=cfg.dropout)
    return UNet2D(
        cfg.in_channels,
        cfg.n_classes,
        base_channels=cfg.base_channels,
        depth=cfg.depth,
        dropout=cfg.dropout,
    )
