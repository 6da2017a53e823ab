"""Read images and label maps into numpy arrays in napari's axis order.

Supported formats
-----------------
``.nii``, ``.nii.gz`` (NIfTI-1 and NIfTI-2, via nibabel)
    2D or 3D. nibabel returns voxel arrays indexed ``(i, j, k)``; we reverse
    them to ``(k, j, i)`` so that napari's slider walks the ``k`` axis (the
    slice axis of most clinical scans), and reverse the voxel sizes likewise.
    The affine and the raw header travel in :attr:`ImageData.metadata` so that
    :func:`napari_semicl.io.writers.write_labels` can write masks back in the
    source geometry. A 4D file whose extra axes have length 1 is squeezed;
    true 4D/5D files are refused.
``.tif``, ``.tiff`` (via tifffile)
    2D ``(Y, X)``, stacks ``(Z, Y, X)`` and RGB ``(Y, X, 3)`` (alpha dropped).
``.png``, ``.jpg``, ``.jpeg`` (via imageio)
    2D grey ``(Y, X)`` or RGB ``(Y, X, 3)`` (alpha dropped).

Label convention: 0 is background/unlabelled, positive integers are classes.

Examples
--------
>>> from napari_semicl.io import read_image, read_labels   # doctest: +SKIP
>>> image = read_image("case_01.nii.gz")                    # doctest: +SKIP
>>> labels = read_labels("case_01_gt.nii.gz", like=image)   # doctest: +SKIP
>>> image.data.shape == labels.data.shape                   # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import struct
import zlib

import numpy as np

from .atomic import full_suffix
from .errors import ReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_SUFFIXES",
    "ImageData",
    "is_labels_file",
    "read_image",
    "read_labels",
]

logger = logging.getLogger(__name__)

#: Extensions (lower case) handled by :func:`read_image`, mapped to the format name.
IMAGE_EXTENSIONS: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".ome.tif": "tiff",
    ".ome.tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
}

#: File-stem endings (lower case) that mark a label map, e.g. ``case_01_gt.nii.gz``.
LABEL_SUFFIXES: tuple[str, ...] = ("_gt", "_label", "_labels", "_seg", "_mask")

_KINDS = ("auto", "image", "labels")

#: Uncompressed TIFF files larger than this are memory-mapped rather than loaded.
_TIFF_MEMMAP_BYTES = 64 * 1024**2

# Errors the libraries raise on broken or foreign files.
_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    struct.error,
    zlib.error,
    MemoryError,
)


@dataclasses.dataclass
class ImageData:
    """An image or label map read from a file, in napari's axis order.

    Attributes
    ----------
    data : numpy.ndarray
        Grey images ``(Y, X)`` or ``(Z, Y, X)``; RGB images ``(Y, X, 3)``.
        NIfTI volumes are nibabel's ``(i, j, k)`` array reversed to
        ``(k, j, i)``. Label maps have an integer dtype, 0 = background.
    scale : tuple of float
        Voxel size along each spatial axis of ``data`` (the RGB channel axis
        has none). NIfTI: the header's zooms, reversed like the data.
    metadata : dict
        Plain Python values only (str, float, tuples, nested lists, bytes), so
        that the dict can be put in a napari layer's ``metadata`` and copied to
        another layer. Keys:

        ``"source_path"`` (str), ``"format"`` ({"nifti", "tiff", "png", "jpeg"}),
        ``"spacing"`` (tuple, equal to ``scale``); NIfTI files add
        ``"affine"`` (4x4 nested list of float, voxel ``(i, j, k)`` to world),
        ``"nifti_header"`` (bytes, the raw header block), ``"nifti_version"``
        ({1, 2}) and ``"axes_reversed"`` (True).
    rgb : bool
        True when the last axis of ``data`` holds RGB channels.
    name : str
        File name without its format suffix (``"case_01"`` for
        ``case_01.nii.gz``).
    """

    data: np.ndarray
    scale: tuple[float, ...]
    metadata: dict
    rgb: bool
    name: str


# --------------------------------------------------------------------------- helpers


def _split_name(path: pathlib.Path) -> tuple[str, str]:
    """Return ``(stem, lower-case suffix)`` with double suffixes kept."""
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return stem, suffix.lower()


def _format_of(path: pathlib.Path) -> str:
    _, suffix = _split_name(path)
    try:
        return IMAGE_EXTENSIONS[suffix]
    except KeyError:
        supported = ", ".join(IMAGE_EXTENSIONS)
        raise ReadError(
            f"Cannot read {path.name}: the extension {suffix or '(none)'!r} is not "
            f"supported. Supported extensions: {supported}. Convert the file to one "
            "of these formats."
        ) from None


def _check_exists(path: pathlib.Path) -> None:
    if not path.exists():
        raise ReadError(f"Cannot read {path}: the file does not exist. Check the path.")
    if path.is_dir():
        raise ReadError(
            f"Cannot read {path}: it is a folder, not a file. Open the image files "
            "inside it instead."
        )


def _reason(exc: BaseException) -> str:
    """A library error as one clause: whitespace collapsed, no final full stop."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.rstrip(" .?!")


