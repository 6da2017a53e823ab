"""Loss and metric history for the training-curves dock (bounded, no Qt)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


class TrainingHistory:
    """Values by name against the step, each series bounded by decimation.

    When a series exceeds ``max_points``, every second point is dropped (the first and
    the newest kept), so a long run keeps its whole shape in bounded memory.

    Parameters
    ----------
    max_points : int, optional
        Bound per series (>= 4).
    """

    def __init__(self, max_points: int = 4000) -> None:
        if max_points < 4:
            raise ValueError(f"max_points must be >= 4, got {max_points}")
        self.max_points = max_points
        self._steps: dict[str, list[int]] = defaultdict(list)
        self._values: dict[str, list[float]] = defaultdict(list)

    def add(self, step: int, values: dict) -> None:
        """Record ``values`` (name -> number) at ``step``; non-finite and non-numbers skipped."""
        for name, value in values.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            steps, vals = self._steps[name], self._values[name]
            if steps and step < steps[-1]:  # a new run restarted the steps: start afresh
                steps.clear()
                vals.clear()
            steps.append(int(step))
            vals.append(v)
            if len(steps) > self.max_points:
                keep = list(range(0, len(steps) - 1, 2)) + [len(steps) - 1]
                self._steps[name] = [steps[i] for i in keep]
                self._values[name] = [vals[i] for i in keep]

    def names(self) -> list[str]:
        return [n for n in self._steps if self._steps[n]]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one series (empty arrays when unknown)."""
        return (np.asarray(self._steps.get(name, []), dtype=np.int64),
                np.asarray(self._values.get(name, []), dtype=np.float64))

    def clear(self) -> None:
        self._steps.clear()
        self._values.clear()
