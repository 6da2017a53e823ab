"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, arXiv:1703.01780), METHODS.md §0.

Student on the strong view, EMA teacher on the weak view of the same unlabelled crop:
``L = L_sup + w(t) * consistency(p_s(strong), p_t(weak))`` with the sigmoid ramp
``w(t) = w_max exp(-5 (1 - t/T_r)^2)``; after each step
``theta_t <- a theta_t + (1 - a) theta_s``, ``a = min(1 - 1/(step + 1), alpha)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_positive
from .base import Method, strong_augment, weak_augment
from .losses import consistency_loss, sigmoid_rampup, supervised_loss


@dataclass
class MeanTeacherConfig:
    """Mean Teacher settings, shared by every teacher-based method.

    ema_alpha : EMA decay cap alpha. consistency : w_max. rampup_steps : T_r.
    consistency_type : {'mse', 'kl'}.
    """

    ema_alpha: float = 0.99
    consistency: float = 0.1
    rampup_steps: int = 200
    consistency_type: str = "mse"

    def validate(self, path: str = "mean_teacher") -> None:
        if not 0 < self.ema_alpha < 1:
            raise ConfigError(f"{path}.ema_alpha must be in (0, 1), got {self.ema_alpha}")
        check_positive(f"{path}.consistency", self.consistency, allow_zero=True)
        check_positive(f"{path}.rampup_steps", self.rampup_steps, allow_zero=True)
        check_choice(f"{path}.consistency_type", self.consistency_type, ("mse", "kl"))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, alpha: float) -> float:
    """theta_t <- a theta_t + (1 - a) theta_s with a = min(1 - 1/(step + 1), alpha).

    Buffers (batch-norm statistics) are averaged the same way. Returns ``a``.
    """
    a = min(1.0 - 1.0 / (step + 1), alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1 - a)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(a).add_(s.detach(), alpha=1 - a)
        else:
            t.copy_(s)
    return a


class MeanTeacher(Method):
    """Supervised loss plus a ramped consistency to an EMA teacher on unlabelled crops."""

    name = "mean_teacher"
    config_class = MeanTeacherConfig
    uses_teacher = True
    uses_unlabelled = True

    @property
    def mt(self) -> MeanTeacherConfig:
        return self.config.mean_teacher

    def consistency_weight(self, step: int) -> float:
        return self.mt.consistency * sigmoid_rampup(step, self.mt.rampup_steps)

    def student_views(self, batch, generator: torch.Generator):
        """Weak labelled view + targets, weak and strong unlabelled views (aligned)."""
        x, y = self.labelled_view(batch, generator)
        if batch.x_u is None:
            return x, y, None, None
        u_weak, _ = weak_augment(batch.x_u, generator=generator)
        return x, y, u_weak, strong_augment(u_weak, generator=generator)

    def student_forward(self, x: torch.Tensor, u_strong: torch.Tensor, *, return_features: bool = False):
        """Student outputs for the labelled and the strong unlabelled crops, in two passes.

        Two passes, not one over the concatenated batch: with one pass the batch-norm
        statistics mix clean labelled crops with strongly perturbed ones, and on a left-atrium
        volume (K = 5, 400 steps) Mean Teacher then scored Dice 0.39 (0.33 with the
        consistency weight at 0) against supervised's 0.61. Returns ``(labelled, unlabelled)``
        logits, or ``((logits, features), (logits, features))`` with ``return_features``.
        """
        return (self.student(x, return_features=return_features),
                self.student(u_strong, return_features=return_features))

    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y, u_weak, u_strong = self.student_views(batch, generator)
        if u_weak is None:
            return supervised_loss(self.student(x), y)
        l_logits, s_logits = self.student_forward(x, u_strong)
        losses = supervised_loss(l_logits, y)
        with torch.no_grad():
            t_logits = self.teacher(u_weak)
        w = self.consistency_weight(step)
        losses["consistency"] = w * consistency_loss(s_logits, t_logits, self.mt.consistency_type)
        return losses

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, step, self.mt.ema_alpha)
