"""Write label maps (masks) back to disk in the geometry of their source image.

Every write is atomic (see :mod:`napari_semicl.io.atomic`) and never replaces
an existing file unless asked to.

Examples
--------
>>> from napari_semicl.io import read_image, write_labels       # doctest: +SKIP
>>> image = read_image("case_01.nii.gz")                         # doctest: +SKIP
>>> mask = (image.data > 100).astype("uint8")                    # doctest: +SKIP
>>> write_labels("case_01_seg.nii.gz", mask, metadata=image.metadata)  # doctest: +SKIP
PosixPath('case_01_seg.nii.gz')
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from .atomic import atomic_path, full_suffix
from .errors import WriteError

__all__ = ["LABEL_WRITE_EXTENSIONS", "label_dtype", "write_labels"]

logger = logging.getLogger(__name__)

#: Extensions (lower case) :func:`write_labels` understands, mapped to the format.
LABEL_WRITE_EXTENSIONS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".tif": "tiff",
    ".tiff": "tiff",
}


def label_dtype(data: np.ndarray, *, target: str = "") -> np.dtype:
    """Pick the storage type for a label map.

    Parameters
    ----------
    data : numpy.ndarray
        Integer, bool or integral float labels.
    target : str, optional
        File name used in error messages.

    Returns
    -------
    numpy.dtype
        ``uint8`` when all labels lie in 0..255, ``uint16`` in 0..65535, else
        ``int32``.

    Raises
    ------
    WriteError
        The labels are fractional, NaN/Inf, or do not fit in ``int32``.
    """
    where = f" to {target}" if target else ""
    if data.dtype.kind not in "biuf":
        raise WriteError(
            f"Cannot write labels of type {data.dtype}{where}: labels must be "
            "integers (0 = background)."
        )
    if data.size == 0:
        return np.dtype(np.uint8)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise WriteError(
                f"Cannot write labels{where}: the array holds fractional or NaN/Inf "
                "values. Round or threshold it to whole numbers first."
            )
    low, high = int(data.min()), int(data.max())
    if low >= 0 and high <= 255:
        return np.dtype(np.uint8)
    if low >= 0 and high <= 65535:
        return np.dtype(np.uint16)
    info = np.iinfo(np.int32)
    if info.min <= low and high <= info.max:
        return np.dtype(np.int32)
    raise WriteError(
        f"Cannot write labels{where}: values {low}..{high} do not fit in int32. "
        "Relabel the classes with smaller numbers."
    )


def _format_of(path: pathlib.Path) -> str:
    suffix = full_suffix(path).lower()
    try:
        return LABEL_WRITE_EXTENSIONS[suffix]
    except KeyError:
        supported = ", ".join(LABEL_WRITE_EXTENSIONS)
        raise WriteError(
            f"Cannot write labels to {path.name}: the extension {suffix or '(none)'!r} "
            f"is not supported. Use one of: {supported}."
        ) from None


def _nifti_image(data: np.ndarray, dtype: np.dtype, metadata: dict, path: pathlib.Path, *, intent: str = "label"):
    """Build the NIfTI image object for ``data`` in napari axis order (``intent`` 'label'
    for label maps, 'none' for float maps)."""
    import nibabel as nib

    if data.ndim not in (2, 3):
        raise WriteError(
            f"Cannot write {data.ndim}D labels to {path.name}: NIfTI export supports "
            "2D and 3D label maps."
        )
    array = data.transpose(tuple(range(data.ndim))[::-1]) if metadata.get("axes_reversed") else data
    array = np.ascontiguousarray(array.astype(dtype, copy=False))

    affine = metadata.get("affine")
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise WriteError(
                f"Cannot write {path.name}: metadata['affine'] must be a finite 4x4 "
                f"matrix, got shape {affine.shape}. Copy the metadata of the source "
                "image layer to the labels layer, or remove the key."
            )
    else:
        spacing = [float(s) for s in metadata.get("spacing", ())]
        if metadata.get("axes_reversed"):
            spacing = spacing[::-1]
        if len(spacing) != array.ndim:
            spacing = [1.0] * array.ndim
        affine = np.diag([*spacing, *([1.0] * (4 - array.ndim))])

    version = int(metadata.get("nifti_version", 1))
    image_cls, header_cls = (
        (nib.Nifti2Image, nib.Nifti2Header) if version == 2 else (nib.Nifti1Image, nib.Nifti1Header)
    )
    header = None
    block = metadata.get("nifti_header")
    if block is not None:
        try:
            header = header_cls(binaryblock=bytes(block))
        except Exception as exc:  # noqa: BLE001 - any corrupt header block
            raise WriteError(
                f"Cannot write {path.name}: metadata['nifti_header'] is not a valid "
                f"NIfTI-{version} header ({exc}). Remove it to write with the affine only."
            ) from exc
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
    img = image_cls(array, affine, header=header)
    hdr = img.header
    if header is not None and (sform_code or qform_code):
        # Keep the source's coordinate codes (a code of 0 stays 0).
        hdr.set_sform(affine, code=sform_code)
        hdr.set_qform(affine, code=qform_code)
    else:
        # No usable codes: without one, readers would ignore the affine.
        hdr.set_sform(affine, code="aligned")
        hdr.set_qform(affine, code="aligned")
        if header is None:
            hdr.set_xyzt_units(xyz="mm")
    img.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)  # stored unscaled
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    hdr.set_intent(intent)
    return img


def _write_nifti(tmp: pathlib.Path, img) -> None:
    import nibabel as nib

    nib.save(img, tmp)
    # nibabel writes slope/inter as NaN ("no scaling") for unscaled integers;
    # make sure no scaling slipped in.
    check = nib.load(tmp)
    slope, inter = check.header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):  # pragma: no cover
        raise WriteError(f"nibabel scaled the labels written to {tmp.name}; please report this.")


def _write_tiff(tmp: pathlib.Path, array: np.ndarray) -> None:
    import tifffile

    axes = {2: "YX", 3: "ZYX"}.get(array.ndim)
    metadata = {"axes": axes} if axes else {}
    tifffile.imwrite(tmp, array, photometric="minisblack", compression="zlib", metadata=metadata)


def _refuse_overwrite(path: pathlib.Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists and was left untouched. Pass overwrite=True to "
            "replace it, or choose another file name."
        )


def write_labels(
    path: str | os.PathLike,
    data,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a label map, atomically, in the geometry of its source image.

    Parameters
    ----------
    path : str or path-like
        Target file: ``.nii.gz``, ``.nii``, ``.tif`` or ``.tiff``.
    data : array-like
        Labels in napari axis order (as read by
        :func:`~napari_semicl.io.readers.read_image`); integers, bool or
        integral floats, 0 = background.
    metadata : dict, optional
        The source image's :attr:`~napari_semicl.io.readers.ImageData.metadata`
        (e.g. a napari layer's ``metadata``). For NIfTI it supplies the affine,
        the header (``"nifti_header"``, ``"nifti_version"``) and whether the
        axes were reversed on reading (``"axes_reversed"``). Without it the
        array is written as given with an identity affine (or ``"spacing"`` on
        the diagonal when only that is known). TIFF ignores the geometry.
    overwrite : bool, optional
        Replace an existing file. Default False.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    WriteError
        Unsupported extension, non-integer data or an unusable header.
    FileExistsError
        ``path`` exists and ``overwrite`` is False. The file is left untouched.

    Notes
    -----
    Storage type: ``uint8`` when the largest label is at most 255, ``uint16``
    up to 65535, else ``int32``. NIfTI output keeps the source header fields
    (description, units, codes), clears the intensity scaling
    (``scl_slope``/``scl_inter``) and display range, and sets the intent to
    "label". Writing goes to a temporary file in the same folder that is then
    renamed onto ``path``, so a failure never leaves a half-written file.
    """
    path = pathlib.Path(path)
    fmt = _format_of(path)
    _refuse_overwrite(path, overwrite)
    if path.is_dir():
        raise WriteError(f"Cannot write labels to {path}: it is a folder. Choose a file name.")
    array = np.asarray(data)
    if array.ndim < 2:
        raise WriteError(
            f"Cannot write labels of shape {array.shape} to {path.name}: a 2D or 3D "
            "label map is needed."
        )
    dtype = label_dtype(array, target=path.name)
    metadata = dict(metadata or {})

    file_shape = array.shape
    if fmt == "nifti":
        img = _nifti_image(array, dtype, metadata, path)
        file_shape = img.shape  # the file's axis order (napari's may be reversed)
        with atomic_path(path, overwrite=overwrite) as tmp:
            _write_nifti(tmp, img)
    else:
        out = np.ascontiguousarray(array.astype(dtype, copy=False))
        with atomic_path(path, overwrite=overwrite) as tmp:
            _write_tiff(tmp, out)
    logger.info("Wrote labels %s (shape %s, %s)", path, tuple(file_shape), dtype)
    return path


def write_image(
    path: str | os.PathLike,
    data,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a float map (e.g. a normalised entropy map) as float32, atomically.

    Same geometry rules, formats and overwrite protection as :func:`write_labels`.
    """
    path = pathlib.Path(path)
    fmt = _format_of(path)
    _refuse_overwrite(path, overwrite)
    array = np.asarray(data, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise WriteError(f"Cannot write a map of shape {array.shape} to {path.name}: 2D or 3D is needed.")
    file_shape = array.shape
    if fmt == "nifti":
        img = _nifti_image(array, np.dtype(np.float32), dict(metadata or {}), path, intent="none")
        file_shape = img.shape  # the file's axis order
        with atomic_path(path, overwrite=overwrite) as tmp:
            import nibabel as nib

            nib.save(img, tmp)
    else:
        with atomic_path(path, overwrite=overwrite) as tmp:
            _write_tiff(tmp, np.ascontiguousarray(array))
    logger.info("Wrote image %s (shape %s, float32)", path, tuple(file_shape))
    return path
