"""``bench report``: markdown tables (and a Dice-vs-K plot) from results JSON files."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def label_efficiency_table(data: dict) -> str:
    """One markdown table of a within-volume or cohort results file."""
    budget = f"{data['budget_steps']} steps" if data.get("budget_steps") else f"{data.get('budget_s')} s"
    head = (f"**{data['protocol']}**, {'K = ' + str(data['k']) if 'k' in data else str(data.get('labelled')) + ' labelled volumes'}, "
            f"budget {budget} per method, seed {data.get('seed')}, {data.get('device')}, "
            f"{data.get('machine', {}).get('date', '')}\n\n")
    rows = ["| method | Dice | HD95 | ASD | train s | steps | volumes |", "|---|---|---|---|---|---|---|"]
    for name, m in data["methods"].items():
        rows.append(f"| {name} | {_fmt(m.get('dice'))} | {_fmt(m.get('hd95'), 1)} | {_fmt(m.get('asd'), 2)} | "
                    f"{_fmt(m.get('train_s'), 0)} | {_fmt(m.get('steps'), 0)} | {len(m.get('per_volume', []))} |")
    return head + "\n".join(rows) + "\n"


def speed_table(data: dict) -> str:
    head = (f"**speed**, patch {data['patch_size']}, batch {data['batch_labelled']}+{data['batch_unlabelled']}, "
            f"{data['threads']} threads, {data['device']}, matmul peak {data['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, "
            f"{data.get('machine', {}).get('date', '')}\n\n")
    rows = ["| method | labelled + unlabelled | step s (median) | x supervised | x supervised, equal batch | GFLOP/step | GFLOP/s | % of matmul peak |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in data["methods"].items():
        n_u = 0 if name.startswith("supervised") else data["batch_unlabelled"]
        rows.append(f"| {name} | {m.get('batch_labelled', data['batch_labelled'])} + {n_u} | {m['step_s_median']:.3f} | "
                    f"{_fmt(m.get('ratio_to_supervised'), 2)} | {_fmt(m.get('ratio_to_supervised_equal_batch'), 2)} | "
                    f"{m['flops_per_step'] / 1e9:.1f} | {m['achieved_flops'] / 1e9:.1f} | "
                    f"{100 * m['fraction_of_matmul_peak']:.0f}% |")
    inf = data["inference"]
    tail = (f"\nWhole-volume inference of a {tuple(data['volume_shape'])} volume: {inf['seconds']:.2f} s "
            f"({inf['slices_per_s']:.1f} slices/s), process peak RSS {inf.get('peak_rss_mb', float('nan')):.0f} MB "
            f"(+{inf['peak_rss_increase_mb']:.0f} MB over the warm process).\n")
    return head + "\n".join(rows) + "\n" + tail


def dice_vs_k_series(files) -> dict[str, dict[int, float]]:
    """``{method: {K: mean Dice}}`` from within-volume files of several K.

    When several files hold the same method at the same K, the later file wins (so a re-run,
    e.g. after a fix, replaces the earlier point instead of adding a second one).
    """
    series: dict[str, dict[int, float]] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        if data.get("protocol") != "within-volume":
            continue
        for name, m in data["methods"].items():
            if m.get("dice") is not None:
                series.setdefault(name, {})[int(data["k"])] = m["dice"]
    return series


def dice_vs_k_table(files) -> str:
    """Markdown: mean Dice of every method (rows) at every K (columns), from
    :func:`dice_vs_k_series`; '–' where a method was not run at that K."""
    series = dice_vs_k_series(files)
    if not series:
        return ""
    ks = sorted({k for by_k in series.values() for k in by_k})
    head = "| method | " + " | ".join(f"K = {k}" for k in ks) + " |\n|---|" + "---|" * len(ks) + "\n"
    rows = [f"| {name} | " + " | ".join(_fmt(by_k.get(k)) if k in by_k else "–" for k in ks) + " |"
            for name, by_k in series.items()]
    return head + "\n".join(rows) + "\n"


def dice_vs_k_plot(files, out_png) -> Path:
    """Plot :func:`dice_vs_k_series` of ``files``: mean Dice against K for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dice_vs_k_series(files)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, by_k in sorted(series.items()):
        pts = sorted(by_k.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("revealed slices K")
    ax.set_ylabel("Dice on the other slices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def render(files) -> str:
    """Markdown for every results file given (type detected from its content)."""
    parts = []
    table = dice_vs_k_table(files)
    if table.count("\n") > 2:
        parts.append("**within-volume**, mean Dice against K (the later file wins)\n\n" + table)
    for f in files:
        data = json.loads(Path(f).read_text())
        if "inference" in data:
            parts.append(speed_table(data))
        elif data.get("protocol") in ("within-volume", "cohort"):
            parts.append(label_efficiency_table(data))
        elif "idle" in data and "training" in data:
            parts.append(
                f"**ui**, {data['method']}, refresh every {data['refresh_every']} steps, "
                f"{data['machine']['date'] if 'machine' in data else ''}\n\n"
                "| phase | p50 ms | p99 ms | max ms | stalls > 100 ms | samples |\n|---|---|---|---|---|---|\n"
                + "\n".join(f"| {ph} | {data[ph]['p50_ms']:.1f} | {data[ph]['p99_ms']:.1f} | {data[ph]['max_ms']:.1f} | "
                            f"{data[ph].get('over_100ms', '–')} | {data[ph]['samples']} |" for ph in ("idle", "training"))
                + "\n")
    return "\n".join(parts)
