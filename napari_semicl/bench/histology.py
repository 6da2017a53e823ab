"""Histology tile benchmark (``bench monuseg``): a few labelled H&E tiles, the rest unlabelled.

Protocol: the tiles of a folder of ``NAME.png`` + ``NAME_gt.png`` (MoNuSeg: 1000 x 1000 RGB,
0/1 nuclei masks) are sorted by name; the first ``labelled`` tiles train with their full
masks (``unpainted='background'``), every other tile is an unlabelled pair for the
semi-supervised methods and is scored (Dice of the foreground class). The ``rf`` baseline
(ilastik-style random forest on multiscale colour features) trains on the same labelled
tiles and predicts the others. Budgets are fixed step counts (immune to a busy machine), or
CPU-seconds of this process (``time.process_time``): a short probe run of the same method measures
its CPU-seconds per step, the run is given the steps that fill the budget (so the learning-rate
schedule ends where the budget does), and it stops early if it reaches the budget first.

``adapt_batch_norm`` ('off', 'on', 'both'): the networks predict with the
``predict.adapt_batch_norm`` setting off, on, or (``both``) each trained network predicts the
scored tiles both ways, a paired comparison from one training run: the adapted rows are
recorded under ``'<method> +adabn'``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from ..data import AnnotatedPair
from ..data.dataset import normalise_image
from ..engine import Finished, StepDone, Trainer, describe_device, pick_device
from ..errors import DataError
from ..io import read_image, read_labels
from .common import Case, ResultsFile, score
from .label_efficiency import (
    apply_overrides,
    bench_config,
    check_methods,
    split_spec,
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


def nuclei_counts(pred: np.ndarray, reference: np.ndarray) -> dict:
    """Pixel precision and recall of the foreground (label > 0), and the foreground fractions
    predicted and referenced: whether a tile's Dice is lost to misses or to false alarms."""
    p, r = np.asarray(pred) > 0, np.asarray(reference) > 0
    hit = float(np.count_nonzero(p & r))
    return {"precision": hit / max(np.count_nonzero(p), 1), "recall": hit / max(np.count_nonzero(r), 1),
            "fg_pred": float(p.mean()), "fg_ref": float(r.mean())}


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


#: steps of the probe run that measures a method's CPU-seconds per step (the first
#: PROBE_SKIP are not counted: the first steps pay for allocation and warm-up)
PROBE_STEPS, PROBE_SKIP = 24, 4


def _network_config(method: str, seed: int, patch_size: int, steps: int):
    name, overrides = split_spec(method)
    cfg = bench_config(name, None, seed, 0, patch_size=patch_size, budget_steps=steps)
    apply_overrides(cfg, cfg.method, overrides)
    return cfg


def _train(cfg, pairs, device, *, cpu_s: float | None = None):
    """Train ``cfg`` to its step budget, or until this process has spent ``cpu_s`` CPU-seconds
    on it. Returns (trainer, finished, CPU-seconds of each step in order)."""
    trainer = Trainer(cfg, pairs, device=device)
    c0 = last = time.process_time()
    finished, step_cpu = None, []
    for event in trainer.run(previews=False):
        if isinstance(event, StepDone):
            now = time.process_time()
            step_cpu.append(now - last)
            last = now
            if cpu_s is not None and now - c0 >= cpu_s:
                trainer.request_stop()
        elif isinstance(event, Finished):
            finished = event
    if finished is None or finished.reason == "error":
        raise RuntimeError(f"{cfg.method} failed: {None if finished is None else finished.error}")
    return trainer, finished, step_cpu


def calibrate_steps(method: str, pairs, device, *, budget_cpu_s: float, seed: int = 0,
                    patch_size: int = 128) -> tuple[int, float]:
    """Steps of ``method`` that fill ``budget_cpu_s`` CPU-seconds of this process, from a
    probe run of :data:`PROBE_STEPS` steps: ``(steps, CPU-seconds per step)``."""
    cfg = _network_config(method, seed, patch_size, PROBE_STEPS)
    _, _, step_cpu = _train(cfg, pairs, device)
    counted = step_cpu[PROBE_SKIP:] or step_cpu
    per_step = max(sum(counted) / len(counted), 1e-6)
    return max(1, int(budget_cpu_s / per_step)), per_step


