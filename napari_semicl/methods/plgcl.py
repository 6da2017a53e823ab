"""PLGCL: pseudo-label guided patch contrastive learning on a mean teacher (METHODS.md §1).

Basak & Yin, "Pseudo-label guided contrastive learning for semi-supervised medical image
segmentation", CVPR 2023 (shared/papers/000_07763fe99ab6758f.txt). Equation numbers are
the paper's.

Per step (B_L labelled, B_U unlabelled crops):

* Eq. 7, supervised: CE (+ Dice, ``supervised_dice``) of the student on the weak view of
  the labelled crops, unpainted pixels ignored.
* Eq. 6, regularisation: ``CE(student logits on the strong view, argmax teacher on the weak
  view)`` on the unlabelled crops, weight ``beta``.
* After ``warmup_steps``: Eq. 5 on non-overlapping P x P patches of all B_L + B_U crops
  (anchors: student embeddings; keys: teacher embeddings; positives chosen by entropy,
  :mod:`~napari_semicl.methods.patch_sampling`), weight ``gamma``.
* Eq. 8: the weighted sum. Eq. 9-10: EMA teacher (and EMA projection head) after each step,
  with ``mean_teacher.ema_alpha`` (METHODS.md §0).

Losses by name: ``'ce'``, ``'dice'`` (Eq. 7), ``'consistency'`` (beta x Eq. 6), ``'plgcl'``
(gamma x Eq. 5, after warm-up).

Eq. 6-8 and the EMA updates, the patch selection and the queue are shared with Semi-AGCL
(:mod:`~napari_semicl.methods.patch_contrast`, where Eq. 6 is
:func:`~napari_semicl.methods.patch_contrast.regularisation_loss`); this module adds Eq. 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_choice, check_positive
from .base import eval_mode
from ..models.ops import in_float32
from .patch_contrast import PatchBatch, PatchContrastMethod
from .patch_sampling import extract_patches

EMBEDDING_CHOICES = ("pooled", "image")
REDUCTION_CHOICES = ("mean", "none")


@dataclass
class PLGCLConfig:
    """PLGCL settings (defaults: the paper's, METHODS.md §1).

    beta : weight of the regularisation CE (Eq. 6, 8). gamma : weight of L_PLGCL (Eq. 8).
    tau : temperature of Eq. 5. lambda_cov : lambda of Eq. 5 (weight of the covariance
    terms), ramped linearly from 0 over ``lambda_rampup_steps`` steps after the warm-up.
    zeta : scale of the negative terms of Eq. 5; None or 0 = the number of keys of each
    negative class. n_positives : n, entropy-nearest positives per anchor. patch_size : P,
    side of the non-overlapping patches (pixels). warmup_steps : steps with L_sup + L_reg
    only. queue_size : teacher keys kept per class (0 = current batch only). embed_dim :
    projection dimension. eps : clamp margin of the entropy and the ridge ``eps * I`` of
    the covariances. embedding : {'pooled', 'image'}; 'pooled' averages decoder features in
    each patch, 'image' encodes each patch as a separate image through the encoder (the
    authors' code; P must be a multiple of ``2**model.depth``). supervised_dice : add Dice
    to the CE of Eq. 7 as the other methods do.
    """

    beta: float = field(default=0.25, metadata={"label": "Regularisation CE weight (β)"})
    gamma: float = field(default=0.2, metadata={"label": "Contrastive loss weight (γ)"})
    tau: float = field(default=0.2, metadata={"label": "Contrast temperature (τ)"})
    lambda_cov: float = field(default=4.0, metadata={"label": "Covariance weight (λ)"})
    lambda_rampup_steps: int = field(default=200, metadata={
        "label": "λ ramp-up steps", "help": "steps over which lambda_cov ramps up linearly from 0 after the warm-up"})
    zeta: float | None = field(default=None, metadata={"label": "Negative-term scale (ζ)"})
    n_positives: int = field(default=20, metadata={"label": "Positives per anchor (n)"})
    patch_size: int = field(default=16, metadata={"label": "Entropy patch side (P, pixels)"})
    warmup_steps: int = field(default=100, metadata={"label": "Warm-up steps (no contrast)"})
    queue_size: int = field(default=256, metadata={"label": "Teacher keys kept per class"})
    embed_dim: int = field(default=128, metadata={"label": "Projection dimension"})
    eps: float = field(default=1e-6, metadata={"label": "Entropy clamp / ridge (ε)"})
    embedding: str = field(default="pooled", metadata={"label": "Patch embedding"})
    supervised_dice: bool = field(default=True, metadata={"label": "Dice in the supervised loss"})

    def validate(self, path: str = "plgcl") -> None:
        check_positive(f"{path}.beta", self.beta, allow_zero=True)
        check_positive(f"{path}.gamma", self.gamma, allow_zero=True)
        check_positive(f"{path}.tau", self.tau)
        check_positive(f"{path}.lambda_cov", self.lambda_cov, allow_zero=True)
        check_positive(f"{path}.lambda_rampup_steps", self.lambda_rampup_steps, allow_zero=True)
        if self.zeta is not None:
            check_positive(f"{path}.zeta", self.zeta, allow_zero=True)
        if self.n_positives < 1:
            raise ConfigError(f"{path}.n_positives must be >= 1, got {self.n_positives}")
        if self.patch_size < 2:
            raise ConfigError(f"{path}.patch_size must be >= 2, got {self.patch_size}")
        check_positive(f"{path}.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive(f"{path}.queue_size", self.queue_size, allow_zero=True)
        if self.embed_dim < 1:
            raise ConfigError(f"{path}.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0 < self.eps < 0.5:
            raise ConfigError(f"{path}.eps must be in (0, 0.5), got {self.eps}")
        check_choice(f"{path}.embedding", self.embedding, EMBEDDING_CHOICES)


class PLGCLLoss(nn.Module):
    """Pseudo-label guided contrastive loss, Eq. 5 of Basak & Yin (CVPR 2023).

    For an anchor ``f`` (unit vector) of class k::

        L = log[ exp(f.mu+ / tau + lam / (2 tau^2) f^T S+ f)
                 + sum_{c != k} zeta_c exp(f.mu_c / tau + lam / (2 tau^2) f^T S_c f) ]
            - f.mu+ / tau

    ``mu+``, ``S+``: mean and biased covariance (``+ eps I``) of the anchor's positive keys;
    ``mu_c``, ``S_c``: the same over the keys of class c. ``zeta_c`` is ``zeta`` or, when
    ``zeta`` is None or 0, the number of keys of class c. The quadratic forms are computed
    as ``f^T S f = mean_v (f.(k_v - mu))^2 + eps |f|^2`` (no D x D matrix is formed).

    Parameters
    ----------
    tau : float
        Temperature (> 0).
    eps : float
        Ridge added to every covariance (>= 0).
    zeta : float or None
        Scale of the negative terms (None or 0: the per-class key count).
    reduction : {'mean', 'none'}
        'mean' over the anchors that have a positive; 'none' returns (A,) with NaN for
        anchors without a positive.

    Notes
    -----
    Layouts: ``anchors`` (A, D), ``anchor_classes`` (A,) long, ``positive_keys`` (A, n, D),
    ``positive_mask`` (A, n) bool, ``keys`` (M, D), ``key_classes`` (M,) long in 0..K-1.
    Keys are detached (teacher side); the gradient flows into ``anchors`` only.
    """

    def __init__(self, tau: float = 0.2, *, eps: float = 1e-6, zeta: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if zeta is not None and zeta < 0:
            raise ValueError(f"zeta must be None or >= 0, got {zeta}")
        if reduction not in REDUCTION_CHOICES:
            raise ValueError(f"reduction must be one of {set(REDUCTION_CHOICES)}, got {reduction!r}")
        self.tau, self.eps, self.zeta, self.reduction = tau, eps, zeta, reduction

    @in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
    def forward(
        self,
        anchors: torch.Tensor,
        anchor_classes: torch.Tensor,
        positive_keys: torch.Tensor,
        positive_mask: torch.Tensor,
        keys: torch.Tensor,
        key_classes: torch.Tensor,
        *,
        n_classes: int,
        lam: float = 0.0,
    ) -> torch.Tensor:
        f = anchors
        tau = self.tau
        scale = lam / (2 * tau**2)
        ridge = self.eps * (f * f).sum(dim=1)  # eps f^T I f, (A,)
        positive_keys, keys = positive_keys.detach(), keys.detach()
        # positive statistics, one set per anchor
        w = positive_mask.to(f.dtype)
        count = w.sum(dim=1)
        has_pos = count > 0
        mu_pos = (w.unsqueeze(-1) * positive_keys).sum(dim=1) / count.clamp_min(1).unsqueeze(1)
        f_mu_pos = (f * mu_pos).sum(dim=1)
        f_k = torch.einsum("ad,and->an", f, positive_keys)
        q_pos = (w * (f_k - f_mu_pos.unsqueeze(1)) ** 2).sum(dim=1) / count.clamp_min(1) + ridge
        a = f_mu_pos / tau
        pos_term = a + scale * q_pos
        # per-class statistics of the keys
        onehot = F.one_hot(key_classes, n_classes).to(f.dtype)  # (M, K)
        n_c = onehot.sum(dim=0)
        mu_c = onehot.t() @ keys / n_c.clamp_min(1).unsqueeze(1)  # (K, D)
        f_mu_c = f @ mu_c.t()  # (A, K)
        centred = f @ keys.t() - f_mu_c[:, key_classes]  # (A, M)
        q_c = (centred**2) @ onehot / n_c.clamp_min(1) + ridge.unsqueeze(1)  # (A, K)
        zeta_c = n_c if not self.zeta else torch.full_like(n_c, float(self.zeta))
        neg = torch.log(zeta_c.clamp_min(1e-30)) + f_mu_c / tau + scale * q_c
        other = torch.arange(n_classes, device=f.device).unsqueeze(0) != anchor_classes.unsqueeze(1)
        usable = other & (n_c > 0).unsqueeze(0) & (zeta_c > 0).unsqueeze(0)
        neg = torch.where(usable, neg, torch.full_like(neg, -math.inf))
        loss = torch.logsumexp(torch.cat([pos_term.unsqueeze(1), neg], dim=1), dim=1) - a
        if self.reduction == "none":
            return torch.where(has_pos, loss, torch.full_like(loss, math.nan))
        if not bool(has_pos.any()):
            return f.sum() * 0.0
        return loss[has_pos].mean()


def encode_patch_images(model: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Encoder features of patch images, global-average-pooled: (N, C, P, P) -> (N, C_b).

    Runs the U-Net's encoder path (``encoders`` with ``pool`` between stages) only; P must
    be a multiple of ``2**model.depth``.
    """
    if not all(hasattr(model, a) for a in ("encoders", "pool", "depth")):
        raise ValueError("embedding='image' needs a U-Net with `encoders`, `pool` and `depth` (UNet2D)")
    h = patches
    for i, enc in enumerate(model.encoders):
        h = enc(h)
        if i < model.depth:
            h = model.pool(h)
    return h.mean(dim=(-2, -1))


class PLGCL(PatchContrastMethod):
    """Mean teacher + CE regularisation + pseudo-label guided patch contrast (PLGCL).

    The mean teacher, the regularisation, the patch selection, the projection heads and the
    per-class FIFO queue of teacher embeddings are :class:`~.patch_contrast.PatchContrastMethod`'s;
    this class adds Eq. 5 (:class:`PLGCLLoss`) and the 'image' embedding.

    In each contrastive step every patch with a (pseudo-)label is an anchor (student
    embedding: strong view for unlabelled crops, weak view for labelled ones). Its positive
    keys are the teacher embeddings (weak view) of the ``n_positives`` entropy-nearest
    patches of its class in the batch; the keys of a negative class c are the teacher
    embeddings of the batch's class-c patches plus the class-c queue. The queue is filled
    with the batch's teacher keys after the loss is computed.
    """

    name = "plgcl"
    config_class = PLGCLConfig
    section = "plgcl"
    contrast_losses = ("plgcl",)
    bank_name = "PLGCL queue"

    def __init__(self, config, student: nn.Module) -> None:
        super().__init__(config, student)
        cfg = self.cfg
        self.loss_fn = PLGCLLoss(cfg.tau, eps=cfg.eps, zeta=cfg.zeta)

    @property
    def cfg(self) -> PLGCLConfig:
        return self.config.plgcl

    def projection_in_channels(self, config, student: nn.Module) -> int:
        cfg = config.plgcl
        if cfg.embedding != "image":
            return super().projection_in_channels(config, student)
        if config.model.spatial_dims == 3:
            raise ConfigError(
                "plgcl.embedding='image' (each patch through the encoder) is for the slice network; with "
                "model.spatial_dims = 3 use plgcl.embedding='pooled' (decoder features averaged in each block)"
            )
        multiple = 2 ** config.model.depth
        if cfg.patch_size % multiple:
            raise ConfigError(
                f"plgcl.patch_size ({cfg.patch_size}) must be a multiple of 2**model.depth ({multiple}) "
                "with embedding='image'"
            )
        return config.model.base_channels * 2 ** config.model.depth

    def lambda_at(self, step: int) -> float:
        """lambda of Eq. 5: 0 at the end of the warm-up, linear up to ``lambda_cov``."""
        cfg = self.cfg
        if cfg.lambda_rampup_steps <= 0:
            return float(cfg.lambda_cov)
        t = min(max(step - cfg.warmup_steps, 0), cfg.lambda_rampup_steps) / cfg.lambda_rampup_steps
        return float(cfg.lambda_cov) * t

    def contrast_active(self, step: int) -> bool:
        return self.cfg.gamma > 0 and step >= self.cfg.warmup_steps

    # --- the step -------------------------------------------------------------------------
    def _embed(self, side: str, views: torch.Tensor, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(N, D) unit embeddings of the valid patches, through the student or teacher side."""
        if self.cfg.embedding != "image":
            return self.project(side, features, valid)
        net = self.student if side == "student" else self.teacher
        head = self.modules["projection" if side == "student" else "teacher_projection"]
        return head.project_vectors(encode_patch_images(net, extract_patches(views, self.cfg.patch_size)[valid]))

    def contrastive_losses(self, patches: PatchBatch, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        sel = patches.selection
        with torch.no_grad():
            t_emb = self._embed("teacher", patches.teacher_view, patches.teacher_features, sel.valid)
        s_emb = self._embed("student", torch.cat(patches.student_views), patches.student_features, sel.valid)
        q_keys, q_classes = self.bank.contents()
        keys = torch.cat([t_emb, q_keys])
        key_classes = torch.cat([sel.classes, q_classes])
        loss = self.loss_fn(
            s_emb, sel.classes, t_emb[sel.positives], sel.positive_mask, keys, key_classes,
            n_classes=self.n_classes, lam=self.lambda_at(step),
        )
        self.bank.push(t_emb, sel.classes, generator)  # FIFO per class
        self._last = {
            "patch_entropy": sel.entropy,
            "embeddings": s_emb.detach(),
            "embedding_labels": sel.classes,
            "embedding_is_labelled": sel.image_index < patches.n_labelled,
            "patch_centres": sel.centres,
            "patch_image_index": sel.image_index,
        }
        return {"plgcl": cfg.gamma * loss}

    # --- review ------------------------------------------------------------------------------
    def review(self) -> dict[str, np.ndarray]:
        """Arrays of the last contrastive step (empty during the warm-up).

        'patch_entropy' (B, K, H', W') float32 per-image Ent^k maps (Eq. 2);
        'embeddings' (N, D) float32 student embeddings of the valid patches;
        'embedding_labels' (N,) int64 patch classes; 'embedding_is_labelled' (N,) bool;
        'patch_centres' (N, 2) float32 (row, col) in crop pixels; 'patch_image_index' (N,)
        int64, the crop of each patch (labelled crops first).
        """
        return super().review()

    @torch.no_grad()
    def review_slice(self, x: torch.Tensor, *, valid_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The patch sampler on one whole slice, as on an unlabelled crop.

        The teacher (eval mode) predicts the slice; its softmax is the class confidence
        and its arg-max the patch classes (:meth:`~.patch_contrast.PatchContrastMethod.slice_patches`,
        as in the unlabelled path of a step). When H or W is not a multiple of P the slice is
        padded further with zeros (bottom and right) so that every pixel lies in a patch.

        Returns
        -------
        dict
            'patch_entropy' (K, h, w) float32: ``Ent^k`` (Eq. 2) of every class k of the
            class table, each patch's value repeated over its P x P pixels;
            'embeddings' (N, D) float32 teacher-side embeddings of the patches that hold
            slice pixels; 'embedding_labels' (N,) int64 their classes (majority of the
            teacher's arg-max); 'patch_centres' (N, 2) float32 (row, col) in slice pixels.
            ``(h, w)`` is ``valid_shape`` (default: the size of ``x``).
        """
        with eval_mode(self.teacher, self.modules["teacher_projection"]):
            sp = self.slice_patches(x, valid_shape)
            sel = sp.selection
            emb = self._embed("teacher", sp.x, sp.features, sel.valid) if sel.classes.numel() else None
        d = self.cfg.embed_dim
        return {
            "patch_entropy": sp.entropy_map(self.cfg.patch_size).float().cpu().numpy(),
            "embeddings": (np.zeros((0, d), np.float32) if emb is None else emb.float().cpu().numpy()),
            "embedding_labels": sel.classes.cpu().numpy().astype(np.int64),
            "patch_centres": sel.centres.float().cpu().numpy(),
        }
