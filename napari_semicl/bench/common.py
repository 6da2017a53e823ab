"""Shared pieces of the benchmarks: data discovery, scoring, incremental JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import evaluate_segmentation
from ..engine.distributed import env_rank
from ..errors import DataError
from ..io import ImageData, atomic_path, read_image, read_labels


@dataclass
class Case:
    """One benchmark volume: the image, its reference labels and the file stem."""

    name: str
    image: ImageData
    reference: ImageData


def find_cases(folder, *, limit: int | None = None, offset: int = 0) -> list[Case]:
    """Every ``NAME.nii.gz`` with a ``NAME_gt.nii.gz`` beside it, sorted by name; the
    first ``offset`` of them skipped, then at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"benchmark data folder {folder} does not exist")
    cases = []
    for gt in sorted(folder.glob("*_gt.nii.gz"))[offset:]:
        name = gt.name[: -len("_gt.nii.gz")]
        img_path = folder / f"{name}.nii.gz"
        if not img_path.exists():
            continue
        image = read_image(img_path)
        cases.append(Case(name, image, read_labels(gt, like=image)))
        if limit is not None and len(cases) >= limit:
            break
    if not cases:
        raise DataError(f"no NAME.nii.gz + NAME_gt.nii.gz pairs in {folder}")
    return cases


def thinnest_axis(shape) -> int:
    """The axis with the fewest slices (the benchmarks' slicing axis)."""
    return int(np.argmin(shape))


def score(pred: np.ndarray, reference: np.ndarray, *, spacing=None, keep_slices=None, axis: int = 0) -> dict:
    """Dice/HD95/ASD (means over foreground classes), optionally on a subset of slices."""
    if keep_slices is not None:
        pred = np.take(pred, keep_slices, axis=axis)
        reference = np.take(reference, keep_slices, axis=axis)
    result = evaluate_segmentation(pred, reference, spacing=spacing)
    return {k: result["mean"].get(k) for k in ("dice", "hd95", "asd")}


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


class ResultsFile:
    """A results JSON written atomically after every update, so a killed run keeps what
    finished (by rank 0 alone under ``torchrun``)."""

    def __init__(self, path, header: dict) -> None:
        self.path = Path(path)
        self.data = {**header, "machine": machine_info(), "methods": {}}
        self.write()

    def add(self, method: str, per_volume_row: dict) -> None:
        entry = self.data["methods"].setdefault(method, {"per_volume": []})
        entry["per_volume"].append(per_volume_row)
        rows = entry["per_volume"]
        for key in ("dice", "hd95", "asd", "train_s", "steps"):
            vals = [r.get(key) for r in rows if r.get(key) is not None]
            entry[key] = float(np.mean(vals)) if vals else None
        self.write()

    def write(self) -> None:
        if env_rank() != 0:  # under torchrun rank 0 alone writes
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2), encoding="utf-8")
