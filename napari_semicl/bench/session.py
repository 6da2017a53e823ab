"""The session benchmark (``napari-semicl bench session``): what a user pays, in painted slices.

A simulated annotator works through a folder of volumes with references, in a given order.
For each volume it starts from the product's mask and paints one reference slice at a time
(a whole slice, copied from the reference) until the whole-volume Dice of the mask reaches a
target (default 0.90) or it has painted ``max_slices`` (default 10). Where it paints next:

* ``even``: ``k`` slices evenly spaced strictly inside the structure's slice range
  (:func:`~napari_semicl.data.reveal.choose_reveal_slices`, ``placement='inside'``; with the
  range's end slices once ``k`` no longer fits inside it), for ``k = 1, 2, ...``: the set is
  placed afresh at every ``k`` (an annotator who knows how many slices it will paint), so the
  count is the smallest ``k`` that reaches the target;
* ``suggest``: the plugin's "where to paint next" (:mod:`napari_semicl.analysis.suggest`): the
  unpainted slice with the highest mean entropy of the network's mask; only the ``network``
  product has one (the first slice of the first volume, before any network, is the middle of
  the structure, as ``even`` with ``k = 1``);
* ``worst``: an oracle, the unpainted slice with the most wrong voxels in the current mask.

``suggest`` and ``worst`` choose among the slices that hold foreground in the reference: a
painted slice without foreground cannot be told from an unpainted one (whole slices are
painted with ``unpainted='background'``, where 0 is background and unpainted alike, and ITK's
filter has the same convention), so such a slice would tell the product nothing.

The products (``--product``), i.e. the mask the user sees:

* ``fill``: the plugin's fill between slices alone
  (:func:`~napari_semicl.data.interpolation.interpolate_labels`, ``method='flow'`` with the
  image, the plugin's fall-off), no training;
* ``mci``: ITK's MorphologicalContourInterpolator (:mod:`napari_semicl.bench.mci`), the anchor
  of 3D Slicer's and ITK-SNAP's fill; needs the optional extra ``bench``;
* ``network``: one network for the whole session (the engine's :class:`Trainer`), trained on the
  painted slices of every volume seen so far and continuing from its current weights. A new
  volume's first mask is the network's prediction; once slices are painted, it is the network
  fused with the fill of those slices (:meth:`Trainer.predict_pair`, the fusion of
  :mod:`napari_semicl.engine.prior`), finished as the Train dock finishes it
  (``--set predict.largest_component=true``, the dock's "Keep largest piece": each class keeps
  its largest 3D piece, in both masks, by :func:`~napari_semicl.engine.postprocess.finish_prediction`
  inside ``Trainer.predict`` and ``predict_pair``; the entropy stays the network's). Training
  runs for a budget per volume, in CPU-seconds (``time.process_time`` of this process, all
  threads, the fill of the prior included) or in steps: a tenth (``1 / max_slices``) after
  each painted slice, the rest once the volume is done.

Reported per volume: the painted slices (in order), the Dice after each, the final Dice, and
the time (with ``predict.largest_component``, also ``dice_trace_unfinished``: the Dice of the
same masks before the largest piece was kept, a paired diagnostic the annotator does not
see); overall, the mean painted slices over all volumes and over volumes ``warmup + 1`` to
``N`` (the cohort's claim: once a few volumes are painted, the next ones need fewer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis import rank_slices, slice_means
from ..data import AnnotatedPair
from ..data.interpolation import interpolate_labels
from ..data.reveal import choose_reveal_slices, foreground_slice_range, reveal_slices
from ..engine import Finished, StepDone, TrainConfig, Trainer, describe_device, pick_device, recommended_config
from ..engine.metrics import dice_per_class
from ..engine.postprocess import finish_prediction
from ..errors import DataError
from ..io import atomic_path
from .common import Case, find_cases, machine_info, thinnest_axis
from .label_efficiency import RECOMMENDED, apply_overrides, check_methods, split_spec

log = logging.getLogger(__name__)

STRATEGIES = ("even", "suggest", "worst")
PRODUCTS = ("fill", "mci", "network")
ORDERS = ("name", "random")
DEFAULT_TARGET = 0.90
DEFAULT_MAX_SLICES = 10
#: volumes 1..warmup are the cohort's start; the headline mean is over the volumes after them
DEFAULT_WARMUP = 3


# --- the annotator ----------------------------------------------------------------------------
def volume_dice(mask: np.ndarray, reference: np.ndarray) -> float:
    """Whole-volume Dice, the mean over the foreground classes present in ``reference``."""
    values = [int(v) for v in np.unique(reference) if v != 0]
    if not values:
        raise DataError("the reference holds no foreground: nothing to annotate")
    per_class = dice_per_class(mask, reference, values)
    return float(np.mean(list(per_class.values())))


def foreground_slices(reference: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` that hold foreground in ``reference``."""
    other = tuple(a for a in range(reference.ndim) if a != axis)
    return np.flatnonzero(np.any(reference != 0, axis=other))


