"""Fill between painted slices: the dense shape a few fully painted slices imply.

This is the "fill between slices" of 3D Slicer and ITK-SNAP, written for label arrays:

* per class, the 2D signed distance map of every *complete* painted slice (positive
  inside, in in-plane pixels; a pixel's centre sits half a pixel inside the boundary, so a
  one-pixel object scores +0.5 and its neighbours -0.5);
* a slice between painted slices ``a`` and ``b`` gets the linear blend of the two maps by
  position (``method='sdf'``), or of the two maps first carried onto that slice, slice by
  slice, by optical flow between neighbouring image slices (``method='flow'``, the default
  when the image is given);
* past the outermost painted slice, the nearest painted slice's map minus ``shrink`` per
  slice, so that the shape shrinks and vanishes;
* where a class is painted on one side of a gap and absent on the other, the absent side
  is taken as the present side's map lowered by its peak (or by ``shrink`` per slice,
  whichever is more), so that the class shrinks steadily and is gone by the absent slice;
* the class with the largest positive score wins; background where no class is positive.

Conventions (as in :mod:`napari_semicl.data.annotation`): with ``unpainted='background'``
(whole slices painted, 0 = background) any slice with a non-zero pixel is complete; with
``unpainted='ignore'`` (0 = unpainted) a slice is complete only when every pixel is
painted, and the background is the value the user painted as background.

Examples
--------
>>> import numpy as np
>>> lab = np.zeros((5, 9, 9), np.uint8)
>>> lab[0, 3:6, 3:6] = 1
>>> lab[4, 1:8, 1:8] = 1
>>> out = interpolate_labels(lab, axis=0)
>>> out.painted.tolist(), out.class_values
([0, 4], [0, 1])
>>> [int(out.labels[s].sum()) for s in range(5)]
[9, 9, 25, 25, 49]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, DataError
from .annotation import UNPAINTED_CHOICES

log = logging.getLogger(__name__)

METHODS = ("sdf", "flow")
#: Fall-off past the outermost painted slice, in in-plane pixels per slice (isotropic voxels):
#: a taper of about 56 degrees. Chosen on the left-atrium and ACDC volumes of ../shared/data
#: (docs/benchmarks.md, "Fall-off past the outermost painted slice") and checked on ACDC
#: volumes not used to choose it: steeper (3) loses up to 0.07 Dice where the structure goes on
#: past the painted slices, and gains at most 0.004 where the outermost painted slice is its tip.
DEFAULT_SHRINK_PX = 1.5
#: The fall-off of issue 16's baseline ("interp" in ``bench``: 3D Slicer's fill between slices,
#: shrinking 3 px a slice past the outermost one).
BASELINE_SHRINK_PX = 3.0
#: ``interpolate_labels(flow_max_px=...)``: the longest in-plane side at which the optical flow
#: runs at full resolution. Every plane of the left-atrium volumes of ../shared/data (at most
#: 212 px) is below it, so their fill is unchanged; a 512 x 512 CT slice is measured at a third
#: of its resolution, about the sampling of those volumes, and the flow's cost per slice stays
#: about theirs (docs/prior.md, "CT-sized volumes").
DEFAULT_FLOW_MAX_PX = 224


@dataclass(frozen=True)
class Interpolation:
    """The result of :func:`interpolate_labels`.

    Attributes
    ----------
    labels : ndarray
        Same shape and dtype as the input: label values everywhere; the painted slices
        exactly as painted.
    class_values : list of int
        The background value first, then the foreground values (sorted).
    scores : ndarray of float32, shape (len(class_values), \\*region shape)
        Per class, the (blended) signed distance in in-plane pixels, positive inside, on the
        ``region`` of the labels (every slice, a box in the plane; the whole array when not
        cropped). The background's score is minus the largest foreground score, so that
        ``class_values[argmax(scores)] == labels[region]``; outside the region the labels
        are the background. :meth:`full_scores` extends them to the whole array.
    slice_distance : ndarray of float32, shape (n_slices,)
        Distance along ``axis`` from each slice to the nearest painted slice, in slices
        (0 on painted slices).
    painted : ndarray of int
        Sorted indices of the complete painted slices.
    axis : int
        The slicing axis.
    method : str
        {'sdf', 'flow'}: how the in-between slices were filled.
    shrink : float
        The fall-off used past the outermost painted slice, in-plane pixels per slice.
    """

    labels: np.ndarray
    class_values: list
    scores: np.ndarray
    slice_distance: np.ndarray
    painted: np.ndarray
    axis: int
    method: str = "sdf"
    shrink: float = DEFAULT_SHRINK_PX
    #: where ``scores`` sits in ``labels`` (one slice per axis); None: the whole array
    region: tuple | None = None
    #: in-plane pixel sizes (None: isotropic) and the pixel unit of the signed distances
    sampling: tuple | None = None
    unit: float = 1.0
    #: the in-plane downsampling of the optical flow (1: full resolution)
    flow_factor: int = 1

    @property
    def box(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The region in the plane: ((y0, y1), (x0, x1)) along the two in-plane axes."""
        shape = self.labels.shape
        planes = [a for a in range(len(shape)) if len(shape) == 2 or a != self.axis]
        region = self.region or tuple(slice(None) for _ in shape)
        return tuple(region[a].indices(shape[a])[:2] for a in planes)

    def full_scores(self) -> np.ndarray:
        """The scores of the whole array, (len(class_values), \\*labels.shape): outside the
        region each foreground class falls by one pixel a pixel of distance from its value at
        the region's nearest pixel (as a signed distance does), the background is minus the
        largest foreground score. Inside the region, ``scores``."""
        if self.region is None or all(r == slice(None) for r in self.region):
            return np.asarray(self.scores)
        shape = self.labels.shape
        if len(shape) == 2:
            return extend_scores(self.scores, self.box, shape, self.sampling, self.unit)
        moved = np.moveaxis(self.scores, self.axis + 1, 1)  # (K, S, h, w)
        plane = tuple(n for a, n in enumerate(shape) if a != self.axis)
        full = extend_scores(moved, self.box, plane, self.sampling, self.unit)
        return np.moveaxis(full, 1, self.axis + 1)


