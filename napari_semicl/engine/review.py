"""Engine glue for the review docks: embeddings across slices, teacher/student
disagreement per slice, aleatoric samples and the method's own review arrays.

Every function takes the trainer's method and dataset and runs in whichever thread calls
it (the trainer serves them between steps, see :meth:`Trainer.request_analysis`; an idle
dock calls :meth:`Trainer.analyse` from a worker thread). No Qt here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis import bounded_sample
from ..data.annotation import IGNORE_INDEX
from ..errors import ConfigError
from ..methods.base import eval_mode
from ..models.heads import ProjectionHead
from ..models.ops import argmax_classes, pad_to_multiple
from .inference import predict_slices

log = logging.getLogger(__name__)

#: The analyses :meth:`Trainer.analyse` knows, with what they return.
ANALYSES = ("embeddings", "disagreement", "aleatoric", "method_review")


def padded_slice(img: np.ndarray, multiple: int, device) -> torch.Tensor:
    """(1, C, H', W') tensor on ``device`` of a (C, H, W) slice, zero-padded at the
    bottom/right to multiples of ``multiple`` (:func:`~napari_semicl.models.ops.pad_to_multiple`)."""
    return pad_to_multiple(torch.from_numpy(np.ascontiguousarray(img))[None].to(device), multiple)


def projection_head(method) -> ProjectionHead | None:
    """The head that projects the inference network's features, if the method has one:
    'teacher_projection' for methods with a teacher, else 'projection', else the first
    :class:`ProjectionHead` among the method's modules."""
    modules = getattr(method, "modules", {})
    names = ("teacher_projection", "projection") if getattr(method, "teacher", None) is not None else ("projection",)
    for name in names:
        if name in modules and isinstance(modules[name], ProjectionHead):
            return modules[name]
    return next((m for m in modules.values() if isinstance(m, ProjectionHead)), None)