def even_slices(reference: np.ndarray, k: int, axis: int) -> list[int]:
    """The ``even`` strategy's set of ``k`` painted slices: evenly spaced strictly inside the
    structure's slice range; where the range is too short for ``k`` distinct slices inside it
    (e.g. ACDC's 6 to 10 slices), evenly spaced over it with its two end slices; fewer than
    ``k`` when even that does not fit."""
    inside = choose_reveal_slices(reference, k, axis, "inside")
    return inside if len(inside) == k else choose_reveal_slices(reference, k, axis, "ends")


def wrong_per_slice(mask: np.ndarray, reference: np.ndarray, axis: int) -> np.ndarray:
    """(S,) number of voxels of each slice along ``axis`` where ``mask`` differs from ``reference``."""
    other = tuple(a for a in range(reference.ndim) if a != axis)
    return np.sum(mask != reference, axis=other)


def worst_slice(mask: np.ndarray, reference: np.ndarray, axis: int, painted=()) -> int | None:
    """The ``worst`` oracle: among the unpainted slices holding foreground, the one with the
    most wrong voxels (the lowest index among equals); None when every such slice is painted."""
    candidates = np.setdiff1d(foreground_slices(reference, axis), np.asarray(list(painted), dtype=int))
    if candidates.size == 0:
        return None
    wrong = wrong_per_slice(mask, reference, axis)[candidates]
    return int(candidates[int(np.argmax(wrong))])


def suggested_slice(entropy: np.ndarray, reference: np.ndarray, axis: int, painted=()) -> int | None:
    """The plugin's suggestion (:func:`~napari_semicl.analysis.rank_slices` of the mean
    entropy per slice), among the unpainted slices holding foreground; None when none is left."""
    keep = set(foreground_slices(reference, axis).tolist()) - {int(s) for s in painted}
    if not keep:
        return None
    exclude = [s for s in range(reference.shape[axis]) if s not in keep]
    return rank_slices(slice_means(entropy, axis), exclude=exclude, top=1)[0].slice_index


def next_painted(strategy: str, painted: list[int], *, reference: np.ndarray, axis: int, mask: np.ndarray,
                 entropy: np.ndarray | None = None) -> list[int] | None:
    """The painted slices after one more (in the order painted), or None when the strategy
    has no slice left to paint."""
    if strategy == "even":
        k = len(painted) + 1
        chosen = even_slices(reference, k, axis)
        return chosen if len(chosen) == k else None  # the range holds fewer than k slices
    if strategy == "worst":
        s = worst_slice(mask, reference, axis, painted)
    elif strategy == "suggest":
        if entropy is None:  # no network yet: the middle of the structure, as the first even slice
            s = next((c for c in even_slices(reference, 1, axis) if c not in painted), None)
        else:
            s = suggested_slice(entropy, reference, axis, painted)
    else:
        raise DataError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    return None if s is None else [*painted, s]


# --- the products -----------------------------------------------------------------------------
@dataclass
class Shown:
    """What the user sees of a volume: the mask and, where the product has one, the entropy
    the plugin's suggestion ranks slices by."""

    mask: np.ndarray
    entropy: np.ndarray | None = None
    #: the mask before ``predict.largest_component`` finished it (a diagnostic; None when off)
    unfinished: np.ndarray | None = None


def _spacing(case: Case):
    return tuple(case.image.scale) if case.image.metadata.get("format") == "nifti" else None


class FillProduct:
    """The plugin's fill between slices (flow, with the image), no training."""

    name = "fill"

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def start(self, case: Case) -> Shown:
        self.case = case
        return Shown(np.zeros_like(case.reference.data))

    def paint(self, labels: np.ndarray, painted: list[int]) -> Shown:
        out = interpolate_labels(labels, axis=self.axis, spacing=_spacing(self.case), image=self.case.image.data,
                                 method="flow", unpainted="background")
        return Shown(out.labels.astype(labels.dtype, copy=False))

    def finish(self) -> dict:
        return {}


