"""Pixel samplers for pixel-level contrastive learning: NS, SG, SAG and index strata.

ARCO (You et al., NeurIPS 2023, arXiv:2302.01735, Sec. 3.3; METHODS.md §4) estimates an
aggregation over the candidate pixels ``P`` of one class,

    H = (1/|P|) sum_{p in P} h(p)                                          (Eq. 3.1)

from a few sampled pixels. Every sampler here returns a :class:`PixelSample`: the drawn
pixel coordinates and one weight per draw such that

    H_hat = sum_i weights[i] * h(coords[i])

is an **unbiased** estimator of ``H`` (the weights are ``1/n`` wherever that is already
unbiased). The samplers:

* :func:`sample_naive` (NS): ``n`` i.i.d. uniform draws over ``P``.
* :func:`sample_stratified_groups` (SG): ``P`` split into groups ``P_m`` by a ``G x G`` grid
  over the image; ``n_m`` i.i.d. uniform draws in group ``m`` with ``E[n_m] = n |P_m|/|P|``
  exactly (floor of the quota plus a systematically randomised remainder). Unbiased, and
  with a variance no larger than NS's up to the small rounding term (Theorem 3.2).
* :func:`sample_stratified_antithetic` (SAG): as SG, but draws come in pairs
  ``(p, T(p))`` where ``T(p)`` is the point reflection ``2 c_m - p`` through the group's
  centre, snapped to the nearest candidate pixel of the group. Variance at most twice
  SG's (Lemma 3.1).
* :func:`sample_index_strata`: the mode of the authors' code: strata over the flattened
  (raster-order) candidate list, equal shares of draws per stratum.

Masks are boolean ``(..., H, W)`` arrays: the grid is laid over the last two axes and any
leading axes (e.g. the batch) index separate images, so a group never spans two images.
Coordinates are integer ``(n, mask.ndim)`` arrays in the mask's axis order. Draws are
with replacement (independent within and between groups, as the paper's analysis assumes).
Every function takes ``repeats=R`` to draw ``R`` independent samples at once (arrays then
gain a leading ``(R,)`` axis), for estimator studies.

:func:`sample_class_pixels` is the torch-facing wrapper used by
:class:`~napari_semicl.methods.arco.ARCO`: per class of a ``(B, H, W)`` class map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

#: sampler names accepted by :func:`sample_pixels` and :func:`sample_class_pixels`
SAMPLERS = ("ns", "sg", "sag", "index")


@dataclass(frozen=True)
class PixelSample:
    """Sampled pixels and the weights of their unbiased mean estimator.

    Attributes
    ----------
    coords : ndarray of int64, shape (n, d) or (R, n, d)
        Pixel coordinates in the mask's axis order (``d = mask.ndim``).
    weights : ndarray of float64, shape (n,) or (R, n)
        ``sum_i weights[i] * h(coords[i])`` estimates the mean of ``h`` over the mask
        without bias; ``weights.sum()`` is 1 in expectation (exactly 1 except for SAG).
    group : ndarray of int64, shape (n,) or (R, n)
        The group (SG, SAG: grid cell, see :func:`grid_groups`) or stratum (index mode) of
        each draw; 0 for NS.
    partner : ndarray of int64, shape (n,) or (R, n)
        For SAG, the position of the draw's antithetic partner in the same sample (pairs
        sit at positions ``2j, 2j + 1``); -1 for unpaired draws and other samplers.
    """

    coords: np.ndarray
    weights: np.ndarray
    group: np.ndarray
    partner: np.ndarray

    def __len__(self) -> int:
        return int(self.coords.shape[-2])


@dataclass(frozen=True)
class GridGroups:
    """The candidate pixels of a mask, grouped by a ``G x G`` grid per image.

    Attributes
    ----------
    coords : ndarray of int64, shape (N, d)
        Candidate pixels in raster order (``np.nonzero`` order).
    group : ndarray of int64, shape (N,)
        Dense group index in ``0..M-1`` of each candidate (empty cells are dropped).
    sizes : ndarray of int64, shape (M,)
        ``|P_m|``.
    centres : ndarray of float64, shape (M, 2)
        ``c_m``: the centroid (y, x) of each group's candidate pixels.
    cell : ndarray of int64, shape (M,)
        The grid cell of each group: ``image * G * G + row * G + column`` with ``image``
        the raveled index over the leading axes.
    """

    coords: np.ndarray
    group: np.ndarray
    sizes: np.ndarray
    centres: np.ndarray
    cell: np.ndarray


# --- helpers -----------------------------------------------------------------------------
def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.ndim < 2:
        raise ValueError(f"mask must have at least 2 dimensions (..., H, W), got shape {mask.shape}")
    return mask


def _check_n(n) -> int:
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def _check_grid(grid) -> int:
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    return int(grid)


def _reps(repeats) -> int:
    if repeats is None:
        return 1
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be None or a positive integer, got {repeats!r}")
    return int(repeats)


def _finish(coords, weights, group, partner, repeats) -> PixelSample:
    if repeats is None:
        coords, weights, group, partner = coords[0], weights[0], group[0], partner[0]
    return PixelSample(coords.astype(np.int64), weights.astype(np.float64), group.astype(np.int64), partner.astype(np.int64))


def _empty(d: int, repeats) -> PixelSample:
    r = _reps(repeats)
    return _finish(np.zeros((r, 0, d)), np.zeros((r, 0)), np.zeros((r, 0)), np.zeros((r, 0)), repeats)


def proportional_counts(sizes, n: int, rng: np.random.Generator, *, repeats: int | None = None) -> np.ndarray:
    """Integer allocation of ``n`` draws to groups, proportional in expectation.

    ``n_m = floor(q_m) + e_m`` with quota ``q_m = n |P_m| / sum |P|``; the ``n - sum floor(q)``
    leftover draws go to groups by systematic sampling with inclusion probabilities
    ``frac(q_m)`` (one uniform start), so ``e_m`` is 0 or 1, ``P(e_m = 1) = frac(q_m)``,
    ``sum_m n_m = n`` exactly and ``E[n_m] = q_m``. This expectation is what keeps the plain
    sample mean unbiased (Theorem 3.2 with proportional group sizes).

    Parameters
    ----------
    sizes : array_like of int, shape (M,)
        Group sizes, all > 0.
    n : int
        Total draws.
    rng : numpy.random.Generator
    repeats : int, optional
        Independent allocations to draw.

    Returns
    -------
    ndarray of int64, shape (M,) or (R, M)
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    r = _reps(repeats)
    quota = n * sizes / sizes.sum()
    base = np.floor(quota)
    frac = quota - base
    rem = int(round(n - base.sum()))
    cum = np.concatenate([[0.0], np.cumsum(frac)])
    if rem > 0:
        cum *= rem / cum[-1]  # remove rounding drift so the last edge is exactly `rem`
        cum[-1] = rem
    else:
        cum[:] = 0.0
    u = rng.random(r)[:, None]
    extra = np.ceil(cum[None, 1:] - u) - np.ceil(cum[None, :-1] - u)
    counts = (base[None] + extra).astype(np.int64)
    return counts if repeats is not None else counts[0]


