"""``napari-semicl bench ...``: the benchmarks of docs/benchmarks.md.

Each benchmark is one :class:`Bench` in :data:`BENCHES`: its flags (``arguments``) and the
function that runs it (``run(args) -> exit code``). A new benchmark is a new entry there; the
work itself lives in :mod:`napari_semicl.bench`, imported when the benchmark runs. Benchmarks
with ``results=True`` write a results JSON and get ``--seed``, ``--device`` and ``--out``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..data.reveal import PLACEMENTS
from ..engine import pick_device
from ..engine.distributed import env_rank
from ..errors import DataError
from ..io.atomic import write_json
from .common import Command, add_device_option, set_items


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    results: bool = True


# --- shared pieces ------------------------------------------------------------------------------
def _device(args):
    return pick_device(getattr(args, "device", "auto"))


def _methods(args) -> list[str] | None:
    raw = getattr(args, "methods", None)
    return [m.strip() for m in raw.split(",") if m.strip()] if raw else None


def _summary(args, data: dict) -> int:
    """Print each method's row of a results file (rank 0 alone under torchrun)."""
    if env_rank() != 0:
        return 0
    summary = {m: {k: v for k, v in row.items() if k != "per_volume" and k != "step_s_all"}
               for m, row in data["methods"].items()}
    print(json.dumps({"out": args.out, "methods": summary}, indent=2))
    return 0


def _training_flags(q, *, budget_required: bool) -> None:
    """Flags of the label-efficiency benchmarks: methods, budget, network and batch, --set."""
    q.add_argument("--methods", required=True,
                   help="comma-separated: registered methods, rf, full (and within-volume: interp, interp_flow)")
    budget = q.add_mutually_exclusive_group(required=budget_required)
    budget.add_argument("--budget-s", type=float, help="wall-clock training budget per method")
    budget.add_argument("--budget-steps", type=int, help="step budget per method (robust on a busy machine)")
    q.add_argument("--spatial-dims", type=int, choices=(2, 3),
                   help="2: slice network (default), 3: 3D network on volume patches")
    q.add_argument("--patch-size", type=int, help="training crop side (default 128)")
    q.add_argument("--patch-depth", type=int, help="3D: patch depth along the slicing axis (default: --patch-size)")
    q.add_argument("--batch-labelled", type=int, help="labelled crops per step (default 4)")
    q.add_argument("--batch-unlabelled", type=int, help="unlabelled crops per step (default 4)")
    q.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="any setting for every trained method, e.g. --set mean_teacher.ema_alpha=0.99 (repeatable)")


def bench_settings(args) -> dict[str, str]:
    """The settings ``bench within-volume`` and ``bench cohort`` apply to every trained
    method: the network and batch flags, then ``--set KEY=VALUE``."""
    out = {}
    for flag, key in (("spatial_dims", "model.spatial_dims"), ("patch_size", "data.patch_size"),
                      ("patch_depth", "data.patch_depth"), ("batch_labelled", "data.batch_labelled"),
                      ("batch_unlabelled", "data.batch_unlabelled")):
        if getattr(args, flag, None) is not None:
            out[key] = str(getattr(args, flag))
    for key, raw in set_items(args, sections=True):
        out[key] = raw
    return out


# --- within-volume --------------------------------------------------------------------------------
def _within_volume_arguments(w) -> None:
    w.add_argument("--data", required=True, help="folder of NAME.nii.gz + NAME_gt.nii.gz")
    w.add_argument("--k", type=int, required=True)
    w.add_argument("--placement", choices=PLACEMENTS, default="ends",
                   help="the K slices: 'ends' includes the first and last foreground slice (the tips), "
                        "'inside' spaces them strictly inside that range")
    w.add_argument("--limit", type=int, help="only the first N volumes")
    w.add_argument("--offset", type=int, default=0, help="skip the first N volumes (by name)")
    _training_flags(w, budget_required=False)  # the baselines alone need no budget


def _within_volume(args) -> int:
    from ..bench import label_efficiency

    data = label_efficiency.within_volume(args.data, k=args.k, methods=_methods(args), budget_s=args.budget_s,
                                          seed=args.seed, out=args.out, limit=args.limit, device=_device(args),
                                          budget_steps=args.budget_steps, placement=args.placement,
                                          offset=args.offset, settings=bench_settings(args))
    return _summary(args, data)


# --- cohort ---------------------------------------------------------------------------------------
def _cohort_arguments(c) -> None:
    c.add_argument("--train", required=True)
    c.add_argument("--test", required=True)
    c.add_argument("--labelled", type=int, required=True,
                   help="how many training volumes are fully labelled (evenly spaced through the sorted list)")
    c.add_argument("--labelled-names", help="comma-separated names of the labelled volumes (instead of evenly spaced)")
    c.add_argument("--limit-test", type=int, help="only the first N test volumes")
    c.add_argument("--skip-labelled", action="store_true",
                   help="leave the labelled training volumes out of the scores (when --test is the --train folder)")
    c.add_argument("--complete-labels", action="store_true",
                   help="train on every slice of the labelled volumes, slices without foreground as background "
                        "(the papers' setting; by default such slices are unlabelled)")
    _training_flags(c, budget_required=True)


