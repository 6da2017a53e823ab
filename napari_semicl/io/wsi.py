"""Whole-slide images: lazy multiscale reading and pyramidal writing.

Reading
-------
:func:`open_slide` opens a pyramidal TIFF (tiled TIFF with SubIFDs or reduced-resolution
pages, OME-TIFF, Aperio SVS whose compression tifffile can decode) or an OME-Zarr group as
a :class:`Slide`: a list of lazy arrays, level 0 (full resolution) first, read chunk by
chunk through tifffile's zarr store. Nothing is loaded until it is indexed, so a
20000 x 20000 slide opens in milliseconds and napari shows it as a multiscale layer. RGB
stays RGB: levels are ``(Y, X, 3)`` uint8 (alpha dropped lazily) or ``(Y, X)`` grey.

:func:`read_tile_folder` reads a folder of equally sized PNG/TIFF tiles as a stack
``(N, Y, X[, 3])`` (each tile a slice, so the slice datasets train on it unchanged).

Writing
-------
:func:`write_pyramid` writes a list of levels (any array-likes that can be sliced, e.g.
zarr arrays) as a tiled pyramidal OME-TIFF (levels as SubIFDs) or as an OME-Zarr
(NGFF 0.4) multiscale group, tile by tile: memory is bounded by one tile, never by the
slide. :func:`build_pyramid_levels` fills the lower levels of a zarr group from level 0
(nearest neighbour for labels, 2 x 2 mean for images), block by block.

Label convention: 0 is background/unlabelled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from .atomic import atomic_path, full_suffix
from .errors import ReadError, WriteError

__all__ = [
    "Slide",
    "build_pyramid_levels",
    "create_label_pyramid",
    "is_slide",
    "open_slide",
    "read_tile_folder",
    "write_pyramid",
]

log = logging.getLogger(__name__)

#: A single-level TIFF larger than this (pixels) is opened lazily as a slide too.
SLIDE_MIN_PIXELS = 64 * 1024**2
#: Suffixes of slide files tifffile reads.
SLIDE_TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".svs", ".btf", ".tf8")
TILE_SUFFIXES = (".png", ".tif", ".tiff")


class _DropAlpha:
    """Lazy ``(Y, X, 3)`` view of a ``(Y, X, 4)`` array (napari-compatible array-like)."""

    def __init__(self, array) -> None:
        self._array = array
        self.shape = (*array.shape[:2], 3)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        channel = np.arange(3)[key[2]]
        return np.asarray(self._array[key[0], key[1], :])[..., channel]

    def __array__(self, dtype=None, copy=None):
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out

    def __len__(self) -> int:
        return self.shape[0]


@dataclasses.dataclass
class Slide:
    """A lazily read multiscale image.

    Attributes
    ----------
    levels : list of array-like
        Level 0 (full resolution) first; each ``(Y, X, 3)`` for RGB or ``(Y, X)``. They
        support numpy slicing and read only the chunks a slice touches.
    rgb : bool
        True when the last axis holds RGB channels.
    name : str
        File name without its format suffix.
    metadata : dict
        Plain values: ``source_path``, ``format`` ('slide'), ``downsamples`` (level 0 size
        over each level's size, per level), ``tile`` (the chunk shape of level 0).
    """

    levels: list
    rgb: bool
    name: str
    metadata: dict
    _closers: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Spatial shape ``(Y, X)`` of level 0."""
        return tuple(int(s) for s in self.levels[0].shape[:2])

    @property
    def downsamples(self) -> list[float]:
        return list(self.metadata["downsamples"])

    def close(self) -> None:
        """Release the open file handles (the levels can no longer be read)."""
        for close in self._closers:
            try:
                close()
            except Exception:
                log.debug("closing %s failed", self.name, exc_info=True)
        self._closers.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _suffix(path: pathlib.Path) -> str:
    return full_suffix(path).lower()


def _stem(path: pathlib.Path) -> str:
    suffix = full_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def is_slide(path: str | os.PathLike) -> bool:
    """Whether ``path`` should be opened as a lazy multiscale slide.

    True for an OME-Zarr folder (``.zarr``), an ``.svs`` file, and a 2D (grey or RGB) TIFF
    whose first series has several resolution levels, is tiled (the whole-slide layout), or
    has more than :data:`SLIDE_MIN_PIXELS` pixels. Stacks (Z/T/C > 1) are not slides.
    Only headers are read; unreadable files give False (reading reports the problem).
    """
    path = pathlib.Path(path)
    suffix = _suffix(path)
    if suffix == ".zarr" or path.suffix.lower() == ".zarr":
        return path.is_dir()
    if suffix == ".svs":
        return True
    if not any(suffix.endswith(s) for s in (".tif", ".tiff", ".btf", ".tf8")) or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.levels) > 1:
                return True
            stack = any(ax in "ZTCQI" and n > 1 for ax, n in zip(series.axes, series.shape))
            spatial = [n for ax, n in zip(series.axes, series.shape) if ax in "YX"]
            if stack or len(spatial) != 2:
                return False
            return bool(series.pages[0].is_tiled) or math.prod(spatial) >= SLIDE_MIN_PIXELS
    except Exception as exc:  # noqa: BLE001 - a guess; reading reports the error
        log.debug("is_slide(%s): %s", path, exc)
        return False


