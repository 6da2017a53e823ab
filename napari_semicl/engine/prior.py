"""Painted slices as a dense prior (METHODS.md §5): one component of the training loop.

The few fully painted slices of a volume imply a dense shape: the "fill between slices"
interpolation (:func:`napari_semicl.data.interpolation.interpolate_labels`). This module
turns it into what the one training loop composes, whatever the method:

* **Dense targets** (``prior.mode = 'targets'``): every unpainted, non-validation slice of a
  volume gets the interpolated labels as a target, with the pixels near the interpolated
  boundary left out (a band of ``boundary_px`` pixels per slice of distance to the nearest
  painted slice: the farther from a painted slice, the less the shape is known). A share of
  each step's labelled crops is drawn from these slices: ``dense_start`` at the first step,
  falling linearly to ``dense_end`` at the end of the budget (dense early, sparse late, as
  in Cai et al., CVPR 2023). The methods see them as labelled crops; their own terms
  (consistency, contrast) run on the unlabelled crops as before. The painted slices keep
  their own labels: the prior never reaches a painted slice's target, and validation slices
  are left out of the interpolation.
* **Fusion** (``prior.fuse``): the mask a user gets mixes the network's class
  probabilities with the prior's, voxel by voxel::

      n = (1 - c(d)) * (1 - r(d) H_net) * a ** agreement_power     c(d) = exp(-d / confidence_length)
      p = (1 - n) * p_prior + n * p_net

  with ``d`` the slice's distance (in slices) to the nearest painted slice (past the
  outermost painted slices ``c`` falls with ``beyond_length`` instead, when set), ``H_net`` the
  network's normalised entropy, ``r(d)`` 1 between the outermost painted slices and
  ``exp(-d / entropy_length)`` past them (where the fill is an extrapolation, an unsure
  network keeps more of its say the farther it is), ``a`` the network's Dice against the
  prior on the slices within 2 of a painted one (where the fill is best) and ``p_prior =
  softmax(scores / (temperature_px (1 + d)))`` over the interpolation's signed distances.
  Where the network is unsure, the prior wins (between the painted slices, and past them
  near the outermost ones); near painted slices the prior wins; a network that does not yet
  reproduce the fill next to the painted slices has little say anywhere; far from painted
  slices a confident, consistent network decides. On painted slices (``d = 0``) the result
  is the painted labels. A volume with fewer than ``network_min_painted`` painted slices gets
  the fill alone, unless another volume of the run has that many (a cohort's network).

Functions first; :class:`SlicePrior` holds the per-volume arrays in the dataset's slice
layout (slicing axis first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data.annotation import IGNORE_INDEX
from ..data.interpolation import METHODS as INTERPOLATION_METHODS
from ..data.interpolation import FlowCache, default_shrink, extend_scores, interpolate_labels
from ..errors import ConfigError, DataError
from ..errors import check_choice as _check_choice
from ..models.ops import normalised_entropy

log = logging.getLogger(__name__)

PRIOR_MODES = ("off", "targets")
#: the PriorConfig fields that only change how a mask fuses network and fill (a resumed run may change them)
FUSION_SETTINGS = ("fuse", "confidence_length", "temperature_px", "agreement_power", "network_min_painted",
                   "beyond_length", "entropy_length", "entropy_margin_px")
#: the fills of data.interpolation, the default first (docs/benchmarks.md: flow measured better)
INTERPOLATION_CHOICES = ("flow", *(m for m in INTERPOLATION_METHODS if m != "flow"))


@dataclass
class PriorConfig:
    """How painted slices enter training as a dense prior (see the module doc).

    mode : {'off', 'targets'}
        'targets': dense targets from the interpolation on unpainted slices; 'off': none.
    interpolation : {'sdf', 'flow'}
        How the prior fills between painted slices (signed-distance blend, or the same
        after optical-flow registration of the image slices).
    dense_start, dense_end : float in [0, 1]
        Share of the labelled crops drawn from interpolated slices at the first and at the
        last step (linear in between).
    boundary_px : float
        Pixels left out of a dense target on each side of the interpolated boundary, per
        slice of distance to the nearest painted slice.
    fuse : bool
        Mix the prior into the predicted mask (see the module doc).
    confidence_length : float
        Slices: the prior's weight in the fusion is ``exp(-d / confidence_length)``.
    temperature_px : float
        Pixels: softness of the prior's class probabilities at distance 0 (grows as 1 + d).
    agreement_power : float
        The network's say in the fusion is scaled by ``agreement ** agreement_power``, its
        Dice against the prior on the slices next to painted ones (within 2 slices), where
        the fill is known to be good: a network that cannot yet reproduce the fill there is
        not allowed to overrule it elsewhere. 0 switches the gate off.
    network_min_painted : int
        Fewer painted slices than this in a volume and the fused mask is the fill alone. With
        the fill's 1.5 px fall-off, two painted slices measured +0.015 to +0.037 Dice over the
        fill with the network (left atrium, slices inside the structure, 4 volumes) and +0.000
        with the tips painted (2 volumes; the agreement gate kept the fill); with the earlier 3 px
        fall-off the tips case had cost 0.06 (docs/benchmarks.md). One painted slice gets the fill,
        unless another volume of the run has this many painted slices: a cohort's network takes
        part from a new volume's first painted slice (:meth:`SlicePrior.fill_only`).
    beyond_length : float or None
        Slices: the prior's confidence length past the outermost painted slices, where the
        fill is an extrapolation (``None``: ``confidence_length`` there too). A network that
        learnt the anatomy from other volumes (a cohort) is worth more there than the fill's
        shrinking copy of the last painted slice.
    entropy_length : float or None
        Slices: past the outermost painted slices of a volume fused with a cohort's network
        (another volume of the run has ``network_min_painted`` painted slices,
        :meth:`SlicePrior.cohort`), the network's entropy hands a voxel to the fill with the
        factor ``r = exp(-d / entropy_length)`` near the painted shape (``entropy_margin_px``;
        the share ``(1 - c)(1 - r H)`` in the module doc). ``r = 1`` between the painted
        slices, in a volume alone in its run, and everywhere with ``None`` (the rule before
        issue 26). Past the outermost painted slice the fill is that slice's shape shrinking
        until it vanishes, and with ``r = 1`` every voxel the network was unsure of went to it,
        however far: with one painted slice of a new left-atrium volume and a cohort network
        (4 volumes, 5 painted slices each; the slice at 1/4, 1/2 or 3/4 of the structure), the
        fused mask fell below the network alone on 3 of 12 volume-positions (down to -0.074
        Dice, largest piece kept); with 8 slices and a 15 px margin on none, for a 3000-step and
        a 9000-step network, and two or three painted slices moved by -0.003 to +0.006
        (docs/prior.md, "Fusion").
    entropy_margin_px : float
        Pixels: ``r`` is ``exp(-d / entropy_length)`` only within this distance of the
        outermost painted shape as the fill carries it past that slice (the fill's signed
        distance plus its fall-off, 1.5 px a slice, times ``d``), and 1 farther out, where the
        fill's background is the painted shape's surroundings and removed the network's stray
        foreground (without the margin the same networks lost 0.02-0.05 Dice with one painted
        slice; 5 px let one volume fall below the network alone, 30 px kept less of the gain).
    calibrate : bool
        With three painted slices or more, measure the interpolation on the volume itself
        (:func:`leave_one_out`) and set the band (pixels per slice) from it instead of
        ``boundary_px``.
    """

    mode: str = "off"
    interpolation: str = "flow"
    dense_start: float = 0.5
    dense_end: float = 0.1
    boundary_px: float = 1.0
    fuse: bool = True
    confidence_length: float = 8.0
    temperature_px: float = 2.0
    agreement_power: float = 8.0
    network_min_painted: int = 2
    beyond_length: float | None = None
    entropy_length: float | None = 8.0
    entropy_margin_px: float = 15.0
    calibrate: bool = True

    def validate(self, path: str = "prior") -> None:
        _check_choice(f"{path}.mode", self.mode, PRIOR_MODES)
        _check_choice(f"{path}.interpolation", self.interpolation, INTERPOLATION_CHOICES)
        for name in ("dense_start", "dense_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{path}.{name} must be in [0, 1], got {value}")
        if self.network_min_painted < 0:
            raise ConfigError(f"{path}.network_min_painted must be >= 0, got {self.network_min_painted}")
        if not self.agreement_power >= 0:
            raise ConfigError(f"{path}.agreement_power must be >= 0, got {self.agreement_power}")
        for name in ("beyond_length", "entropy_length"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{path}.{name} must be > 0 (or null), got {value}")
        if not self.entropy_margin_px >= 0:
            raise ConfigError(f"{path}.entropy_margin_px must be >= 0, got {self.entropy_margin_px}")
        for name in ("boundary_px", "confidence_length", "temperature_px"):
            value = getattr(self, name)
            if not value >= 0 or (name != "boundary_px" and value == 0):
                raise ConfigError(f"{path}.{name} must be {'>= 0' if name == 'boundary_px' else '> 0'}, got {value}")

    @property
    def active(self) -> bool:
        """Whether any part of the prior is used (targets or fusion)."""
        return self.mode != "off"


def dense_share(config: PriorConfig, fraction: float) -> float:
    """Share of labelled crops drawn from interpolated slices at ``fraction`` of the budget."""
    f = min(max(float(fraction), 0.0), 1.0)
    return config.dense_start + (config.dense_end - config.dense_start) * f


def prior_weight(slice_distance: np.ndarray, length: float) -> np.ndarray:
    """c(d) = exp(-d / length): 1 on painted slices, falling with the distance to them."""
    return np.exp(-np.asarray(slice_distance, np.float32) / np.float32(length)).astype(np.float32)


def _past_painted(dist: np.ndarray) -> np.ndarray | None:
    """Which slices lie past the outermost painted ones (distance 0), or None when none is painted."""
    painted = np.flatnonzero(dist == 0)
    if len(painted) == 0:
        return None
    index = np.arange(len(dist))
    return (index < painted[0]) | (index > painted[-1])


def fusion_weight(slice_distance: np.ndarray, length: float, beyond_length: float | None = None) -> np.ndarray:
    """c(d) of every slice: :func:`prior_weight` between the painted slices, and with
    ``beyond_length`` (slices) instead of ``length`` past the outermost painted ones."""
    dist = np.asarray(slice_distance, np.float32)
    weight = prior_weight(dist, length)
    beyond = None if beyond_length is None else _past_painted(dist)
    if beyond is not None:
        weight[beyond] = prior_weight(dist[beyond], beyond_length)
    return weight


def entropy_trust(slice_distance: np.ndarray, length: float | None) -> np.ndarray:
    """r(d) of every slice: 1 between the outermost painted slices (and everywhere with
    ``length`` None), ``exp(-d / length)`` past them, where the fill is an extrapolation."""
    dist = np.asarray(slice_distance, np.float32)
    trust = np.ones(len(dist), np.float32)
    beyond = None if length is None else _past_painted(dist)
    if beyond is not None:
        trust[beyond] = prior_weight(dist[beyond], length)
    return trust


def footprint_trust(scores: torch.Tensor, slice_distance: torch.Tensor, slice_trust: torch.Tensor,
                    shrink: float, margin_px: float) -> torch.Tensor:
    """(B, 1, H, W) ``r`` per pixel: ``slice_trust`` (:func:`entropy_trust`) within ``margin_px``
    of the outermost painted slice's shape as the fill carries it past that slice, 1 farther out.

    scores : (B, K, H, W) the fill's signed distances, background first; past the outermost
    painted slice a class scores its carried map minus ``shrink`` (pixels a slice) times the
    distance ``slice_distance`` (B,), so ``scores + shrink * d`` is the carried shape itself.
    Between the painted slices ``slice_trust`` is 1 and so is the result.
    """
    d = slice_distance.float().view(-1, 1, 1, 1)
    carried = scores[:, 1:].float().amax(dim=1, keepdim=True) + float(shrink) * d
    near = carried > -float(margin_px)
    r = slice_trust.float().view(-1, 1, 1, 1).expand_as(carried)
    return torch.where(near, r, torch.ones_like(r))


def prior_probabilities(scores: torch.Tensor, slice_distance: torch.Tensor, temperature_px: float) -> torch.Tensor:
    """Soft class probabilities of the prior: softmax over classes of scores / T(d).

    scores : (B, K, H, W) signed distances (pixels, positive inside); slice_distance : (B,)
    in slices; T(d) = temperature_px * (1 + d).
    """
    t = (temperature_px * (1.0 + slice_distance.float())).view(-1, 1, 1, 1)
    return (scores.float() / t).softmax(dim=1)


def fuse_probabilities(p_net: torch.Tensor, p_prior: torch.Tensor, weight: torch.Tensor,
                       agreement: float = 1.0, power: float = 0.0, trust: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - n) * p_prior + n * p_net, the network's share n = (1 - w)(1 - r H_net) a^power.

    p_net, p_prior : (B, K, H, W) probabilities; weight : (B,) the prior's weight c(d);
    agreement : the network's Dice against the prior next to painted slices (``a``), with
    ``power`` its exponent (0: no gate); trust : ``r``, how far the prior is trusted where the
    network is unsure, (B,) per slice or (B, 1, H, W) per pixel (:meth:`SlicePrior.fuser`;
    None: 1 everywhere). With no gate this is alpha * p_prior + (1 - alpha) * p_net,
    alpha = w + (1 - w) r H (module doc).
    """
    ent = normalised_entropy(p_net, dim=1).unsqueeze(1)
    w = weight.float().view(-1, 1, 1, 1)
    if trust is not None:
        ent = ent * (trust.float().view(-1, 1, 1, 1) if trust.dim() == 1 else trust.float())
    share = (1.0 - w) * (1.0 - ent) * float(max(agreement, 0.0)) ** power
    return (1.0 - share) * p_prior + share * p_net


