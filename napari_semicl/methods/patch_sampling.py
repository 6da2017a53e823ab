"""Class-aware entropy patch sampling (PLGCL §3.1; shared with Semi-AGCL).

Functions on tensors, no state. An image batch is cut into non-overlapping ``P x P``
patches on a grid of ``H' = H // P`` rows and ``W' = W // P`` columns (a remainder at the
bottom/right edge is left out). Patches are numbered image by image, row by row:
patch ``n = b * H' * W' + i * W' + j`` (see :func:`flatten_patch_grid`).

The sampler, after Basak & Yin, "Pseudo-label guided contrastive learning for
semi-supervised medical image segmentation", CVPR 2023 (shared/papers/000_07763fe99ab6758f.txt;
the equation numbers below are the paper's):

* Eq. 1, average patch confidence: ``Avg^k = mean_{m in patch} C^k(m)``.
* Attended image: ``X'^k = I~ * C^k`` with ``I~`` the image min-max scaled to [0, 1] per
  image and ``C^k`` the class-k confidence (one-hot ground truth for labelled images,
  teacher softmax for unlabelled ones).
* Eq. 3, binary entropy: ``F(x) = -x log x - (1 - x) log(1 - x)``, on ``clamp(x, eps, 1-eps)``.
* Eq. 2, average patch entropy: ``Ent^k = mean_{m in patch} F(X'^k(m))``.
  (METHODS.md writes "Eq. 2-3" for the pair; the paper prints Ent as Eq. 2, F as Eq. 3.)
* Patch class: the majority (pseudo-)label of its pixels, ``IGNORE_INDEX`` pixels left out;
  a patch without a valid pixel has no class and takes part in nothing.
* Positives of an anchor of class k: the ``n`` other patches of class k (across the whole
  batch) nearest to it in ``Ent^k``; negatives: the patches of every other class.

Layouts: images (B, C, H, W) float; confidences (B, K, H, W) float in [0, 1]; labels
(B, H, W) long with ``IGNORE_INDEX`` (= -1) for pixels without a (pseudo-)label; features
(B, D, H, W). Class indices are network classes 0..K-1 (0 = background).

Volume patches of a 3D network take the same functions with a depth axis before H and W:
the patches are then non-overlapping ``P x P x P`` blocks on a (D', H', W') grid, numbered
image by image in raster order, and a patch's entropy, class and pooled feature are means
and votes over its P^3 voxels (docs/methods/three_d.md).

Examples
--------
>>> import torch
>>> images = torch.rand(2, 1, 32, 32)
>>> labels = torch.randint(0, 3, (2, 32, 32))
>>> conf = one_hot_confidence(labels, 3)
>>> sel = select_patches(images, conf, labels, patch_size=16, n_positives=2)
>>> sel.entropy.shape, sel.classes.shape, sel.positives.shape
(torch.Size([2, 3, 2, 2]), torch.Size([8]), torch.Size([8, 2]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.annotation import IGNORE_INDEX
from ..models.ops import argmax_classes, avg_pool, one_hot_channels

__all__ = [
    "IGNORE_INDEX",
    "PatchSelection",
    "attended_images",
    "average_patch_confidence",
    "binary_entropy",
    "extract_patches",
    "flatten_patch_grid",
    "minmax_scale",
    "negative_mask",
    "nearest_entropy_positives",
    "one_hot_confidence",
    "patch_centres",
    "patch_entropy",
    "patch_majority_labels",
    "pool_patches",
    "select_patches",
]


def _check_patch_size(patch_size: int, *spatial: int) -> None:
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if patch_size > min(spatial):
        raise ValueError(f"patch_size {patch_size} is larger than the image ({' x '.join(map(str, spatial))})")


# --- Eq. 3 and the attended image ---------------------------------------------------------
def binary_entropy(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary entropy ``F(x) = -x log x - (1 - x) log(1 - x)`` (paper Eq. 3), elementwise.

    Parameters
    ----------
    x : Tensor
        Any shape, values in [0, 1] (clamped to ``[eps, 1 - eps]`` first, so that 0 and 1
        give a finite value close to 0).
    eps : float
        Clamp margin, in (0, 0.5).

    Returns
    -------
    Tensor
        Same shape, in [0, log 2] (natural logarithm).
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    x = x.clamp(eps, 1 - eps)
    return -x * torch.log(x) - (1 - x) * torch.log1p(-x)


def minmax_scale(images: torch.Tensor) -> torch.Tensor:
    """Scale each image of a (B, C, H, W) batch to [0, 1] (over all its channels and pixels).

    A constant image becomes 0 everywhere.
    """
    b = images.shape[0]
    flat = images.reshape(b, -1)
    lo = flat.amin(dim=1).view(b, *([1] * (images.dim() - 1)))
    hi = flat.amax(dim=1).view(b, *([1] * (images.dim() - 1)))
    span = hi - lo
    return torch.where(span > 0, (images - lo) / span.clamp_min(torch.finfo(images.dtype).tiny), torch.zeros_like(images))


def attended_images(images: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Attended images ``X'^k = I~ * C^k`` for every class k.

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) images in any range (min-max scaled per image here).
    confidence : Tensor
        (B, K, H, W) class confidences in [0, 1].

    Returns
    -------
    Tensor
        (B, K, C, H, W): channel c of class k is ``I~_c * C^k``.
    """
    if (images.dim() not in (4, 5) or confidence.dim() != images.dim() or images.shape[0] != confidence.shape[0]
            or images.shape[2:] != confidence.shape[2:]):
        raise ValueError(
            f"images must be (B, C, [D,] H, W) and confidence (B, K, [D,] H, W) with the same B and spatial shape; "
            f"got {tuple(images.shape)} and {tuple(confidence.shape)}"
        )
    return minmax_scale(images).unsqueeze(1) * confidence.unsqueeze(2)