def _cohort(args) -> int:
    from ..bench import label_efficiency

    data = label_efficiency.cohort(args.train, args.test, labelled=args.labelled, methods=_methods(args),
                                   budget_s=args.budget_s, seed=args.seed, out=args.out, device=_device(args),
                                   limit_test=args.limit_test, budget_steps=args.budget_steps,
                                   labelled_names=args.labelled_names.split(",") if args.labelled_names else None,
                                   settings=bench_settings(args), skip_labelled=args.skip_labelled,
                                   complete_labels=args.complete_labels)
    return _summary(args, data)


# --- speed ----------------------------------------------------------------------------------------
def _speed_arguments(s) -> None:
    s.add_argument("--methods", help="comma-separated (default: every registered method)")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--patch-size", type=int, default=128, help="training crop side (default 128)")
    s.add_argument("--batch", type=int, default=4, help="labelled and unlabelled crops per step (default 4 each)")
    s.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2, help="2: slice network, 3: 3D patches")
    s.add_argument("--patch-depth", type=int, default=0, help="3D: patch depth (default: --patch-size)")
    s.add_argument("--compare", action="store_true",
                   help="today's default (fp32, one thread) against the new one (bf16, channels_last, all cores) "
                        "and each factor; --methods names one method or 'recommended' (default)")
    s.add_argument("--rounds", type=int, default=3, help="--compare: rounds of --steps steps per variant")
    s.add_argument("--image", help="a volume to train on and infer (default: the bundled sample)")
    s.add_argument("--reference", help="its labels (three slices are revealed for training)")


def _speed(args) -> int:
    from ..bench.speed import speed

    device = _device(args)
    image = reference = None
    if args.image or args.reference:
        if not (args.image and args.reference):
            raise DataError("bench speed: give both --image and --reference (its labels), or neither")
        from ..io import read_image, read_labels

        image, reference = read_image(args.image).data, read_labels(args.reference).data
        if image.shape != reference.shape:
            raise DataError(f"bench speed: image {image.shape} and reference {reference.shape} differ in shape")
    if args.compare:  # issue 26: today's default against the new one and each factor, one run
        from ..bench.speed import compare_defaults

        data = compare_defaults(image=image, reference=reference, method=(_methods(args) or ["recommended"])[0],
                                rounds=args.rounds, steps=args.steps, device=device)
        write_json(args.out, data)
        print(json.dumps({"out": args.out, "variants": {k: {m: v[m] for m in (
            "steps_per_minute_x", "steps_per_cpu_minute_x", "inference_slices_per_minute_x")}
            for k, v in data["variants"].items()}}, indent=2))
        return 0
    data = speed(methods=_methods(args), steps=args.steps, device=device, threads=args.threads,
                 image=image, reference=reference, patch_size=args.patch_size, batch=args.batch,
                 spatial_dims=args.spatial_dims, patch_depth=args.patch_depth)
    write_json(args.out, data)
    return _summary(args, data)


# --- report ---------------------------------------------------------------------------------------
def _report_arguments(r) -> None:
    r.add_argument("results", nargs="+")
    r.add_argument("--plot", help="PNG path for Dice against K (within-volume files)")


def _report(args) -> int:
    from ..bench.report import dice_vs_k_plot, render

    print(render(args.results))
    if args.plot:
        print(f"plot written to {dice_vs_k_plot(args.results, args.plot)}", file=sys.stderr)
    return 0


# --- ui -------------------------------------------------------------------------------------------
def _ui_arguments(u) -> None:
    u.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    u.add_argument("--method", default="mean_teacher")
    u.add_argument("--refresh-every", type=int, default=20)
    u.add_argument("--review-docks", action="store_true", help="also open the review docks, refreshing")
    u.add_argument("--image", help="an image file instead of the sample")
    u.add_argument("--reference", help="its reference labels (3 slices are revealed)")
    u.add_argument("--trace-stalls", action="store_true",
                   help="record the Qt thread's stack whenever it is blocked (diagnosis)")
    u.add_argument("--out", required=True)


def _ui(args) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "napari_semicl.widgets.ui_probe", "--out", args.out,
           "--seconds", str(args.seconds), "--method", args.method, "--refresh-every", str(args.refresh_every)]
    if args.review_docks:
        cmd.append("--review-docks")
    if args.trace_stalls:
        cmd.append("--trace-stalls")
    for flag, value in (("--image", args.image), ("--reference", args.reference)):
        if value:
            cmd += [flag, value]
    return subprocess.call(cmd)  # a separate process: Qt and napari stay out of the CLI