def choose_review_slices(dataset, max_slices: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``max_slices`` (pair, slice) pairs, half labelled and half unlabelled where
    both exist (validation slices never)."""
    lab, unl = list(dataset.labelled), list(dataset.unlabelled)
    n_unl = min(len(unl), max_slices // 2 if lab else max_slices)
    n_lab = min(len(lab), max_slices - n_unl)
    n_unl = min(len(unl), max_slices - n_lab)

    def pick(items, n):
        return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))] if n else []

    return pick(lab, n_lab) + pick(unl, n_unl)


@torch.no_grad()
def sample_embeddings(
    method, dataset, *, device, max_points: int = 2000, max_slices: int = 8, seed: int = 0
) -> dict[str, np.ndarray]:
    """Embeddings of a bounded sample of pixels across labelled and unlabelled slices.

    The inference network (the teacher when there is one, eval mode) predicts each chosen
    slice; decoder features at candidate pixels go through the method's projection head
    (:func:`projection_head`; L2-normalised raw features when it has none). Candidates: the
    painted pixels of labelled slices (class: the painted one, ``is_labelled`` True) and
    every pixel of unlabelled slices (class: the network's arg-max, a pseudo-label). At
    most ``max_points`` are kept, stratified by class (:func:`~napari_semicl.analysis.bounded_sample`).

    Returns
    -------
    dict
        'embeddings' (N, D) float32; 'embedding_labels' (N,) int64 class indices;
        'embedding_is_labelled' (N,) bool; 'positions' (N, 4) int64 (pair, slice, row, col)
        in the dataset's slice coordinates; 'class_values' (K,) int64 label value of each
        class index. N <= ``max_points``.
    """
    rng = np.random.default_rng(seed)
    model = method.inference_model()
    head = projection_head(method)
    multiple = int(getattr(model, "multiple", 1))
    per_slice = max(1, 4 * max_points // max(max_slices, 1))  # candidates, then the bound
    feats, classes, labelled, positions = [], [], [], []
    with eval_mode(model, head):
        for p_idx, s_idx in choose_review_slices(dataset, max_slices, rng):
            img = dataset.images[p_idx][s_idx]
            h, w = img.shape[-2:]
            logits, feat = model(padded_slice(img, multiple, device), return_features=True)
            pred = argmax_classes(logits[0, :, :h, :w], dim=0).cpu().numpy()
            is_lab = (p_idx, s_idx) in set(dataset.labelled)
            if is_lab:
                target = dataset.target(p_idx, s_idx)
                rows, cols = np.nonzero(target != IGNORE_INDEX)
                cls_all = target[rows, cols]
            else:
                rows, cols = np.divmod(np.arange(h * w), w)
                cls_all = pred.reshape(-1)
            if len(rows) > per_slice:
                keep = bounded_sample(cls_all, per_slice, rng)
                rows, cols, cls_all = rows[keep], cols[keep], cls_all[keep]
            if not len(rows):
                continue
            vec = feat[0, :, torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)].T  # (n, C)
            fits = head is not None and head.net[0].in_channels == vec.shape[1]  # PLGCL 'image' heads do not
            emb = head.project_vectors(vec) if fits else F.normalize(vec, dim=1)
            feats.append(emb.float().cpu().numpy())
            classes.append(np.asarray(cls_all, dtype=np.int64))
            labelled.append(np.full(len(rows), is_lab))
            positions.append(np.stack([np.full(len(rows), p_idx), np.full(len(rows), s_idx), rows, cols], axis=1))
    if not feats:
        d = int(getattr(model, "feature_channels", 0))
        return {"embeddings": np.zeros((0, d), np.float32), "embedding_labels": np.zeros(0, np.int64),
                "embedding_is_labelled": np.zeros(0, bool), "positions": np.zeros((0, 4), np.int64),
                "class_values": np.asarray(dataset.class_values, np.int64)}
    classes_all = np.concatenate(classes)
    keep = bounded_sample(classes_all, max_points, rng)
    return {
        "embeddings": np.concatenate(feats)[keep],
        "embedding_labels": classes_all[keep],
        "embedding_is_labelled": np.concatenate(labelled)[keep],
        "positions": np.concatenate(positions)[keep].astype(np.int64),
        "class_values": np.asarray(dataset.class_values, np.int64),
    }


def slice_disagreement(method, dataset, *, device, pair_index: int = 0) -> dict[str, np.ndarray]:
    """Per slice of one pair, the fraction of pixels where teacher and student arg-max differ.

    Returns
    -------
    dict
        'disagreement' (S,) float32 in [0, 1] along the slicing axis; empty for methods
        without a teacher.
    """
    teacher = getattr(method, "teacher", None)
    if teacher is None:
        return {}
    images = dataset.images[pair_index]
    t_idx, _ = predict_slices(teacher, images, device=device)
    s_idx, _ = predict_slices(method.student, images, device=device)
    return {"disagreement": (t_idx != s_idx).mean(axis=(1, 2)).astype(np.float32)}


@torch.no_grad()
def aleatoric_samples(method, dataset, *, device, pair_index: int, slice_index: int, n_samples: int = 8) -> dict:
    """S aleatoric samples of one slice from the method's aleatoric head.

    Methods that declare ``'aleatoric'`` in ``review_analyses`` answer through
    ``method.sample_aleatoric(x, n_samples, valid_shape)``; others (or a None answer) give an
    empty dict.

    Returns
    -------
    dict
        'aleatoric_samples' (S, H, W) int64 class indices; 'class_values' (K,) int64.
    """
    if "aleatoric" not in getattr(method, "review_analyses", ()):
        return {}
    sample = method.sample_aleatoric
    if n_samples < 1:
        raise ConfigError(f"the number of aleatoric samples must be >= 1, got {n_samples}")
    img = dataset.images[pair_index][slice_index]
    h, w = img.shape[-2:]
    multiple = int(getattr(method.inference_model(), "multiple", 1))
    out = sample(padded_slice(img, multiple, device), n_samples, valid_shape=(h, w))
    if out is None:
        return {}
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return {"aleatoric_samples": out[:, :h, :w].astype(np.int64), "class_values": np.asarray(dataset.class_values, np.int64)}


def method_review(method) -> dict[str, np.ndarray]:
    """The method's :meth:`~napari_semicl.methods.base.Method.review` arrays as numpy."""
    out = {}
    for key, value in (method.review() or {}).items():
        out[key] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return out


def run_analysis(method, dataset, kind: str, *, device, **params) -> dict[str, np.ndarray]:
    """Dispatch one of :data:`ANALYSES` by name (``params`` go to its function).

    'embeddings' and 'aleatoric' run the network on single slices: a 3D network (volume
    patches) raises a ValueError saying so (the trainer turns it into a notice)."""
    if kind in ("embeddings", "aleatoric") and getattr(method.student, "spatial_dims", 2) == 3:
        raise ValueError(f"the {kind} review runs on single slices, for slice networks; this run trains a 3D network")
    if kind == "embeddings":
        return sample_embeddings(method, dataset, device=device, **params)
    if kind == "disagreement":
        return slice_disagreement(method, dataset, device=device, **params)
    if kind == "aleatoric":
        return aleatoric_samples(method, dataset, device=device, **params)
    if kind == "method_review":
        return method_review(method)
    raise ConfigError(f"unknown analysis {kind!r}: choose one of {', '.join(ANALYSES)}")
