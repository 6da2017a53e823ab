"""Label-efficiency benchmarks: ``bench within-volume`` and ``bench cohort``.

Every network method gets the same seed and the same wall-clock budget; results are written
after each (method, volume) so an interrupted run keeps what finished.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..data import AnnotatedPair
from ..data.interpolation import BASELINE_SHRINK_PX, default_shrink, interpolate_labels
from ..data.reveal import choose_reveal_slices, reveal_slices
from ..engine import Finished, TrainConfig, Trainer, describe_device, pick_device, recommended_config
from ..engine.config import set_option
from ..errors import ConfigError, DataError
from ..methods import available_methods
from .common import Case, ResultsFile, find_cases, score, thinnest_axis
from .rf import rf_segment

log = logging.getLogger(__name__)

BASELINES = ("rf", "full", "interp", "interp_flow")
#: The Train dock's default for fully painted slices (:func:`~napari_semicl.engine.recommended_config`).
RECOMMENDED = "recommended"
#: Baselines without training: fill between the revealed slices (data.interpolation), by method.
#: name -> (fill, fall-off in px a slice or None for the plugin's): ``interp`` is issue 16's
#: baseline, 3D Slicer's fill (signed distance, 3 px a slice past the outermost painted slice);
#: ``interp_flow`` the plugin's own fill as "Fill between slices" makes it.
INTERPOLATION_BASELINES = {"interp": ("sdf", BASELINE_SHRINK_PX), "interp_flow": ("flow", None)}


def split_spec(spec: str) -> tuple[str, dict]:
    """'arco:sampler=sg;grid=8' -> ('arco', {'sampler': 'sg', 'grid': '8'}): a method with
    settings of its own config section (so variants share one results file)."""
    name, _, rest = spec.partition(":")
    overrides = dict(item.split("=", 1) for item in rest.split(";") if "=" in item) if rest else {}
    return name, overrides


def apply_overrides(cfg: TrainConfig, method: str, overrides: dict) -> None:
    """Set ``overrides`` ({key: text}) in the method's config section; a dotted key
    ('prior.mode', 'data.context_slices') names another section of the config."""
    try:
        for key, raw in overrides.items():
            set_option(cfg, key, raw, default_section=method)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    cfg.validate()


def check_methods(methods) -> list[str]:
    valid = [*available_methods(), *BASELINES, RECOMMENDED]
    bad = [m for m in methods if split_spec(m)[0] not in valid]
    if bad:
        raise DataError(f"unknown method(s) {bad}; choose from {valid}")
    return list(methods)


def bench_config(method: str, budget_s: float | None, seed: int, axis: int, *, patch_size: int = 128,
                 budget_steps: int | None = None) -> TrainConfig:
    """The benchmark's config: a wall-clock budget (or a step budget, which is immune to a
    noisy shared machine), fully painted slices, no previews. ``method`` 'recommended' is
    the Train dock's default configuration for fully painted slices."""
    cfg = recommended_config() if method == RECOMMENDED else TrainConfig(method=method)
    cfg.seed, cfg.refresh_every = seed, 10**9
    if budget_steps:
        cfg.budget, cfg.iterations = "iterations", budget_steps
    elif budget_s:
        cfg.budget, cfg.minutes = "minutes", budget_s / 60.0
    else:
        raise DataError("give a budget: seconds or steps")
    cfg.data.unpainted = "background"
    cfg.data.axis = axis
    cfg.data.patch_size = patch_size
    return cfg


def train_network(cfg: TrainConfig, pairs, device) -> tuple[Trainer, Finished]:
    trainer = Trainer(cfg, pairs, device=device)
    finished = None
    for event in trainer.run(previews=False):
        if isinstance(event, Finished):
            finished = event
    if finished.reason == "error":
        raise RuntimeError(f"{cfg.method} failed: {finished.error}")
    return trainer, finished


def _spacing(case: Case):
    return case.image.scale if case.image.metadata.get("format") == "nifti" else None


def within_volume(data_dir, *, k: int, methods, budget_s: float | None, seed: int = 0, out, limit=None,
                  device=None, patch_size: int = 128, budget_steps: int | None = None, placement: str = "ends",
                  offset: int = 0, settings: dict | None = None) -> dict:
    """Reveal ``k`` slices of each volume (``placement`` as in
    :func:`~napari_semicl.data.reveal.choose_reveal_slices`), train each method on them,
    score the rest.

    ``settings`` ({'model.spatial_dims': '3', ...}) apply to every trained method, before
    the method's own ``name:key=value`` settings."""
    methods = check_methods(methods)
    device = device or pick_device()
    cases = find_cases(data_dir, limit=limit, offset=offset)
    results = ResultsFile(out, {"protocol": "within-volume", "k": k, "budget_s": budget_s, "budget_steps": budget_steps, "seed": seed,
                                "placement": placement, "device": describe_device(device), "data": str(data_dir),
                                "settings": dict(settings or {})})
    for case in cases:
        ref = case.reference.data
        axis = thinnest_axis(ref.shape)
        revealed = choose_reveal_slices(ref, k, axis, placement)
        painted = reveal_slices(ref, revealed, axis)
        keep = np.setdiff1d(np.arange(ref.shape[axis]), revealed)
        for method in methods:
            t0 = time.perf_counter()
            if method == "rf":
                pred, info = rf_segment(case.image.data, painted, painted_slices=revealed, axis=axis, seed=seed)
                row = {"train_s": info["total_s"], "steps": None}
            elif method in INTERPOLATION_BASELINES:  # revealed slices are whole slices: 'background' semantics
                fill, px = INTERPOLATION_BASELINES[method]
                shrink = None if px is None else default_shrink(case.image.scale, ref.ndim, axis, px)
                pred = interpolate_labels(painted, axis=axis, spacing=case.image.scale, image=case.image.data,
                                          method=fill, shrink=shrink, unpainted="background").labels
                row = {"train_s": time.perf_counter() - t0, "steps": None}
            else:
                labels = ref if method == "full" else painted
                name, overrides = split_spec(method)
                cfg = bench_config("supervised" if name == "full" else name, budget_s, seed, axis, patch_size=patch_size,
                                   budget_steps=budget_steps)
                apply_overrides(cfg, cfg.method, {**(settings or {}), **overrides})
                pair = AnnotatedPair(case.image.data, labels, name=case.name, spacing=_spacing(case))
                trainer, finished = train_network(cfg, [pair], device)
                pred = trainer.predict_pair(0).labels  # fused with the painted-slice prior where it is on
                row = {"train_s": finished.seconds, "steps": finished.step}
            row.update(score(pred, ref, spacing=_spacing(case), keep_slices=keep, axis=axis))
            row.update({"name": case.name, "revealed": revealed, "wall_s": time.perf_counter() - t0})
            log.info("%s %s: dice %.4f (%s steps, %.0f s)", case.name, method, row["dice"] or float("nan"),
                     row["steps"], row["train_s"])
            results.add(method, row)
    return results.data


