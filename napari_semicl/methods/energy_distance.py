"""Generalized energy distance with the generalized Dice distance (AUA's consistency, Eq. 6-8).

Wu, Li & Cheng, "Exploring feature representation learning for semi-supervised medical
image segmentation", IEEE TMI (shared/papers/001_cbbdac219ee3d98a.txt), read as in
METHODS.md §2: the distance between the sample sets of two stochastic segmentations (the
student's and the teacher's aleatoric samples of the same crop), with the Dice distance of
Eq. 8 between single samples. Layouts: samples are softmaxed maps flattened per image,
(S, B, N) with N = K*H*W.
"""

from __future__ import annotations

import torch

from ..models.ops import in_float32


@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
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


@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
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