def _slots(counts: np.ndarray) -> np.ndarray:
    """(R, M) counts with equal row sums -> (R, n) group index of every draw slot."""
    r, m = counts.shape
    n = int(counts[0].sum())
    return np.repeat(np.tile(np.arange(m), r), counts.ravel()).reshape(r, n)


def grid_groups(mask, grid: int = 4, *, spatial_dims: int = 2) -> GridGroups:
    """Split the candidate pixels of ``mask`` into groups by a ``grid x grid`` grid per image.

    Cell ``(i, j)`` of an ``H x W`` image holds rows ``y`` with ``floor(y G / H) == i`` and
    columns with ``floor(x G / W) == j``; the group ``P_m`` is the candidate pixels in one
    cell of one image (empty cells are no group). With ``spatial_dims = 3`` the last three
    axes (D, H, W) are the image and the grid is ``G x G x G`` (cell ``(k, i, j)``).

    Parameters
    ----------
    mask : array_like of bool, shape (..., H, W) or (..., D, H, W)
    grid : int
        ``G`` (>= 1).
    spatial_dims : {2, 3}
        How many trailing axes form one image; the leading axes number the images.

    Returns
    -------
    GridGroups
    """
    mask = _check_mask(mask)
    g = _check_grid(grid)
    if spatial_dims not in (2, 3) or mask.ndim < spatial_dims:
        raise ValueError(f"spatial_dims must be 2 or 3 and at most mask.ndim ({mask.ndim}), got {spatial_dims!r}")
    size = mask.shape[mask.ndim - spatial_dims:]
    coords = np.stack(np.nonzero(mask), axis=1).astype(np.int64)
    lead = mask.reshape(-1, *size)
    flat = np.nonzero(lead)
    cell = flat[0].astype(np.int64)  # the image, then the cell index along each axis
    for axis, n in enumerate(size):
        cell = cell * g + flat[axis + 1] * g // n
    uniq, group = np.unique(cell, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    sizes = np.bincount(group, minlength=len(uniq)).astype(np.int64)
    if len(uniq):
        centres = np.stack([np.bincount(group, weights=coords[:, a], minlength=len(uniq)) / sizes
                            for a in range(mask.ndim - spatial_dims, mask.ndim)], axis=1)
    else:
        centres = np.zeros((0, spatial_dims))
    return GridGroups(coords, group, sizes, centres, uniq.astype(np.int64))


def antithetic_partners(groups: GridGroups) -> np.ndarray:
    """``T(p)``: the candidate nearest to ``2 c_m - p`` in p's group, for every candidate.

    The reflection through the group centroid ``c_m`` is snapped to the nearest candidate
    pixel of the same group (Euclidean distance in (y, x)). Where the reflection's nearest
    grid point is unique and a candidate of the group, that is the answer (a table lookup:
    most pixels); the others go through one k-d tree over all groups, kept apart by an
    offset axis larger than any in-image distance.

    Returns
    -------
    ndarray of int64, shape (N,)
        Index into ``groups.coords`` of each candidate's partner.
    """
    if len(groups.group) == 0:
        return np.zeros(0, np.int64)
    nd = groups.centres.shape[1]  # 2 for (y, x), 3 for (z, y, x): the grid's axes
    yx = groups.coords[:, -nd:].astype(np.float64)
    reflected = 2.0 * groups.centres[groups.group] - yx
    idx = np.full(len(yx), -1, np.int64)
    # fast path: where the reflection's nearest grid point is unique (no coordinate half-way
    # between two) and is a candidate of the same group, it is the nearest candidate
    near = np.rint(reflected)
    unique = (np.abs(reflected - near) < 0.5 - 1e-9).all(axis=1)
    lead = groups.coords[:, :-nd]
    near = near.astype(np.int64)
    lo = groups.coords[:, -nd:].min(axis=0)
    hi = groups.coords[:, -nd:].max(axis=0)
    inside = unique & ((near >= lo) & (near <= hi)).all(axis=1)
    if inside.any():
        # index of every candidate by (leading coordinates, y, x), via a dense lookup table
        lead_ids = (np.ravel_multi_index(tuple(lead.T), tuple(lead.max(axis=0) + 1))
                    if lead.shape[1] else np.zeros(len(yx), np.int64))
        table = np.full((int(lead_ids.max()) + 1, *(hi - lo + 1)), -1, np.int64)
        table[(lead_ids, *(groups.coords[:, -nd:] - lo).T)] = np.arange(len(yx))
        rows = np.flatnonzero(inside)
        hit = table[(lead_ids[rows], *(near[rows] - lo).T)]
        ok = hit >= 0
        ok[ok] = groups.group[hit[ok]] == groups.group[rows[ok]]
        idx[rows[ok]] = hit[ok]
    rest = np.flatnonzero(idx < 0)
    if len(rest):
        span = float(yx.max(initial=0) + 1) * 8.0  # > any distance within an image
        sep = groups.group[:, None].astype(np.float64) * span
        tree = cKDTree(np.concatenate([sep, yx], axis=1))
        _, idx[rest] = tree.query(np.concatenate([sep[rest], reflected[rest]], axis=1))
    return idx


# --- the samplers --------------------------------------------------------------------------
def sample_naive(mask, n: int, rng: np.random.Generator, *, repeats: int | None = None) -> PixelSample:
    """Naive sampling (NS): ``n`` i.i.d. uniform draws over the candidate pixels.

    Estimator: ``H_hat = (1/n) sum_i h(p_i)`` (weights ``1/n``), unbiased with variance
    ``sigma^2 / n``, ``sigma^2`` the variance of ``h`` over the mask.

    Parameters
    ----------
    mask : array_like of bool, shape (..., H, W)
        Candidate pixels (one class).
    n : int
        Number of draws; an empty mask gives an empty sample.
    rng : numpy.random.Generator
    repeats : int, optional
        Draw ``R`` independent samples at once (leading axis ``R``).

    Returns
    -------
    PixelSample

    Examples
    --------
    >>> mask = np.zeros((8, 8), bool); mask[2:6, 2:6] = True
    >>> s = sample_naive(mask, 5, np.random.default_rng(0))
    >>> s.coords.shape, float(s.weights.sum())
    ((5, 2), 1.0)
    """
    mask = _check_mask(mask)
    n = _check_n(n)
    coords = np.stack(np.nonzero(mask), axis=1)
    if n == 0 or len(coords) == 0:
        return _empty(mask.ndim, repeats)
    r = _reps(repeats)
    idx = rng.integers(0, len(coords), size=(r, n))
    zeros = np.zeros((r, n))
    return _finish(coords[idx], np.full((r, n), 1.0 / n), zeros, zeros - 1, repeats)


def sample_stratified_groups(
    mask, n: int, rng: np.random.Generator, *, grid: int = 4, repeats: int | None = None, spatial_dims: int = 2,
) -> PixelSample:
    """Stratified Group sampling (SG, ARCO Sec. 3.3, Theorem 3.2).

    The candidates are split into groups ``P_m`` by a ``grid x grid`` grid
    (:func:`grid_groups`); group ``m`` gets ``n_m`` draws with ``E[n_m] = n |P_m| / |P|``
    (:func:`proportional_counts`), drawn i.i.d. uniformly inside the group.

    Estimator: ``H_hat = (1/n) sum_i h(p_i)`` (weights ``1/n``). It is unbiased because
    ``E[H_hat] = (1/n) sum_m E[n_m] mu_m = sum_m (|P_m|/|P|) mu_m = H``. With exactly
    proportional ``n_m`` its variance is
    ``Var_NS - (1/n) sum_m (|P_m|/|P|) (mu_m - H)^2 <= Var_NS`` (Theorem 3.2; the paper's
    statement drops the group weight); the randomised rounding adds at most
    ``(1/n^2) Var(sum_m e_m mu_m)``, negligible next to the reduction once ``n`` exceeds
    the number of groups.

    Parameters
    ----------
    mask : array_like of bool, shape (..., H, W)
    n : int
    rng : numpy.random.Generator
    grid : int, optional
        ``G``: the grid is ``G x G`` per image (``G = 1`` is NS).
    repeats : int, optional
    spatial_dims : {2, 3}, optional
        3: the last three axes are an image and the grid is ``G x G x G`` (:func:`grid_groups`).

    Returns
    -------
    PixelSample
        ``group`` indexes :func:`grid_groups` ``(mask, grid)``.
    """
    mask = _check_mask(mask)
    n = _check_n(n)
    groups = grid_groups(mask, grid, spatial_dims=spatial_dims)
    if n == 0 or len(groups.coords) == 0:
        return _empty(mask.ndim, repeats)
    r = _reps(repeats)
    order = np.argsort(groups.group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(groups.sizes)[:-1]])
    slot = _slots(proportional_counts(groups.sizes, n, rng, repeats=r))
    idx = order[starts[slot] + rng.integers(0, groups.sizes[slot])]
    return _finish(groups.coords[idx], np.full((r, n), 1.0 / n), slot, np.full((r, n), -1), repeats)