def _sane_spacing(values, path: pathlib.Path) -> tuple[float, ...]:
    """Return finite positive spacings, replacing any other value by 1.0."""
    out = []
    for value in values:
        value = float(value)
        if math.isfinite(value) and value > 0:
            out.append(value)
        else:
            logger.warning(
                "%s: voxel size %r is not a positive number; using 1.0 instead",
                path.name,
                value,
            )
            out.append(1.0)
    return tuple(out)


def _warn_non_finite(data: np.ndarray, path: pathlib.Path) -> None:
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        count = int(data.size - np.count_nonzero(np.isfinite(data)))
        logger.warning(
            "%s contains %d NaN/Inf values; they are kept as they are (the "
            "training engine masks them).",
            path.name,
            count,
        )


def _smallest_label_dtype(low: int, high: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise OverflowError(f"label values {low}..{high} do not fit in int64")


def _as_labels(data: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """Return ``data`` as a writable integer array or raise :class:`ReadError`."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.kind in "iu":
        # Load into memory (a read-only memory map cannot be painted on).
        return np.array(data)
    if data.dtype.kind == "f":
        values = np.asarray(data)
        if not np.isfinite(values).all():
            raise ReadError(
                f"{path.name} cannot be used as labels: it contains NaN or Inf values. "
                "Labels must be whole numbers (0 = background); fix the file or open "
                "it as an image."
            )
        if values.size and not np.array_equal(values, np.round(values)):
            raise ReadError(
                f"{path.name} cannot be used as labels: it holds fractional values "
                "(e.g. a probability map). Labels must be whole numbers (0 = "
                "background); threshold or round it first, or open it as an image."
            )
        low = int(values.min()) if values.size else 0
        high = int(values.max()) if values.size else 0
        return values.astype(_smallest_label_dtype(low, high))
    raise ReadError(
        f"{path.name} cannot be used as labels: its data type {data.dtype} is not "
        "an integer type. Save the labels as integers (0 = background)."
    )


# --------------------------------------------------------------------------- NIfTI


def _read_nifti(path: pathlib.Path, *, labels: bool) -> tuple[np.ndarray, tuple, dict]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
    except (ImageFileError, *_LIBRARY_ERRORS) as exc:
        raise ReadError(
            f"Cannot read {path.name} as NIfTI: {_reason(exc)}. The file may be truncated, "
            "not a NIfTI file, or saved with a wrong extension; re-export it or "
            "check that the download completed."
        ) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise ReadError(
            f"{path.name} is a {type(img).__name__}, not a NIfTI-1/2 image. Convert "
            "it to .nii.gz (e.g. with nibabel or dcm2niix) and open it again."
        )
    shape = img.shape
    # Drop length-1 axes beyond the third (e.g. a 4D file with one volume).
    keep = [ax for ax, size in enumerate(shape) if ax < 3 or size != 1]
    if len(keep) > 3:
        extra = [ax for ax in keep if ax >= 3]
        raise ReadError(
            f"{path.name} has shape {tuple(shape)} ({len(keep)}D); only 2D and 3D "
            f"images are supported. Split it along axis {extra[0]} (nibabel "
            "index; e.g. nibabel.funcs.four_to_three or fslsplit) and open one "
            "3D volume at a time."
        )
    if len(keep) < 2:
        raise ReadError(
            f"{path.name} has shape {tuple(shape)}; it is not a 2D or 3D image."
        )
    try:
        data = np.asanyarray(img.dataobj)
        # Check the whole file is there; memory maps fail late otherwise.
        if isinstance(data, np.memmap) and data.size:
            _ = data.reshape(-1)[-1]
    except (ImageFileError, *_LIBRARY_ERRORS) as exc:
        raise ReadError(
            f"Cannot read the voxels of {path.name}: {_reason(exc)}. The file is probably "
            "truncated or corrupt; re-export it or download it again."
        ) from exc
    if len(keep) != data.ndim:
        data = data.reshape(tuple(shape[ax] for ax in keep))
    ndim = data.ndim
    data = data.transpose(tuple(range(ndim))[::-1])
    zooms = img.header.get_zooms()[:ndim]
    spacing = _sane_spacing(zooms[::-1], path)
    if labels:
        data = _as_labels(data, path)
    metadata = {
        "source_path": str(path),
        "format": "nifti",
        "spacing": spacing,
        "affine": [[float(v) for v in row] for row in np.asarray(img.affine)],
        "nifti_header": bytes(img.header.binaryblock),
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "axes_reversed": True,
    }
    return data, spacing, metadata


# --------------------------------------------------------------------------- TIFF


def _tiff_spacing(tif, page, n_spatial: int, path: pathlib.Path) -> tuple[float, ...]:
    """Pixel sizes from resolution tags, or 1.0s when absent or not physical.

    Used only when the ResolutionUnit is centimetre (converted to mm) or when
    ImageJ metadata name a unit (kept in that unit, with the ImageJ ``spacing``
    as the Z size of stacks). Inch-based DPI values are print settings, not
    pixel sizes, and are ignored.
    """
    ones = (1.0,) * n_spatial
    tags = page.tags
    try:
        xres = tags["XResolution"].value
        yres = tags["YResolution"].value
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except (KeyError, TypeError, ValueError):
        return ones
    ij = tif.imagej_metadata or {}
    if unit == 3:
        factor = 10.0  # cm -> mm
    elif unit == 1 and ij.get("unit"):
        factor = 1.0
    else:
        return ones
    try:
        sx = factor * xres[1] / xres[0]
        sy = factor * yres[1] / yres[0]
    except (ZeroDivisionError, IndexError, TypeError):
        return ones
    sizes = [sy, sx]
    if n_spatial == 3:
        sizes.insert(0, float(ij.get("spacing", 1.0)) * (factor if unit == 3 else 1.0))
    if not all(math.isfinite(s) and 1e-9 < s < 1e9 for s in sizes):
        return ones
    return tuple(float(s) for s in sizes[-n_spatial:])


def _read_tiff(path: pathlib.Path, *, labels: bool) -> tuple[np.ndarray, tuple, dict, bool]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            page = series.pages[0] if series.pages else tif.pages[0]
            photometric = int(page.photometric)
            shape = series.shape
            big = (
                series.dataoffset is not None
                and os.path.getsize(path) >= _TIFF_MEMMAP_BYTES
                and not labels
            )
            data = None if big else series.asarray()
            rgb = photometric == 2 and "S" in axes and shape[axes.index("S")] in (3, 4)
            n_spatial = sum(1 for ax, n in zip(axes, shape) if ax != "S" and n != 1)
            spacing = _tiff_spacing(tif, page, min(n_spatial, 3), path)
        if data is None:
            data = tifffile.memmap(path, series=0, mode="r")
    except (tifffile.TiffFileError, *_LIBRARY_ERRORS) as exc:
        raise ReadError(
            f"Cannot read {path.name} as TIFF: {_reason(exc)}. The file may be truncated or "
            "not a TIFF file; re-export it (e.g. from Fiji: File > Save As > Tiff)."
        ) from exc
    data = data.reshape(shape) if data.shape != shape else data
    if rgb:
        s_axis = axes.index("S")
        data = np.moveaxis(data, s_axis, -1)[..., :3]
        axes = axes.replace("S", "") + "S"
    # Squeeze length-1 axes, but never Y or X.
    drop = tuple(
        ax for ax, (name, size) in enumerate(zip(axes, data.shape))
        if size == 1 and name not in "YXS"
    )
    if drop:
        data = data.squeeze(axis=drop)
        axes = "".join(a for ax, a in enumerate(axes) if ax not in drop)
    n_spatial = data.ndim - (1 if rgb else 0)
    if n_spatial not in (2, 3):
        raise ReadError(
            f"{path.name} has axes {axes!r} and shape {tuple(data.shape)}; only 2D, "
            "3D (Z, Y, X) and 2D RGB TIFF images are supported. Split the extra "
            "axes (e.g. time or channel) into separate files, e.g. in Fiji with "
            "Image > Stacks > Tools."
        )
    if labels:
        if rgb:
            raise ReadError(
                f"{path.name} is an RGB image and cannot be used as labels. Save "
                "labels as a single-channel integer image (0 = background)."
            )
        data = _as_labels(data, path)
    if len(spacing) != n_spatial:
        spacing = (1.0,) * n_spatial
    metadata = {"source_path": str(path), "format": "tiff", "spacing": spacing}
    return data, spacing, metadata, rgb


# --------------------------------------------------------------------------- PNG / JPEG


def _read_flat(
    path: pathlib.Path, fmt: str, *, labels: bool
) -> tuple[np.ndarray, tuple, dict, bool]:
    import imageio.v3 as iio

    try:
        meta = iio.immeta(path)
        if labels and meta.get("mode") == "P":
            # Palette PNG masks: the indices are the labels, not the colours.
            data = iio.imread(path, mode="P")
        else:
            data = iio.imread(path)
    except _LIBRARY_ERRORS as exc:
        raise ReadError(
            f"Cannot read {path.name} as {fmt.upper()}: {_reason(exc)}. The file may be "
            "truncated or not a valid image; re-export it."
        ) from exc
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] == 2:  # grey + alpha
        data = data[..., 0]
    elif data.ndim == 3 and data.shape[-1] == 4:  # RGBA
        data = data[..., :3]
    rgb = data.ndim == 3 and data.shape[-1] == 3
    if not (data.ndim == 2 or rgb):
        raise ReadError(
            f"{path.name} has shape {tuple(data.shape)}; only 2D grey or RGB "
            f"{fmt.upper()} images are supported (animated or multi-page files are "
            "not). Save a single frame, or use TIFF for stacks."
        )
    if labels:
        if rgb:
            raise ReadError(
                f"{path.name} is an RGB image and cannot be used as labels. Save "
                "labels as a single-channel (grey or palette) PNG with integer "
                "values (0 = background)."
            )
        data = _as_labels(data, path)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    spacing = (1.0, 1.0)
    metadata = {"source_path": str(path), "format": fmt, "spacing": spacing}
    return data, spacing, metadata, rgb


# --------------------------------------------------------------------------- public API


def is_labels_file(path: str | os.PathLike) -> bool:
    """Guess whether ``path`` holds a label map rather than an image.

    A file is taken as labels when its file stem ends with one of
    :data:`LABEL_SUFFIXES` (``_gt``, ``_label``, ``_labels``, ``_seg``,
    ``_mask``; case-insensitive) *and* its stored data type is an integer.
    Only the header is read. JPEG files are never labels: lossy compression
    changes the label values.

    Parameters
    ----------
    path : str or path-like
        The file.

    Returns
    -------
    bool
        False also for unreadable files and unsupported extensions (reading
        them as an image then reports the problem).

    Examples
    --------
    >>> is_labels_file("case_01_GT.nii.gz")   # doctest: +SKIP
    True
    """
    path = pathlib.Path(path)
    stem, suffix = _split_name(path)
    fmt = IMAGE_EXTENSIONS.get(suffix)
    if fmt is None or fmt == "jpeg" or not stem.lower().endswith(LABEL_SUFFIXES):
        return False
    try:
        if fmt == "nifti":
            import nibabel as nib

            img = nib.load(path)
            slope, inter = img.header.get_slope_inter()
            scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
            kind = img.header.get_data_dtype().kind
            return kind in "iub" and not scaled
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tif.series[0].dtype.kind in "iub"
        return True  # PNG stores only unsigned integers
    except Exception as exc:  # noqa: BLE001 - a guess; reading reports the error
        logger.debug("is_labels_file(%s): %s", path, exc)
        return False


def read_image(path: str | os.PathLike, *, kind: str = "auto") -> ImageData:
    """Read an image or a label map into napari's axis order.

    Parameters
    ----------
    path : str or path-like
        A ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``, ``.png``, ``.jpg`` or
        ``.jpeg`` file.
    kind : {"auto", "image", "labels"}, optional
        ``"labels"`` checks that the values are whole numbers and returns an
        integer array in memory (float files with integral values are cast);
        ``"image"`` returns the values as stored (uncompressed files may be
        memory-mapped); ``"auto"`` uses ``"labels"`` when
        :func:`is_labels_file` says so and ``"image"`` otherwise.

    Returns
    -------
    ImageData
        Data, voxel size, metadata (see :class:`ImageData`), RGB flag, name.

    Raises
    ------
    ReadError
        The file is missing, truncated, of an unsupported type, 4D/5D, or not
        usable as labels when ``kind="labels"``.
    ValueError
        ``kind`` is not one of the allowed values.

    Notes
    -----
    NaN/Inf values in a float image are kept; a warning is logged.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    path = pathlib.Path(path)
    fmt = _format_of(path)
    _check_exists(path)
    labels = kind == "labels" or (kind == "auto" and is_labels_file(path))
    if fmt == "nifti":
        data, spacing, metadata = _read_nifti(path, labels=labels)
        rgb = False
    elif fmt == "tiff":
        data, spacing, metadata, rgb = _read_tiff(path, labels=labels)
    else:
        data, spacing, metadata, rgb = _read_flat(path, fmt, labels=labels)
    if not labels:
        _warn_non_finite(data, path)
    stem, _ = _split_name(path)
    logger.debug("Read %s: shape %s, dtype %s, spacing %s", path, data.shape, data.dtype, spacing)
    return ImageData(data=data, scale=tuple(spacing), metadata=metadata, rgb=rgb, name=stem)


def read_labels(path: str | os.PathLike, *, like: ImageData | None = None) -> ImageData:
    """Read a label map (integers, 0 = background) into napari's axis order.

    Parameters
    ----------
    path : str or path-like
        A label file in any format :func:`read_image` supports (JPEG is
        accepted but discouraged: compression alters label values).
    like : ImageData, optional
        The image these labels belong to; their spatial shapes must match.

    Returns
    -------
    ImageData
        ``data`` has an integer dtype (``uint8`` for bool and for integral
        float files whose values fit, else the smallest fitting type).

    Raises
    ------
    ReadError
        The file is unreadable, RGB, or holds fractional/NaN values.
    ValueError
        The shape differs from ``like``'s; the message names both shapes.
    """
    labels = read_image(path, kind="labels")
    if like is not None:
        like_shape = tuple(like.data.shape[:-1] if like.rgb else like.data.shape)
        if tuple(labels.data.shape) != like_shape:
            raise ValueError(
                f"The labels {pathlib.Path(path).name} have shape "
                f"{tuple(labels.data.shape)} but the image {like.name!r} has shape "
                f"{like_shape}. Open the labels that belong to this image, or "
                "resample them to the image grid first."
            )
    return labels