# --------------------------------------------------------------------------- slices
def _check_axis(labels: np.ndarray, axis: int) -> int:
    if labels.ndim not in (2, 3):
        raise DataError(f"interpolation needs a 2D image or a 3D volume of labels, got {labels.ndim} dimensions "
                        f"(shape {labels.shape})")
    if labels.ndim == 2:
        return 0
    if not -labels.ndim <= axis < labels.ndim:
        raise DataError(f"axis {axis} does not exist in labels of shape {labels.shape}")
    return axis % labels.ndim


def _check_mode(unpainted: str) -> None:
    if unpainted not in UNPAINTED_CHOICES:
        raise ConfigError(f"unpainted must be one of {set(UNPAINTED_CHOICES)}, got {unpainted!r}")


def _slice_stats(labels: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice along ``axis``: whether any pixel is painted, whether every pixel is."""
    vol = labels[None] if labels.ndim == 2 else np.moveaxis(labels, axis, 0)
    nonzero = vol.reshape(vol.shape[0], -1) != 0
    return nonzero.any(axis=1), nonzero.all(axis=1)


def complete_slice_indices(labels: np.ndarray, axis: int = 0, unpainted: str = "background") -> np.ndarray:
    """Indices of the slices along ``axis`` that are fully painted.

    Parameters
    ----------
    labels : ndarray
        Integer labels, (Z, Y, X) or (Y, X) (one slice, index 0).
    axis : int
        The slicing axis (ignored for 2D labels).
    unpainted : {'background', 'ignore'}
        'background': 0 is background, so any slice with a non-zero pixel is complete.
        'ignore': 0 is unpainted, so a slice is complete only when every pixel is non-zero.

    Returns
    -------
    ndarray of int
        Sorted slice indices.

    Examples
    --------
    >>> lab = np.zeros((3, 2, 2), int); lab[0] = 1; lab[1, 0, 0] = 2
    >>> complete_slice_indices(lab, 0).tolist(), complete_slice_indices(lab, 0, "ignore").tolist()
    ([0, 1], [0])
    """
    _check_mode(unpainted)
    axis = _check_axis(labels, axis)
    anything, everything = _slice_stats(labels, axis)
    return np.flatnonzero(anything if unpainted == "background" else everything)


def _format_slices(indices) -> str:
    indices = [int(i) for i in indices]
    shown = ", ".join(str(i) for i in indices[:10])
    return shown + (f" and {len(indices) - 10} more" if len(indices) > 10 else "")


# --------------------------------------------------------------------------- distances
def _signed_distance(mask: np.ndarray, sampling, unit: float, absent: float) -> np.ndarray:
    """Signed distance of a 2D boolean mask in in-plane pixels, positive inside.

    A pixel's score is its distance to the nearest pixel of the other side minus half a
    pixel: +0.5 for a one-pixel object, -0.5 next to it; ``absent`` where the mask is empty.
    """
    if not mask.any():
        return np.full(mask.shape, absent, np.float32)
    if mask.all():
        return np.full(mask.shape, -absent, np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return ((inside - outside) / unit - np.where(mask, 0.5, -0.5)).astype(np.float32)


def _plane_geometry(spacing, ndim: int, axis: int) -> tuple[tuple | None, float, float]:
    """(in-plane sampling or None, in-plane pixel size, slice spacing in in-plane pixels)."""
    if spacing is None:
        return None, 1.0, 1.0
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise DataError(f"spacing must give {ndim} positive voxel sizes, got {spacing}")
    if ndim == 2:
        plane = spacing
        through = 1.0
    else:
        plane = tuple(s for a, s in enumerate(spacing) if a != axis)
        through = spacing[axis]
    unit = min(plane)
    # the distance transform measures in the spacing's units (mm) and _signed_distance
    # divides by ``unit``: pass the sampling always, or isotropic pixels of size != 1 would
    # be counted in pixels and divided again
    return plane, unit, through / unit


# --------------------------------------------------------------------------- flow
def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentiles of the whole image (every voxel up to 2**24 of them,
    else an even subsample: a percentile needs a copy of what it reads)."""
    step = 1
    while image.size / step ** image.ndim > 2 ** 24:
        step += 1
    sample = image[(slice(None, None, step),) * image.ndim] if step > 1 else image
    low, high = np.percentile(sample, (1, 99))
    return float(low), float(high)


def _flow_factor(plane, flow_max_px: int | None) -> int:
    """The in-plane downsampling of the optical flow: the smallest integer factor that brings
    the longest side of the (cropped) plane to at most ``flow_max_px`` pixels (1: none)."""
    if not flow_max_px:
        return 1
    return max(1, int(np.ceil(max(plane) / float(flow_max_px))))


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """``img`` averaged over f x f blocks (edge-padded to a multiple of f)."""
    if f == 1:
        return img
    h, w = img.shape
    padded = np.pad(img, ((0, -h % f), (0, -w % f)), mode="edge")
    return padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).mean(axis=(1, 3))