def _level_view(array, axes: str):
    """``array`` (a zarr level) as ``(Y, X[, 3])``; refuses other layouts."""
    axes = axes.upper()
    squeeze = [i for i, (ax, n) in enumerate(zip(axes, array.shape)) if ax not in "YXS" and n == 1]
    if squeeze:
        # lazy squeeze of leading singleton axes (T, C, Z of OME files)
        if squeeze != list(range(len(squeeze))):
            raise ReadError(f"unsupported axes {axes!r} for a slide: only Y, X and RGB samples")
        array = _Squeezed(array, len(squeeze))
        axes = axes[len(squeeze):]
    if axes == "YX":
        return array, False
    if axes == "YXS" and array.shape[-1] in (3, 4):
        return (array if array.shape[-1] == 3 else _DropAlpha(array)), True
    raise ReadError(
        f"a slide level has axes {axes!r} and shape {tuple(array.shape)}; only (Y, X) grey and "
        "(Y, X, 3) RGB slides are supported. Export the slide as RGB (e.g. with QuPath or "
        "bfconvert) and open it again."
    )


class _Squeezed:
    """Lazy view of an array without its first ``n`` singleton axes."""

    def __init__(self, array, n: int) -> None:
        self._array, self._n = array, n
        self.shape = tuple(array.shape[n:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        chunks = getattr(array, "chunks", None)
        self.chunks = None if chunks is None else tuple(chunks[n:])

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self._array[(0,) * self._n + key])

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out

    def __len__(self) -> int:
        return self.shape[0]


def _open_tiff_slide(path: pathlib.Path) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ReadError(f"Cannot read {path.name} as a slide: {exc}. Check that the file is a complete TIFF/SVS.") from exc
    try:
        series = tif.series[0]
        axes = series.axes
        store = series.aszarr()
        root = zarr.open(store, mode="r")
        if hasattr(root, "shape"):  # a single level
            arrays = [root]
        else:
            arrays = [root[str(i)] for i in range(len(series.levels))]
        levels, rgb = [], None
        for arr in arrays:
            view, is_rgb = _level_view(arr, axes)
            rgb = is_rgb if rgb is None else rgb
            levels.append(view)
        # check the codec once: SVS/JPEG tiles need imagecodecs
        _ = levels[-1][:1, :1]
    except ReadError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        hint = (" The tiles are probably JPEG/JPEG2000-compressed: install imagecodecs "
                "(pip install imagecodecs) and open it again.") if "imagecodecs" in str(exc).lower() or "compress" in str(exc).lower() else ""
        raise ReadError(f"Cannot read the tiles of {path.name}: {exc}.{hint}") from exc
    shape0 = levels[0].shape[:2]
    downsamples = [float(shape0[0]) / float(level.shape[0]) for level in levels]
    chunks = getattr(arrays[0], "chunks", None)
    metadata = {
        "source_path": str(path),
        "format": "slide",
        "downsamples": downsamples,
        "tile": tuple(int(c) for c in chunks[-3 if rgb else -2:][:2]) if chunks else None,
        "spacing": (1.0, 1.0),
    }
    return Slide(levels, bool(rgb), _stem(path), metadata, [tif.close])


def _open_ome_zarr(path: pathlib.Path) -> Slide:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        multiscales = group.attrs.get("multiscales")
        if multiscales:
            ms = multiscales[0]
            paths = [d["path"] for d in ms["datasets"]]
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])).upper()
        else:
            paths = sorted((k for k in group.array_keys()), key=lambda k: int(k) if k.isdigit() else k)
            axes = ""
        arrays = [group[p] for p in paths]
    except Exception as exc:
        raise ReadError(f"Cannot read {path.name} as OME-Zarr: {exc}. Check that it is an OME-Zarr multiscale folder.") from exc
    if not arrays:
        raise ReadError(f"{path.name} holds no array; it is not an OME-Zarr multiscale image.")
    if not axes:
        axes = "YX" if arrays[0].ndim == 2 else "YXS"
    axes = axes.replace("C", "S") if axes.endswith("C") else axes
    levels, rgb = [], False
    for arr in arrays:
        view, rgb = _level_view(arr, axes)
        levels.append(view)
    shape0 = levels[0].shape[:2]
    metadata = {
        "source_path": str(path),
        "format": "slide",
        "downsamples": [float(shape0[0]) / float(lv.shape[0]) for lv in levels],
        "tile": tuple(int(c) for c in arrays[0].chunks[:2]),
        "spacing": (1.0, 1.0),
    }
    return Slide(levels, rgb, _stem(path), metadata)


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a pyramidal TIFF/SVS/OME-TIFF or an OME-Zarr folder lazily.

    Parameters
    ----------
    path : str or path-like
        The slide.

    Returns
    -------
    Slide
        Lazy levels, level 0 first. Close it (or use it as a context manager) when done.

    Raises
    ------
    ReadError
        Missing, unreadable, not 2D grey/RGB, or tiles compressed with a codec that is not
        installed (the message names the package to install).

    Examples
    --------
    >>> with open_slide("slide.ome.tif") as slide:      # doctest: +SKIP
    ...     thumb = np.asarray(slide.levels[-1][:])
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ReadError(f"Cannot read {path}: the file does not exist. Check the path.")
    if path.is_dir():
        return _open_ome_zarr(path)
    return _open_tiff_slide(path)