def dense_target(scores: np.ndarray, class_index: np.ndarray, distance: float, boundary_px: float) -> np.ndarray:
    """(H, W) int64 target of one interpolated slice: the argmax class (as network class
    index, ``class_index[k]`` for the prior's class k), ``IGNORE_INDEX`` within
    ``boundary_px * distance`` pixels of the interpolated boundary.

    scores : (K, H, W) signed distances of the prior's classes.
    """
    if scores.shape[0] == 2:  # the usual case, without sorting a whole plane
        margin = np.abs(scores[1] - scores[0]) / 2.0
    elif scores.shape[0] > 2:
        order = np.partition(scores, -2, axis=0)
        margin = (order[-1] - order[-2]) / 2.0
    else:
        margin = np.full(scores.shape[1:], np.inf)
    target = class_index[np.argmax(scores, axis=0)].astype(np.int64)
    target[margin < boundary_px * distance] = IGNORE_INDEX
    return target


@dataclass(frozen=True)
class Calibration:
    """How well the interpolation does on one volume, measured on its own painted slices.

    band_px : pixels per slice of distance left out around the interpolated boundary.
    length : slices, the fusion's confidence length (``confidence_length``).
    loo : ((distance, Dice, boundary error px), ...) of each inner painted slice left out.
    """

    band_px: float
    length: float
    loo: tuple = ()