class FlowCache:
    """The optical flows of one fill, kept for further fills of the same image and region.

    Pass one to :func:`interpolate_labels` (``flow_cache``): the first fill records its
    region, flow resolution and intensity range and keeps every flow it measures (at the
    flow's resolution, ``(2, h / f, w / f)`` float32 a slice pair); later fills of the same
    image, or of a stretch of its slices starting at ``offset``, use that region and reuse the
    flows between the same slices (:func:`napari_semicl.engine.prior.leave_one_out` refills
    each inner painted slice from its neighbours this way, measuring few flows again).
    """

    def __init__(self) -> None:
        self.box = None
        self.factor = 1
        self.intensity = None
        self.plane = None
        #: the slice index, in the first fill's image, of the next fill's slice 0
        self.offset = 0
        self.flows: dict[tuple[int, int], np.ndarray] = {}


def _flow_warper(image: np.ndarray, radius: int, *, factor: int = 1, intensity=None, prefilter: bool = False,
                 num_warp: int = 4, cache: FlowCache | None = None):
    """A function warp(maps, source, target): ``maps`` (C, Y, X) of slice ``source`` moved
    onto slice ``target`` by optical flow between the image slices.

    ``image`` (S, Y, X), slicing axis first (a view is enough: one slice pair is read at a
    time). With ``factor`` > 1 the flow is measured on the slices averaged over factor x
    factor blocks (``radius`` in those pixels, so the window covers the same anatomy as at
    ``factor`` times coarser sampling), then carried back to every pixel (bilinear) and its
    vectors scaled by ``factor``. ``intensity``: (low, high) for the normalisation to [0, 1]
    (default: the image's 1st and 99th percentiles).
    """
    from skimage.registration import optical_flow_ilk

    low, high = _intensity_range(image) if intensity is None else intensity
    scale = high - low if high > low else 1.0
    shape = image.shape[1:]
    grid = np.mgrid[: shape[0], : shape[1]].astype(np.float32)

    def prepared(s: int) -> np.ndarray:
        img = np.clip((np.asarray(image[s], np.float32) - low) / scale, 0, 1)
        return _block_mean(img, factor).astype(np.float32, copy=False)

    def warp(maps: np.ndarray, source: int, target: int) -> np.ndarray:
        if source == target:
            return maps
        # flow v with image[source](x + v(x)) ~ image[target](x)
        key = None if cache is None else (source + cache.offset, target + cache.offset)
        flow = None if key is None else cache.flows.get(key)
        if flow is None:
            flow = optical_flow_ilk(prepared(target), prepared(source), radius=radius, num_warp=num_warp,
                                    prefilter=prefilter)
            if key is not None:
                cache.flows[key] = flow
        if factor > 1:
            # bilinear, block centres to pixel centres: pixel y reads the coarse grid at (y + 0.5) / f - 0.5
            flow = factor * np.stack([ndimage.zoom(c, factor, order=1, mode="nearest", grid_mode=True)
                                      [: shape[0], : shape[1]] for c in flow])
        coords = grid + flow
        return np.stack([ndimage.map_coordinates(m, coords, order=1, mode="nearest") for m in maps])

    return warp


