"""Whole-volume inference: slices in batches, each slice by MONAI's sliding window.

Memory stays bounded by one batch of slices: only the label map (and, on request, the
normalised entropy map) of the whole volume is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..data.annotation import decode_classes
from ..data.dataset import normalise_image, to_slices


@dataclass
class Prediction:
    """labels: label values, the image's spatial shape; entropy: normalised to [0, 1]
    (divided by log K) or None."""

    labels: np.ndarray
    entropy: np.ndarray | None = None


def _window(size: int, multiple: int, max_window: int) -> int:
    return min(int(math.ceil(size / multiple)) * multiple, max_window)


@torch.no_grad()
def predict_slices(
    model: torch.nn.Module,
    slices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 8,
    max_window: int = 512,
    overlap: float = 0.25,
    with_entropy: bool = False,
):
    """Class indices (S, H, W) int64 and optional normalised entropy of (S, C, H, W) slices.

    Each slice is covered by windows of the slice size rounded up to the network's size
    multiple (capped at ``max_window``), blended with Gaussian weights where they overlap.
    """
    was_training = model.training
    model.eval()
    multiple = getattr(model, "multiple", 16)
    s, _, h, w = slices.shape
    roi = (_window(h, multiple, max_window), _window(w, multiple, max_window))
    labels = np.empty((s, h, w), dtype=np.int64)
    entropy = np.empty((s, h, w), dtype=np.float32) if with_entropy else None
    try:
        for start in range(0, s, batch_size):
            x = torch.from_numpy(slices[start:start + batch_size]).to(device)
            logits = sliding_window_inference(
                x, roi, sw_batch_size=batch_size, predictor=model, overlap=overlap, mode="gaussian"
            )
            probs = logits.float().softmax(dim=1)
            labels[start:start + batch_size] = probs.argmax(dim=1).cpu().numpy()
            if with_entropy:
                k = probs.shape[1]
                ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / math.log(k)
                entropy[start:start + batch_size] = ent.clamp(0, 1).cpu().numpy()
    finally:
        model.train(was_training)
    return labels, entropy


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    class_values,
    axis: int = 0,
    rgb: bool = False,
    normalise: str = "percentile",
    device: torch.device,
    batch_size: int = 8,
    with_entropy: bool = False,
) -> Prediction:
    """Predict a 2D image or 3D volume as the network saw it in training.

    Parameters
    ----------
    image : ndarray
        Raw image (normalised here with the training ``normalise`` mode).
    class_values : sequence of int
        The class table: network class i is label value ``class_values[i]``.
    axis : int
        Slicing axis used in training.
    """
    norm = normalise_image(image, normalise, rgb=rgb)
    slices = to_slices(norm, axis, rgb=rgb)
    idx, ent = predict_slices(model, slices, device=device, batch_size=batch_size, with_entropy=with_entropy)
    spatial = image.ndim - (1 if rgb else 0)
    labels = decode_classes(idx, class_values)
    if spatial == 2:
        return Prediction(labels[0], None if ent is None else ent[0])
    labels = np.moveaxis(labels, 0, axis)
    ent = None if ent is None else np.moveaxis(ent, 0, axis)
    return Prediction(np.ascontiguousarray(labels), None if ent is None else np.ascontiguousarray(ent))
