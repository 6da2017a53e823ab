"""Draw functions for FigureView's render-process tests: module level (so they can be pickled
by reference) in a module that imports nothing heavy (the render process imports it)."""

from __future__ import annotations

import os

from napari_semicl.analysis.render_server import CHILD_ENV


def draw_line(fig, snap):
    """A red line from (0, 0) to (1, slope); info: slope, the data origin in pixels, the pid
    and how many times this figure was drawn."""
    fig.clear()
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    ax.plot([0, 1], [0, snap["slope"]], "r-")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.draws = getattr(fig, "draws", 0) + 1
    draws = fig.draws
    if snap.get("fail"):
        raise KeyError("fail")
    die = snap.get("die_once")  # a file: the first process to see it missing dies
    in_child = os.environ.get(CHILD_ENV) == "1"
    if die is not None and in_child and not os.path.exists(die):
        open(die, "w").close()
        os._exit(3)
    if snap.get("die_always") and in_child:
        os._exit(3)
    return lambda: {"slope": snap["slope"], "origin": ax.transData.transform((0.0, 0.0)),
                    "pid": os.getpid(), "draws": draws,
                    "nice": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None}