def _propagate(warp, maps: np.ndarray, source: int, targets, *, chain: bool, stop=None) -> dict:
    """``maps`` of slice ``source`` warped onto each of ``targets`` (in order, moving away
    from ``source``): directly, or slice by slice along the chain of neighbours.

    ``stop(s, maps)``: once it is true (chained), the remaining targets get the maps as they
    are, unwarped (used past the outermost painted slice, where the shape is gone)."""
    out, current, previous = {}, maps, source
    moving = True
    for s in targets:
        if chain:
            if moving:
                current, previous = warp(current, previous, s), s
                moving = stop is None or not stop(s, current)
            out[s] = current
        else:
            out[s] = warp(maps, source, s)
    return out


# --------------------------------------------------------------------------- region
def crop_margin(box_extent, reach: int, flow: bool, flow_radius: int, factor: int) -> int:
    """In-plane pixels kept around the painted foreground's bounding box (:func:`interpolate_labels`'s
    ``crop``).

    * 1 pixel for the signed distances: with one pixel of background all round the painted
      shapes, the distance transform of the region equals the whole plane's there (the
      nearest pixel of the other side is never farther than the region's edge);
    * with the optical flow, its window (``2 * flow_radius`` pixels of the flow's resolution,
      ``factor`` pixels each): the flow next to the region's edge is measured on less
      image than on the whole plane;
    * and the shape's motion away from the painted shapes' box: a tenth of the box's longer
      side plus half a pixel per slice of ``reach``, the longest stretch a map is carried
      (a gap between painted slices, or past the outermost one while the shape lasts). On
      4 left-atrium volumes of ../shared/data (K = 2, 3, 5, tips painted or not: 24 fills)
      the whole plane's fill left the painted box by at most 9 pixels (K = 2, the tips
      painted), where this margin came to 34 to 45 pixels.
    """
    margin = 1
    if flow:
        margin += 2 * flow_radius * factor + int(np.ceil(0.1 * max(box_extent))) + int(np.ceil(reach / 2))
    return margin