class MciProduct(FillProduct):
    """ITK's MorphologicalContourInterpolator along the slicing axis."""

    name = "mci"

    def __init__(self, axis: int) -> None:
        from .mci import _itk

        _itk()  # a clear message now, not after the first volume, when ITK is missing
        super().__init__(axis)

    def paint(self, labels: np.ndarray, painted: list[int]) -> Shown:
        from .mci import mci_interpolate

        return Shown(mci_interpolate(labels, self.axis))


class NetworkProduct:
    """One network for the session: trained on every volume seen so far, fused with the fill.

    ``budget_s`` (CPU-seconds) or ``budget_steps`` per volume: ``1 / max_slices`` of it after
    each painted slice, the rest when the volume is done.
    """

    name = "network"

    def __init__(self, config: TrainConfig, *, budget_s: float | None, budget_steps: int | None,
                 max_slices: int, device, threads: int | None = None) -> None:
        if not (budget_s or budget_steps):
            raise DataError("the network product needs a training budget per volume: --budget-s or --budget-steps")
        self.config = config
        self.budget_s, self.budget_steps = budget_s, budget_steps
        self.chunks = max(1, int(max_slices))
        self.device, self.threads = device, threads
        self.trainer: Trainer | None = None
        self.pairs: list[AnnotatedPair] = []  # the volumes done, with their painted slices
        self.current: AnnotatedPair | None = None

    # budget bookkeeping of the current volume
    def _reset_volume(self) -> None:
        self.spent_s, self.spent_steps = 0.0, 0

    def _share(self, rest: bool = False) -> tuple[float | None, int | None]:
        """CPU-seconds or steps to train now: a chunk, or what is left of the volume's budget."""
        if self.budget_steps:
            left = self.budget_steps - self.spent_steps
            steps = left if rest else min(left, max(1, round(self.budget_steps / self.chunks)))
            return None, max(0, steps)
        left = self.budget_s - self.spent_s
        return max(0.0, left if rest else min(left, self.budget_s / self.chunks)), None

    def _train(self, seconds: float | None, steps: int | None) -> None:
        if self.trainer is None or (seconds is not None and seconds <= 0) or (steps is not None and steps <= 0):
            return
        t0, s0 = time.process_time(), self.trainer.step
        finished = None
        for event in self.trainer.run(previews=False):
            if isinstance(event, StepDone):
                done_steps = self.trainer.step - s0
                if (steps is not None and done_steps >= steps) or (
                        seconds is not None and time.process_time() - t0 >= seconds):
                    self.trainer.request_stop()
            elif isinstance(event, Finished):
                finished = event
        if finished is None or finished.reason == "error":
            raise DataError(f"training failed: {None if finished is None else finished.error}")
        self.spent_s += time.process_time() - t0
        self.spent_steps += self.trainer.step - s0

    def _shown(self, predict, dtype) -> Shown:
        """``predict()`` (a :class:`Trainer` prediction, which the trainer finishes as the
        config's ``predict`` section says, as the Train dock does) as the user sees it; with
        ``largest_component`` on, also the mask before it was finished: the same prediction,
        made with the setting off and then finished by the same function, so both Dice can be
        recorded for one network state."""
        settings = self.trainer.config.predict
        if not settings.largest_component:
            pred = predict()
            return Shown(pred.labels.astype(dtype, copy=False), pred.entropy)
        self.trainer.config.predict = dataclasses.replace(settings, largest_component=False)
        try:
            raw = predict()
        finally:
            self.trainer.config.predict = settings
        pred = finish_prediction(raw, settings)
        return Shown(pred.labels.astype(dtype, copy=False), pred.entropy,
                     unfinished=raw.labels.astype(dtype, copy=False))

    def start(self, case: Case) -> Shown:
        self._reset_volume()
        self.case = case
        self.current = None
        if self.trainer is None:  # nothing trained yet: an empty mask
            return Shown(np.zeros_like(case.reference.data))
        return self._shown(lambda: self.trainer.predict(case.image.data, with_entropy=True), case.reference.data.dtype)

    def paint(self, labels: np.ndarray, painted: list[int]) -> Shown:
        case = self.case
        self.current = AnnotatedPair(case.image.data, labels, name=case.name, spacing=_spacing(case))
        pairs = [*self.pairs, self.current]
        if self.trainer is None:
            self.trainer = Trainer(self.config, pairs, device=self.device, num_threads=self.threads)
        else:
            self.trainer.submit_data(pairs)  # applied before the next step
        self._train(*self._share())
        return self._shown(lambda: self.trainer.predict_pair(len(pairs) - 1, with_entropy=True), labels.dtype)

    def finish(self) -> dict:
        if self.current is not None:
            self.pairs.append(self.current)
            self.current = None
        if self.trainer is not None:  # the rest of the volume's budget (a volume accepted unpainted adds no data)
            self._train(*self._share(rest=True))
        return {"train_cpu_s": round(self.spent_s, 2), "train_steps": self.spent_steps,
                "total_steps": 0 if self.trainer is None else self.trainer.step}


