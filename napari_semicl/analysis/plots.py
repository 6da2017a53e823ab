"""The review docks' figures as pure functions of a *snapshot*, and the drawing of them
into an RGBA image, without Qt.

A snapshot is a plain picklable object (copies of the data, never live widgets);
``draw(figure, snapshot)`` clears and fills a matplotlib figure and may return information
the widget needs afterwards (a dict, or a callable giving one once the figure is drawn, for
what depends on final axis limits). :func:`render_figure` draws a snapshot at a pixel size
with Agg. :func:`render_in_process` is the same for the render process of
:class:`~napari_semicl.widgets._figure.FigureView` (:mod:`.render_server`): there every view
keeps its own figure, and matplotlib's Python never competes with napari's event loop for the
GIL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Colours by class index (cycled beyond ten classes): t-SNE points and sampled-pixel layers.
CLASS_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
#: Name of the validation Dice series in the training curves.
DICE = "validation Dice"
#: Figures the render process keeps (one per view; the least recently drawn goes first).
MAX_FIGURES = 16

_FIGURES: OrderedDict[str, Figure] = OrderedDict()


def new_figure() -> Figure:
    """A figure with an Agg canvas (no GUI backend involved)."""
    fig = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def render_figure(fig: Figure, draw: Callable[[Figure, Any], Any], snapshot: Any,
                  size: tuple[int, int]) -> tuple[np.ndarray, Any]:
    """Draw ``snapshot`` into ``fig`` at ``size`` = (width, height) pixels.

    Returns the image, (height, width, 4) uint8 RGBA, and ``draw``'s information (called
    after the draw when it is callable). ``snapshot`` None gives an empty figure.
    """
    fig.set_size_inches(size[0] / fig.dpi, size[1] / fig.dpi)
    info = draw(fig, snapshot) if snapshot is not None else None
    if snapshot is None:
        fig.clear()
    fig.canvas.draw()
    if callable(info):  # information that needs the drawn figure (final limits)
        info = info()
    return np.array(fig.canvas.buffer_rgba(), dtype=np.uint8, copy=True), info


def render_in_process(key: str, draw: Callable[[Figure, Any], Any], snapshot: Any,
                      size: tuple[int, int]) -> tuple[np.ndarray, Any]:
    """:func:`render_figure` with the figure of view ``key``, kept between calls (runs in the
    render process; at most :data:`MAX_FIGURES` figures are kept)."""
    fig = _FIGURES.pop(key, None) or new_figure()
    _FIGURES[key] = fig
    while len(_FIGURES) > MAX_FIGURES:
        _FIGURES.popitem(last=False)
    return render_figure(fig, draw, snapshot, size)


def draw_curves(fig: Figure, snap: dict) -> None:
    """Fill ``fig`` with the losses (left axis) and validation Dice (right axis, only when
    ``snap`` has a Dice series) of ``snap``."""
    fig.clear()
    # fixed margins: a layout engine (tight/constrained) re-runs on every draw
    fig.subplots_adjust(left=0.15, right=0.86, bottom=0.15, top=0.97)
    ax = fig.add_subplot(1, 1, 1)
    series = snap["series"]
    for name, (steps, values) in series.items():
        if name != DICE:
            ax.plot(steps, values, label=name, linewidth=1.2 if name == "total" else 0.9)
    if snap["log"] and any((v > 0).all() for n, (_, v) in series.items() if n != DICE):
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    axes = [ax]
    steps, dice = series.get(DICE, ((), ()))
    if len(steps):  # the Dice axis only when there is a validation Dice to show
        ax2 = ax.twinx()
        ax2.plot(steps, dice, "k.-", label=DICE)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("Dice", fontsize=8)
        ax2.yaxis.set_label_position("right")
        ax2.yaxis.tick_right()
        axes.append(ax2)
    handles, labels = [], []
    for a in axes:
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper right", framealpha=0.6)
    for a in axes:
        a.tick_params(labelsize=7)


def draw_embedding(fig: Figure, snap: dict) -> dict:
    """Fill ``fig`` with the t-SNE scatter (and the affinity heat map) of ``snap``; gives the
    points' display coordinates (device pixels, origin bottom left) for clicks once drawn."""
    fig.clear()
    # fixed margins: a layout engine re-runs on every draw
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.92, wspace=0.08)
    affinity = snap["affinity"]
    ax = fig.add_subplot(1, 2, 1) if affinity is not None else fig.add_subplot(1, 1, 1)
    points, classes, labelled, values = snap["points"], snap["classes"], snap["labelled"], snap["values"]
    for k in np.unique(classes):
        colour = CLASS_COLOURS[int(k) % len(CLASS_COLOURS)]
        name = str(values[k]) if values is not None and k < len(values) else str(k)
        for mask, marker, what in ((labelled, "o", "painted"), (~labelled, "x", "pseudo")):
            sel = (classes == k) & mask
            if sel.any():
                ax.scatter(points[sel, 0], points[sel, 1], s=10 if marker == "o" else 14,
                           c=colour, marker=marker, linewidths=0.8, label=f"{name} {what}")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes):
        ax.set_title(f"t-SNE of {len(classes)} pixel embeddings", fontsize=9)
        ax.legend(fontsize=7, markerscale=1.5, loc="best", framealpha=0.6)
    if affinity is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.imshow(affinity, cmap="viridis", interpolation="nearest")
        ax2.set_title(f"affinity ({affinity.shape[0]} x {affinity.shape[1]})", fontsize=9)
        ax2.set_xticks([])
        ax2.set_yticks([])

    def after_draw() -> dict:  # the axis limits are final once the figure is drawn
        xy = ax.transData.transform(points.astype(np.float64)) if len(points) else np.zeros((0, 2))
        return {"display_xy": xy}

    return after_draw
