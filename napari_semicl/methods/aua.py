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

One concept per module: the low-rank Gaussian over logits (Eq. 5) beside its head in
:mod:`napari_semicl.models.heads`; the generalized energy distance (Eq. 6-8) in
:mod:`.energy_distance`; BCL (Eq. 10) in :mod:`.boundary_contrast`; PCL's class statistics
and loss (Eq. 12-13) in :mod:`.prototype_contrast`; the review-window tiler in
:mod:`napari_semicl.models.ops`. This module keeps the settings, the Monte-Carlo likelihood
(Eq. 3-4), the two stages and the review. The names are re-exported here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.annotation import IGNORE_INDEX
from ..errors import CheckpointError, ConfigError, check_choice, check_positive
from ..models import build_model
from ..models.heads import (AleatoricHead, LowRankLogitGaussian, ProjectionHead, low_rank_logit_distribution,
                            sample_logits)
from ..models.ops import argmax_classes, in_float32, normalised_entropy, window_slices
from .base import StageChange, eval_mode, review_arrays, weak_augment
from .boundary_contrast import boundary_mask, pixel_vectors, sample_pixels, supervised_contrastive_loss
from .energy_distance import generalized_dice_distance, generalized_energy_distance
from .losses import masked_cross_entropy, masked_dice_loss, sigmoid_rampup
from .mean_teacher import MeanTeacher, ema_update
from .prototype_contrast import ClassStatistics, prototype_contrastive_loss

log = logging.getLogger(__name__)

STAGE2_INIT_CHOICES = ("continue", "restart")
COVARIANCE_CHOICES = ("full", "diagonal")


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


# --- Eq. 3-4: the Monte-Carlo likelihood of the low-rank Gaussian (Eq. 5, models.heads) -------
@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def mc_supervised_loss(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4: ``-(LSE_s log p(y | g_s) - log S)`` per image, divided by its valid pixels.

    Parameters
    ----------
    samples : Tensor
        (S, B, K, H, W) logit samples ((S, B, K, D, H, W) for volume patches).
    target : Tensor
        (B, H, W) long class indices, ``IGNORE_INDEX`` where no loss applies ((B, D, H, W)).

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
    index = safe[None, :, None].expand(s, -1, 1, *target.shape[1:])
    pixels = tuple(range(2, target.dim() + 1))  # the spatial axes of (S, B, *spatial)
    ll = (log_p.gather(2, index).squeeze(2) * valid).sum(dim=pixels)  # (S, B)
    n = valid.sum(dim=tuple(range(1, target.dim())))
    keep = n > 0
    if not bool(keep.any()):
        return samples.sum() * 0.0
    nll = -(torch.logsumexp(ll, dim=0) - math.log(s))
    return (nll[keep] / n[keep]).mean()


# --- review helpers ----------------------------------------------------------------------------
def sample_disagreement(samples: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(S, H, W) class samples -> (H, W) entropy of their class histogram / log K, in [0, 1]."""
    p = F.one_hot(samples, n_classes).sum(dim=0).float() / samples.shape[0]  # (H, W, K)
    return normalised_entropy(p, dim=-1)


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
    config_class = AUAConfig
    review_analyses = ("aleatoric",)
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
        x, y = self.labelled_view(batch, generator)
        u = None if batch.x_u is None else weak_augment(batch.x_u, generator=generator)[0]
        if self.stage == 1:
            return self._stage1(x, y, u, step, generator)
        return self._stage2(x, y, u)

    def _distribution(self, logits, features, head) -> LowRankLogitGaussian:
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
            is_labelled = (torch.arange(target.shape[0], device=target.device) < x.shape[0])
            is_labelled = is_labelled.view(-1, *[1] * (target.dim() - 1))
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
            for rows, cols in window_slices(x.shape[-2], x.shape[-1], size):
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
