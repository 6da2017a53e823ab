"""Boundary-aware contrast (BCL, AUA's Eq. 10): near-boundary pixels and SupCon on them.

Wu, Li & Cheng, IEEE TMI (shared/papers/001_cbbdac219ee3d98a.txt), read as in METHODS.md §2:
on the labelled crops, at most N_b near-boundary pixels per image (:func:`boundary_mask`,
:func:`sample_pixels`) are projected to unit vectors (:func:`pixel_vectors` keeps each row
aligned with its label) and pulled together by class with the supervised contrastive loss
(Khosla et al., NeurIPS 2020, arXiv:2004.11362), :func:`supervised_contrastive_loss`.
Layouts: labels (B, H, W) long with ``IGNORE_INDEX`` where unknown, masks (B, H, W) bool,
features (B, D, H, W), embeddings (N, D).
"""

from __future__ import annotations

import torch

from ..data.annotation import IGNORE_INDEX
from ..models.ops import channels_last, in_float32, max_pool, one_hot_channels


def boundary_mask(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Near-boundary pixels: valid pixels with a valid 8-neighbour of another class.

    For each class c this is ``dilation(c) - c`` (the outer ring) plus ``c - erosion(c)``
    (the inner rim), 1-pixel radius, joined over the classes; pixels with ``IGNORE_INDEX``
    are never boundary pixels nor make one. target : (B, H, W) long; returns (B, H, W) bool.
    A (B, D, H, W) target of volume patches uses the 3x3x3 (26-)neighbourhood.
    """
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target))
    onehot = one_hot_channels(safe, n_classes).float() * valid[:, None]
    near = max_pool(onehot, 3, stride=1, padding=1)  # classes within the 3x3 (3x3x3) neighbourhood
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
    """(B, D, H, W) features at the (B, H, W) ``mask`` -> (N, D), in ``tensor[mask]`` order
    (volume patches: (B, D, Z, H, W) at a (B, Z, H, W) mask).

    ``features.permute(0, 2, 3, 1)[mask]``: row n belongs to the same pixel as
    ``labels[mask][n]`` and ``mask.nonzero()[n]``.
    """
    return channels_last(features)[mask]


@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
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
