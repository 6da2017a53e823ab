"""Histology tile benchmark (``bench monuseg``): a few labelled H&E tiles, the rest unlabelled.

Protocol: the tiles of a folder of ``NAME.png`` + ``NAME_gt.png`` (MoNuSeg: 1000 x 1000 RGB,
0/1 nuclei masks) are sorted by name; the first ``labelled`` tiles train with their full
masks (``unpainted='background'``), every other tile is an unlabelled pair for the
semi-supervised methods and is scored (Dice of the foreground class). The ``rf`` baseline
(ilastik-style random forest on multiscale colour features) trains on the same labelled
tiles and predicts the others. Budgets are fixed step counts (immune to a busy machine).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from ..data import AnnotatedPair
from ..data.dataset import normalise_image
from ..engine import describe_device, pick_device
from ..errors import DataError
from ..io import read_image, read_labels
from .common import Case, ResultsFile, score
from .label_efficiency import (
    apply_overrides,
    bench_config,
    check_methods,
    split_spec,
    train_network,
)

log = logging.getLogger(__name__)


def find_tiles(folder) -> list[Case]:
    """Every ``NAME.png`` (or .tif) with a ``NAME_gt`` mask beside it, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"tile folder {folder} does not exist")
    cases = []
    for gt in sorted([*folder.glob("*_gt.png"), *folder.glob("*_gt.tif")]):
        stem = gt.name[: -len("_gt" + gt.suffix)]
        img_path = next((p for p in (folder / f"{stem}.png", folder / f"{stem}.tif") if p.exists()), None)
        if img_path is None:
            continue
        image = read_image(img_path, kind="image")
        cases.append(Case(stem, image, read_labels(gt, like=image)))
    if not cases:
        raise DataError(f"no NAME.png + NAME_gt.png tiles in {folder}")
    return cases


def _rgb_features(image: np.ndarray) -> np.ndarray:
    """(H, W, F) multiscale intensity/edge/texture features of a normalised RGB tile."""
    norm = normalise_image(image, "percentile", rgb=True)
    return multiscale_basic_features(norm, intensity=True, edges=True, texture=True, sigma_min=1,
                                     sigma_max=16, channel_axis=-1).astype(np.float32)


def rf_tiles(train: list[Case], test: list[Case], *, max_samples: int = 200_000, n_estimators: int = 100,
             seed: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """A random forest on the labelled tiles' pixels; predictions of ``test`` and seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    per_tile = max(1, max_samples // len(train))
    xs, ys = [], []
    for case in train:
        feats = _rgb_features(case.image.data)
        flat = feats.reshape(-1, feats.shape[-1])
        idx = rng.choice(flat.shape[0], min(per_tile, flat.shape[0]), replace=False)
        xs.append(flat[idx])
        ys.append(case.reference.data.reshape(-1)[idx])
    clf = RandomForestClassifier(n_estimators=n_estimators, n_jobs=1, random_state=seed)
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    preds = {}
    for case in test:
        feats = _rgb_features(case.image.data)
        preds[case.name] = clf.predict(feats.reshape(-1, feats.shape[-1])).reshape(feats.shape[:2]).astype(
            case.reference.data.dtype)
    return preds, time.perf_counter() - t0


def monuseg(folder, *, labelled: int = 2, methods, budget_steps: int, seed: int = 0, out, device=None,
            patch_size: int = 128) -> dict:
    """Train each method on ``labelled`` tiles (the rest unlabelled) and score the rest.

    Parameters
    ----------
    folder : path
        ``NAME.png`` + ``NAME_gt.png`` tiles.
    labelled : int
        How many tiles (the first by name) train with their masks.
    methods : list of str
        Registered methods (``name:key=value`` overrides allowed) and ``rf``.
    budget_steps : int
        Training steps per network method.
    out : path
        Results JSON, rewritten after every method.
    """
    methods = check_methods(methods)
    device = device or pick_device()
    cases = find_tiles(folder)
    if not 1 <= labelled < len(cases):
        raise DataError(f"labelled must be in 1..{len(cases) - 1}, got {labelled}")
    train, test = cases[:labelled], cases[labelled:]
    results = ResultsFile(out, {"protocol": "histology-tiles", "labelled": labelled, "budget_steps": budget_steps,
                                "seed": seed, "patch_size": patch_size, "device": describe_device(device),
                                "data": str(folder), "labelled_tiles": [c.name for c in train],
                                "scored_tiles": [c.name for c in test]})
    for method in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "rf":
            preds, seconds = rf_tiles(train, test, seed=seed)
            rows = [{"name": c.name, "train_s": seconds, "steps": None, **score(preds[c.name], c.reference.data)}
                    for c in test]
        else:
            name, overrides = split_spec(method)
            cfg = bench_config(name, None, seed, 0, patch_size=patch_size, budget_steps=budget_steps)
            apply_overrides(cfg, cfg.method, overrides)
            pairs = [AnnotatedPair(c.image.data, c.reference.data, rgb=True, name=c.name) for c in train]
            pairs += [AnnotatedPair(c.image.data, None, rgb=True, name=c.name) for c in test]
            trainer, finished = train_network(cfg, pairs, device)
            train_cpu_s = time.process_time() - c0
            rows = []
            for c in test:
                pred = trainer.predict(c.image.data, rgb=True).labels
                rows.append({"name": c.name, "train_s": finished.seconds, "train_cpu_s": train_cpu_s,
                             "steps": finished.step, **score(pred, c.reference.data)})
        for row in rows:
            row["wall_s"] = time.perf_counter() - t0
            row["cpu_s"] = time.process_time() - c0  # this process's CPU time (training + inference)
            results.add(method, row)
        log.info("%s: mean dice %.4f over %d tiles (%.0f s)", method, results.data["methods"][method]["dice"],
                 len(test), time.perf_counter() - t0)
    return results.data
