"""Autosave of the annotations a run trained on, beside its checkpoint.

Every labelled pair's labels are written to ``<run folder>/annotations/`` as an ordinary
label file in the source geometry (``.nii.gz`` for NIfTI sources, ``.tif`` otherwise), so
that napari (File > Open) and ``napari-semicl train --labels`` read them back as they are.
``annotations/manifest.json`` lists the files with each pair's name, shape and validation
slices; it is written last, so a manifest always names complete files. Every file is
written atomically (temporary file + rename): a run killed while saving leaves the previous
autosave intact.

Slides (:class:`~napari_semicl.data.tiles.SlidePair`) are never written whole: their painted
tiles go to ``pair<i>_<name>_tiles.npz`` (one array per tile, named ``r<row>_c<col>``, with
the tile bounds at the training level), and the manifest records the level and tile size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_path, read_labels, write_labels

ANNOTATIONS_DIR = "annotations"
MANIFEST = "manifest.json"


def _file_name(index: int, pair) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(pair.name)).strip("._") or "image"
    suffix = ".nii.gz" if (pair.metadata or {}).get("format") == "nifti" else ".tif"
    return f"pair{index}_{stem}_labels{suffix}"


def save_annotations(run_dir, pairs) -> Path:
    """Write the labels of every pair that has labels; returns the manifest's path.

    Parameters
    ----------
    run_dir : path
        The run folder (created if needed); files go to ``run_dir/annotations``.
    pairs : list of AnnotatedPair
        The snapshots the run trains on. Pairs without labels are listed with ``file: null``.
    """
    folder = Path(run_dir) / ANNOTATIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, pair in enumerate(pairs):
        entry = {"name": pair.name, "shape": list(pair.spatial_shape),
                 "validation_slices": [int(s) for s in pair.validation_slices], "file": None}
        if hasattr(pair, "painted"):  # a slide: only its painted tiles
            entry.update(_save_tiles(folder, i, pair))
        elif pair.labels is not None:
            name = _file_name(i, pair)
            write_labels(folder / name, pair.labels, metadata=pair.metadata, overwrite=True)
            entry["file"] = name
        entries.append(entry)
    manifest = folder / MANIFEST
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps({"pairs": entries}, indent=2) + "\n", encoding="utf-8")
    return manifest


def _save_tiles(folder: Path, index: int, pair) -> dict:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(pair.name)).strip("._") or "slide"
    name = f"pair{index}_{stem}_tiles.npz"
    arrays = {}
    for (row, col), labels in sorted(pair.painted.items()):
        arrays[f"r{row}_c{col}"] = np.asarray(labels)
        arrays[f"bounds_r{row}_c{col}"] = np.asarray(pair.grid.bounds(row, col), np.int64)
    with atomic_path(folder / name) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return {"tiles_file": name, "level": int(pair.level), "tile_size": int(pair.grid.tile),
            "painted_tiles": [[int(r), int(c)] for r, c in sorted(pair.painted)]}


def load_tiles(path) -> dict:
    """Painted tiles of an autosaved slide: ``(row, col) -> (labels, (y0, y1, x0, x1))``."""
    with np.load(path) as data:
        out = {}
        for key in data.files:
            if key.startswith("r"):
                row, col = (int(v[1:]) for v in key.split("_"))
                out[(row, col)] = (data[key], tuple(int(b) for b in data[f"bounds_{key}"]))
    return out


def load_annotations(run_dir) -> list[dict]:
    """The autosaved annotations of a run: one dict per pair.

    Returns
    -------
    list of dict
        ``name``, ``labels`` (ndarray in the shape the run used, or None),
        ``validation_slices`` (list of int) and ``path`` (the label file or None); for a
        slide also ``tiles`` (see :func:`load_tiles`), ``level`` and ``tile_size``.

    Raises
    ------
    DataError
        No autosave in ``run_dir``, or a file it lists is missing or unreadable.
    """
    folder = Path(run_dir) / ANNOTATIONS_DIR
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DataError(f"no autosaved annotations in {run_dir} ({manifest} does not exist)")
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["pairs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest} is not an annotations manifest: {exc}") from None
    out = []
    for entry in entries:
        labels, path = None, None
        if entry.get("file"):
            path = folder / entry["file"]
            labels = np.asarray(read_labels(path).data)
            if list(labels.shape) != list(entry["shape"]):
                raise DataError(f"{path} has shape {labels.shape}, the manifest says {entry['shape']}")
        item = {"name": entry["name"], "labels": labels, "path": path,
                "validation_slices": [int(s) for s in entry.get("validation_slices", [])]}
        if entry.get("tiles_file"):
            item["path"] = folder / entry["tiles_file"]
            try:
                item["tiles"] = load_tiles(item["path"])
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(f"{item['path']} is not a readable tiles autosave: {exc}") from None
            item.update(level=entry.get("level"), tile_size=entry.get("tile_size"))
        out.append(item)
    return out