def extend_scores(scores: np.ndarray, box, plane, sampling=None, unit: float = 1.0) -> np.ndarray:
    """Scores of a region extended to the whole plane.

    ``scores`` (K, ..., h, w): the region's scores, background first; ``box`` ((y0, y1), (x0,
    x1)) where the region sits in the plane of shape ``plane``. Outside the region a
    foreground class scores its value at the nearest region pixel minus the distance to the
    region (in in-plane pixels of size ``unit``, like the signed distances), and the
    background minus the largest foreground score (as inside).
    """
    (y0, y1), (x0, x1) = box
    h, w = plane
    if (y0, y1, x0, x1) == (0, h, 0, w):
        return scores
    lead = scores.shape[:-2]
    yy = np.clip(np.arange(h), y0, y1 - 1)
    xx = np.clip(np.arange(w), x0, x1 - 1)
    sy, sx = (1.0, 1.0) if sampling is None else (float(sampling[0]) / unit, float(sampling[1]) / unit)
    dist = np.hypot(((np.arange(h) - yy) * sy)[:, None], ((np.arange(w) - xx) * sx)[None, :]).astype(np.float32)
    out = np.empty((*lead, h, w), np.float32)
    fg = scores[1:][..., (yy - y0)[:, None], (xx - x0)[None, :]] - dist
    out[1:] = fg
    out[0] = -fg.max(axis=0) if fg.shape[0] else 1.0
    out[..., y0:y1, x0:x1] = scores
    return out


# --------------------------------------------------------------------------- interpolation
def _class_values(vol: np.ndarray, painted: np.ndarray, unpainted: str, background_value) -> tuple[int, list[int]]:
    values, counts = np.unique(vol[painted], return_counts=True)
    if unpainted == "background":
        background = 0
    elif background_value is not None:
        background = int(background_value)
    else:
        background = int(values[np.argmax(counts)])
    foreground = sorted(int(v) for v in values if int(v) != background and (unpainted == "ignore" or v != 0))
    return background, foreground


def default_shrink(spacing, ndim: int, axis: int, px: float = DEFAULT_SHRINK_PX) -> float:
    """The fall-off of ``px`` in-plane pixels a slice scaled to the voxel size: ``px * slice
    spacing / in-plane pixel size`` (``px`` with no spacing)."""
    return float(px) * _plane_geometry(spacing, ndim, axis)[2]