# --- histology ------------------------------------------------------------------------------------
def _histology_arguments(hs) -> None:
    hs.add_argument("--data", required=True, help="folder of NAME.png + NAME_gt.png tiles")
    hs.add_argument("--labelled", type=int, default=2)
    hs.add_argument("--methods", required=True, help="comma-separated: registered methods and rf")
    budget = hs.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-steps", type=int, help="training steps per method")
    budget.add_argument("--budget-cpu-s", type=float,
                        help="CPU-seconds of training per method (steps calibrated by a short probe run)")
    hs.add_argument("--patch-size", type=int, default=128)
    hs.add_argument("--adapt-batch-norm", choices=("off", "on", "both"), default="off",
                    help="the networks predict with predict.adapt_batch_norm off, on, or both from one training "
                         "(paired; rows '<method> +adabn')")


def _histology(args) -> int:
    from ..bench.histology import monuseg

    data = monuseg(args.data, labelled=args.labelled, methods=_methods(args), budget_steps=args.budget_steps,
                   budget_cpu_s=args.budget_cpu_s, seed=args.seed, out=args.out, device=_device(args),
                   patch_size=args.patch_size, adapt_batch_norm=args.adapt_batch_norm)
    return _summary(args, data)


# --- wsi ------------------------------------------------------------------------------------------
def _wsi_arguments(ws) -> None:
    ws.add_argument("--tiles", required=True, help="folder of NAME.png + NAME_gt.png H&E tiles")
    ws.add_argument("--size", type=int, default=20000, help="slide side in pixels")
    ws.add_argument("--tissue-fraction", type=float, default=0.15)
    ws.add_argument("--level", type=int, default=1, help="pyramid level trained and predicted")
    ws.add_argument("--steps", type=int, default=100)
    ws.add_argument("--method", default="mean_teacher")
    ws.add_argument("--work-dir", help="where the slide and masks are written (default: a temporary folder)")
    ws.add_argument("--reuse", action="store_true", help="keep a slide an earlier run wrote in --work-dir")


def _wsi(args) -> int:
    from ..bench.slides import wsi_benchmark

    result = wsi_benchmark(args.tiles, args.out, size=args.size, tissue_fraction=args.tissue_fraction,
                           level=args.level, steps=args.steps, method=args.method, work_dir=args.work_dir,
                           seed=args.seed, device=_device(args), reuse=args.reuse)
    print(json.dumps({"out": args.out, "times": result["times"], "peak_rss_mb": result["peak_rss_mb"]}, indent=2))
    return 0


# --- session --------------------------------------------------------------------------------------
def _session_arguments(q) -> None:
    from ..bench.session import add_session_arguments

    add_session_arguments(q)


def _session(args) -> int:
    from ..bench.session import run_session_command

    return run_session_command(args)


#: Every benchmark, in the order ``bench --help`` lists them. A new benchmark is a new entry.
BENCHES: tuple[Bench, ...] = (
    Bench("within-volume", "reveal K slices per volume, score the rest", _within_volume_arguments, _within_volume),
    Bench("cohort", "N fully labelled training volumes, the rest unlabelled", _cohort_arguments, _cohort),
    Bench("speed", "step time, FLOP/s, inference throughput and memory", _speed_arguments, _speed),
    Bench("report", "markdown tables from results JSON files (and a Dice-vs-K plot)", _report_arguments, _report,
          results=False),
    Bench("ui", "Qt event-loop latency in a real viewer, idle and training (needs a display)", _ui_arguments, _ui,
          results=False),
    Bench("histology", "H&E tiles (MoNuSeg): N labelled, the rest unlabelled and scored", _histology_arguments,
          _histology),
    Bench("wsi", "a slide built from real tiles: open, train, predict, export; peak memory", _wsi_arguments, _wsi),
    Bench("session", "a simulated annotator paints slices until the Dice target (fill, mci, network)",
          _session_arguments, _session, results=False),  # its own --seed, --device and --out
)


def arguments(b) -> None:
    bsub = b.add_subparsers(dest="bench", required=True)
    for bench in BENCHES:
        q = bsub.add_parser(bench.name, help=bench.help)
        bench.arguments(q)
        if bench.results:
            q.add_argument("--seed", type=int, default=0)
            add_device_option(q)
            q.add_argument("--out", required=True, help="results JSON (written as results arrive)")


def cmd_bench(args) -> int:
    return {bench.name: bench.run for bench in BENCHES}[args.bench](args)


COMMAND = Command("bench", "benchmarks: label efficiency and speed (docs/benchmarks.md)", arguments, cmd_bench)
