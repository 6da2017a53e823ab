"""Layer helpers for the docks: snapshots of layers, and the layers training writes.

The engine never sees a napari layer: :func:`snapshot_pair` copies an Image/Labels pair
into an :class:`~napari_semicl.data.AnnotatedPair`; :func:`show_prediction` and
:func:`show_entropy` turn preview arrays back into layers that keep the image's geometry
(scale, translate and metadata, so that exporting a prediction keeps the source affine);
:func:`show_patch_entropy` and :func:`show_sampled_pixels` draw a method's review of one
slice (:class:`~napari_semicl.engine.events.Reviewed`) on that slice.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable

import math

import numpy as np
from napari.layers import Image, Labels, Layer, Points

from ..analysis.plots import CLASS_COLOURS
from ..data import AnnotatedPair
from ..data.tiles import SlidePair, WSIConfig, snapshot_slide
from ..errors import DataError

log = logging.getLogger(__name__)

#: ``layer.metadata`` key marking the layers that training creates (not inputs).
ROLE_KEY = "napari_semicl_role"
PREDICTION_SUFFIX = " prediction"
ENTROPY_SUFFIX = " entropy"
PATCH_ENTROPY_SUFFIX = " patch entropy"
SAMPLED_PIXELS_SUFFIX = " sampled pixels"
#: Metadata keys that carry a NIfTI geometry (see :mod:`napari_semicl.io.readers`).
GEOMETRY_KEYS = ("affine", "nifti_header")


def role(layer: Layer) -> str | None:
    """'prediction', 'entropy', 'patch_entropy' or 'sampled_pixels' for layers created by
    training, else None."""
    return layer.metadata.get(ROLE_KEY) if isinstance(layer.metadata, dict) else None


def layer_key(layer: Layer) -> str:
    """A stable identifier of ``layer``: its ``unique_id`` (kept across renames), else its name.

    Never key state on ``id(layer)`` or compare layers with ``is``: napari hands plugin docks
    a proxy viewer whose layers are new proxy objects at every access.
    """
    key = getattr(layer, "unique_id", None)
    return str(key) if key is not None else f"name:{layer.name}"


def same_layer(a: Layer | None, b: Layer | None) -> bool:
    """Whether ``a`` and ``b`` are the same layer (through napari's proxies too)."""
    return a is not None and b is not None and layer_key(a) == layer_key(b)


def spatial_shape(layer: Layer) -> tuple[int, ...]:
    """Spatial shape of an Image (without the RGB channel axis) or Labels layer."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def slice_shape(layer: Layer, axis: int) -> tuple[int, ...]:
    """(H, W) of one slice of ``layer`` along ``axis`` (a 2D image is one slice)."""
    shape = spatial_shape(layer)
    return shape if len(shape) == 2 else shape[:axis] + shape[axis + 1:]


def has_geometry(metadata: dict | None) -> bool:
    """Whether ``metadata`` holds a NIfTI affine or header to write masks with."""
    return bool(metadata) and any(metadata.get(k) is not None for k in GEOMETRY_KEYS)


def input_images(layers: Iterable[Layer]) -> list[Image]:
    """Image layers the user can train on (not the entropy maps training writes)."""
    return [layer for layer in layers if isinstance(layer, Image) and role(layer) is None]


#: Layer names of reference masks ('case_gt', 'case-ground truth', 'brain reference'): offered
#: to train on, never picked by default (a reference is for evaluation, not for painting).
_REFERENCE_NAME = re.compile(r"(?:^|[\s_.-])(?:gt|ground[\s_-]?truth|reference|ref)(?:[\s_.-]?\d+)?$", re.I)


def looks_like_reference(layer: Layer) -> bool:
    """Whether ``layer``'s name says it is a reference mask (ends in gt, ground truth, reference)."""
    return bool(_REFERENCE_NAME.search(str(layer.name)))


def input_labels(layers: Iterable[Layer]) -> list[Labels]:
    """Labels layers the user can paint (not the predictions training writes)."""
    return [layer for layer in layers if isinstance(layer, Labels) and role(layer) is None]


def _geometry_kwargs(image: Layer) -> dict:
    ndim = len(spatial_shape(image))
    return {
        "scale": tuple(image.scale)[-ndim:],
        "translate": tuple(image.translate)[-ndim:],
        "metadata": dict(image.metadata),
    }


def new_labels_layer(viewer, image: Layer, *, name: str | None = None, dtype=np.uint16) -> Labels:
    """Add an empty Labels layer of the image's spatial shape, scale and metadata."""
    kwargs = _geometry_kwargs(image)
    if getattr(image, "multiscale", False):
        # a slide: chunked labels in memory, only the painted chunks take space
        import zarr

        data = zarr.zeros(spatial_shape(image), chunks=(512, 512), dtype=dtype, zarr_format=3)
        return viewer.add_labels(data, name=name or f"{image.name} labels", **kwargs)
    return viewer.add_labels(
        np.zeros(spatial_shape(image), dtype=dtype), name=name or f"{image.name} labels", **kwargs
    )


def snapshot_pair(
    image: Image, labels: Labels | None, *, validation_slices: Iterable[int] = (), wsi=None
) -> AnnotatedPair | SlidePair:
    """Copy an Image/Labels layer pair into an :class:`AnnotatedPair` (never views).

    A multiscale image (a slide) becomes a :class:`~napari_semicl.data.tiles.SlidePair`
    for training at ``wsi.level`` (a :class:`~napari_semicl.data.tiles.WSIConfig`): its
    levels are shared (read lazily, never copied) and only the painted tiles' labels are
    copied.

    Raises
    ------
    DataError
        Labels whose shape differs from the image's spatial shape.
    """
    if getattr(image, "multiscale", False):
        lab = None if labels is None else (labels.data[0] if labels.multiscale else labels.data)
        return snapshot_slide(list(image.data), lab, rgb=bool(image.rgb), wsi=wsi or WSIConfig(),
                              name=image.name, metadata=dict(image.metadata))
    shape = spatial_shape(image)
    lab = None
    if labels is not None:
        lab = np.array(labels.data, copy=True)
        if lab.shape != shape:
            raise DataError(
                f"labels layer '{labels.name}' has shape {lab.shape} but image '{image.name}' has "
                f"spatial shape {shape}: use 'New labels layer for image' to create a matching one"
            )
    return AnnotatedPair(
        image=np.array(image.data, copy=True),
        labels=lab,
        rgb=bool(image.rgb),
        name=image.name,
        validation_slices=tuple(sorted(int(s) for s in validation_slices)),
        spacing=tuple(float(s) for s in tuple(image.scale)[-len(shape):]),
        metadata=dict(image.metadata),
    )


def refresh_pair(pair: AnnotatedPair, labels: Labels | None, validation_slices: Iterable[int]) -> AnnotatedPair | None:
    """A new snapshot of ``pair`` with the current labels and validation slices.

    The image copy is shared with ``pair`` (it does not change during training). Returns
    None when nothing changed, so that the trainer does not rebuild its data for nothing.
    """
    if isinstance(pair, SlidePair):
        if labels is None:
            return None
        wsi = WSIConfig(level=pair.level, tile_size=pair.grid.tile)
        lab = labels.data[0] if labels.multiscale else labels.data
        new = snapshot_slide(pair.levels, lab, rgb=pair.rgb, wsi=wsi, name=pair.name, metadata=pair.metadata)
        return None if new.same_paint(pair) else new
    val = tuple(sorted(int(s) for s in validation_slices))
    if labels is None or tuple(labels.data.shape) != pair.spatial_shape:
        return None if val == tuple(pair.validation_slices) else dataclasses.replace(pair, validation_slices=val)
    current = np.asarray(labels.data)
    same = pair.labels is not None and np.array_equal(current, pair.labels)
    if same and val == tuple(pair.validation_slices):
        return None
    return dataclasses.replace(
        pair, labels=pair.labels if same else np.array(current, copy=True), validation_slices=val
    )


def current_slice(viewer, layer: Layer, axis: int) -> int:
    """Index along data axis ``axis`` of ``layer`` at the viewer's current position."""
    shape = spatial_shape(layer)
    if len(shape) == 2:
        return 0
    if not 0 <= axis < len(shape):
        raise DataError(f"slicing axis {axis} is out of range for '{layer.name}' (shape {shape})")
    coords = layer.world_to_data(viewer.dims.point)
    coords = np.asarray(coords)[-len(shape):]
    return int(np.clip(np.round(coords[axis]), 0, shape[axis] - 1))


def _find(viewer, name: str, kind: type) -> Layer | None:
    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, kind):
            return layer
    return None


