"""The refresh: what the loop shows the user every ``refresh_every`` steps.

A refresh is a list of steps (``Trainer.refresh_steps``); each is a callable
``step(trainer) -> list of events`` run in order at every refresh (and once at the end of a
run), like an Ignite handler on its ITERATION_COMPLETED event. :func:`default_steps` picks
them for a dataset: volumes get :func:`volume_previews` (the fused prediction and entropy of
every pair) then :func:`validation` (Dice on the validation slices); slides get
:class:`SlidePreviews`. A new refresh step is one function here, added to
:func:`default_steps` (or appended to a trainer's ``refresh_steps``).

A 3D network predicts each pair once a refresh (the trainer's
:class:`~napari_semicl.engine.fusion.PairPredictions` share it); :func:`refresh` releases
those predictions when the last step is done.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.annotation import decode_classes
from ..data.tiles import TileDataset
from .events import Evaluated, Notice, Preview
from .inference import predict_slices
from .metrics import dice_per_class
from .postprocess import finish_labels

RefreshStep = Callable[[object], list]


def refresh(trainer, steps) -> list:
    """The events of one refresh: every step's, in order."""
    events: list = []
    try:
        for step in steps:
            events.extend(step(trainer))
    finally:
        trainer.predictions.release()
    return events


def volume_previews(trainer, pairs=None) -> list:
    """The mask (network fused with the prior) and the entropy of every training pair (of
    the pair indices ``pairs``)."""
    events: list = []
    notes: list[str] = []
    predictions = trainer.predictions
    for p_idx in range(len(trainer.dataset.images)) if pairs is None else pairs:
        idx, ent = predictions.pair_classes(p_idx, with_entropy=True, notes=notes)
        labels = finish_labels(predictions.labels(idx, p_idx), trainer.config.predict)
        events.append(Preview(trainer.step, "prediction", p_idx, labels))
        events.append(Preview(trainer.step, "entropy", p_idx, predictions.in_pair_layout(ent, p_idx)))
    events.extend(Notice("warning", note) for note in dict.fromkeys(notes))
    return events


def validation(trainer) -> list:
    """An :class:`Evaluated` event with :func:`validate`'s metrics (none without validation slices)."""
    metrics = validate(trainer)
    return [Evaluated(trainer.step, metrics)] if metrics else []


def validate(trainer) -> dict:
    """Dice per class (label value) on the validation slices; {} when there are none."""
    dataset, config = trainer.dataset, trainer.config
    if not dataset.validation:
        return {}
    predictions = trainer.predictions
    model = trainer.method.inference_model()
    preds, refs = [], []
    volumes: dict[int, np.ndarray] = {}  # a 3D network predicts each pair once
    for p_idx, s_idx in dataset.validation:
        if config.model.spatial_dims == 3:
            if p_idx not in volumes:
                volumes[p_idx] = predictions.pair_classes(p_idx)[0]
            idx = volumes[p_idx][s_idx:s_idx + 1]
        else:
            img = dataset.images[p_idx][s_idx:s_idx + 1]
            idx, _ = predict_slices(model, img, device=trainer.device, fuse=predictions.fuser(p_idx, offset=s_idx))
        ref = dataset.targets[p_idx][s_idx]
        pred = decode_classes(idx[0], dataset.class_values)
        if config.data.unpainted == "ignore":
            painted = ref != 0
            pred, ref = pred[painted], ref[painted]
        preds.append(pred.ravel())
        refs.append(ref.ravel())
    per_class = dice_per_class(np.concatenate(preds), np.concatenate(refs), dataset.class_values)
    mean = float(np.mean(list(per_class.values()))) if per_class else math.nan
    return {"dice": mean, "dice_per_class": per_class, "slices": len(dataset.validation)}


class SlidePreviews:
    """Stitched tile-by-tile predictions of every slide, as zarr label pyramids.

    Each refresh writes a new OME-Zarr under ``out_dir/previews`` (or a temporary folder)
    and removes the one before the last, so a viewer still reading the last preview never
    sees it change. The event's array is the list of pyramid levels.
    """

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.root: Path | None = None
        self.paths: dict[int, list[Path]] = {}

    def __call__(self, trainer) -> list:
        from .slide_inference import predict_slide_pair

        if self.root is None:
            if self.out_dir is not None:
                self.root = self.out_dir / "previews"
                self.root.mkdir(parents=True, exist_ok=True)
            else:
                self.root = Path(tempfile.mkdtemp(prefix="semicl_previews_"))
        model = trainer.method.inference_model()
        events = []
        for p_idx, pair in enumerate(trainer.dataset.pairs):
            path = self.root / f"pair{p_idx}_step{trainer.step}.zarr"
            pyramid, _ = predict_slide_pair(model, pair, path, class_values=trainer.dataset.class_values,
                                            device=trainer.device, overlap=trainer.config.wsi.overlap)
            self.paths.setdefault(p_idx, []).append(path)
            while len(self.paths[p_idx]) > 2:
                shutil.rmtree(self.paths[p_idx].pop(0), ignore_errors=True)
            events.append(Preview(trainer.step, "prediction", p_idx, pyramid))
        return events


def default_steps(dataset, out_dir: Path | None) -> list[RefreshStep]:
    """The refresh steps for ``dataset``: slides get their stitched previews; volumes and
    images the fused previews, then validation."""
    if isinstance(dataset, TileDataset):
        return [SlidePreviews(out_dir)]
    return [volume_previews, validation]