def choose_labelled(names: list[str], labelled: int, chosen: list[str] | None = None) -> list[int]:
    """Indices (into the sorted ``names``) of the fully labelled training volumes.

    ``chosen`` names them explicitly; otherwise ``labelled`` volumes evenly spaced through the
    sorted list (index ``round(i * n / labelled)``), so that consecutive volumes of one subject
    (e.g. ACDC's two frames of a patient) are not all the labelled set.
    """
    n = len(names)
    if chosen:
        missing = [c for c in chosen if c not in names]
        if missing:
            raise DataError(f"--labelled-names: no training volume named {missing}; the volumes are {names}")
        return sorted(names.index(c) for c in dict.fromkeys(chosen))
    if labelled < 1 or labelled > n:
        raise DataError(f"--labelled must be in 1..{n}, got {labelled}")
    return sorted({min(n - 1, round(i * n / labelled)) for i in range(labelled)})


def cohort(train_dir, test_dir, *, labelled: int, methods, budget_s: float | None, seed: int = 0, out,
           device=None, patch_size: int = 128, limit_test=None, budget_steps: int | None = None,
           labelled_names: list[str] | None = None, settings: dict | None = None, skip_labelled: bool = False,
           complete_labels: bool = False) -> dict:
    """``labelled`` fully labelled training volumes (:func:`choose_labelled`), the others
    unlabelled; score every test volume.

    ``settings`` ({'model.spatial_dims': '3', 'data.patch_depth': '80', ...}) apply to
    every trained method, before its own ``name:key=value`` settings: the seeds'
    left-atrium protocol is ``--spatial-dims 3 --patch-size 112 --patch-depth 80
    --batch-labelled 2 --batch-unlabelled 2`` (docs/benchmarks.md). ``skip_labelled``
    leaves the labelled training volumes out of the scores (test = train folder).
    ``complete_labels`` trains on every slice of a labelled volume, the slices without
    foreground as background (:attr:`AnnotatedPair.complete`; the seeds' setting), where by
    default those slices join the unlabelled pool."""
    methods = check_methods(methods)
    device = device or pick_device()
    train = find_cases(train_dir)
    test = find_cases(test_dir, limit=limit_test)
    chosen = set(choose_labelled([c.name for c in train], labelled, labelled_names))
    axis = thinnest_axis(train[0].reference.data.shape)
    results = ResultsFile(out, {"protocol": "cohort", "labelled": len(chosen), "budget_s": budget_s, "budget_steps": budget_steps, "seed": seed,
                                "device": describe_device(device), "train": str(train_dir), "test": str(test_dir),
                                "labelled_volumes": [train[i].name for i in sorted(chosen)],
                                "settings": dict(settings or {}), "skip_labelled": skip_labelled,
                                "complete_labels": complete_labels})
    if skip_labelled:
        test = [c for c in test if c.name not in {train[i].name for i in chosen}]
    for method in methods:
        if method == "rf":
            log.warning("rf is a within-volume baseline; skipped in the cohort protocol")
            continue
        pairs = []
        for i, case in enumerate(train):
            fully = method == "full" or i in chosen
            pairs.append(AnnotatedPair(case.image.data, case.reference.data if fully else None, name=case.name,
                                       complete=fully and complete_labels))
        name, overrides = split_spec(method)
        cfg = bench_config("supervised" if name == "full" else name, budget_s, seed, axis, patch_size=patch_size,
                           budget_steps=budget_steps)
        apply_overrides(cfg, cfg.method, {**(settings or {}), **overrides})
        trainer, finished = train_network(cfg, pairs, device)
        if not trainer.dist.is_main:  # under torchrun every rank trains, rank 0 scores
            continue
        for case in test:
            pred = trainer.predict(case.image.data).labels
            row = {"name": case.name, "train_s": finished.seconds, "steps": finished.step}
            row.update(score(pred, case.reference.data, spacing=_spacing(case)))
            results.add(method, row)
        log.info("%s: mean dice %.4f over %d test volumes (%d steps)", method,
                 results.data["methods"][method]["dice"], len(test), finished.step)
    return results.data