def _replace_data(layer: Layer, array: np.ndarray) -> Layer:
    """New data for an output layer: in place when shape and dtype allow (no new buffers,
    no reset of the layer's display), else a copy."""
    if layer.data.shape == array.shape and np.can_cast(array.dtype, layer.data.dtype):
        layer.data[...] = array
        layer.refresh()
    else:
        layer.data = np.array(array, copy=True)
    return layer


def show_prediction(viewer, image: Layer, array) -> Labels:
    """Create or refresh the '<image> prediction' Labels layer (in place when shapes match).

    ``array`` may be a list of pyramid levels (a slide's stitched prediction): the layer is
    then multiscale, scaled so that its level 0 lies on the image's (the prediction is at
    the training level, which may be coarser than the image's level 0).
    """
    name = f"{image.name}{PREDICTION_SUFFIX}"
    layer = _find(viewer, name, Labels)
    if isinstance(array, list):
        return _show_label_pyramid(viewer, image, layer, name, array)
    if layer is not None and layer.multiscale:
        viewer.layers.remove(layer)
        layer = None
    if layer is not None:
        return _replace_data(layer, array)
    kwargs = _geometry_kwargs(image)
    kwargs["metadata"][ROLE_KEY] = "prediction"
    return viewer.add_labels(np.array(array, copy=True), name=name, opacity=0.5, **kwargs)


