"""Heads on the decoder features: projection heads that turn them into embeddings for
contrastive losses, and the aleatoric head with the low-rank Gaussian over logits it
parameterises (AUA, Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import in_float32

#: variance added to exp(log-diagonal) (METHODS.md §2: D = exp(.) + 1e-5)
DIAGONAL_EPS = 1e-5


def _as_planes(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(B, C, *spatial) -> (B, C, N, 1) and the spatial shape: a 1x1 convolution and batch
    norm act on every voxel alike, so 2D layers serve 3D (and any) feature maps."""
    if features.dim() < 3:
        raise ValueError(f"features must be (B, C, *spatial), got shape {tuple(features.shape)}")
    b, c, *spatial = features.shape
    if len(spatial) == 2:  # already planes: the 2D path runs unchanged
        return features, tuple(spatial)
    return features.reshape(b, c, -1, 1), tuple(spatial)


class ProjectionHead(nn.Module):
    """Per-pixel MLP (1x1 convolutions) to ``out_dim`` channels, L2-normalised over channels.

    Input (B, C, H, W) or (B, C, D, H, W) features; output (B, out_dim, *spatial) unit
    vectors (``normalise=True``); the same weights serve 2D and 3D.
    Use :meth:`project_vectors` for already pooled (N, C) features. ``n_layers`` counts the
    convolutions (each but the last followed by batch norm and ReLU); 2 by default, 3 for
    the BCL/PCL head of AUA.
    """

    def __init__(
        self, in_channels: int, out_dim: int = 128, hidden: int | None = None, *, normalise: bool = True,
        n_layers: int = 2,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        hidden = hidden or max(in_channels, out_dim)
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(n_layers - 1):
            layers += [nn.Conv2d(c_in, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
            c_in = hidden
        layers.append(nn.Conv2d(c_in, out_dim, 1))
        self.net = nn.Sequential(*layers)
        self.normalise = normalise

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat, spatial = _as_planes(features)
        z = self.net(flat).float()  # float32 out, also under autocast
        z = z.reshape(z.shape[0], z.shape[1], *spatial)
        return F.normalize(z, dim=1) if self.normalise else z

    def project_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, out_dim), through the same layers (as 1x1 'images')."""
        z = self.net(vectors[:, :, None, None])[:, :, 0, 0].float()
        return F.normalize(z, dim=1) if self.normalise else z


class AleatoricHead(nn.Module):
    """The covariance branches of a low-rank Gaussian over logits (AUA, Eq. 5).

    Two 1x1 convolutions on the last decoder features (B, C, *spatial), 2D or 3D: the log of
    the diagonal ``log_d`` (B, K, *spatial) and the low-rank factor ``factor``
    (B, K, rank, *spatial). The mean
    of the Gaussian is the segmentation network's own 1x1 output convolution, so the plain
    network keeps predicting ``mu`` (:func:`low_rank_logit_distribution` builds the
    distribution, :func:`sample_logits` draws from it).

    Parameters
    ----------
    in_channels : int
        Channels of the decoder features.
    n_classes : int
        K, logits per pixel.
    rank : int
        r, columns of the factor.
    """

    def __init__(self, in_channels: int, n_classes: int, rank: int = 8) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.n_classes, self.rank = int(n_classes), int(rank)
        self.log_diagonal = nn.Conv2d(in_channels, n_classes, 1)
        self.factor = nn.Conv2d(in_channels, n_classes * rank, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat, spatial = _as_planes(features)
        b = flat.shape[0]
        factor = self.factor(flat).float().view(b, self.n_classes, self.rank, *spatial)  # float32 out
        return self.log_diagonal(flat).float().view(b, self.n_classes, *spatial), factor


class LowRankLogitGaussian:
    """``N(loc, F F^T + D)`` over a batch of flattened logit maps, for reparameterised sampling.

    What AUA needs of Eq. 5 is samples and their gradients, never a density. torch's
    ``LowRankMultivariateNormal`` factorises its capacitance matrix ``I + F^T D^-1 F``
    (Cholesky) when it is built, for ``log_prob`` and ``entropy``; with a tiny diagonal and
    factor columns that grow alike during training that r x r matrix is singular in float32
    and the factorisation fails ("not positive-definite"; a cohort run stopped so at step
    587). Sampling needs no factorisation: ``loc + F e_r + sqrt(D) e_N`` with standard normal
    ``e_r`` (r values) and ``e_N`` (N values) has covariance ``F F^T + D`` exactly.

    Parameters
    ----------
    loc : Tensor
        (B, N) means.
    cov_factor : Tensor
        (B, N, r) low-rank factor F.
    cov_diag : Tensor
        (B, N) positive diagonal D.
    """

    def __init__(self, loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor) -> None:
        if cov_factor.shape[:-1] != loc.shape or cov_diag.shape != loc.shape:
            raise ValueError(
                f"shapes do not agree: loc {tuple(loc.shape)}, cov_factor {tuple(cov_factor.shape)} "
                f"(expected loc's + (r,)), cov_diag {tuple(cov_diag.shape)} (expected loc's)"
            )
        self.loc, self.cov_factor, self.cov_diag = loc, cov_factor, cov_diag

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """(B, N, N) ``F F^T + D``: for checks on small N only."""
        return self.cov_factor @ self.cov_factor.transpose(-1, -2) + torch.diag_embed(self.cov_diag)

    def rsample(self, sample_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        """(*sample_shape, B, N) samples that carry gradients to loc, F and D (global RNG)."""
        sample_shape = tuple(sample_shape)
        opts = {"dtype": self.loc.dtype, "device": self.loc.device}
        e_r = torch.randn(sample_shape + self.cov_factor.shape[:-2] + self.cov_factor.shape[-1:] + (1,), **opts)
        e_n = torch.randn(sample_shape + self.loc.shape, **opts)
        return self.loc + (self.cov_factor @ e_r).squeeze(-1) + self.cov_diag.sqrt() * e_n


@in_float32
def low_rank_logit_distribution(
    mu: torch.Tensor, log_diagonal: torch.Tensor, factor: torch.Tensor
) -> LowRankLogitGaussian:
    """Eq. 5: ``N(mu, F F^T + D)`` over each image's flattened logits.

    Parameters
    ----------
    mu, log_diagonal : Tensor
        (B, K, *spatial) mean and log of the diagonal; ``D = exp(log_diagonal) + 1e-5``;
        spatial is (H, W) or (D, H, W).
    factor : Tensor
        (B, K, r, *spatial) low-rank factor F.

    Returns
    -------
    LowRankLogitGaussian
        Over (B, K*prod(spatial)) logits, flattened in (K, *spatial) order,
        so that ``sample.view(mu.shape)`` is a logit map.
    """
    b = mu.shape[0]
    r = factor.shape[2]
    loc = mu.reshape(b, -1)
    cov_factor = factor.movedim(2, -1).reshape(b, -1, r)
    cov_diag = log_diagonal.reshape(b, -1).exp() + DIAGONAL_EPS
    return LowRankLogitGaussian(loc, cov_factor, cov_diag)


@in_float32
def sample_logits(dist: LowRankLogitGaussian, n_samples: int, *, antithetic: bool = True) -> torch.Tensor:
    """(S, B, N) reparameterised samples; antithetic pairs ``mu + e`` and ``mu - e``.

    With ``antithetic`` the first S/2 samples are ``mu + e_j`` and the last S/2 are
    ``mu - e_j`` for S/2 independent draws ``e_j ~ N(0, F F^T + D)`` (S must be even).
    """
    if not antithetic:
        return dist.rsample((n_samples,))
    if n_samples % 2:
        raise ValueError(f"n_samples must be even for antithetic sampling, got {n_samples}")
    dev = dist.rsample((n_samples // 2,)) - dist.loc
    return torch.cat([dist.loc + dev, dist.loc - dev])
