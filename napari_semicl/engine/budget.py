"""A run's budget: when it ends, where the learning-rate schedule stands, and the ETA.

Counted from where a call of :meth:`Trainer.run` starts: ``iterations`` more steps
(``budget='iterations'``) or ``minutes`` more of wall-clock time (``'minutes'``). The
loop reads the clock and passes the elapsed seconds; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import Notice


@dataclass(frozen=True)
class Budget:
    start_step: int
    target: int | None       # the step to stop at ('iterations'), else None
    seconds: float | None    # wall-clock seconds ('minutes'), else None

    @classmethod
    def of(cls, config, step: int) -> "Budget":
        """The budget of a run that starts at ``step`` under ``config``."""
        if config.budget == "iterations":
            return cls(step, step + config.iterations, None)  # N more steps, wherever this call starts
        return cls(step, None, config.minutes * 60.0)

    def spent(self, step: int, elapsed: float) -> bool:
        if self.target is not None:
            return step >= self.target
        return elapsed >= self.seconds

    def lr_fraction(self, step: int, elapsed: float) -> float:
        """Where the learning-rate schedule stands: over the whole iteration budget (from
        step 0), or over this run's time."""
        if self.target is not None:
            return step / max(self.target, 1)
        return elapsed / self.seconds

    def progress(self, step: int, elapsed: float) -> tuple[float, float]:
        """(fraction of this run's budget in [0, 1], seconds left) after a step."""
        if self.target is not None:
            done = step - self.start_step
            return done / max(self.target - self.start_step, 1), elapsed / done * (self.target - step)
        return min(elapsed / self.seconds, 1.0), max(self.seconds - elapsed, 0.0)


def warm_up_notice(config, target: int | None) -> Notice | None:
    """A warning when a run ends before the method's warm-up does (its own term, e.g.
    PLGCL's contrastive loss, would never train); None otherwise."""
    section = getattr(config, config.method, None)
    warm = getattr(section, "warmup_steps", None)
    if target is None or not isinstance(warm, int) or target > warm:
        return None
    return Notice(
        "warning",
        f"{config.method}: this run ends at step {target}, within its {warm}-step warm-up, so its "
        f"contrastive term never trains; train more steps or lower the warm-up steps (Advanced)",
    )
