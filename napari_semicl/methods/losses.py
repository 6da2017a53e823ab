"""Losses shared by the methods: masked cross-entropy + Dice, and consistency terms.

Layout: logits (B, K, H, W); targets (B, H, W) long with ``IGNORE_INDEX`` for pixels that
must not reach the loss (unpainted pixels of scribbled slices, crop padding). Volume
patches, (B, K, D, H, W) and (B, D, H, W), go through the same functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.annotation import IGNORE_INDEX
from ..models.ops import one_hot_channels


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over valid pixels only, averaged over the classes present.

    ``1 - mean_k (2 sum p_k g_k + s) / (sum p_k + sum g_k + s)`` with sums over pixels whose
    target is not ``IGNORE_INDEX``; classes absent from the valid target are skipped.
    Returns 0 (with a gradient path) when no pixel is valid.
    """
    valid = target != IGNORE_INDEX
    probs = logits.softmax(dim=1)
    k = logits.shape[1]
    safe = torch.where(valid, target, torch.zeros_like(target))
    onehot = one_hot_channels(safe, k).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    axes = (0, *range(2, logits.dim()))  # all but the class axis
    inter = (probs * onehot).sum(dim=axes)
    denom = probs.sum(dim=axes) + onehot.sum(dim=axes)
    present = onehot.sum(dim=axes) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice[present].mean()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over valid pixels (0 with a gradient path if none)."""
    if not bool((target != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def supervised_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """METHODS.md §0: CE + Dice on labelled (painted) pixels, returned by name."""
    return {"ce": masked_cross_entropy(logits, target), "dice": masked_dice_loss(logits, target)}


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean Teacher consistency between softmaxes; the teacher side carries no gradient.

    kind : {'mse', 'kl'}; 'mse' is the mean squared difference of the probabilities (Tarvainen
    & Valpola 2017), 'kl' is KL(p_t || p_s) averaged over pixels.
    """
    p_t = teacher_logits.detach().softmax(dim=1)
    if kind == "mse":
        return F.mse_loss(student_logits.softmax(dim=1), p_t)
    if kind == "kl":
        return F.kl_div(student_logits.log_softmax(dim=1), p_t, reduction="none").sum(1).mean()
    raise ValueError(f"kind must be one of {{'mse', 'kl'}}, got {kind!r}")


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """exp(-5 (1 - t/T)^2) for t < T, else 1 (Laine & Aila 2017)."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0), rampup_steps) / rampup_steps
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))