def read_tile_folder(folder: str | os.PathLike, *, kind: str = "image", names: Sequence[str] | None = None):
    """Read a folder of equally sized tiles as a stack (each tile one slice).

    Parameters
    ----------
    folder : str or path-like
        PNG/TIFF tiles; files whose stem ends with a label suffix (``_gt``, ``_mask``, ...)
        are skipped unless ``kind='labels'``.
    kind : {'image', 'labels'}
        ``'labels'`` reads integer masks; with ``names`` the mask of tile ``NAME`` is the
        file whose stem is ``NAME`` plus a label suffix (or, in a folder without such
        files, ``NAME`` itself), and a missing mask becomes an unpainted (all-zero) slice.
    names : sequence of str, optional
        Tile names (from the image folder's ``metadata['tile_names']``) to align masks to.

    Returns
    -------
    ImageData
        ``data`` is ``(N, Y, X)`` or ``(N, Y, X, 3)``; ``metadata['tile_names']`` lists
        the tiles in slice order (sorted by name).

    Raises
    ------
    ReadError
        No tile, or tiles of different shapes or colour.
    """
    from .readers import LABEL_SUFFIXES, ImageData, read_image

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ReadError(f"{folder} is not a folder of tiles.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and _suffix(p) in TILE_SUFFIXES)
    label_files = {}
    image_files = []
    for p in files:
        stem = _stem(p)
        low = stem.lower()
        suffix = next((s for s in LABEL_SUFFIXES if low.endswith(s)), None)
        if suffix is not None:
            label_files[stem[: len(stem) - len(suffix)]] = p
        else:
            image_files.append(p)
    if kind == "labels":
        if names is None:
            names = sorted(label_files) or [_stem(p) for p in image_files]
        first = None
        arrays = []
        for name in names:
            p = label_files.get(name)
            if p is None and not label_files:  # a separate mask folder with the tiles' names
                p = next((f for f in image_files if _stem(f) == name), None)
            arrays.append(None if p is None else read_image(p, kind="labels").data)
            first = first if first is not None or arrays[-1] is None else arrays[-1]
        if first is None:
            raise ReadError(f"{folder} holds no mask for any of the tiles {list(names)[:3]}...")
        stack = np.zeros((len(arrays), *first.shape), dtype=first.dtype)
        for i, arr in enumerate(arrays):
            if arr is not None:
                if arr.shape != first.shape:
                    raise ReadError(f"mask of tile {names[i]!r} has shape {arr.shape}, others {first.shape}")
                stack[i] = arr
        meta = {"source_path": str(folder), "format": "tiles", "tile_names": list(names), "spacing": (1.0, 1.0, 1.0)}
        return ImageData(stack, (1.0, 1.0, 1.0), meta, False, folder.name)
    if not image_files:
        raise ReadError(f"{folder} holds no PNG/TIFF tile. Put the tiles (same size) in one folder.")
    tiles = [read_image(p, kind="image") for p in image_files]
    shapes = {t.data.shape for t in tiles}
    if len(shapes) > 1 or len({t.rgb for t in tiles}) > 1:
        raise ReadError(
            f"the tiles in {folder} differ in shape or colour ({sorted(shapes)[:3]}); a tile folder "
            "must hold tiles of one size (crop or pad them to one size)."
        )
    stack = np.stack([np.asarray(t.data) for t in tiles])
    meta = {"source_path": str(folder), "format": "tiles", "tile_names": [_stem(p) for p in image_files],
            "spacing": (1.0, 1.0, 1.0)}
    return ImageData(stack, (1.0, 1.0, 1.0), meta, tiles[0].rgb, folder.name)


# --------------------------------------------------------------------------- writing


def _level_shapes(shape: tuple[int, int], min_size: int) -> list[tuple[int, int]]:
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _downsample2(block: np.ndarray, labels: bool) -> np.ndarray:
    """Half-size block: nearest (top-left) for labels, 2 x 2 mean for images."""
    if labels:
        return block[::2, ::2]
    h, w = block.shape[:2]
    pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2)
    b = np.pad(block.astype(np.float32), pad, mode="edge")
    out = 0.25 * (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2])
    return np.round(out).astype(block.dtype) if block.dtype.kind in "iu" else out.astype(block.dtype)