def sample_stratified_antithetic(
    mask, n: int, rng: np.random.Generator, *, grid: int = 4, repeats: int | None = None, spatial_dims: int = 2,
) -> PixelSample:
    """Stratified-Antithetic Group sampling (SAG, ARCO Sec. 3.3, Lemma 3.1).

    ``n // 2`` pairs are allocated to the SG groups proportionally
    (:func:`proportional_counts`); a pair in group ``m`` is a uniform draw ``p`` and its
    antithetic partner ``T(p)``, the point reflection ``2 c_m - p`` through the group
    centroid snapped to the nearest candidate of the group (:func:`antithetic_partners`).
    An odd ``n`` adds one uniform draw over all candidates (last position).

    Estimator: ``H_hat = sum_i w_i h(p_i)`` with ``w = (1/n) * 2 / (1 + k(p))`` for paired
    draws, ``k(p) = |T^{-1}(p)|`` the number of candidates whose partner is ``p``, and
    ``1/n`` for the single draw. The pair's members are a two-component mixture (uniform and
    its image under ``T``), and ``2 / (1 + k)`` is the balance-heuristic importance weight
    ``u(p) / r(p)`` of that mixture, so each pair has expectation ``2 mu_m`` and ``H_hat`` is
    unbiased. Where the group is point-symmetric (``T`` a bijection, e.g. a full grid cell)
    ``k = 1`` and every weight is ``1/n``. Lemma 3.1: ``Var_SAG <= 2 Var_SG`` (each pair
    average has variance at most ``sigma_m^2``; with half as many independent units).

    Parameters
    ----------
    mask : array_like of bool, shape (..., H, W)
    n : int
    rng : numpy.random.Generator
    grid : int, optional
    repeats : int, optional

    Returns
    -------
    PixelSample
        Pairs at positions ``(2j, 2j + 1)``, first the uniform draw then its partner;
        ``partner`` links them.
    """
    mask = _check_mask(mask)
    n = _check_n(n)
    groups = grid_groups(mask, grid, spatial_dims=spatial_dims)
    if n == 0 or len(groups.coords) == 0:
        return _empty(mask.ndim, repeats)
    r = _reps(repeats)
    n_pairs = n // 2
    partner_of = antithetic_partners(groups)
    hits = np.bincount(partner_of, minlength=len(partner_of))
    order = np.argsort(groups.group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(groups.sizes)[:-1]])
    idx = np.zeros((r, n), np.int64)
    slot = np.zeros((r, n), np.int64)
    weights = np.full((r, n), 1.0 / n)
    partner = np.full((r, n), -1, np.int64)
    if n_pairs:
        pair_slot = _slots(proportional_counts(groups.sizes, n_pairs, rng, repeats=r))
        first = order[starts[pair_slot] + rng.integers(0, groups.sizes[pair_slot])]
        second = partner_of[first]
        idx[:, 0:2 * n_pairs:2], idx[:, 1:2 * n_pairs:2] = first, second
        slot[:, 0:2 * n_pairs:2] = slot[:, 1:2 * n_pairs:2] = pair_slot
        weights[:, 0:2 * n_pairs:2] = 2.0 / (1.0 + hits[first]) / n
        weights[:, 1:2 * n_pairs:2] = 2.0 / (1.0 + hits[second]) / n
        pos = np.arange(2 * n_pairs)
        partner[:, : 2 * n_pairs] = pos ^ 1
    if n % 2:
        single = rng.integers(0, len(groups.coords), size=r)
        idx[:, -1] = single
        slot[:, -1] = groups.group[single]
    return _finish(groups.coords[idx], weights, slot, partner, repeats)