def _boundary_pixels(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(np.count_nonzero(mask & ~ndimage.binary_erosion(mask)))


def leave_one_out(labels: np.ndarray, painted, *, axis: int, spacing=None, unpainted: str = "background",
                  method: str = "sdf", image: np.ndarray | None = None, flow_cache: FlowCache | None = None):
    """Fill each inner painted slice from its two painted neighbours and compare it with
    what was painted.

    Parameters
    ----------
    labels : ndarray of int
        The painted labels (validation slices already removed).
    painted : sequence of int
        The complete painted slices, sorted; the first and the last are never left out
        (filling them would be extrapolation, which the prior does not do between slices).
    method, image
        As in :func:`~napari_semicl.data.interpolation.interpolate_labels`. Only the
        stretch between the two neighbours is filled, so leaving every inner slice out costs
        about one interpolation of the volume.
    flow_cache : FlowCache, optional
        The flows of the whole volume's fill (``interpolate_labels(flow_cache=...)``): each
        stretch is filled in that fill's region with its flows, so that few flows are
        measured again (those that reach the left-out slice).

    Returns
    -------
    list of (distance, dice, error_px)
        ``distance``: slices from the left-out slice to the nearest of its neighbours;
        ``dice``: mean Dice over the classes painted on it; ``error_px``: the mean boundary
        displacement, pixels of symmetric difference per pixel of painted boundary.
    """
    painted = [int(p) for p in painted]
    out = []
    for a, j, b in zip(painted, painted[1:], painted[2:]):
        stretch = np.arange(a, b + 1)
        sub = np.take(labels, stretch, axis=axis)
        truth = np.take(sub, j - a, axis=axis).copy()
        inner = [slice(None)] * labels.ndim
        inner[axis] = slice(1, b - a)
        sub[tuple(inner)] = 0
        sub_image = None if image is None else np.take(image, stretch, axis=axis)
        if flow_cache is not None:
            flow_cache.offset = a
        fill = interpolate_labels(sub, axis=axis, spacing=spacing, unpainted=unpainted, method=method, image=sub_image,
                                  flow_cache=flow_cache)
        filled = np.take(fill.labels, j - a, axis=axis)
        present = set(np.unique(truth).tolist())
        values = [v for v in fill.class_values[1:] if v in present]  # the foreground (background first)
        dices, diff, edge = [], 0, 0
        for v in values:
            x, y = filled == v, truth == v
            dices.append(2.0 * np.count_nonzero(x & y) / max(np.count_nonzero(x) + np.count_nonzero(y), 1))
            diff += np.count_nonzero(x ^ y)
            edge += _boundary_pixels(y)
        if dices:
            out.append((float(min(j - a, b - j)), float(np.mean(dices)), diff / max(edge, 1)))
    return out


def calibrate(loo, config: PriorConfig) -> Calibration:
    """The dense targets' band from :func:`leave_one_out` (the config's ``boundary_px``
    when there is no measurement or ``config.calibrate`` is off).

    band_px = median(error / distance), at least ``boundary_px`` / 4: the boundary moves
    about that many pixels per slice of distance on this volume. The fusion's confidence
    length stays ``confidence_length``: setting it from the measured Dice (d / -ln Dice)
    was tried on two LA and two ACDC volumes and weighted the prior too little on ACDC,
    where the left-out slices are twice as far from their neighbours as any filled slice.
    """
    if not loo or not config.calibrate:
        return Calibration(config.boundary_px, config.confidence_length, tuple(loo))
    band = float(np.median([e / d for d, _, e in loo]))
    return Calibration(max(band, config.boundary_px / 4), config.confidence_length, tuple(loo))


class SlicePrior:
    """The interpolated prior of every annotated volume of a :class:`SliceDataset`.

    Parameters
    ----------
    pairs : list of AnnotatedPair
    dataset : SliceDataset
        Its slicing axis, class table, labelled and validation slices.
    config : PriorConfig

    Attributes
    ----------
    notes : list of str
        Why a volume has no prior (scribbles, a 2D image, no painted slice): said to the user.
    """

    def __init__(self, pairs, dataset, config: PriorConfig) -> None:
        self.config = config
        self.axis = int(dataset.cfg.axis)
        self.class_values = list(dataset.class_values)
        self.notes: list[str] = []
        #: pair index -> (scores (K_prior, S, h, w) float16 of the fill's region, class index
        #: (K_prior,), distance (S,)); :meth:`scores` gives them as float32 on the whole plane
        self._volumes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: pair index -> (the region's box in the plane, the plane's shape, sampling, unit, the
        #: fill's fall-off past the outermost painted slices in pixels a slice)
        self._regions: dict[int, tuple] = {}
        #: pair index -> Calibration (the band and confidence length in use)
        self.calibration: dict[int, Calibration] = {}
        #: pair index -> how many complete painted slices the fill starts from
        self.painted_count: dict[int, int] = {}
        validation: dict[int, list[int]] = {}
        for p, s in dataset.validation:
            validation.setdefault(p, []).append(s)
        for p, pair in enumerate(pairs):
            if pair.labels is None:
                continue
            if len(pair.spatial_shape) != 3:
                continue  # a 2D image has no slices to fill between
            try:
                *volume, self._regions[p], self.calibration[p], self.painted_count[p] = self._build(
                    pair, validation.get(p, []), dataset.cfg.unpainted)
                self._volumes[p] = tuple(volume)
            except DataError as exc:
                self.notes.append(f"'{pair.name}': no prior from the painted slices: {exc}")

    def _build(self, pair, validation_slices, unpainted: str):
        labels = np.asarray(pair.labels)
        if validation_slices:  # held out: the prior must not see them
            labels = labels.copy()
            index = [slice(None)] * labels.ndim
            index[self.axis] = list(validation_slices)
            labels[tuple(index)] = 0
        image = None
        if self.config.interpolation == "flow" and not pair.rgb:
            image = np.asarray(pair.image, np.float32)
        # the leave-one-out fills below reuse this fill's flows (and region)
        cache = FlowCache() if image is not None and self.config.calibrate else None
        interp = interpolate_labels(labels, axis=self.axis, spacing=pair.spacing, method=self.config.interpolation,
                                    image=image, unpainted=unpainted, flow_cache=cache)
        missing = [v for v in interp.class_values if v not in self.class_values]
        if missing:
            raise DataError(f"label values {missing} are not in this run's class table {self.class_values}")
        class_index = np.array([self.class_values.index(v) for v in interp.class_values], np.int64)
        # the region's scores only, slice layout, in half precision: signed distances of at most
        # a plane's size, kept to 0.5 px at 1024 px and finer near the boundary, which decides
        scores = np.moveaxis(interp.scores, 1 + self.axis, 1).astype(np.float16)  # (K, S, h, w)
        plane = tuple(n for a, n in enumerate(labels.shape) if a != self.axis)
        # the fill's fall-off past the outermost painted slices (interpolate_labels' default)
        region = (interp.box, plane, interp.sampling, interp.unit,
                  default_shrink(pair.spacing, labels.ndim, self.axis))
        painted, distance = interp.painted, interp.slice_distance.astype(np.float32)
        del interp
        loo = []
        if self.config.calibrate:
            loo = leave_one_out(labels, painted, axis=self.axis, spacing=pair.spacing, unpainted=unpainted,
                                method=self.config.interpolation, image=image, flow_cache=cache)
        return scores, class_index, distance, region, calibrate(loo, self.config), len(painted)

    def take_over(self, other: "SlicePrior", pairs: dict[int, int]) -> None:
        """Use ``other``'s fill of its pair ``pairs[p]`` as this prior's pair ``p`` (a pair
        whose image, painted and validation slices did not change: no fill computed again)."""
        for p, q in pairs.items():
            if q in other._volumes:
                self._volumes[p], self._regions[p] = other._volumes[q], other._regions[q]
                self.calibration[p], self.painted_count[p] = other.calibration[q], other.painted_count[q]

    # --- queries ------------------------------------------------------------------------
    def __contains__(self, pair_index: int) -> bool:
        return pair_index in self._volumes

    def slice_distance(self, pair_index: int) -> np.ndarray:
        return self._volumes[pair_index][2]

    def scores(self, pair_index: int, start: int, stop: int) -> np.ndarray:
        """(stop - start, K_prior, H, W) float32: the fill's scores of slices ``[start, stop)``
        on the whole plane (outside the fill's region extended as
        :func:`~napari_semicl.data.interpolation.extend_scores` does)."""
        crop = self._volumes[pair_index][0][:, start:stop].astype(np.float32)
        box, plane, sampling, unit, _ = self._regions[pair_index]
        return np.moveaxis(extend_scores(crop, box, plane, sampling, unit), 1, 0)

    def _mask_of(self, pair_index: int, slices) -> np.ndarray:
        """(N, H, W) network class indices of the fill on ``slices``: the argmax in the
        region, the background outside it."""
        crop, class_index, _ = self._volumes[pair_index]
        (y0, y1), (x0, x1) = self._regions[pair_index][0]
        slices = np.asarray(slices, int)
        out = np.full((len(slices), *self._regions[pair_index][1]), class_index[0],
                      np.min_scalar_type(int(class_index.max())))
        for i, s in enumerate(slices):
            out[i, y0:y1, x0:x1] = class_index[np.argmax(crop[:, s], axis=0)]
        return out

    def mask(self, pair_index: int) -> np.ndarray | None:
        """(S, H, W) network class indices of the interpolated shape (slice layout), or None."""
        if pair_index not in self._volumes:
            return None
        return self._mask_of(pair_index, range(self._volumes[pair_index][0].shape[1]))

    def dense_targets(self, unlabelled) -> dict[tuple[int, int], np.ndarray]:
        """Targets (H, W) int16 (:func:`dense_target`'s values) of the given unlabelled (pair,
        slice) items that have a prior."""
        out = {}
        for p, s in unlabelled:
            if p not in self._volumes:
                continue
            _, class_index, dist = self._volumes[p]
            if dist[s] == 0:
                continue  # a painted slice (never an unlabelled one, but be safe)
            target = dense_target(self.scores(p, s, s + 1)[0], class_index, float(dist[s]), self.calibration[p].band_px)
            out[(p, s)] = target.astype(np.int16)  # a quarter of int64's memory: one per unpainted slice
        return out

    def near_slices(self, pair_index: int, within: float = 2.0) -> np.ndarray:
        """Unpainted slices within ``within`` slices of a painted one, where the fill is best.

        No slices with a single painted one: the fill beside it is the shrinking copy of that
        one slice, an extrapolation, and judging a cohort's network by it took the network's
        say away everywhere (the agreement gate): in the session benchmark the first painted
        slice then lowered the mask from the network's 0.81 to 0.36 (docs/benchmarks.md)."""
        if self.painted_count.get(pair_index, 0) < 2:
            return np.empty(0, dtype=np.int64)
        dist = self._volumes[pair_index][2]
        return np.flatnonzero((dist > 0) & (dist <= within))

    def agreement(self, pair_index: int, predicted: np.ndarray, slices) -> float:
        """Mean Dice over the prior's foreground classes between network class indices
        ``predicted`` (N, H, W) of ``slices`` and the prior there (1.0 with nothing to compare)."""
        if len(slices) == 0:
            return 1.0
        class_index = self._volumes[pair_index][1]
        mask = self._mask_of(pair_index, slices)  # those slices only
        background = class_index[0]
        dices = []
        for k in np.unique(mask):
            if k == background:
                continue
            a, b = predicted == k, mask == k
            dices.append(2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))
        return float(np.mean(dices)) if dices else 1.0

    def cohort(self, pair_index: int) -> bool:
        """Whether another volume of the run has ``network_min_painted`` painted slices: the
        network fused into this pair's mask is a cohort's, which learnt the anatomy from other
        volumes (:meth:`fill_only`; ``entropy_length`` applies)."""
        least = self.config.network_min_painted
        return any(n >= least for p, n in self.painted_count.items() if p != pair_index)

    def fill_only(self, pair_index: int) -> bool:
        """Whether the pair's fused mask is the fill alone: fewer than ``network_min_painted``
        painted slices in it, and none of the run's other volumes has that many (a cohort
        network, trained on other painted volumes, takes part from a volume's first painted
        slice: with the fill alone, painting that slice would take the network's mask away)."""
        return self.painted_count[pair_index] < self.config.network_min_painted and not self.cohort(pair_index)

    def probabilities(self, pair_index: int, start: int, stop: int, like: torch.Tensor,
                      scores: torch.Tensor | None = None) -> torch.Tensor:
        """The prior's class probabilities (B, K, H, W) of slices ``[start, stop)`` in the
        network's class layout, dtype and device of ``like`` (:func:`prior_probabilities`);
        ``scores``: those slices' :meth:`scores` on that device, when already at hand."""
        device = like.device
        class_index, dist = self._volumes[pair_index][1:]
        s = torch.from_numpy(self.scores(pair_index, start, stop)).to(device) if scores is None else scores
        d = torch.from_numpy(dist[start:stop]).to(device)
        p_small = prior_probabilities(s, d, self.config.temperature_px)
        p_prior = torch.zeros_like(like)
        if p_prior.shape[1] != len(self.class_values):  # pragma: no cover - guarded by the class table
            raise DataError("the prior's classes do not fit the network's")
        p_prior[:, torch.from_numpy(class_index).to(device)] = p_small.to(like.dtype)
        return p_prior

    def fuser(self, pair_index: int, agreement: float = 1.0):
        """``fuse(start, stop, probs)`` for :func:`~napari_semicl.engine.inference.predict_slices`:
        the fused probabilities of slices ``[start, stop)`` of the pair; None without a prior.
        ``agreement``: :meth:`agreement` of the network being fused."""
        if pair_index not in self._volumes or not self.config.fuse:
            return None
        fill_only = self.fill_only(pair_index)  # PriorConfig doc
        dist = self._volumes[pair_index][2]
        weight = fusion_weight(dist, self.calibration[pair_index].length, self.config.beyond_length)
        # past the painted slices a cohort's network keeps more of its say where it is unsure
        # (PriorConfig.entropy_length); a lone volume's network learnt no more than the fill there
        length = self.config.entropy_length if self.cohort(pair_index) else None
        trust = entropy_trust(dist, length)
        shrink = self._regions[pair_index][4]

        def fuse(start: int, stop: int, probs: torch.Tensor) -> torch.Tensor:
            device = probs.device
            scores = torch.from_numpy(self.scores(pair_index, start, stop)).to(device)
            p_prior = self.probabilities(pair_index, start, stop, probs, scores)
            if fill_only:
                return p_prior
            r = None
            if length is not None and bool((trust[start:stop] < 1).any()):
                r = footprint_trust(scores, torch.from_numpy(dist[start:stop]).to(device),
                                    torch.from_numpy(trust[start:stop]).to(device), shrink,
                                    self.config.entropy_margin_px)
            return fuse_probabilities(probs, p_prior, torch.from_numpy(weight[start:stop]).to(device),
                                      agreement, self.config.agreement_power, r)

        return fuse