def session_config(method: str, *, axis: int, class_values, seed: int, patch_size: int | None = None,
                   settings: dict | None = None) -> TrainConfig:
    """The network product's config: ``method`` ('recommended': the Train dock's default for
    painted slices, supervised with the painted-slice prior) on whole painted slices, the class
    table of the whole folder, and a wall-clock budget too long to end a run: the session stops
    each run itself (CPU-seconds or steps), at a constant learning rate."""
    name, overrides = split_spec(method)
    cfg = recommended_config() if name == RECOMMENDED else TrainConfig(method=name)
    cfg.seed, cfg.refresh_every = seed, 10**9
    cfg.budget, cfg.minutes = "minutes", 10.0**6
    cfg.data.unpainted = "background"
    cfg.data.axis = axis
    cfg.data.class_values = [int(v) for v in class_values]
    if patch_size:
        cfg.data.patch_size = patch_size
    if name != RECOMMENDED or overrides or settings:
        apply_overrides(cfg, cfg.method, {**(settings or {}), **overrides})
    return cfg


# --- the session ------------------------------------------------------------------------------
def order_cases(cases: list[Case], order: str, seed: int = 0) -> list[Case]:
    """``order``: 'name' (sorted, as found), 'random' (shuffled with ``seed``) or
    comma-separated volume names (those volumes, in that order)."""
    if order == "name":
        return list(cases)
    if order == "random":
        rng = np.random.default_rng(seed)
        return [cases[i] for i in rng.permutation(len(cases))]
    names = [n.strip() for n in order.split(",") if n.strip()]
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        raise DataError(f"--order: no volume named {missing or order!r} in the folder; give 'name', 'random' or "
                        f"comma-separated names from {sorted(by_name)}")
    if len(set(names)) != len(names):
        raise DataError(f"--order names a volume twice: {names}")
    return [by_name[n] for n in names]


def _before(before: list) -> str:
    return "" if not before or before[-1] is None else f" ({before[-1]:.4f} before keeping the largest piece)"


def annotate_volume(case: Case, product, *, strategy: str, axis: int, target: float = DEFAULT_TARGET,
                    max_slices: int = DEFAULT_MAX_SLICES) -> dict:
    """One volume of the session: paint until the Dice reaches ``target`` or ``max_slices``."""
    reference = case.reference.data
    foreground_slice_range(reference, axis)  # a clear error for a reference without foreground
    t0, c0 = time.perf_counter(), time.process_time()
    shown = product.start(case)
    painted: list[int] = []
    trace = [volume_dice(shown.mask, reference)]
    before: list[float | None] = []  # the Dice of each mask before it was finished, where it was

    def unfinished(shown: Shown) -> None:
        before.append(None if shown.unfinished is None else volume_dice(shown.unfinished, reference))

    unfinished(shown)
    log.info("%s: first mask (0 painted slices), Dice %.4f%s", case.name, trace[0], _before(before))
    while trace[-1] < target and len(painted) < max_slices:
        chosen = next_painted(strategy, painted, reference=reference, axis=axis, mask=shown.mask,
                              entropy=shown.entropy)
        if chosen is None:
            break
        painted = chosen
        shown = product.paint(reveal_slices(reference, painted, axis), painted)
        trace.append(volume_dice(shown.mask, reference))
        unfinished(shown)
        log.info("%s: %d painted slice(s) %s, Dice %.4f%s", case.name, len(painted), painted, trace[-1],
                 _before(before))
    extra = product.finish()
    row = {"name": case.name, "painted": len(painted), "slices": [int(s) for s in painted],
           "dice": round(trace[-1], 4), "dice_trace": [round(d, 4) for d in trace],
           "reached": bool(trace[-1] >= target), "wall_s": round(time.perf_counter() - t0, 2),
           "cpu_s": round(time.process_time() - c0, 2), **extra}
    if any(d is not None for d in before):  # predict.largest_component on: the Dice had it been off
        row["dice_trace_unfinished"] = [None if d is None else round(d, 4) for d in before]
    return row


