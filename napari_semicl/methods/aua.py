"""AUA + BCL + PCL: aleatoric-uncertainty adaptive consistency and stage-adaptive contrast.

Wu, Li & Cheng, "Exploring feature representation learning for semi-supervised medical
image segmentation", IEEE TMI (shared/papers/001_cbbdac219ee3d98a.txt), read as in
METHODS.md §2. Equation numbers are the paper's; docs/methods/aua.md maps each to code.

Stage 1 (Eq. 14), steps ``< stage2_at * iterations``:

* Eq. 3-5, supervised: a low-rank Gaussian over the logits of each labelled crop (mean: the
  U-Net's output convolution; diagonal and rank-r factor: :class:`~..models.AleatoricHead`),
  S antithetic samples, ``-(LSE_s log p(y | g_s) - log S) / #pixels``, averaged with the
  Dice of ``softmax(mu)`` (losses ``'ce'`` and ``'dice'``, each half of the average).
* Eq. 6-9, consistency on unlabelled crops: the generalized energy distance between S student
  samples (weak view) and S teacher samples (weak view + clamped Gaussian noise), with the
  generalized Dice distance of Eq. 8 on the softmaxed samples, weight
  ``ged_weight * exp(-5 (1 - t/t_max)^2)`` (loss ``'ged'``).
* Eq. 10, BCL on near-boundary pixels of the labelled crops, weight ``bcl_weight``
  (loss ``'bcl'``).

Stage 2 (Eq. 15): the stage-1 teacher is frozen as the pseudo-labeller; the student (from
the stage-1 weights or re-initialised, ``stage2_init``) learns ``mean(CE, Dice)`` on
labelled + pseudo-labelled crops (``'ce'``, ``'dice'``) plus ``pcl_weight`` x PCL (Eq. 12)
against running class statistics of the projected features (Eq. 13) (``'pcl'``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from ..data.annotation import IGNORE_INDEX
from ..data.augment import weak_augment
from ..errors import CheckpointError, ConfigError, check_choice, check_positive
from ..models import build_model
from ..models.heads import AleatoricHead, ProjectionHead
from ..models.ops import argmax_classes
from .base import StageChange, eval_mode, review_arrays
from .losses import masked_cross_entropy, masked_dice_loss, sigmoid_rampup
from .mean_teacher import MeanTeacher, ema_update

log = logging.getLogger(__name__)

STAGE2_INIT_CHOICES = ("continue", "restart")
COVARIANCE_CHOICES = ("full", "diagonal")
#: variance added to exp(log-diagonal) (METHODS.md §2: D = exp(.) + 1e-5)
DIAGONAL_EPS = 1e-5


@dataclass
class AUAConfig:
    """AUA + BCL + PCL settings (METHODS.md §2; defaults: the paper's where it gives one).

    rank : r of the low-rank covariance factor (Eq. 5). n_samples : S, Monte-Carlo samples per
    image for Eq. 3-4 and Eq. 7 (even when ``antithetic``). antithetic : draw S/2 samples and
    use ``mu +- (g - mu)``. ged_weight : lambda_g's maximum (Eq. 9). ged_rampup_steps :
    t_max of lambda_g(t) = ged_weight exp(-5 (1 - t/t_max)^2); None = the length of stage 1.
    teacher_noise, teacher_noise_clip : the teacher sees ``x + clamp(noise N(0,1), +-clip)``.
    bcl_weight : lambda_c (Eq. 14; 0.09 at 20% labels, 0.01 at 5%). bcl_tau : tau_1 (Eq. 10).
    boundary_pixels : N_b, near-boundary pixels sampled per labelled crop. embed_dim :
    channels of the 3-layer projection head (BCL and PCL). stage2_at : stage 2 starts at step
    ``round(stage2_at * iterations)``; >= 1 = stage 1 only. stage2_init : {'continue',
    'restart'}; stage 2 continues from the stage-1 weights or re-initialises the student (the
    authors' scripts). pcl_weight : lambda_r (Eq. 15). pcl_tau : tau_2 (Eq. 12).
    pcl_covariance : {'full', 'diagonal'} class covariances of Eq. 12-13. review_samples :
    S of the aleatoric samples shown for review. review_window : side (pixels) of the windows
    a large slice is sampled in for review (memory bound).
    """

    rank: int = 8
    n_samples: int = 10
    antithetic: bool = True
    ged_weight: float = 0.15
    ged_rampup_steps: int | None = None
    teacher_noise: float = 0.1
    teacher_noise_clip: float = 0.2
    bcl_weight: float = 0.01
    bcl_tau: float = 0.07
    boundary_pixels: int = 256
    embed_dim: int = 16
    stage2_at: float = 0.6
    stage2_init: str = "continue"
    pcl_weight: float = 0.1
    pcl_tau: float = 100.0
    pcl_covariance: str = "full"
    review_samples: int = 8
    review_window: int = 256

    def validate(self, path: str = "aua") -> None:
        if self.rank < 1:
            raise ConfigError(f"{path}.rank must be >= 1, got {self.rank}")
        if self.n_samples < 2:
            raise ConfigError(f"{path}.n_samples must be >= 2, got {self.n_samples}")
        if self.antithetic and self.n_samples % 2:
            raise ConfigError(f"{path}.n_samples must be even with antithetic sampling, got {self.n_samples}")
        check_positive(f"{path}.ged_weight", self.ged_weight, allow_zero=True)
        if self.ged_rampup_steps is not None:
            check_positive(f"{path}.ged_rampup_steps", self.ged_rampup_steps, allow_zero=True)
        check_positive(f"{path}.teacher_noise", self.teacher_noise, allow_zero=True)
        check_positive(f"{path}.teacher_noise_clip", self.teacher_noise_clip, allow_zero=True)
        check_positive(f"{path}.bcl_weight", self.bcl_weight, allow_zero=True)
        check_positive(f"{path}.bcl_tau", self.bcl_tau)
        if self.boundary_pixels < 2:
            raise ConfigError(f"{path}.boundary_pixels must be >= 2, got {self.boundary_pixels}")
        if self.embed_dim < 1:
            raise ConfigError(f"{path}.embed_dim must be >= 1, got {self.embed_dim}")
        check_positive(f"{path}.stage2_at", self.stage2_at, allow_zero=True)
        check_choice(f"{path}.stage2_init", self.stage2_init, STAGE2_INIT_CHOICES)
        check_positive(f"{path}.pcl_weight", self.pcl_weight, allow_zero=True)
        check_positive(f"{path}.pcl_tau", self.pcl_tau)
        check_choice(f"{path}.pcl_covariance", self.pcl_covariance, COVARIANCE_CHOICES)
        if self.review_samples < 1:
            raise ConfigError(f"{path}.review_samples must be >= 1, got {self.review_samples}")
        if self.review_window < 16:
            raise ConfigError(f"{path}.review_window must be >= 16, got {self.review_window}")


# --- Eq. 3-5: the low-rank Gaussian over logits and the Monte-Carlo likelihood -------------
def low_rank_logit_distribution(
    mu: torch.Tensor, log_diagonal: torch.Tensor, factor: torch.Tensor
) -> LowRankMultivariateNormal:
    """Eq. 5: ``N(mu, F F^T + D)`` over each image's flattened logits.

    Parameters
    ----------
    mu, log_diagonal : Tensor
        (B, K, H, W) mean and log of the diagonal; ``D = exp(log_diagonal) + 1e-5``.
    factor : Tensor
        (B, K, r, H, W) low-rank factor F.

    Returns
    -------
    LowRankMultivariateNormal
        Batch shape (B,), event shape (K*H*W,), flattened in (K, H, W) order, so that
        ``sample.view(B, K, H, W)`` is a logit map.
    """
    b, _, _, _ = mu.shape
    r = factor.shape[2]
    loc = mu.reshape(b, -1)
    cov_factor = factor.permute(0, 1, 3, 4, 2).reshape(b, -1, r)
    cov_diag = log_diagonal.reshape(b, -1).exp() + DIAGONAL_EPS
    return LowRankMultivariateNormal(loc, cov_factor, cov_diag, validate_args=False)


def sample_logits(dist: LowRankMultivariateNormal, n_samples: int, *, antithetic: bool = True) -> torch.Tensor:
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


def mc_supervised_loss(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4: ``-(LSE_s log p(y | g_s) - log S)`` per image, divided by its valid pixels.

    Parameters
    ----------
    samples : Tensor
        (S, B, K, H, W) logit samples.
    target : Tensor
        (B, H, W) long class indices, ``IGNORE_INDEX`` where no loss applies.

    Returns
    -------
    Tensor
        Mean over the images with a valid pixel (0 with a gradient path if none).
        ``log p(y | g_s)`` is Eq. 2, the sum over valid pixels of ``log softmax(g_s)_y``;
        with S identical samples this is the per-image mean cross-entropy.
    """
    s = samples.shape[0]
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p = samples.log_softmax(dim=2)
    index = safe[None, :, None].expand(s, -1, 1, -1, -1)
    ll = (log_p.gather(2, index).squeeze(2) * valid).sum(dim=(2, 3))  # (S, B)
    n = valid.sum(dim=(1, 2))
    keep = n > 0
    if not bool(keep.any()):
        return samples.sum() * 0.0
    nll = -(torch.logsumexp(ll, dim=0) - math.log(s))
    return (nll[keep] / n[keep]).mean()


# --- Eq. 6-8: generalized energy distance with the generalized Dice distance ----------------
def generalized_dice_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 8 as printed: ``1 - <a, b> / (<a, a> + <b, b>)`` over the last axis.

    a, b : (..., N) flattened maps (pixels x classes). Note the printed form has no factor 2:
    ``d(y, y) = 1/2``; it is ``1/2 + 1/2 (1 - 2<a,b>/(|a|^2 + |b|^2))``, so in the energy
    distance (where the constant cancels) it gives exactly half of the usual Dice distance.
    """
    ab = (a * b).sum(-1)
    return 1.0 - ab / ((a * a).sum(-1) + (b * b).sum(-1))


def _pairwise_dice_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(S, B, N), (T, B, N) -> (B, S, T) distances of Eq. 8 between every pair."""
    ab = torch.einsum("sbn,tbn->bst", a, b)
    aa = (a * a).sum(-1).transpose(0, 1)  # (B, S)
    bb = (b * b).sum(-1).transpose(0, 1)  # (B, T)
    return 1.0 - ab / (aa[:, :, None] + bb[:, None, :])


def generalized_energy_distance(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 7 with the 1/S^2 averages of METHODS.md §2, mean over images.

    ``2/(S T) sum d(s, t) - 1/S^2 sum d(s, s') - 1/T^2 sum d(t, t')`` over all pairs (the
    equal-index pairs included, as in Eq. 7), d from :func:`generalized_dice_distance`.

    Parameters
    ----------
    p_student, p_teacher : Tensor
        (S, B, N) and (T, B, N) softmaxed samples, each image flattened over (K, H, W).
    """
    d_st = _pairwise_dice_distance(p_student, p_teacher).mean(dim=(1, 2))
    d_ss = _pairwise_dice_distance(p_student, p_student).mean(dim=(1, 2))
    d_tt = _pairwise_dice_distance(p_teacher, p_teacher).mean(dim=(1, 2))
    return (2 * d_st - d_ss - d_tt).mean()


# --- Eq. 10: boundary-aware contrast -----------------------------------------------------------
def boundary_mask(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Near-boundary pixels: valid pixels with a valid 8-neighbour of another class.

    For each class c this is ``dilation(c) - c`` (the outer ring) plus ``c - erosion(c)``
    (the inner rim), 1-pixel radius, joined over the classes; pixels with ``IGNORE_INDEX``
    are never boundary pixels nor make one. target : (B, H, W) long; returns (B, H, W) bool.
    """
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, n_classes).permute(0, 3, 1, 2).float() * valid[:, None]
    near = F.max_pool2d(onehot, 3, stride=1, padding=1)  # classes within the 3x3 neighbourhood
    return valid & (near.sum(dim=1) >= 2)


def sample_pixels(mask: torch.Tensor, max_per_image: int, generator: torch.Generator | None) -> torch.Tensor:
    """A (B, H, W) bool subset of ``mask`` with at most ``max_per_image`` pixels per image.

    Random (``generator``) where an image has more; ``generator=None`` takes evenly spaced
    pixels instead (deterministic, for review).
    """
    out = torch.zeros_like(mask)
    flat_out = out.view(mask.shape[0], -1)
    for i, m in enumerate(mask.view(mask.shape[0], -1)):
        idx = m.nonzero().squeeze(1)
        if idx.numel() > max_per_image:
            if generator is None:
                pick = torch.linspace(0, idx.numel() - 1, max_per_image).round().long().to(idx.device)
            else:
                pick = torch.randperm(idx.numel(), generator=generator)[:max_per_image].to(idx.device)
            idx = idx[pick]
        flat_out[i, idx] = True
    return out


def pixel_vectors(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) features at the (B, H, W) ``mask`` -> (N, D), in ``tensor[mask]`` order.

    ``features.permute(0, 2, 3, 1)[mask]``: row n belongs to the same pixel as
    ``labels[mask][n]`` and ``mask.nonzero()[n]``.
    """
    return features.permute(0, 2, 3, 1)[mask]


def supervised_contrastive_loss(
    z: torch.Tensor, labels: torch.Tensor, tau: float, *, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 10 (SupCon): ``-1/|P(i)| sum_{p in P(i)} log exp(z_i.z_p/tau) / sum_{o != i} exp(z_i.z_o/tau)``.

    Parameters
    ----------
    z : Tensor
        (N, D) unit embeddings.
    labels : Tensor
        (N,) classes.
    tau : float
        Temperature tau_1.
    groups : Tensor, optional
        (N,) image index; O(i) and P(i) only hold pixels of i's image (Eq. 10 is per image).

    Returns
    -------
    Tensor
        The mean over the anchors with at least one positive (0 with a gradient path if
        none). The paper's sum over NB is read as this mean (SupCon's reduction), so that
        lambda_c does not depend on N_b.
    """
    n = z.shape[0]
    sim = z @ z.T / tau
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    others = ~eye
    if groups is not None:
        others = others & (groups[:, None] == groups[None, :])
    pos = others & (labels[:, None] == labels[None, :])
    sim = sim.masked_fill(~others, torch.finfo(sim.dtype).min / 2)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    per_anchor = -(log_prob * pos).sum(dim=1)[has] / n_pos[has]
    return per_anchor.mean()


# --- Eq. 12-13: prototype-aware contrast with running class statistics -----------------------
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


# --- review helpers ----------------------------------------------------------------------------
def sample_disagreement(samples: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(S, H, W) class samples -> (H, W) entropy of their class histogram / log K, in [0, 1]."""
    s = samples.shape[0]
    p = F.one_hot(samples, n_classes).sum(dim=0).float() / s  # (H, W, K)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
    return (ent / math.log(n_classes)).clamp(0.0, 1.0)


def _windows(h: int, w: int, size: int) -> Iterator[tuple[slice, slice]]:
    for r in range(0, h, size):
        for c in range(0, w, size):
            yield slice(r, min(r + size, h)), slice(c, min(c + size, w))


# --- the method --------------------------------------------------------------------------------
class AUA(MeanTeacher):
    """AUA + BCL (stage 1) then pseudo-labels + PCL (stage 2), in the one training loop.

    Trainable extras: the aleatoric head (``modules['aleatoric']``, Eq. 5) and its EMA copy
    on the teacher side (``modules['teacher_aleatoric']``), and the 3-layer projection head of
    BCL/PCL (``modules['projection']``). Buffers (checkpointed): the stage, the step stage 2
    began, the frozen stage-1 teacher and aleatoric head (the pseudo-labeller) and the
    running class statistics of Eq. 13.

    In stage 2 the teacher stays an EMA of the student (the predictor the plugin uses; after
    a restart it is reset to the new student and its EMA ramp restarts). Aleatoric samples
    for review come from the stage-1 model (the teacher in stage 1, the frozen stage-1
    snapshot in stage 2): stage 2 does not train the aleatoric head.
    """

    name = "aua"
    review_layers = ("aleatoric_disagreement",)

    def __init__(self, config, student: nn.Module) -> None:
        super().__init__(config, student)
        cfg = self.cfg
        self.n_classes = int(config.model.n_classes)
        channels = int(getattr(student, "feature_channels", config.model.base_channels))
        head = self.add_module("aleatoric", AleatoricHead(channels, self.n_classes, cfg.rank))
        self.add_module("teacher_aleatoric", self.make_ema_copy(head))
        self.add_module("projection", ProjectionHead(channels, cfg.embed_dim, cfg.embed_dim, n_layers=3))
        self.stage = 1
        self.stage2_step = -1
        self.pseudo_labeller: nn.Module | None = None
        self.pseudo_aleatoric: nn.Module | None = None
        self.stats = ClassStatistics(
            self.n_classes, cfg.embed_dim, diagonal=cfg.pcl_covariance == "diagonal", device=self.device
        )
        self._last: dict[str, torch.Tensor] = {}

    @property
    def cfg(self) -> AUAConfig:
        return self.config.aua

    @property
    def switch_step(self) -> int | None:
        """The step stage 2 starts at (None: stage 1 only)."""
        if self.cfg.stage2_at >= 1:
            return None
        return round(self.cfg.stage2_at * self.config.iterations)

    def ged_weight(self, step: int) -> float:
        """lambda_g(t) = ged_weight exp(-5 (1 - t/t_max)^2) (Eq. 9, METHODS.md §2)."""
        t_max = self.cfg.ged_rampup_steps
        if t_max is None:
            t_max = self.switch_step if self.switch_step is not None else self.config.iterations
        return self.cfg.ged_weight * sigmoid_rampup(step, t_max)

    # --- stages ------------------------------------------------------------------------------
    def before_step(self, step: int) -> StageChange | None:
        switch = self.switch_step
        if self.stage == 1 and switch is not None and step >= switch:
            return self.start_stage2(step)
        return None

    def start_stage2(self, step: int) -> StageChange:
        """Freeze the stage-1 teacher as the pseudo-labeller; continue or re-initialise."""
        self.pseudo_labeller = self.make_ema_copy(self.teacher).eval()
        self.pseudo_aleatoric = self.make_ema_copy(self.modules["teacher_aleatoric"]).eval()
        self.stage, self.stage2_step = 2, int(step)
        self.stats = ClassStatistics(self.n_classes, self.cfg.embed_dim, diagonal=self.stats.diagonal, device=self.device)
        restart = self.cfg.stage2_init == "restart"
        if restart:
            self._reinitialise()
        what = "re-initialised network" if restart else "the stage-1 weights"
        return StageChange(
            f"AUA stage 2 from step {step}: pseudo-labels of the stage-1 model + PCL, starting from {what}",
            reset_optimizer=restart,
        )

    @torch.no_grad()
    def _reinitialise(self) -> None:
        """Fresh student and projection head weights (seeded, the global RNG untouched);
        the teacher becomes a copy of the new student."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 1)
            fresh = build_model(self.config.model)
            proj = self.modules["projection"]
            fresh_proj = ProjectionHead(proj.net[0].in_channels, self.cfg.embed_dim, self.cfg.embed_dim, n_layers=3)
        self.student.load_state_dict(fresh.state_dict())
        proj.load_state_dict(fresh_proj.state_dict())
        self.teacher.load_state_dict(self.student.state_dict())

    # --- the step -------------------------------------------------------------------------------
    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = weak_augment(batch.x_l, batch.y_l, generator=generator)
        u = None if batch.x_u is None else weak_augment(batch.x_u, generator=generator)[0]
        if self.stage == 1:
            return self._stage1(x, y, u, step, generator)
        return self._stage2(x, y, u)

    def _distribution(self, logits, features, head) -> LowRankMultivariateNormal:
        log_d, factor = head(features)
        return low_rank_logit_distribution(logits, log_d, factor)

    def _softmax_samples(self, dist, shape) -> torch.Tensor:
        s = self.cfg.n_samples
        g = sample_logits(dist, s, antithetic=self.cfg.antithetic).view(s, *shape)
        return g.softmax(dim=2).reshape(s, shape[0], -1)

    def _stage1(self, x, y, u, step: int, generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if u is None:
            l_logits, l_feat = self.student(x, return_features=True)
        else:
            (l_logits, l_feat), (u_logits, u_feat) = self.student_forward(x, u, return_features=True)
        dist = self._distribution(l_logits, l_feat, self.modules["aleatoric"])
        s = cfg.n_samples
        samples = sample_logits(dist, s, antithetic=cfg.antithetic).view(s, *l_logits.shape)
        losses = {  # L_sup_au (Eq. 3-4) averaged with the Dice of softmax(mu)
            "ce": 0.5 * mc_supervised_loss(samples, y),
            "dice": 0.5 * masked_dice_loss(l_logits, y),
        }
        if cfg.bcl_weight > 0:
            losses["bcl"] = cfg.bcl_weight * self._bcl(l_feat, y, generator)
        if u is not None and cfg.ged_weight > 0:
            with torch.no_grad():
                noise = (cfg.teacher_noise * torch.randn(u.shape, generator=generator)).to(u.device, u.dtype)
                noise = noise.clamp(-cfg.teacher_noise_clip, cfg.teacher_noise_clip)
                t_logits, t_feat = self.teacher(u + noise, return_features=True)
                t_dist = self._distribution(t_logits, t_feat, self.modules["teacher_aleatoric"])
                p_t = self._softmax_samples(t_dist, t_logits.shape)
            s_dist = self._distribution(u_logits, u_feat, self.modules["aleatoric"])
            p_s = self._softmax_samples(s_dist, u_logits.shape)
            losses["ged"] = self.ged_weight(step) * generalized_energy_distance(p_s, p_t)
        return losses

    def _bcl(self, features, y, generator) -> torch.Tensor:
        """Eq. 10 on at most N_b random near-boundary pixels of each labelled crop."""
        sel = sample_pixels(boundary_mask(y, self.n_classes), self.cfg.boundary_pixels, generator)
        if int(sel.sum()) < 2:
            self._last = {}
            return features.sum() * 0.0
        emb = self.modules["projection"](features)
        z = pixel_vectors(emb, sel)
        labels = y[sel]
        groups = sel.nonzero()[:, 0]
        self._remember(z, labels, torch.ones_like(labels, dtype=torch.bool))
        return supervised_contrastive_loss(z, labels, self.cfg.bcl_tau, groups=groups)

    def _stage2(self, x, y, u) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if u is None:
            logits, feat = self.student(x, return_features=True)
            target = y
        else:
            (l_logits, l_feat), (u_logits, u_feat) = self.student_forward(x, u, return_features=True)
            with torch.no_grad():
                pseudo = argmax_classes(self.pseudo_labeller(u))
            logits, feat = torch.cat([l_logits, u_logits]), torch.cat([l_feat, u_feat])
            target = torch.cat([y, pseudo])
        losses = {  # L_sup_ced (Eq. 15): the average of CE and Dice
            "ce": 0.5 * masked_cross_entropy(logits, target),
            "dice": 0.5 * masked_dice_loss(logits, target),
        }
        if cfg.pcl_weight > 0:
            valid = target != IGNORE_INDEX
            emb = self.modules["projection"](feat)
            z = pixel_vectors(emb, valid)
            labels = target[valid]
            self.stats.update(z, labels)  # Eq. 13, then Eq. 12 with the updated statistics
            losses["pcl"] = cfg.pcl_weight * prototype_contrastive_loss(z, labels, self.stats, cfg.pcl_tau)
            is_labelled = (torch.arange(target.shape[0], device=target.device) < x.shape[0])[:, None, None]
            self._remember(z, labels, is_labelled.expand_as(target)[valid])
        return losses

    def _remember(self, z, labels, is_labelled, limit: int = 2048) -> None:
        """Keep (evenly spaced, at most ``limit``) embeddings of this step for review()."""
        n = z.shape[0]
        idx = torch.linspace(0, n - 1, min(n, limit)).round().long().to(z.device)
        self._last = {
            "embeddings": z.detach()[idx],
            "embedding_labels": labels[idx],
            "embedding_is_labelled": is_labelled[idx],
        }

    def after_step(self, step: int) -> None:
        if self.stage == 1:
            super().after_step(step)
            ema_update(self.modules["teacher_aleatoric"], self.modules["aleatoric"], step, self.mt.ema_alpha)
            return
        # stage 2: the teacher follows the student; after a restart its EMA ramp restarts too
        t = step - self.stage2_step if self.cfg.stage2_init == "restart" else step
        ema_update(self.teacher, self.student, t, self.mt.ema_alpha)

    # --- state --------------------------------------------------------------------------------
    def buffers_state(self) -> dict:
        return {
            "stage": torch.tensor(self.stage),
            "stage2_step": torch.tensor(self.stage2_step),
            "stats": self.stats.state(),
            "pseudo_labeller": {} if self.pseudo_labeller is None else self.pseudo_labeller.state_dict(),
            "pseudo_aleatoric": {} if self.pseudo_aleatoric is None else self.pseudo_aleatoric.state_dict(),
        }

    def load_buffers_state(self, state: dict) -> None:
        try:
            self.stats.load(state["stats"])
            self.stage = int(state["stage"])
            self.stage2_step = int(state["stage2_step"])
            if self.stage == 2:
                self.pseudo_labeller = self.make_ema_copy(self.teacher)
                self.pseudo_labeller.load_state_dict(state["pseudo_labeller"])
                self.pseudo_labeller.eval()
                self.pseudo_aleatoric = self.make_ema_copy(self.modules["teacher_aleatoric"])
                self.pseudo_aleatoric.load_state_dict(state["pseudo_aleatoric"])
                self.pseudo_aleatoric.eval()
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the AUA state in the checkpoint does not fit this run: {str(exc).splitlines()[0]}") from None

    # --- review -------------------------------------------------------------------------------
    def review(self) -> dict[str, np.ndarray]:
        """Embeddings of the last step: BCL's boundary pixels (stage 1) or PCL's pixels (stage 2).

        'embeddings' (N, D) float32 unit vectors; 'embedding_labels' (N,) int64 classes
        (ground truth, or pseudo-labels in stage 2); 'embedding_is_labelled' (N,) bool.
        At most 2048, evenly spaced over the step's pixels.
        """
        return review_arrays(self._last)

    def _aleatoric_model(self) -> tuple[nn.Module, nn.Module]:
        if self.stage == 2 and self.pseudo_labeller is not None:
            return self.pseudo_labeller, self.pseudo_aleatoric
        return self.teacher, self.modules["teacher_aleatoric"]

    def _window_size(self, net: nn.Module) -> int:
        multiple = int(getattr(net, "multiple", 1))
        return max(multiple, self.cfg.review_window // multiple * multiple)

    @torch.no_grad()
    def _sample_windows(self, x, n_samples, valid_shape, *, with_embeddings: bool):
        """Aleatoric samples (and their disagreement, and embeddings) window by window."""
        h, w = valid_shape if valid_shape is not None else tuple(x.shape[-2:])
        net, head = self._aleatoric_model()
        size = self._window_size(net)
        samples = np.empty((n_samples, h, w), np.int64)
        disagreement = np.empty((h, w), np.float32)
        emb, labels, coords = [], [], []
        antithetic = self.cfg.antithetic and n_samples % 2 == 0
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
        proj = self.modules["projection"]
        with torch.random.fork_rng(devices=devices), eval_mode(net, head, self.student, proj):
            torch.manual_seed(self.config.seed)
            for rows, cols in _windows(x.shape[-2], x.shape[-1], size):
                if rows.start >= h or cols.start >= w:
                    continue
                xw = x[..., rows, cols]
                vh, vw = min(rows.stop, h) - rows.start, min(cols.stop, w) - cols.start
                logits, feat = net(xw, return_features=True)
                dist = self._distribution(logits, feat, head)
                g = sample_logits(dist, n_samples, antithetic=antithetic).view(n_samples, *logits.shape)
                cls = argmax_classes(g[:, 0])[:, :vh, :vw]  # (S, vh, vw)
                samples[:, rows.start:rows.start + vh, cols.start:cols.start + vw] = cls.cpu().numpy()
                disagreement[rows.start:rows.start + vh, cols.start:cols.start + vw] = (
                    sample_disagreement(cls, self.n_classes).cpu().numpy()
                )
                if with_embeddings:
                    s_logits, s_feat = self.student(xw, return_features=True)
                    pred = argmax_classes(s_logits)
                    pred[:, vh:, :] = IGNORE_INDEX
                    pred[:, :, vw:] = IGNORE_INDEX
                    mask = boundary_mask(pred, self.n_classes) if self.stage == 1 else pred != IGNORE_INDEX
                    mask = sample_pixels(mask, self.cfg.boundary_pixels, None)
                    emb.append(pixel_vectors(proj(s_feat), mask).float().cpu().numpy())
                    labels.append(pred[mask].cpu().numpy().astype(np.int64))
                    rc = mask[0].nonzero().cpu().numpy() + np.array([rows.start, cols.start])
                    coords.append(rc.astype(np.float32))
        out = {"aleatoric_samples": samples, "aleatoric_disagreement": disagreement}
        if with_embeddings:
            d = self.cfg.embed_dim
            out["embeddings"] = np.concatenate(emb) if emb else np.zeros((0, d), np.float32)
            out["embedding_labels"] = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            out["pixel_coords"] = np.concatenate(coords) if coords else np.zeros((0, 2), np.float32)
        return out

    def sample_aleatoric(self, x, n_samples, valid_shape=None) -> np.ndarray:
        """(S, h, w) int64 arg-max classes of S samples of the stage-1 model's Gaussian (Eq. 5).

        The slice is sampled in windows of ``aua.review_window`` pixels (each window its own
        low-rank Gaussian), so memory stays bounded for large slices; the training RNG
        streams are untouched (the samples are seeded with ``config.seed``).
        """
        return self._sample_windows(x, int(n_samples), valid_shape, with_embeddings=False)["aleatoric_samples"]

    def review_slice(self, x: torch.Tensor, *, valid_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Aleatoric samples, their disagreement and BCL/PCL embeddings of one whole slice.

        Returns
        -------
        dict
            'aleatoric_samples' (S, h, w) int64 (S = ``aua.review_samples``, see
            :meth:`sample_aleatoric`); 'aleatoric_disagreement' (h, w) float32 in [0, 1],
            the entropy of the S samples' class histogram divided by log K; 'embeddings'
            (N, D) float32 student projections (eval mode) of at most ``boundary_pixels``
            pixels per window: near-boundary pixels of the student's prediction in stage 1,
            any pixel in stage 2 (evenly spaced); 'embedding_labels' (N,) int64 the student's
            classes there; 'pixel_coords' (N, 2) float32 (row, col) in slice pixels.
        """
        return self._sample_windows(x, self.cfg.review_samples, valid_shape, with_embeddings=True)


__all__ = [
    "AUA",
    "AUAConfig",
    "ClassStatistics",
    "boundary_mask",
    "generalized_dice_distance",
    "generalized_energy_distance",
    "low_rank_logit_distribution",
    "mc_supervised_loss",
    "pixel_vectors",
    "prototype_contrastive_loss",
    "sample_disagreement",
    "sample_logits",
    "sample_pixels",
    "supervised_contrastive_loss",
]
