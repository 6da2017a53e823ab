"""Semi-AGCL: affinity-graph-guided contrast with hard negatives on a mean teacher (METHODS.md §3).

Cheng, Yuan & Lukasiewicz, "Affinity-Graph-Guided Contractive Learning for Pretext-Free
Medical Image Segmentation with Minimal Annotation" (shared/papers/003_8d7b57ba569572b4.txt).
Equation numbers are the paper's; where METHODS.md §3 decides an ambiguity it is followed.

Per step (B_L labelled, B_U unlabelled crops):

* ``L_sup``: CE (+ Dice, ``supervised_dice``) of the student on the weak view of the
  labelled crops, unpainted pixels ignored.
* ``L_reg``: CE of the student (strong view) against the teacher's arg-max (weak view) on
  the unlabelled crops, weight ``beta`` (as PLGCL's Eq. 6, :func:`.patch_contrast.regularisation_loss`).
* After ``warmup_steps``, on patches chosen by PLGCL's entropy sampler
  (:mod:`~napari_semicl.methods.patch_sampling`, shared, Eq. 1 of this paper):

  - Eq. 2, :func:`affinity_matrix`: ``A_ij = exp(-|y_t^i - y_s^j|^2 / (2 sigma^2))`` between
    teacher (weak view) and student (strong view) patch embeddings, ``sigma`` the median
    distance (:func:`adaptive_bandwidth`) unless fixed.
  - Eq. 3, :class:`AffinityGraphLoss`: ``L_AGG^PL = -(1/N) tr(A) + (gamma/N) ||A||_*``.
  - Eq. 6, :func:`closest_negative_pairs` + :func:`mix_hard_negatives`:
    ``h = normalise(A_ii n_i + (1 - A_ii) n_j)``, ``n_i, n_j`` drawn from the anchor's closest
    negatives in the batch keys and a per-class memory bank, ``A_ii`` detached.
  - Eq. 7 (Eq. 4 with the set H), :func:`info_nce`: ``L_AGG^RW``, temperature ``tau``.

* Eq. 8: ``L_sup + beta L_reg + w_PL L_AGG^PL + w_RW L_AGG^RW`` (the weights default to 1,
  ``beta`` to PLGCL's 0.25). EMA teacher and EMA projection head after each step.

Losses by name: ``'ce'``, ``'dice'``, ``'consistency'`` (beta x L_reg), ``'agg_pl'``,
``'agg_rw'`` (after the warm-up).

``L_sup``, ``L_reg``, the entropy sampler, the projection heads, the memory bank and the EMA
updates are shared with PLGCL (:mod:`~napari_semicl.methods.patch_contrast`); this module
adds Eq. 2-3, 6 and 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_positive
from .base import eval_mode
from ..models.ops import in_float32
from .patch_contrast import PatchBatch, PatchContrastMethod

#: torch.quantile refuses inputs above 2**24 elements: N^2 <= 2**24
MAX_PATCHES_LIMIT = 4096


@dataclass
class AGCLConfig:
    """Semi-AGCL settings (METHODS.md §3; see docs/methods/agcl.md).

    beta : weight of L_reg (PLGCL's 0.25). pl_weight, rw_weight : weights of L_AGG^PL and
    L_AGG^RW in Eq. 8 (1 = the paper's plain sum). gamma : weight of the nuclear norm in
    Eq. 3 (> 0: minimised). sigma : bandwidth of Eq. 2; None = adaptive, the median
    teacher-student distance of the step. tau : temperature of Eq. 7. n_positives : n,
    entropy-nearest positives per anchor (PLGCL's sampler). patch_size : P. max_patches :
    N, patches in the affinity graph (a random subset of the batch's when more).
    n_closest : closest negatives an anchor draws its mixing pairs from (Eq. 6).
    n_hard : |H|, hard negatives per anchor. queue_size : memory-bank keys per class.
    embed_dim : projection dimension. warmup_steps : steps with L_sup + L_reg only.
    eps : clamp margin of the patch entropy. supervised_dice : add Dice to L_sup.
    """

    beta: float = 0.25
    pl_weight: float = 1.0
    rw_weight: float = 1.0
    gamma: float = 1.0
    sigma: float | None = None
    tau: float = 0.2
    n_positives: int = 20
    patch_size: int = 16
    max_patches: int = 256
    n_closest: int = 64
    n_hard: int = 32
    queue_size: int = 256
    embed_dim: int = 128
    warmup_steps: int = 100
    eps: float = 1e-6
    supervised_dice: bool = True

    def validate(self, path: str = "agcl") -> None:
        for name in ("beta", "pl_weight", "rw_weight", "gamma", "warmup_steps", "queue_size"):
            check_positive(f"{path}.{name}", getattr(self, name), allow_zero=True)
        if self.sigma is not None:
            check_positive(f"{path}.sigma", self.sigma)
        check_positive(f"{path}.tau", self.tau)
        for name in ("n_positives", "n_closest", "n_hard", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size < 2:
            raise ConfigError(f"{path}.patch_size must be >= 2, got {self.patch_size}")
        if not 2 <= self.max_patches <= MAX_PATCHES_LIMIT:
            raise ConfigError(f"{path}.max_patches must be in 2..{MAX_PATCHES_LIMIT}, got {self.max_patches}")
        if not 0 < self.eps < 0.5:
            raise ConfigError(f"{path}.eps must be in (0, 0.5), got {self.eps}")


# --- Eq. 2: the affinity graph ----------------------------------------------------------------
@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def squared_distances(y_t: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
    """``D_ij = |y_t^i - y_s^j|^2`` for (N, D) and (M, D) rows -> (N, M), >= 0.

    Computed as ``|y_t^i|^2 + |y_s^j|^2 - 2 y_t^i . y_s^j`` (no square root, so the gradient
    is finite at zero distance).
    """
    d = (y_t * y_t).sum(1, keepdim=True) + (y_s * y_s).sum(1).unsqueeze(0) - 2 * y_t @ y_s.t()
    return d.clamp_min(0)


def adaptive_bandwidth(sq_dist: torch.Tensor, min_sigma: float = 1e-6) -> torch.Tensor:
    """The adaptive sigma of Eq. 2: the median of the distances ``sqrt(D_ij)`` (detached).

    The median over all N x M entries (diagonal included), as ``numpy.median`` (the mean of
    the two middle values for an even count); at least ``min_sigma``. No gradient flows
    through sigma.
    """
    return torch.quantile(sq_dist.detach().flatten().sqrt(), 0.5).clamp_min(min_sigma)


def affinity_matrix(y_t: torch.Tensor, y_s: torch.Tensor, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: ``A_ij = exp(-|y_t^i - y_s^j|^2 / (2 sigma^2))``.

    Parameters
    ----------
    y_t : Tensor
        (N, D) teacher embeddings (rows i).
    y_s : Tensor
        (N, D) student embeddings of the same patches (columns j).
    sigma : float, optional
        Fixed bandwidth; None = :func:`adaptive_bandwidth`.

    Returns
    -------
    A : Tensor
        (N, N), entries in (0, 1]; differentiable in both inputs.
    sigma : Tensor
        The bandwidth used (0-d).
    """
    d = squared_distances(y_t, y_s)
    s = adaptive_bandwidth(d) if sigma is None else torch.as_tensor(float(sigma), dtype=d.dtype, device=d.device)
    return torch.exp(-d / (2 * s * s)), s


# --- Eq. 3: L_AGG^PL ------------------------------------------------------------------------------
class AffinityGraphLoss(nn.Module):
    """Eq. 3 as METHODS.md §3 reads it: ``L_AGG^PL = -(1/N) tr(A) + (gamma/N) ||A||_*``.

    The trace (teacher-student agreement on each patch) is maximised and the nuclear norm
    (sum of singular values, a convex surrogate of the rank) minimised, as the paper's text
    says; its printed sign contradicts the text. ``||A||_*`` is
    ``torch.linalg.matrix_norm(A, 'nuc')``.

    Parameters
    ----------
    gamma : float
        Weight of the nuclear norm (>= 0).
    """

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    @staticmethod
    def terms(affinity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tr(A), ||A||_*)`` of an (N, N) affinity matrix."""
        if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
            raise ValueError(f"the affinity matrix must be square (N, N), got {tuple(affinity.shape)}")
        return torch.diagonal(affinity).sum(), torch.linalg.matrix_norm(affinity, ord="nuc")

    @in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
    def forward(self, affinity: torch.Tensor) -> torch.Tensor:
        trace, nuclear = self.terms(affinity)
        n = affinity.shape[0]
        return (-trace + self.gamma * nuclear) / n


# --- Eq. 6: affinity-guided hard negatives -------------------------------------------------------
@torch.no_grad()
@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def closest_negative_pairs(
    queries: torch.Tensor,
    query_classes: torch.Tensor,
    keys: torch.Tensor,
    key_classes: torch.Tensor,
    *,
    n_closest: int,
    n_hard: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(n_i, n_j)`` pairs of Eq. 6: drawn from each query's closest negatives.

    For a query of class k the negatives are the keys of every other class; the
    ``n_closest`` with the largest dot product with the query (cosine for unit vectors)
    form its set, and ``n_hard`` pairs are drawn from it uniformly, ``i != j`` whenever the
    set has two or more keys (with one key, ``n_i = n_j``).

    Parameters
    ----------
    queries : Tensor
        (A, D) (detached here).
    query_classes : Tensor
        (A,) long.
    keys : Tensor
        (M, D) candidate keys (batch teacher keys and memory bank).
    key_classes : Tensor
        (M,) long.
    n_closest, n_hard : int
        Size of the closest-negative set, number of pairs per query.
    generator : torch.Generator
        A CPU generator (the draws are reproducible).

    Returns
    -------
    index_i, index_j : Tensor
        (A, n_hard) long indices into ``keys`` (0 where the query has no negative).
    has_negative : Tensor
        (A,) bool.
    """
    a = queries.shape[0]
    m = keys.shape[0]
    if m == 0:
        zeros = torch.zeros(a, n_hard, dtype=torch.long, device=queries.device)
        return zeros, zeros, torch.zeros(a, dtype=torch.bool, device=queries.device)
    sim = queries.detach() @ keys.detach().t()
    negative = key_classes.unsqueeze(0) != query_classes.unsqueeze(1)
    sim = torch.where(negative, sim, torch.full_like(sim, -math.inf))
    c = min(n_closest, m)
    top_sim, top_idx = torch.topk(sim, c, dim=1, largest=True, sorted=True)  # finite entries first
    count = torch.isfinite(top_sim).sum(dim=1)  # (A,)
    u_i = torch.rand(a, n_hard, generator=generator).to(queries.device)
    u_j = torch.rand(a, n_hard, generator=generator).to(queries.device)
    cnt = count.unsqueeze(1)
    pos_i = (u_i * cnt).long().clamp(max=(cnt - 1).clamp_min(0))
    # j uniform over the count - 1 others, shifted past i
    others = (cnt - 1).clamp_min(1)
    pos_j = (u_j * others).long().clamp(max=others - 1)
    pos_j = torch.where(cnt >= 2, pos_j + (pos_j >= pos_i).long(), pos_i)
    index_i = top_idx.gather(1, pos_i)
    index_j = top_idx.gather(1, pos_j)
    has = count > 0
    index_i = torch.where(has.unsqueeze(1), index_i, torch.zeros_like(index_i))
    index_j = torch.where(has.unsqueeze(1), index_j, torch.zeros_like(index_j))
    return index_i, index_j, has


def mix_hard_negatives(a_ii: torch.Tensor, n_i: torch.Tensor, n_j: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``h = (A_ii n_i + (1 - A_ii) n_j) / |A_ii n_i + (1 - A_ii) n_j|_2``.

    Parameters
    ----------
    a_ii : Tensor
        (A,) the affinity diagonal of each anchor, in [0, 1]; detached here (the weights
        carry no gradient, METHODS.md §3).
    n_i, n_j : Tensor
        (A, H, D) negative keys.

    Returns
    -------
    Tensor
        (A, H, D) unit vectors (a zero mixture stays zero).
    """
    w = a_ii.detach().to(n_i.dtype).reshape(-1, 1, 1)
    return F.normalize(w * n_i + (1 - w) * n_j, dim=-1)


# --- Eq. 4 / Eq. 7: InfoNCE -------------------------------------------------------------------------
@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def info_nce(
    queries: torch.Tensor,
    positive_keys: torch.Tensor,
    positive_mask: torch.Tensor,
    negatives: torch.Tensor,
    tau: float,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with per-query negatives (Eq. 4; Eq. 7 when the negatives are the set H).

    For query ``q`` and each of its positive keys ``k+``::

        l = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{h in H(q)} exp(q.h / tau)) )

    Parameters
    ----------
    queries : Tensor
        (A, D).
    positive_keys : Tensor
        (A, P, D); several positives give one term each.
    positive_mask : Tensor
        (A, P) bool, which positives are real.
    negatives : Tensor
        (A, H, D) each query's negatives.
    tau : float
        Temperature (> 0).
    reduction : {'mean', 'none'}
        'mean' over the real (query, positive) pairs (0 with a gradient path if none);
        'none' gives (A, P) with NaN where masked.

    Notes
    -----
    Keys and negatives are detached: the gradient flows into the queries only.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pos = torch.einsum("ad,apd->ap", queries, positive_keys.detach()) / tau
    neg = torch.einsum("ad,ahd->ah", queries, negatives.detach()) / tau
    a, p = pos.shape
    logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(a, p, neg.shape[1])], dim=-1)
    loss = torch.logsumexp(logits, dim=-1) - pos
    if reduction == "none":
        return torch.where(positive_mask, loss, torch.full_like(loss, math.nan))
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not bool(positive_mask.any()):
        return queries.sum() * 0.0
    return loss[positive_mask].mean()


# --- the method ---------------------------------------------------------------------------------------
class AGCL(PatchContrastMethod):
    """Mean teacher + CE regularisation + affinity-graph patch contrast (Semi-AGCL).

    The mean teacher, ``L_reg``, the entropy sampler (shared with PLGCL), the projection
    heads and the per-class memory bank of teacher embeddings are
    :class:`~.patch_contrast.PatchContrastMethod`'s; this class adds Eq. 2-3, 6 and 7.

    In each contrastive step up to ``max_patches`` of the patches with a (pseudo-)label (a
    random subset) form the affinity graph: teacher embeddings ``y_t`` (weak view) against
    student embeddings ``y_s`` (strong view for unlabelled crops, weak view for labelled
    ones). The student embedding of each is a query of Eq. 7; its positive keys are its own
    teacher embedding and the teacher embeddings of its entropy-nearest positives; its hard
    negatives mix pairs of its closest negatives (batch teacher keys and the memory bank)
    with weight ``A_ii``. The bank is filled with the batch's teacher keys after the loss.
    """

    name = "agcl"
    config_class = AGCLConfig
    section = "agcl"
    contrast_losses = ("agg_pl", "agg_rw")
    bank_name = "AGCL memory bank"

    def __init__(self, config, student: nn.Module) -> None:
        super().__init__(config, student)
        self.pl_loss = AffinityGraphLoss(self.cfg.gamma)
        #: the bandwidth of Eq. 2 in the last contrastive step (None before the first)
        self.last_sigma: float | None = None

    @property
    def cfg(self) -> AGCLConfig:
        return self.config.agcl

    def contrast_active(self, step: int) -> bool:
        cfg = self.cfg
        return step >= cfg.warmup_steps and (cfg.pl_weight > 0 or cfg.rw_weight > 0)

    # --- the step -------------------------------------------------------------------------
    def contrastive_losses(self, patches: PatchBatch, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        sel = patches.selection
        n_valid = sel.classes.numel()
        with torch.no_grad():
            t_all = self.project("teacher", patches.teacher_features, sel.valid)  # (Nv, D)
            if n_valid > cfg.max_patches:
                sample = torch.randperm(n_valid, generator=generator)[: cfg.max_patches].sort().values.to(self.device)
            else:
                sample = torch.arange(n_valid, device=self.device)
        s_all = self.project("student", patches.student_features, sel.valid)
        y_s, y_t = s_all[sample], t_all[sample]
        classes = sel.classes[sample]
        # Eq. 2 and 3
        affinity, sigma = affinity_matrix(y_t, y_s, cfg.sigma)
        pl = self.pl_loss(affinity)
        self.last_sigma = float(sigma)
        # Eq. 6: hard negatives from the batch keys and the memory bank
        bank_keys, bank_classes = self.bank.contents()
        keys = torch.cat([t_all, bank_keys])
        key_classes = torch.cat([sel.classes, bank_classes])
        idx_i, idx_j, has_neg = closest_negative_pairs(
            y_s, classes, keys, key_classes, n_closest=cfg.n_closest, n_hard=cfg.n_hard, generator=generator
        )
        hard = mix_hard_negatives(torch.diagonal(affinity), keys[idx_i], keys[idx_j])
        # Eq. 7: positives = own teacher key + entropy-nearest teacher keys of the class
        pos_keys = torch.cat([y_t.unsqueeze(1), t_all[sel.positives[sample]]], dim=1)
        pos_mask = torch.cat([torch.ones_like(sel.positive_mask[sample][:, :1]), sel.positive_mask[sample]], dim=1)
        pos_mask = pos_mask & has_neg.unsqueeze(1)
        rw = info_nce(y_s, pos_keys, pos_mask, hard, cfg.tau)
        self.bank.push(t_all, sel.classes, generator)
        self._last = {
            "affinity": affinity.detach(),
            "embeddings": y_s.detach(),
            "embedding_labels": classes,
            "embedding_is_labelled": sel.image_index[sample] < patches.n_labelled,
            "patch_centres": sel.centres[sample],
            "patch_image_index": sel.image_index[sample],
            "patch_entropy": sel.entropy,
        }
        return {"agg_pl": cfg.pl_weight * pl, "agg_rw": cfg.rw_weight * rw}

    # --- review ----------------------------------------------------------------------------------
    def review(self) -> dict[str, np.ndarray]:
        """Arrays of the last contrastive step (empty during the warm-up).

        'affinity' (N, N) float32, Eq. 2 of the N patches of the graph (rows: teacher,
        columns: student; the bandwidth used is ``last_sigma``); 'embeddings' (N, D) float32 student embeddings of the same patches;
        'embedding_labels' (N,) int64 their classes; 'embedding_is_labelled' (N,) bool;
        'patch_centres' (N, 2) float32 (row, col) in crop pixels; 'patch_image_index' (N,)
        int64 (labelled crops first); 'patch_entropy' (B, K, H', W') float32, Ent^k of the
        sampler for every crop.
        """
        return super().review()

    @torch.no_grad()
    def review_slice(self, x: torch.Tensor, *, valid_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The sampler and the affinity graph on one whole slice, as on an unlabelled crop.

        Teacher and student (eval mode) see the same unaugmented slice; the teacher's
        softmax and arg-max give the patch classes and entropies (shared sampler,
        :meth:`~.patch_contrast.PatchContrastMethod.slice_patches`). When H or W is not a
        multiple of P the slice is padded further (zeros, bottom and right).

        Returns
        -------
        dict
            'patch_entropy' (K, h, w) float32, Ent^k of each class, each patch's value over
            its pixels; 'embeddings' (N, D) float32 teacher embeddings of the (up to
            ``max_patches``, the first in grid order) patches holding slice pixels;
            'embedding_labels' (N,) int64; 'patch_centres' (N, 2) float32 (row, col) in
            slice pixels; 'affinity' (N, N) float32, Eq. 2 between their teacher and
            student embeddings. ``(h, w)`` is ``valid_shape`` (default: the size of ``x``).
        """
        cfg = self.cfg
        with eval_mode(self.teacher, self.student, *self.modules.values()):
            sp = self.slice_patches(x, valid_shape)
            sel = sp.selection
            keep = min(int(sel.classes.numel()), cfg.max_patches)
            emb = np.zeros((0, cfg.embed_dim), np.float32)
            affinity = np.zeros((0, 0), np.float32)
            if keep:
                _, s_feat = self.student(sp.x, return_features=True)
                y_t = self.project("teacher", sp.features, sel.valid)[:keep]
                y_s = self.project("student", s_feat, sel.valid)[:keep]
                emb = y_t.float().cpu().numpy()
                affinity = affinity_matrix(y_t.float(), y_s.float(), cfg.sigma)[0].cpu().numpy()
        return {
            "patch_entropy": sp.entropy_map(cfg.patch_size).float().cpu().numpy(),
            "embeddings": emb,
            "embedding_labels": sel.classes[:keep].cpu().numpy().astype(np.int64),
            "patch_centres": sel.centres[:keep].float().cpu().numpy(),
            "affinity": affinity.astype(np.float32, copy=False),
        }