def sample_index_strata(
    mask, n: int, rng: np.random.Generator, *, strata: int | None = None, repeats: int | None = None
) -> PixelSample:
    """Strata over the flattened candidate list with equal shares (the authors' code's mode).

    The candidates in raster order are cut into ``S`` contiguous strata of (nearly) equal
    size (sizes differ by at most one); every stratum gets ``n // S`` i.i.d. uniform draws
    and ``n % S`` strata, chosen uniformly at random, get one more.

    Estimator: ``H_hat = sum_s (N_s / N) (1 / n_s) sum_{i in s} h(p_i)`` (weights
    ``N_s / (N n_s)``; they sum to 1), unbiased since every stratum has ``n_s >= 1``.

    Parameters
    ----------
    mask : array_like of bool, shape (..., H, W)
    n : int
    rng : numpy.random.Generator
    strata : int, optional
        ``S``; default (None or 0) one stratum per draw. Capped at ``n`` and at the number of
        candidates.
    repeats : int, optional

    Returns
    -------
    PixelSample
        ``group`` is the stratum of each draw.
    """
    mask = _check_mask(mask)
    n = _check_n(n)
    if strata is not None and (int(strata) != strata or strata < 0):
        raise ValueError(f"strata must be None or a non-negative integer, got {strata!r}")
    coords = np.stack(np.nonzero(mask), axis=1)
    total = len(coords)
    if n == 0 or total == 0:
        return _empty(mask.ndim, repeats)
    r = _reps(repeats)
    s = min(int(strata) if strata else n, n, total)
    edges = (np.arange(s + 1) * total) // s
    sizes = np.diff(edges)
    counts = np.full((r, s), n // s, np.int64)
    rem = n % s
    if rem:
        lucky = np.argsort(rng.random((r, s)), axis=1)[:, :rem]
        np.put_along_axis(counts, lucky, n // s + 1, axis=1)
    slot = _slots(counts)
    idx = edges[slot] + rng.integers(0, sizes[slot])
    weights = sizes[slot] / (total * np.take_along_axis(counts, slot, axis=1))
    return _finish(coords[idx], weights, slot, np.full((r, n), -1), repeats)


def sample_pixels(
    mask, n: int, rng: np.random.Generator, *, sampler: str = "sag", grid: int = 4,
    strata: int | None = None, repeats: int | None = None, spatial_dims: int = 2,
) -> PixelSample:
    """Dispatch to a sampler by name.

    Parameters
    ----------
    sampler : {'ns', 'sg', 'sag', 'index'}
    grid : int
        For 'sg' and 'sag'.
    spatial_dims : {2, 3}
        For 'sg' and 'sag': the grid's axes (see :func:`grid_groups`).
    strata : int, optional
        For 'index'.

    Raises
    ------
    ValueError
        An unknown sampler name (the message lists the valid ones).
    """
    if sampler == "ns":
        return sample_naive(mask, n, rng, repeats=repeats)
    if sampler == "sg":
        return sample_stratified_groups(mask, n, rng, grid=grid, repeats=repeats, spatial_dims=spatial_dims)
    if sampler == "sag":
        return sample_stratified_antithetic(mask, n, rng, grid=grid, repeats=repeats, spatial_dims=spatial_dims)
    if sampler == "index":
        return sample_index_strata(mask, n, rng, strata=strata, repeats=repeats)
    raise ValueError(f"sampler must be one of {set(SAMPLERS)}, got {sampler!r}")


def sample_class_pixels(
    class_map: torch.Tensor,
    n_per_class: int,
    rng: np.random.Generator,
    *,
    confident: torch.Tensor | None = None,
    sampler: str = "sag",
    grid: int = 4,
    strata: int | None = None,
    n_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``n_per_class`` pixels of every class of a batch of class maps.

    For class ``c`` the candidates are ``(class_map == c) & confident``; the sampler runs on
    that ``(B, H, W)`` mask (grid cells per image, so groups never span two images). A
    ``(B, D, H, W)`` class map of volume patches is sampled with a ``G x G x G`` grid per
    patch.

    Parameters
    ----------
    class_map : Tensor of int64, shape (B, H, W) or (B, D, H, W)
        Class per pixel; negative values (e.g. ``IGNORE_INDEX``) are never candidates.
    n_per_class : int
        Draws per class present (classes without candidates get none).
    rng : numpy.random.Generator
    confident : Tensor of bool, shape (B, H, W), optional
        Extra candidate mask (e.g. teacher confidence above a threshold).
    sampler : {'ns', 'sg', 'sag', 'index'}
    grid, strata : int
        See :func:`sample_pixels`.
    n_classes : int, optional
        Classes ``0..K-1`` to consider (default: ``class_map.max() + 1``).

    Returns
    -------
    coords : Tensor of int64, shape (N, 3) or (N, 4)
        (batch index, y, x) or (batch index, z, y, x), on ``class_map``'s device.
    classes : Tensor of int64, shape (N,)
    weights : Tensor of float32, shape (N,)
        Per-class estimator weights (see the samplers): for every class,
        ``sum_{i: classes[i] == c} weights[i] * h_i`` estimates the class mean of ``h``.
    """
    if class_map.ndim not in (3, 4):
        raise ValueError(f"class_map must be (B, H, W) or (B, D, H, W), got shape {tuple(class_map.shape)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {set(SAMPLERS)}, got {sampler!r}")
    cmap = class_map.detach().cpu().numpy()
    valid = cmap >= 0
    if confident is not None:
        valid &= confident.detach().cpu().numpy().astype(bool)
    k = int(n_classes) if n_classes is not None else int(cmap.max(initial=-1)) + 1
    coords, classes, weights = [], [], []
    for c in range(k):
        mask = valid & (cmap == c)
        if not mask.any():
            continue
        s = sample_pixels(mask, n_per_class, rng, sampler=sampler, grid=grid, strata=strata,
                          spatial_dims=class_map.ndim - 1)
        coords.append(s.coords)
        classes.append(np.full(len(s), c, np.int64))
        weights.append(s.weights)
    dev = class_map.device
    if not coords:
        return (torch.zeros((0, class_map.ndim), dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                torch.zeros(0, device=dev))
    return (
        torch.from_numpy(np.concatenate(coords)).to(dev),
        torch.from_numpy(np.concatenate(classes)).to(dev),
        torch.from_numpy(np.concatenate(weights)).float().to(dev),
    )


__all__ = [
    "SAMPLERS",
    "GridGroups",
    "PixelSample",
    "antithetic_partners",
    "grid_groups",
    "proportional_counts",
    "sample_class_pixels",
    "sample_index_strata",
    "sample_naive",
    "sample_pixels",
    "sample_stratified_antithetic",
    "sample_stratified_groups",
]