def summarise(rows: list[dict], warmup: int) -> dict:
    """Mean (and spread) of the painted slices over all volumes and over volumes ``warmup+1..N``."""
    def stats(values):
        if not values:
            return None
        a = np.asarray(values, dtype=float)
        return {"mean": round(float(a.mean()), 3), "std": round(float(a.std()), 3), "min": float(a.min()),
                "max": float(a.max()), "n": int(a.size)}

    later = rows[warmup:]
    return {"painted": stats([r["painted"] for r in rows]),
            "painted_after_warmup": stats([r["painted"] for r in later]),
            "dice": stats([r["dice"] for r in rows]),
            "reached": sum(r["reached"] for r in rows), "volumes": len(rows),
            "cpu_s": stats([r["cpu_s"] for r in rows])}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def run_session(data_dir, *, product: str = "fill", strategy: str = "even", out, target: float = DEFAULT_TARGET,
                max_slices: int = DEFAULT_MAX_SLICES, order: str = "name", limit: int | None = None,
                warmup: int = DEFAULT_WARMUP, axis: int | None = None, budget_s: float | None = None,
                budget_steps: int | None = None, method: str = RECOMMENDED, patch_size: int | None = None,
                settings: dict | None = None, seed: int = 0, device=None, threads: int | None = None) -> dict:
    """Run a session over the volumes of ``data_dir`` (``NAME.nii.gz`` + ``NAME_gt.nii.gz``);
    the results JSON at ``out`` is rewritten after every volume. Returns the results."""
    if product not in PRODUCTS:
        raise DataError(f"unknown product {product!r}; choose from {PRODUCTS}")
    if strategy not in STRATEGIES:
        raise DataError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy == "suggest" and product != "network":
        raise DataError("strategy 'suggest' ranks slices by the network's entropy: use it with --product network "
                        "(the fill and mci have no suggestion; compare them with 'even' or 'worst')")
    if not 0.0 < target <= 1.0:
        raise DataError(f"--target is a Dice in (0, 1], got {target}")
    if max_slices < 1:
        raise DataError(f"--max-slices must be at least 1, got {max_slices}")
    if warmup < 0:
        raise DataError(f"--warmup must be >= 0, got {warmup}")
    cases = order_cases(find_cases(data_dir), order, seed)[:limit]
    shapes = {c.reference.data.ndim for c in cases}
    if shapes != {3}:
        raise DataError(f"the session benchmark annotates 3D volumes; {data_dir} holds {sorted(shapes)}-D references")
    for c in cases:
        if c.image.data.shape != c.reference.data.shape:
            raise DataError(f"{c.name}: image {c.image.data.shape} and reference {c.reference.data.shape} differ")
    axis = thinnest_axis(cases[0].reference.data.shape) if axis is None else axis
    if not 0 <= axis < 3:
        raise DataError(f"--axis must be 0, 1 or 2, got {axis}")
    header = {"protocol": "session", "product": product, "strategy": strategy, "target": target,
              "max_slices": max_slices, "warmup": warmup, "axis": axis, "data": str(data_dir), "order": order,
              "volumes_order": [c.name for c in cases], "seed": seed}
    if product == "network":
        device = device or pick_device()
        class_values = sorted({0, *(int(v) for c in cases for v in np.unique(c.reference.data))})
        check_methods([method])
        cfg = session_config(method, axis=axis, class_values=class_values, seed=seed, patch_size=patch_size,
                             settings=settings)
        runner = NetworkProduct(cfg, budget_s=budget_s, budget_steps=budget_steps, max_slices=max_slices,
                                device=device, threads=threads)
        header.update({"method": method, "budget_cpu_s": budget_s, "budget_steps": budget_steps,
                       "settings": dict(settings or {}), "largest_component": cfg.predict.largest_component,
                       "device": describe_device(device, threads),
                       "threads": threads or os.cpu_count()})
    else:
        if budget_s or budget_steps:
            log.warning("the %s product does not train: the budget is ignored", product)
        runner = FillProduct(axis) if product == "fill" else MciProduct(axis)
    out = Path(out)
    data = {**header, "machine": machine_info(), "volumes": [], "summary": None}
    _write(out, data)
    for i, case in enumerate(cases):
        row = annotate_volume(case, runner, strategy=strategy, axis=axis, target=target, max_slices=max_slices)
        row["index"] = i + 1
        data["volumes"].append(row)
        data["summary"] = summarise(data["volumes"], warmup)
        _write(out, data)
        log.info("volume %d/%d %s: %d painted, Dice %.4f, %.0f CPU-s", i + 1, len(cases), case.name,
                 row["painted"], row["dice"], row["cpu_s"])
    return data