def monuseg(folder, *, labelled: int = 2, methods, budget_steps: int | None = None, seed: int = 0, out,
            device=None, patch_size: int = 128, budget_cpu_s: float | None = None,
            adapt_batch_norm: str = "off") -> dict:
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
    budget_cpu_s : float
        Instead of ``budget_steps``: CPU-seconds of training per network method (this
        process's ``time.process_time``; run with one thread for a per-core figure). The
        steps come from a probe run (:func:`calibrate_steps`); the run stops early if it
        spends the budget before its steps.
    out : path
        Results JSON, rewritten after every method.
    adapt_batch_norm : {'off', 'on', 'both'}
        The networks' ``predict.adapt_batch_norm``; ``both``: each network predicts the scored
        tiles without, then with it (rows ``'<method> +adabn'``), from the same training.
    """
    variants = {"off": (False,), "on": (True,), "both": (False, True)}.get(adapt_batch_norm)
    if variants is None:
        raise DataError(f"adapt_batch_norm must be 'off', 'on' or 'both', got {adapt_batch_norm!r}")
    if (budget_steps is None) == (budget_cpu_s is None):
        raise DataError("give one budget: budget_steps (steps) or budget_cpu_s (CPU-seconds)")
    if budget_cpu_s is not None and budget_cpu_s <= 0:
        raise DataError(f"the CPU-second budget must be > 0, got {budget_cpu_s}")
    methods = check_methods(methods)
    device = device or pick_device()
    cases = find_tiles(folder)
    if not 1 <= labelled < len(cases):
        raise DataError(f"labelled must be in 1..{len(cases) - 1}, got {labelled}")
    train, test = cases[:labelled], cases[labelled:]
    results = ResultsFile(out, {"protocol": "histology-tiles", "labelled": labelled, "budget_steps": budget_steps,
                                "budget_cpu_s": budget_cpu_s, "torch_threads": torch.get_num_threads(),
                                "seed": seed, "patch_size": patch_size, "device": describe_device(device),
                                "data": str(folder), "adapt_batch_norm": adapt_batch_norm,
                                "labelled_tiles": [c.name for c in train],
                                "scored_tiles": [c.name for c in test]})
    for method in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "rf":
            preds, seconds = rf_tiles(train, test, seed=seed)
            rows = [{"name": c.name, "train_s": seconds, "steps": None, **score(preds[c.name], c.reference.data),
                     **nuclei_counts(preds[c.name], c.reference.data)} for c in test]
        else:
            pairs = [AnnotatedPair(c.image.data, c.reference.data, rgb=True, name=c.name) for c in train]
            pairs += [AnnotatedPair(c.image.data, None, rgb=True, name=c.name) for c in test]
            extra = {}
            steps = budget_steps
            if budget_cpu_s is not None:
                steps, per_step = calibrate_steps(method, pairs, device, budget_cpu_s=budget_cpu_s, seed=seed,
                                                  patch_size=patch_size)
                extra = {"probe_cpu_s_per_step": per_step, "planned_steps": steps}
                log.info("%s: %.4f CPU-s per step in the probe: %d steps for %.0f CPU-s", method, per_step, steps,
                         budget_cpu_s)
                c0 = time.process_time()  # the probe is not part of the method's time
            cfg = _network_config(method, seed, patch_size, steps)
            trainer, finished, _ = _train(cfg, pairs, device, cpu_s=budget_cpu_s)
            train_cpu_s = time.process_time() - c0
            settings = trainer.config.predict
            for adapt in variants:
                name = f"{method} +adabn" if adapt and len(variants) > 1 else method
                trainer.config.predict = dataclasses.replace(settings, adapt_batch_norm=adapt)
                rows = []
                for c in test:
                    p0 = time.process_time()
                    pred = trainer.predict(c.image.data, rgb=True).labels
                    rows.append({"name": c.name, "train_s": finished.seconds, "train_cpu_s": train_cpu_s,
                                 "steps": finished.step, "adapt_batch_norm": adapt,
                                 "predict_cpu_s": time.process_time() - p0, **extra,
                                 **score(pred, c.reference.data), **nuclei_counts(pred, c.reference.data)})
                trainer.config.predict = settings
                _add_rows(results, name, rows, t0, c0, len(test))
            continue
        _add_rows(results, method, rows, t0, c0, len(test))
    return results.data


def _add_rows(results, method: str, rows: list[dict], t0: float, c0: float, n: int) -> None:
    for row in rows:
        row["wall_s"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0  # this process's CPU time (training + inference)
        results.add(method, row)
    log.info("%s: mean dice %.4f over %d tiles (%.0f s)", method, results.data["methods"][method]["dice"], n,
             time.perf_counter() - t0)
