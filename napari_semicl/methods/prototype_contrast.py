"""Prototype-aware contrast (PCL, AUA stage 2, Eq. 12-13): running class statistics and the loss.

Wu, Li & Cheng, IEEE TMI (shared/papers/001_cbbdac219ee3d98a.txt), read as in METHODS.md §2:
:class:`ClassStatistics` keeps each class's running mean and (full or diagonal) covariance of
the projected pixel features (Eq. 13); :func:`prototype_contrastive_loss` contrasts each
pixel's (N, D) feature against every class's statistics (Eq. 12).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.ops import in_float32


class ClassStatistics:
    """Per-class running mean and covariance of feature vectors (Eq. 13).

    After updates with batches ``(f_t, y_t)`` the statistics equal the mean and the biased
    covariance (``np.cov(..., bias=True)``) of all vectors of each class seen so far: a batch
    with ``n`` vectors of class c, mean ``m`` and covariance ``C`` merges as
    ``mu <- (N mu + n m)/(N + n)``, ``S <- (N S + n C)/(N + n) + N n (mu - m)(mu - m)^T/(N + n)^2``.
    Kept in float64. ``diagonal=True`` keeps only the variances (K, D).
    """

    def __init__(self, n_classes: int, dim: int, *, diagonal: bool = False, device=None) -> None:
        self.diagonal = diagonal
        self.count = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.mean = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        shape = (n_classes, dim) if diagonal else (n_classes, dim, dim)
        self.cov = torch.zeros(shape, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge (N, D) ``vectors`` with (N,) class ``labels`` (Eq. 13)."""
        vectors = vectors.detach().to(torch.float64)
        for c in labels.unique().tolist():
            f = vectors[labels == c]
            n = f.shape[0]
            m = f.mean(dim=0)
            centred = f - m
            cov_b = (centred * centred).mean(dim=0) if self.diagonal else centred.T @ centred / n
            big_n = float(self.count[c])
            total = big_n + n
            delta = self.mean[c] - m
            spread = delta * delta if self.diagonal else torch.outer(delta, delta)
            self.cov[c] = (big_n * self.cov[c] + n * cov_b) / total + big_n * n * spread / total**2
            self.mean[c] = (big_n * self.mean[c] + n * m) / total
            self.count[c] = total

    def quadratic_forms(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K): ``f^T Sigma_c f`` for every class c."""
        cov = self.cov.to(vectors.dtype)
        if self.diagonal:
            return (vectors * vectors) @ cov.T
        return torch.einsum("nd,kde,ne->nk", vectors, cov, vectors)

    def state(self) -> dict:
        return {"count": self.count.cpu().clone(), "mean": self.mean.cpu().clone(), "cov": self.cov.cpu().clone()}

    def load(self, state: dict) -> None:
        for key in ("count", "mean", "cov"):
            value = state[key]
            if tuple(value.shape) != tuple(getattr(self, key).shape):
                raise CheckpointError(
                    f"the AUA class statistics '{key}' have shape {tuple(value.shape)}, this run needs "
                    f"{tuple(getattr(self, key).shape)} (classes, aua.embed_dim, aua.pcl_covariance)"
                )
            setattr(self, key, value.to(getattr(self, key).device, torch.float64).clone())


@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def prototype_contrastive_loss(
    vectors: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics, tau: float
) -> torch.Tensor:
    """Eq. 12, for K classes: ``mean_i f_i^T S_y f_i - mean_i log softmax_c(z_ic)_{y_i}``.

    ``z_ic = f_i . mu_c / tau + f_i^T S_c f_i / (2 tau^2)`` with the (detached) running
    statistics of class c; classes never seen are left out of the softmax. With two classes
    this is Eq. 12 (positive class y_i, negative class the other); the leading
    ``f^T sigma_p f`` of Eq. 12 is read as averaged over the pixels like the second term.
    vectors : (N, D); labels : (N,) long.
    """
    q = stats.quadratic_forms(vectors)  # (N, K)
    z = vectors @ stats.mean.to(vectors.dtype).T / tau + q / (2 * tau**2)
    z = z.masked_fill(~(stats.count > 0)[None], torch.finfo(z.dtype).min / 2)
    own = labels[:, None]
    log_p = z.gather(1, own).squeeze(1) - torch.logsumexp(z, dim=1)
    return q.gather(1, own).squeeze(1).mean() - log_p.mean()