# --- Eq. 1 and 2: per-patch averages ---------------------------------------------------------
def average_patch_confidence(confidence: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average class confidence of each patch, ``Avg^k`` (paper Eq. 1).

    (B, K, H, W) -> (B, K, H', W'). Kept for comparison with the entropy criterion (the
    paper's Table 3); the sampler itself uses :func:`patch_entropy`.
    """
    _check_patch_size(patch_size, *confidence.shape[2:])
    return avg_pool(confidence, patch_size)


def patch_entropy(images: torch.Tensor, confidence: torch.Tensor, patch_size: int, *, eps: float = 1e-6) -> torch.Tensor:
    """Average patch entropy ``Ent^k = mean_{m in patch} F(X'^k(m))`` (paper Eq. 2).

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) images (min-max scaled per image inside).
    confidence : Tensor
        (B, K, H, W) class confidences in [0, 1].
    patch_size : int
        Side P of the non-overlapping square patches.
    eps : float
        Clamp margin of :func:`binary_entropy`.

    Returns
    -------
    Tensor
        (B, K, H', W'): the mean of ``F`` over the pixels (and channels) of each patch.
    """
    _check_patch_size(patch_size, *images.shape[2:])
    ent = binary_entropy(attended_images(images, confidence), eps).mean(dim=2)  # (B, K, H, W)
    return avg_pool(ent, patch_size)


# --- confidences and patch classes ---------------------------------------------------------------
def one_hot_confidence(labels: torch.Tensor, n_classes: int, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Class confidence of a labelled image: its one-hot ground truth.

    Parameters
    ----------
    labels : Tensor
        (B, H, W) long, ``IGNORE_INDEX`` where unlabelled.
    n_classes : int
        K.
    fallback : Tensor, optional
        (B, K, H, W) confidences (e.g. the teacher's softmax) used at ``IGNORE_INDEX``
        pixels; without it those pixels have confidence 0 for every class.

    Returns
    -------
    Tensor
        (B, K, H, W) float.
    """
    valid = labels != IGNORE_INDEX
    if bool(((labels < 0) & valid).any()) or bool((labels >= n_classes).any()):
        raise ValueError(f"labels must be in 0..{n_classes - 1} or IGNORE_INDEX ({IGNORE_INDEX})")
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    dtype = fallback.dtype if fallback is not None else torch.float32
    onehot = one_hot_channels(safe, n_classes).to(dtype)
    mask = valid.unsqueeze(1)
    if fallback is None:
        return onehot * mask.to(dtype)
    return torch.where(mask, onehot, fallback)


def patch_majority_labels(labels: torch.Tensor, n_classes: int, patch_size: int) -> torch.Tensor:
    """Class of each patch: the most frequent valid (pseudo-)label among its pixels.

    ``IGNORE_INDEX`` pixels do not vote; a patch with no valid pixel gets ``IGNORE_INDEX``.
    Ties go to the lower class index.

    Parameters
    ----------
    labels : Tensor
        (B, H, W) long, values in 0..K-1 or ``IGNORE_INDEX``.
    n_classes : int
        K.
    patch_size : int
        P.

    Returns
    -------
    Tensor
        (B, H', W') long.
    """
    _check_patch_size(patch_size, *labels.shape[1:])
    votes = one_hot_confidence(labels, n_classes)  # zeros at ignored pixels
    counts = avg_pool(votes, patch_size)  # fractions of the patch
    best = argmax_classes(counts)
    return torch.where(counts.sum(dim=1) > 0, best, torch.full_like(best, IGNORE_INDEX))


# --- patch features and locations -------------------------------------------------------------
def pool_patches(features: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average features inside each patch: (B, D, H, W) -> (B, D, H', W') (3D: blocks)."""
    _check_patch_size(patch_size, *features.shape[2:])
    return avg_pool(features, patch_size)


def flatten_patch_grid(grid: torch.Tensor, *, channels: bool | None = None) -> torch.Tensor:
    """(B, D, H', W') -> (B * H' * W', D), or (B, H', W') -> (B * H' * W',).

    Order: image by image, then row by row (patch ``b * H' * W' + i * W' + j``). A 3D grid
    ((B, D, D', H', W') or (B, D', H', W')) is flattened in raster order; since a 3D class
    grid and a 2D feature grid both have 4 axes, say which with ``channels`` (default:
    True for 4 or 5 axes, False for 3).
    """
    if channels is None:
        if grid.dim() not in (3, 4, 5):
            raise ValueError(f"grid must be (B, D, H', W') or (B, H', W') (3D: one axis more), got {tuple(grid.shape)}")
        channels = grid.dim() != 3
    if not channels:
        return grid.reshape(-1)
    return grid.movedim(1, -1).reshape(-1, grid.shape[1])


def extract_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut (B, C, H, W) into (B * H' * W', C, P, P) patch images, in grid order (2D only)."""
    if images.dim() != 4:
        raise ValueError(f"patch images are cut from (B, C, H, W) slices, got shape {tuple(images.shape)}")
    _check_patch_size(patch_size, *images.shape[-2:])
    b, c, h, w = images.shape
    p = patch_size
    hp, wp = h // p, w // p
    x = images[:, :, : hp * p, : wp * p].reshape(b, c, hp, p, wp, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * hp * wp, c, p, p)


def patch_centres(batch: int, grid_shape: tuple[int, ...], patch_size: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres (row, col) and image index of every patch, in grid order.

    Returns
    -------
    centres : Tensor
        (B * H' * W', 2) float32, ``(i * P + (P - 1) / 2, j * P + (P - 1) / 2)``; for a
        3D grid (D', H', W') the centres are (B * D' * H' * W', 3) (z, row, col).
    image_index : Tensor
        (B * H' * W',) long, the image each patch comes from.
    """
    axes = torch.meshgrid(*(torch.arange(n, device=device) for n in grid_shape), indexing="ij")
    one = torch.stack([a.reshape(-1) for a in axes], dim=1).float() * patch_size + (patch_size - 1) / 2
    centres = one.repeat(batch, 1)
    image_index = torch.arange(batch, device=device).repeat_interleave(one.shape[0])
    return centres, image_index


# --- positives and negatives ---------------------------------------------------------------------
def nearest_entropy_positives(
    own_entropy: torch.Tensor, classes: torch.Tensor, n: int, anchors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor, the ``n`` other patches of its class nearest to it in entropy.

    For an anchor of class k the distance to a patch j of class k is
    ``|Ent^k(anchor) - Ent^k(j)|``; since both are of class k this only needs each patch's
    entropy for its own class.

    Parameters
    ----------
    own_entropy : Tensor
        (N,) ``Ent^{class(j)}(j)`` of each patch.
    classes : Tensor
        (N,) long class of each patch (``IGNORE_INDEX`` patches are never chosen).
    n : int
        Positives per anchor (>= 1).
    anchors : Tensor, optional
        (A,) indices of the anchors into the N patches; all patches by default.

    Returns
    -------
    index : Tensor
        (A, n) long indices into the N patches, nearest first; entries beyond the number
        of available positives are 0 and masked.
    mask : Tensor
        (A, n) bool, True where ``index`` is a real positive.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    num = classes.shape[0]
    if anchors is None:
        anchors = torch.arange(num, device=classes.device)
    a_cls = classes[anchors]
    same = (classes.unsqueeze(0) == a_cls.unsqueeze(1)) & (a_cls.unsqueeze(1) != IGNORE_INDEX)
    same[torch.arange(anchors.shape[0], device=classes.device), anchors] = False  # not itself
    dist = (own_entropy.unsqueeze(0) - own_entropy[anchors].unsqueeze(1)).abs()
    dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
    k = min(n, num)
    d, index = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    mask = torch.isfinite(d)
    index = torch.where(mask, index, torch.zeros_like(index))
    if k < n:  # fewer patches than n: pad
        pad = n - k
        index = F.pad(index, (0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return index, mask


def negative_mask(classes: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """(A, N) bool: True where patch j has a class other than the anchor's (both valid)."""
    if anchors is None:
        anchors = torch.arange(classes.shape[0], device=classes.device)
    a_cls = classes[anchors].unsqueeze(1)
    valid = (classes != IGNORE_INDEX).unsqueeze(0) & (a_cls != IGNORE_INDEX)
    return valid & (classes.unsqueeze(0) != a_cls)


@dataclass(frozen=True)
class PatchSelection:
    """The outcome of :func:`select_patches` for one batch.

    Attributes
    ----------
    entropy : Tensor
        (B, K, H', W') average patch entropy (Eq. 2) for every class.
    grid_classes : Tensor
        (B, H', W') patch classes, ``IGNORE_INDEX`` for patches without a valid pixel.
    valid : Tensor
        (B * H' * W',) bool, patches with a class (grid order).
    classes : Tensor
        (N,) long classes of the N valid patches (the rows below index these).
    own_entropy : Tensor
        (N,) each valid patch's entropy for its own class.
    positives : Tensor
        (N, n) long indices (into the N valid patches) of each anchor's positives.
    positive_mask : Tensor
        (N, n) bool, which of ``positives`` are real.
    centres : Tensor
        (N, 2) float pixel centres (row, col) of the valid patches.
    image_index : Tensor
        (N,) long image of each valid patch.
    """

    entropy: torch.Tensor
    grid_classes: torch.Tensor
    valid: torch.Tensor
    classes: torch.Tensor
    own_entropy: torch.Tensor
    positives: torch.Tensor
    positive_mask: torch.Tensor
    centres: torch.Tensor
    image_index: torch.Tensor


@torch.no_grad()
def select_patches(
    images: torch.Tensor,
    confidence: torch.Tensor,
    labels: torch.Tensor,
    *,
    patch_size: int,
    n_positives: int,
    eps: float = 1e-6,
) -> PatchSelection:
    """Patch entropies, classes and entropy-nearest positives for a whole batch.

    Every valid patch is an anchor; its negatives are the valid patches of the other
    classes (:func:`negative_mask` of ``classes``).

    Parameters
    ----------
    images : Tensor
        (B, C, H, W) the view the confidences belong to.
    confidence : Tensor
        (B, K, H, W) class confidences (one-hot ground truth / teacher softmax).
    labels : Tensor
        (B, H, W) long (pseudo-)labels, ``IGNORE_INDEX`` where unknown.
    patch_size : int
        P.
    n_positives : int
        n, positives per anchor.
    eps : float
        Clamp margin of the entropy.
    """
    n_classes = confidence.shape[1]
    entropy = patch_entropy(images, confidence, patch_size, eps=eps)
    grid_classes = patch_majority_labels(labels, n_classes, patch_size)
    flat_classes = flatten_patch_grid(grid_classes, channels=False)
    valid = flat_classes != IGNORE_INDEX
    classes = flat_classes[valid]
    ent_flat = flatten_patch_grid(entropy, channels=True)[valid]  # (N, K)
    own = ent_flat.gather(1, classes.unsqueeze(1)).squeeze(1)
    positives, mask = nearest_entropy_positives(own, classes, n_positives)
    centres, image_index = patch_centres(images.shape[0], tuple(grid_classes.shape[1:]), patch_size, device=images.device)
    return PatchSelection(
        entropy=entropy,
        grid_classes=grid_classes,
        valid=valid,
        classes=classes,
        own_entropy=own,
        positives=positives,
        positive_mask=mask,
        centres=centres[valid],
        image_index=image_index[valid],
    )