def interpolate_labels(
    labels: np.ndarray,
    *,
    axis: int = 0,
    spacing=None,
    shrink: float | None = None,
    method: str | None = None,
    image: np.ndarray | None = None,
    unpainted: str = "background",
    background_value: int | None = None,
    flow_radius: int = 4,
    flow_chain: bool = True,
    crop: bool = True,
    flow_max_px: int | None = DEFAULT_FLOW_MAX_PX,
    flow_cache: FlowCache | None = None,
) -> Interpolation:
    """Fill the slices between fully painted slices, the way 3D Slicer and ITK-SNAP do.

    Parameters
    ----------
    labels : ndarray of int, (Z, Y, X) or (Y, X)
        Painted labels; only complete slices (see :func:`complete_slice_indices`) count.
    axis : int
        The slicing axis (ignored for 2D labels).
    spacing : sequence of float, optional
        Voxel size per axis of ``labels``. In-plane distances then respect an anisotropic
        pixel, and the default ``shrink`` scales with the slice spacing.
    shrink : float, optional
        Fall-off past the outermost painted slice, in in-plane pixels per slice. Default
        :func:`default_shrink`: ``1.5 * slice spacing / in-plane pixel size`` (1.5 for
        isotropic voxels).
    method : {'flow', 'sdf'}, optional
        'sdf': linear blend of the two neighbouring painted slices' signed distance maps.
        'flow': the same, after carrying each map onto the slice by optical flow
        (:func:`skimage.registration.optical_flow_ilk`) between neighbouring image slices;
        needs ``image``. Default: 'flow' when ``image`` is given (it measured better on
        left-atrium and cardiac MRI, docs/benchmarks.md), else 'sdf'.
    image : ndarray, optional
        The grey image, same shape as ``labels``; required by ``method='flow'``.
    unpainted : {'background', 'ignore'}
        'background': 0 is background and any slice with a painted pixel is complete.
        'ignore': 0 is unpainted; slices must be painted in every pixel (a partly painted
        slice is a scribble and is refused), and the background is ``background_value``.
    background_value : int, optional
        With ``unpainted='ignore'``: the label value painted as background. Default: the
        most common value on the complete slices.
    flow_radius : int
        Window radius of the optical flow (``method='flow'``), in pixels.
    flow_chain : bool
        ``method='flow'``: register neighbouring slices and carry each map along, slice by
        slice (True), or register each slice directly to the painted slice (False).
    crop : bool
        Work on a region of the plane: the bounding box of the foreground painted on any
        painted slice, plus a margin (:func:`crop_margin`), on every slice; the labels outside
        it are the background. With ``method='sdf'`` the labels are exactly the whole plane's
        and so are the scores in the region (a foreground score is positive only inside a
        painted shape, and 1 pixel of margin keeps the distances exact). With 'flow' the
        flow's coarse levels see the region rather than the plane, so a few boundary pixels
        may differ (docs/prior.md, "CT-sized volumes"). False: the whole plane.
    flow_max_px : int or None
        ``method='flow'``: regions longer than this on a side get their optical flow measured
        on image slices averaged over f x f blocks, f the smallest integer bringing the side to
        at most ``flow_max_px`` (the window radius in those pixels); the flow is carried back
        to every pixel (bilinear) and its vectors scaled by f. None: full resolution always.
    flow_cache : FlowCache, optional
        ``method='flow'``: keep the flows (a first fill) or reuse them with the first fill's
        region, flow resolution and intensity range (later fills of the same image, or of its
        slices from ``flow_cache.offset`` on; same plane).

    Returns
    -------
    Interpolation
        Labels, per-class scores (of the region), distance of each slice to the nearest
        painted one.

    Raises
    ------
    DataError
        No complete slice; scribbles in 'ignore' mode; image and labels differ in shape.
    ConfigError
        Unknown ``method`` or ``unpainted``, or a negative ``shrink``.

    Examples
    --------
    >>> lab = np.zeros((3, 5, 5), np.uint8); lab[1, 1:4, 1:4] = 2
    >>> out = interpolate_labels(lab, axis=0, shrink=1.0)
    >>> [int((out.labels[s] == 2).sum()) for s in range(3)], out.slice_distance.tolist()
    ([1, 9, 1], [1.0, 0.0, 1.0])
    """
    _check_mode(unpainted)
    if method is None:
        method = "sdf" if image is None else "flow"
    if method not in METHODS:
        raise ConfigError(f"method must be one of {set(METHODS)}, got {method!r}")
    if shrink is not None and not shrink >= 0:
        raise ConfigError(f"shrink must be >= 0 (in-plane pixels per slice), got {shrink!r}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise DataError(f"labels must hold integers, got dtype {labels.dtype}")
    axis = _check_axis(labels, axis)
    flat = labels.ndim == 2
    vol = labels[None] if flat else np.moveaxis(labels, axis, 0)
    anything, everything = _slice_stats(labels, axis)
    if unpainted == "ignore":
        scribbled = np.flatnonzero(anything & ~everything)
        if scribbled.size:
            raise DataError(
                f"slice(s) {_format_slices(scribbled)} along axis {axis} are only partly painted: scribbles have no "
                "interpolation. Paint whole slices and tick 'unpainted means background', or paint every pixel of "
                "those slices.")
        complete = everything
    else:
        complete = anything
    painted = np.flatnonzero(complete)
    if painted.size == 0:
        what = "a slice with a painted pixel" if unpainted == "background" else "a slice with every pixel painted"
        raise DataError(f"nothing to interpolate: no complete slice along axis {axis} (need {what})")
    if method == "flow" and not flat:
        if image is None:
            raise DataError("method 'flow' needs the image: pass image= (same shape as the labels), or use method='sdf'")
        image = np.asarray(image)
        if image.shape != labels.shape:
            raise DataError(f"image shape {image.shape} differs from labels shape {labels.shape}")
    use_flow = method == "flow" and not flat

    sampling, unit, _ = _plane_geometry(spacing, labels.ndim, axis)
    shrink = default_shrink(spacing, labels.ndim, axis) if shrink is None else float(shrink)
    background, foreground = _class_values(vol, painted, unpainted, background_value)
    n, plane = vol.shape[0], vol.shape[1:]
    absent = -float(sum(plane))  # lower than any signed distance in the plane

    # the region: the painted foreground's bounding box in the plane, plus a margin
    box = ((0, plane[0]), (0, plane[1]))
    factor = _flow_factor(plane, flow_max_px) if use_flow else 1
    if crop and foreground:
        footprint = np.zeros(plane, bool)
        for p in painted:
            footprint |= np.isin(vol[p], foreground)
        ys, xs = np.any(footprint, axis=1), np.any(footprint, axis=0)
        (y0, y1), (x0, x1) = ((int(np.argmax(a)), len(a) - int(np.argmax(a[::-1]))) for a in (ys, xs))
        reach = max(int(np.diff(painted).max()) if len(painted) > 1 else 0,
                    int(np.ceil(_max_peak(vol, painted, foreground, sampling, unit) / shrink)) if shrink > 0 else n)
        factor = _flow_factor((y1 - y0, x1 - x0), flow_max_px) if use_flow else 1
        m = crop_margin((y1 - y0, x1 - x0), reach, use_flow, flow_radius, factor)
        box = ((max(y0 - m, 0), min(y1 + m, plane[0])), (max(x0 - m, 0), min(x1 + m, plane[1])))
        factor = _flow_factor((box[0][1] - box[0][0], box[1][1] - box[1][0]), flow_max_px) if use_flow else 1
    intensity = None
    if use_flow and flow_cache is not None:
        if flow_cache.box is None:  # the first fill: record its choices
            flow_cache.box, flow_cache.factor, flow_cache.plane = box, factor, plane
            flow_cache.intensity = _intensity_range(image)
        elif flow_cache.plane != plane:
            raise DataError(f"the flow cache holds flows of {flow_cache.plane} planes, these are {plane}")
        box, factor, intensity = flow_cache.box, flow_cache.factor, flow_cache.intensity
    (y0, y1), (x0, x1) = box
    window = (slice(None), slice(y0, y1), slice(x0, x1))
    h, w = y1 - y0, x1 - x0

    # signed distance maps of the painted slices only, in the region: (n_painted, n_fg, h, w)
    maps = np.stack([
        np.stack([_signed_distance(vol[p][window[1:]] == v, sampling, unit, absent) for v in foreground])
        if foreground else np.zeros((0, h, w), np.float32)
        for p in painted
    ])
    present = np.array([[bool(np.any(vol[p] == v)) for v in foreground] for p in painted], dtype=bool)
    present = present.reshape(len(painted), len(foreground))
    peaks = maps.reshape(len(painted), len(foreground), -1).max(axis=2) if foreground else np.zeros(present.shape)

    # scores in the region, background first (filled last)
    scores = np.empty((1 + len(foreground), n, h, w), np.float32)
    fg_scores = scores[1:]
    warp = None
    if use_flow:
        # the image travels with the labels: its slicing axis moves to the front too
        moved = np.moveaxis(image, axis, 0)
        warp = _flow_warper(moved[window], flow_radius, factor=factor,
                            intensity=_intensity_range(image) if intensity is None else intensity, cache=flow_cache)

    # past the outermost painted slices: the nearest map minus `shrink` per slice; once no
    # class scores above 0 any more the flow stops (warps only average, so no score can come
    # back above 0: the labels are the same, the scores there are those of the last slice moved)
    for i, outside in ((0, range(int(painted[0]) - 1, -1, -1)), (len(painted) - 1, range(int(painted[-1]) + 1, n))):
        p = int(painted[i])

        def gone(s, m, p=p):
            return shrink > 0 and (m.size == 0 or float(m.max()) - shrink * abs(s - p) <= 0)

        moved_maps = _propagate(warp, maps[i], p, outside, chain=flow_chain, stop=gone) if warp is not None else None
        for s in outside:
            fg_scores[:, s] = (moved_maps[s] if moved_maps is not None else maps[i]) - shrink * abs(s - p)
    for i in range(len(painted)):
        fg_scores[:, painted[i]] = maps[i]
    # between painted slices a and b: blend by position
    for i in range(len(painted) - 1):
        a, b = int(painted[i]), int(painted[i + 1])
        if b - a < 2:
            continue
        gap = b - a
        left, right = maps[i].copy(), maps[i + 1].copy()
        # a class painted on one side only: shrink it steadily until it is gone at the other
        for c in range(len(foreground)):
            if present[i, c] and not present[i + 1, c]:
                right[c] = left[c] - max(shrink * gap, peaks[i, c] + 0.5)
            elif present[i + 1, c] and not present[i, c]:
                left[c] = right[c] - max(shrink * gap, peaks[i + 1, c] + 0.5)
        if warp is None:
            t = (np.arange(a + 1, b, dtype=np.float32) - a) / gap
            fg_scores[:, a + 1: b] = ((1 - t)[None, :, None, None] * left[:, None] + t[None, :, None, None] * right[:, None])
        else:
            forward = _propagate(warp, left, a, range(a + 1, b), chain=flow_chain)
            backward = _propagate(warp, right, b, range(b - 1, a, -1), chain=flow_chain)
            for s in range(a + 1, b):
                t = (s - a) / gap
                fg_scores[:, s] = (1 - t) * forward[s] + t * backward[s]
            del forward, backward

    values = np.array([background, *foreground], dtype=labels.dtype)
    out = np.full(vol.shape, background, dtype=labels.dtype)
    for s in range(n):  # one slice at a time: argmax's index array is int64
        if foreground:
            np.max(fg_scores[:, s], axis=0, out=scores[0, s])
            np.negative(scores[0, s], out=scores[0, s])
        else:
            scores[0, s] = 1.0
        out[s][window[1:]] = values[np.argmax(scores[:, s], axis=0)]
    out[painted] = vol[painted]  # exactly as painted (same by construction; unpainted 0s in 'background' mode too)

    dist = np.abs(np.arange(n)[:, None] - painted[None, :]).min(axis=1).astype(np.float32)
    region = [slice(None)] * labels.ndim
    if flat:
        out, scores = out[0], scores[:, 0]
        region = [slice(y0, y1), slice(x0, x1)]
    else:
        out = np.moveaxis(out, 0, axis)
        scores = np.moveaxis(scores, 1, axis + 1)  # a view: the caller may move it back for free
        others = [a for a in range(3) if a != axis]
        region[others[0]], region[others[1]] = slice(y0, y1), slice(x0, x1)
    return Interpolation(
        labels=np.ascontiguousarray(out), class_values=[int(v) for v in values], scores=scores,
        slice_distance=dist, painted=painted.astype(int), axis=axis, method=method, shrink=shrink,
        region=tuple(region), sampling=None if sampling is None else tuple(sampling), unit=unit,
        flow_factor=factor,
    )


def _max_peak(vol: np.ndarray, painted, foreground, sampling, unit: float) -> float:
    """An upper bound of the largest signed distance of any class on the painted slices (the
    shape's inscribed circle fits in its bounding box): half the box's shorter side, in pixels
    of size ``unit``, at least 1."""
    sy, sx = (1.0, 1.0) if sampling is None else (sampling[0] / unit, sampling[1] / unit)
    peak = 1.0
    for p in painted:
        mask = np.isin(vol[p], foreground)
        if mask.any():
            ys, xs = np.nonzero(mask)
            peak = max(peak, min((ys.max() - ys.min() + 1) * sy, (xs.max() - xs.min() + 1) * sx) / 2 + 0.5)
    return float(peak)