def build_pyramid_levels(group, *, labels: bool, block: int = 2048, min_size: int = 256) -> list:
    """Fill levels 1, 2, ... of a zarr ``group`` from its array ``'0'``, block by block.

    Each level halves the previous one (nearest for ``labels``, 2 x 2 mean for images)
    until its longer side is at most ``min_size``. Memory: one ``block`` x ``block`` block.

    Returns
    -------
    list
        The zarr arrays of every level, level 0 first.
    """
    arrays = [group["0"]]
    level0 = arrays[0]
    shapes = _level_shapes(level0.shape[:2], min_size)
    chunks = level0.chunks
    for lv in range(1, len(shapes)):
        prev = arrays[-1]
        shape = shapes[lv] + tuple(level0.shape[2:])
        arr = group.create_array(str(lv), shape=shape, dtype=level0.dtype, chunks=chunks, fill_value=0,
                                 overwrite=True)
        b = block - block % 2
        for y in range(0, prev.shape[0], b):
            for x in range(0, prev.shape[1], b):
                small = _downsample2(np.asarray(prev[y:y + b, x:x + b]), labels)
                arr[y // 2:y // 2 + small.shape[0], x // 2:x // 2 + small.shape[1]] = small
        arrays.append(arr)
    return arrays


def _ome_zarr_attrs(n_levels: int, rgb: bool, name: str, labels: bool) -> dict:
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if rgb:
        axes.append({"name": "c", "type": "channel"})
    datasets = []
    for lv in range(n_levels):
        s = float(2**lv)
        scale = [s, s] + ([1.0] if rgb else [])
        datasets.append({"path": str(lv), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    attrs = {"multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets}]}
    if labels:
        attrs["image-label"] = {"version": "0.4"}
    return attrs


def create_label_pyramid(path: str | os.PathLike, shape: tuple[int, int], *, dtype=np.uint8, tile: int = 512,
                         name: str = "labels", overwrite: bool = False):
    """Create an OME-Zarr (NGFF 0.4, zarr format 2) group with an empty level-0 label array.

    Returns the zarr group; write level 0 tile by tile, then call
    :func:`build_pyramid_levels` (``labels=True``) and :func:`finish_ome_zarr`.
    Unwritten chunks read as 0 and take no disk space.
    """
    import zarr

    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise WriteError(f"{path} exists; choose another name or allow overwriting.")
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=tuple(int(s) for s in shape), dtype=dtype, chunks=(tile, tile), fill_value=0)
    group.attrs["napari_semicl"] = {"name": name}
    return group


def finish_ome_zarr(group, *, rgb: bool = False, labels: bool = True, name: str = "labels") -> None:
    """Write the NGFF multiscales metadata for the arrays '0', '1', ... of ``group``."""
    n = 0
    while str(n) in group:
        n += 1
    group.attrs.update(_ome_zarr_attrs(n, rgb, name, labels))


def _tiles_of(level, tile: int, rgb: bool) -> Iterator[np.ndarray]:
    h, w = level.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.asarray(level[y:y + tile, x:x + tile])
            if block.shape[:2] != (tile, tile):
                out = np.zeros((tile, tile, *block.shape[2:]), dtype=block.dtype)
                out[:block.shape[0], :block.shape[1]] = block
                block = out
            yield block


def write_pyramid(path: str | os.PathLike, levels: Sequence, *, rgb: bool = False, tile: int = 512,
                  labels: bool = True, overwrite: bool = False, compression: str | None = "zlib",
                  name: str | None = None) -> pathlib.Path:
    """Write multiscale ``levels`` (level 0 first) as a pyramidal OME-TIFF or OME-Zarr.

    Parameters
    ----------
    path : str or path-like
        ``*.ome.tif`` / ``*.tif`` / ``*.tiff`` (tiled BigTIFF, lower levels as SubIFDs, OME
        metadata) or ``*.zarr`` (OME-Zarr NGFF 0.4 group with arrays '0', '1', ...).
    levels : sequence of array-like
        ``(Y, X)`` or ``(Y, X, 3)``; any object sliceable like numpy (zarr arrays are read
        one tile at a time).
    rgb : bool
        Whether the last axis holds RGB channels.
    tile : int
        Tile (chunk) side, a multiple of 16.
    labels : bool
        Label maps (integers, 0 = background) or an image.
    overwrite : bool
        Replace an existing file or folder.

    Returns
    -------
    pathlib.Path
        The written path. The file appears under its final name only when complete.

    Raises
    ------
    WriteError
        Unsupported extension, existing path without ``overwrite``, or an I/O failure.
    """
    path = pathlib.Path(path)
    suffix = _suffix(path)
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if path.exists() and not overwrite:
        raise WriteError(f"{path} exists; pass overwrite (--overwrite) or choose another name.")
    name = name or _stem(path)
    is_zarr = suffix.endswith(".zarr") or path.suffix.lower() == ".zarr"
    if not is_zarr and not suffix.endswith((".tif", ".tiff")):
        raise WriteError(
            f"Cannot write a pyramid to {path.name}: use .ome.tif (pyramidal OME-TIFF) or .zarr (OME-Zarr)."
        )
    try:
        with atomic_path(path, overwrite=overwrite, directory=is_zarr) as tmp:
            if is_zarr:
                _write_zarr_pyramid(tmp, levels, rgb=rgb, tile=tile, name=name, labels=labels)
            else:
                _write_tiff_pyramid(tmp, levels, rgb=rgb, tile=tile, name=name, compression=compression)
    except OSError as exc:
        raise WriteError(f"Cannot write {path}: {exc.strerror or exc}. Check the folder and free disk space.") from exc
    log.info("pyramid of %d levels written to %s", len(levels), path)
    return path


def _write_zarr_pyramid(folder: pathlib.Path, levels, *, rgb: bool, tile: int, name: str, labels: bool) -> None:
    import zarr

    group = zarr.open_group(str(folder), mode="w", zarr_format=2)
    for lv, level in enumerate(levels):
        arr = group.create_array(str(lv), shape=tuple(level.shape), dtype=level.dtype,
                                 chunks=(tile, tile, *level.shape[2:]), fill_value=0)
        for y in range(0, level.shape[0], tile):
            for x in range(0, level.shape[1], tile):
                arr[y:y + tile, x:x + tile] = np.asarray(level[y:y + tile, x:x + tile])
    group.attrs.update(_ome_zarr_attrs(len(levels), rgb, name, labels))


def _write_tiff_pyramid(file: pathlib.Path, levels, *, rgb: bool, tile: int, name: str, compression) -> None:
    import tifffile

    photometric = "rgb" if rgb else "minisblack"
    level0 = levels[0]
    meta = {"axes": "YXS" if rgb else "YX", "Name": name}
    with tifffile.TiffWriter(file, bigtiff=True, ome=True) as tw:
        tw.write(_tiles_of(level0, tile, rgb), shape=tuple(level0.shape), dtype=level0.dtype,
                 tile=(tile, tile), photometric=photometric, compression=compression,
                 subifds=len(levels) - 1, metadata=meta)
        for level in levels[1:]:
            tw.write(_tiles_of(level, tile, rgb), shape=tuple(level.shape), dtype=level.dtype,
                     tile=(tile, tile), photometric=photometric, compression=compression,
                     subfiletype=1)