def _show_label_pyramid(viewer, image: Layer, layer: Labels | None, name: str, levels: list) -> Labels:
    shape0 = spatial_shape(image)
    factor = shape0[0] / float(levels[0].shape[0])
    kwargs = _geometry_kwargs(image)
    scale = tuple(float(s) * factor for s in kwargs["scale"])
    if layer is not None and layer.multiscale and len(layer.data) == len(levels):
        layer.data = levels  # the new pyramid (a new store: the old one stays readable)
        layer.scale = scale
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    kwargs["metadata"][ROLE_KEY] = "prediction"
    kwargs["scale"] = scale
    return viewer.add_labels(levels, name=name, opacity=0.5, multiscale=True, **kwargs)


def show_entropy(viewer, image: Layer, array: np.ndarray) -> Image:
    """Create or refresh the '<image> entropy' Image layer (magma, 0..1, hidden at first)."""
    name = f"{image.name}{ENTROPY_SUFFIX}"
    layer = _find(viewer, name, Image)
    if layer is not None:
        return _replace_data(layer, array)
    kwargs = _geometry_kwargs(image)
    kwargs["metadata"][ROLE_KEY] = "entropy"
    return viewer.add_image(
        np.array(array, copy=True), name=name, colormap="magma", contrast_limits=(0.0, 1.0),
        blending="additive", visible=False, **kwargs,
    )


def apply_class_names(layer: Labels, names: dict[int, str]) -> bool:
    """Put ``names`` (label value -> name) in the layer's features as 'class_name'.

    napari then shows the name under the cursor. Returns False (and leaves the layer as
    it was) when the layer already has features of its own that do not fit.
    """
    import pandas as pd

    values = sorted(int(v) for v in names)
    existing = layer.features
    if len(existing.columns) and set(existing.columns) - {"index", "class_name"}:
        return False
    try:
        layer.features = pd.DataFrame(
            {"index": values, "class_name": [str(names[v]) for v in values]}
        )
    except (ValueError, TypeError, KeyError) as exc:  # napari refused the table
        log.debug("class names not applied to %s: %s", layer.name, exc)
        return False
    return True


