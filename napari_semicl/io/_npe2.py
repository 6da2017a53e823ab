"""npe2 contributions: reader, label writers and the sample data.

These functions are named in ``napari_semicl/napari.yaml``. They take and
return napari's plain "LayerData" tuples ``(data, attributes, layer_type)``,
so this module imports neither napari nor Qt.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from .atomic import full_suffix
from .readers import IMAGE_EXTENSIONS, ImageData, is_labels_file, read_image, read_labels
from .sample import load_sample_volume
from .writers import write_labels

__all__ = ["get_reader", "read_layers", "sample_volume", "write_labels_nifti", "write_labels_tiff"]

logger = logging.getLogger(__name__)

LayerData = tuple  # (data, attributes: dict, layer_type: str)


def _suffix(path) -> str:
    return full_suffix(pathlib.Path(os.fspath(path))).lower()


def _image_layer(image: ImageData) -> LayerData:
    attributes = {
        "name": image.name,
        "scale": tuple(image.scale),
        "metadata": dict(image.metadata),
        "rgb": bool(image.rgb),
    }
    return (image.data, attributes, "image")


def _labels_layer(
    labels: ImageData, *, name: str | None = None, metadata: dict | None = None
) -> LayerData:
    attributes = {
        "name": name or labels.name,
        "scale": tuple(labels.scale),
        "metadata": dict(metadata if metadata is not None else labels.metadata),
    }
    return (labels.data, attributes, "labels")


def _slide_layer(path) -> LayerData:
    """A whole-slide image (or a label pyramid) as a lazy multiscale layer.

    The file stays open while the layer reads it. A pyramid of integers whose name marks
    labels (``*_mask``, ``*_labels``, ...) or that was written as a prediction becomes a
    Labels layer; anything else an Image layer.
    """
    from .readers import LABEL_SUFFIXES
    from .wsi import open_slide

    slide = open_slide(path)
    metadata = dict(slide.metadata)
    integer = np.dtype(slide.levels[0].dtype).kind in "iu" and not slide.rgb
    stem = slide.name.lower()
    if integer and (stem.endswith(LABEL_SUFFIXES) or "prediction" in stem):
        return (list(slide.levels), {"name": slide.name, "metadata": metadata, "multiscale": True}, "labels")
    attributes = {"name": slide.name, "metadata": metadata, "rgb": slide.rgb, "multiscale": True}
    return (list(slide.levels), attributes, "image")


def _as_path_list(path) -> list[str]:
    if isinstance(path, (str, os.PathLike)):
        return [os.fspath(path)]
    return [os.fspath(p) for p in path]


def read_layers(path) -> list[LayerData]:
    """Read one path or a list of paths into napari LayerData tuples.

    Files that :func:`~napari_semicl.io.readers.is_labels_file` recognises
    become ``"labels"`` layers, all others ``"image"`` layers.

    Raises
    ------
    ReadError
        A file is unreadable, truncated or unsupported.
    """
    from .wsi import is_slide

    layers = []
    for path in _as_path_list(path):
        if is_slide(path):
            layers.append(_slide_layer(path))
        elif is_labels_file(path):
            layers.append(_labels_layer(read_labels(path)))
        else:
            layers.append(_image_layer(read_image(path, kind="image")))
    return layers


def get_reader(path) -> Callable[..., list[LayerData]] | None:
    """Return a reader for ``path`` if napari-semicl handles it.

    Parameters
    ----------
    path : str or list of str
        One file, or several files that all have the same supported extension.

    Returns
    -------
    callable or None
        ``reader(path) -> [(data, attributes, "image" | "labels"), ...]``;
        attributes hold ``name``, ``scale``, ``metadata`` and (images only)
        ``rgb``. Files whose name ends with ``_gt``, ``_label(s)``, ``_seg`` or
        ``_mask`` and that store integers become Labels layers. None for
        unsupported extensions and for lists mixing file types. The reader
        raises :class:`~napari_semicl.io.errors.ReadError` on broken files.
    """
    paths = _as_path_list(path)
    if not paths:
        return None
    suffixes = {_suffix(p) for p in paths}
    if len(suffixes) != 1 or not suffixes <= {*IMAGE_EXTENSIONS, ".svs"}:
        return None
    return read_layers


def _ensure_suffix(path: str, default: str, allowed: Sequence[str]) -> pathlib.Path:
    target = pathlib.Path(path)
    if full_suffix(target).lower() not in allowed:
        target = target.with_name(target.name + default)
    return target


def write_labels_nifti(path: str, data, attributes: dict) -> list[str]:
    """Write a Labels layer to ``.nii.gz``/``.nii`` in its source geometry.

    The geometry (affine, header, axis order) comes from
    ``attributes["metadata"]``, which carries the source image's metadata when
    the layer was read by napari-semicl (or had that metadata copied to it).
    Without it, the layer's ``scale`` gives the voxel size. napari's save
    dialog already asked before replacing a file, so existing files are
    overwritten (atomically).

    Returns
    -------
    list of str
        The path written.
    """
    target = _ensure_suffix(path, ".nii.gz", (".nii.gz", ".nii"))
    metadata = dict(attributes.get("metadata") or {})
    has_geometry = "affine" in metadata or "spacing" in metadata
    if not has_geometry and attributes.get("scale") is not None:
        metadata["spacing"] = tuple(float(s) for s in attributes["scale"])
    written = write_labels(target, data, metadata=metadata, overwrite=True)
    return [str(written)]


def write_labels_tiff(path: str, data, attributes: dict) -> list[str]:
    """Write a Labels layer to ``.tif``/``.tiff`` (axes as in napari).

    Returns
    -------
    list of str
        The path written.
    """
    target = _ensure_suffix(path, ".tif", (".tif", ".tiff"))
    metadata = dict(attributes.get("metadata") or {})
    written = write_labels(target, data, metadata=metadata, overwrite=True)
    return [str(written)]


def sample_volume() -> list[LayerData]:
    """The MNI152 T1 sample with its reference tissue labels.

    Returns
    -------
    list
        An image layer and a labels layer named ``"<image name> reference"``
        whose metadata is the image's, so that exporting the labels keeps the
        image geometry.
    """
    image, labels = load_sample_volume()
    return [
        _image_layer(image),
        _labels_layer(labels, name=f"{image.name} reference", metadata=image.metadata),
    ]