def format_table(data: dict) -> str:
    """The results as a plain-text table, one row per volume, and the means."""
    lines = [f"session: product {data['product']}, strategy {data['strategy']}, target Dice {data['target']}, "
             f"at most {data['max_slices']} slices"]
    if data["product"] == "network":
        budget = (f"{data['budget_steps']} steps" if data.get("budget_steps")
                  else f"{data.get('budget_cpu_s')} CPU-s")
        lines[0] += f", {data['method']}, {budget} per volume"
        if data.get("largest_component"):
            lines[0] += ", largest piece kept"
    head = f"{'#':>3}  {'volume':<24} {'painted':>7}  {'Dice':>6}  {'CPU s':>7}  {'wall s':>7}  slices"
    lines += [head, "-" * len(head)]
    for r in data["volumes"]:
        lines.append(f"{r['index']:>3}  {r['name'][:24]:<24} {r['painted']:>7}  {r['dice']:>6.3f}  {r['cpu_s']:>7.1f}  "
                     f"{r['wall_s']:>7.1f}  {r['slices']}")
    s = data.get("summary")
    if s:
        p, later = s["painted"], s["painted_after_warmup"]
        lines.append(f"mean painted slices: {p['mean']:.2f} (std {p['std']:.2f}) over {p['n']} volumes; "
                     f"reached {s['reached']}/{s['volumes']}; mean Dice {s['dice']['mean']:.3f}")
        if later:
            lines.append(f"volumes {data['warmup'] + 1}..{s['volumes']}: {later['mean']:.2f} painted slices "
                         f"(std {later['std']:.2f}, {later['min']:.0f}-{later['max']:.0f})")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def add_session_arguments(parser) -> None:
    """The options of ``napari-semicl bench session``."""
    parser.add_argument("--data", required=True, help="folder of NAME.nii.gz + NAME_gt.nii.gz (the references)")
    parser.add_argument("--product", choices=PRODUCTS, default="fill",
                        help="the mask the annotator corrects: the plugin's fill alone, ITK's "
                             "MorphologicalContourInterpolator (extra 'bench'), or the session's network fused "
                             "with the fill (default: fill)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="even",
                        help="where the annotator paints: k slices evenly inside the structure, the plugin's "
                             "suggestion (network only), or the slice with most wrong voxels (default: even)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="whole-volume Dice to reach (0.90)")
    parser.add_argument("--max-slices", type=int, default=DEFAULT_MAX_SLICES, help="slices at most per volume (10)")
    parser.add_argument("--order", default="name",
                        help="'name' (sorted), 'random' (shuffled with --seed) or comma-separated volume names")
    parser.add_argument("--limit", type=int, help="only the first N volumes of the order")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="the headline mean leaves out the first N volumes (3: volumes 4..N)")
    parser.add_argument("--axis", type=int, help="the slicing axis (default: the first volume's thinnest)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-s", type=float, help="network: training CPU-seconds per volume (process time)")
    budget.add_argument("--budget-steps", type=int, help="network: training steps per volume")
    parser.add_argument("--method", default=RECOMMENDED,
                        help="network: a registered method or 'recommended' (the Train dock's default), "
                             "optionally NAME:key=value;key=value")
    parser.add_argument("--patch-size", type=int, help="network: training crop side (default 128)")
    parser.add_argument("--threads", type=int, help="network: torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="network: any setting, e.g. --set prior.network_min_painted=1 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every volume)")


def _settings(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise DataError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = raw.strip()
    return out


def run_session_command(args) -> int:
    """``napari-semicl bench session``: run, write the JSON, print the table; 0 on success."""
    device = pick_device(args.device) if args.product == "network" else None
    data = run_session(args.data, product=args.product, strategy=args.strategy, out=args.out, target=args.target,
                       max_slices=args.max_slices, order=args.order, limit=args.limit, warmup=args.warmup,
                       axis=args.axis, budget_s=args.budget_s, budget_steps=args.budget_steps, method=args.method,
                       patch_size=args.patch_size, settings=_settings(args.set), seed=args.seed, device=device,
                       threads=args.threads)
    print(format_table(data))
    print(f"results written to {args.out}")
    return 0