def _slice_geometry(image: Layer, slice_index: int, axis: int) -> tuple[tuple, tuple, int | None]:
    """(scale, translate, axis or None for 2D) of ``image`` with the slicing axis moved
    onto ``slice_index``: data index 0 along ``axis`` lies on that slice."""
    ndim = len(spatial_shape(image))
    scale = [float(v) for v in tuple(image.scale)[-ndim:]]
    translate = [float(v) for v in tuple(image.translate)[-ndim:]]
    if ndim == 2:
        return tuple(scale), tuple(translate), None
    translate[axis] += slice_index * scale[axis]
    return tuple(scale), tuple(translate), axis


def show_patch_entropy(viewer, image: Layer, maps: np.ndarray, slice_index: int, axis: int) -> Image:
    """Create or refresh the '<image> patch entropy' Image layer of one reviewed slice.

    ``maps`` is (K, H, W), one PLGCL ``Ent^k`` map per class of that slice. The stack lies
    on the slicing axis starting at the reviewed slice (class k on slice
    ``slice_index + k``; for a 2D image it is a new leading axis), so class 0's map covers
    the slice it was computed on. Hidden at first; magma, contrast (0, log 2); metadata
    'slice_index' and 'axis'. Refreshed in place when the shape matches.
    """
    name = f"{image.name}{PATCH_ENTROPY_SUFFIX}"
    maps = np.asarray(maps, dtype=np.float32)
    scale, translate, ax = _slice_geometry(image, slice_index, axis)
    if ax is None:  # 2D image: the class is a leading axis of its own
        data, scale, translate = maps, (1.0, *scale), (0.0, *translate)
    else:
        data = np.moveaxis(maps, 0, ax)
    layer = _find(viewer, name, Image)
    if layer is not None and layer.data.shape == data.shape and layer.data.dtype == data.dtype:
        layer.data[...] = data
        layer.translate = translate
        layer.refresh()
    elif layer is not None:
        layer.data = np.array(data, copy=True)
        layer.scale, layer.translate = scale, translate
    else:
        meta = {ROLE_KEY: "patch_entropy"}
        layer = viewer.add_image(
            np.array(data, copy=True), name=name, colormap="magma", contrast_limits=(0.0, math.log(2)),
            blending="additive", visible=False, scale=scale, translate=translate, metadata=meta,
        )
    layer.metadata.update({"slice_index": int(slice_index), "axis": None if ax is None else int(ax)})
    return layer


def show_sampled_pixels(
    viewer, image: Layer, pixels: np.ndarray, classes: np.ndarray, slice_index: int, axis: int
) -> Points:
    """Create or refresh the '<image> sampled pixels' Points layer of one reviewed slice.

    ``pixels`` (N, 2) are (y, x) in the slice; the points are placed on that slice (the
    slice index inserted on the slicing axis) with the image's scale and translate, sized
    about 3 pixels, with a 'class' feature and face colours from the categorical palette
    :data:`CLASS_COLOURS` by class index (the same colour for a class at every refresh).
    """
    import pandas as pd
    from napari.utils.colormaps.standardize_color import transform_color

    name = f"{image.name}{SAMPLED_PIXELS_SUFFIX}"
    scale, translate, ax = _slice_geometry(image, 0, axis)
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    if ax is not None:
        pixels = np.insert(pixels, ax, float(slice_index), axis=1)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    features = pd.DataFrame({"class": classes})
    palette = transform_color(list(CLASS_COLOURS))  # (10, 4) RGBA
    colours = palette[classes % len(CLASS_COLOURS)] if len(classes) else np.zeros((0, 4), np.float32)
    layer = _find(viewer, name, Points)
    if layer is not None and layer.ndim == pixels.shape[1]:
        layer.data = pixels
        layer.features = features
        if len(pixels):
            layer.face_color = colours
        layer.refresh()
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_points(
            pixels, name=name, features=features, face_color=colours if len(pixels) else "white",
            border_width=0, size=3, scale=scale, translate=translate, metadata={ROLE_KEY: "sampled_pixels"},
        )
    layer.metadata.update({"slice_index": int(slice_index), "axis": None if ax is None else int(ax)})
    return layer
