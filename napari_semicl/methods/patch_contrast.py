"""The patch-contrast mean teacher that PLGCL and Semi-AGCL share (METHODS.md §1, §3).

Both methods are the same mean teacher with the same extras; each adds only its own loss on
the patches this module selects:

* ``L_sup``: CE (+ Dice, ``supervised_dice``) of the student on the weak view of the
  labelled crops, unpainted pixels ignored (PLGCL Eq. 7).
* ``L_reg``: :func:`regularisation_loss`, CE of the student (strong view) against the
  teacher's arg-max (weak view) on the unlabelled crops, weight ``beta`` (PLGCL Eq. 6).
* The teacher-side patch selection (:meth:`PatchContrastMethod.teacher_patches`): the entropy
  sampler of :mod:`~napari_semicl.methods.patch_sampling` (PLGCL Eq. 2-3, AGCL Eq. 1) on
  all B_L + B_U crops, ground truth where painted and the teacher's belief elsewhere.
* A projection head (``modules['projection']``) and its EMA copy on the teacher side
  (``modules['teacher_projection']``, not optimised), updated after each step with the
  teacher (PLGCL Eq. 9-10).
* A per-class memory bank of teacher embeddings (:class:`~.memory_bank.ClassMemoryBank`,
  (K, queue_size, embed_dim)), checkpointed.
* The start of :meth:`~.base.Method.review_slice`: the sampler on one whole slice.

A subclass sets ``name``, ``section`` (its config section), ``contrast_losses`` (the names
of the losses it adds) and implements :meth:`PatchContrastMethod.contrastive_losses`.
Its config section has at least ``beta``, ``patch_size``, ``n_positives``, ``eps``,
``queue_size``, ``embed_dim``, ``warmup_steps`` and ``supervised_dice``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.heads import ProjectionHead
from ..models.ops import argmax_classes, pad_to_multiple
from .base import review_arrays, strong_augment, weak_augment
from .losses import masked_cross_entropy, supervised_loss
from .mean_teacher import MeanTeacher, ema_update
from .memory_bank import ClassMemoryBank
from .patch_sampling import (
    IGNORE_INDEX,
    PatchSelection,
    flatten_patch_grid,
    one_hot_confidence,
    pool_patches,
    select_patches,
)

log = logging.getLogger(__name__)


def regularisation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """PLGCL Eq. 6: CE of the student (strong view) against the teacher's argmax (weak view).

    Both (B, K, H, W), pixel-aligned; the teacher side carries no gradient.
    """
    return F.cross_entropy(student_logits, argmax_classes(teacher_logits.detach()))


@dataclass
class UnlabelledViews:
    """The unlabelled crops of a step: weak and strong views (B_U, C, H, W), the teacher's
    logits (B_U, K, H, W) and features on the weak view, the student's features on the
    strong view (B_U, C_f, H, W)."""

    weak: torch.Tensor
    strong: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_features: torch.Tensor
    student_features: torch.Tensor


@dataclass
class PatchBatch:
    """The patches of one step, labelled crops first.

    selection : the sampler's output over all B = B_L + B_U crops (at least 2 valid patches).
    teacher_view : (B, C, H, W) what the teacher saw (weak views).
    student_views : the student's views (labelled weak, unlabelled strong), not concatenated.
    teacher_features : (B, C_f, H, W), no gradient. student_features : (B, C_f, H, W), with
    the student's gradient. n_labelled : B_L.
    """

    selection: PatchSelection
    teacher_view: torch.Tensor
    student_views: tuple[torch.Tensor, ...]
    teacher_features: torch.Tensor
    student_features: torch.Tensor
    n_labelled: int


@dataclass
class SlicePatches:
    """The sampler on one whole slice (:meth:`PatchContrastMethod.slice_patches`).

    x : (1, C, H', W') the slice padded to the lcm of P and the network's multiple.
    features : (1, C_f, H', W') the teacher's decoder features. selection : the sampler's
    output (padding never gives a patch its class). valid_shape : (h, w) of the slice.
    """

    x: torch.Tensor
    features: torch.Tensor
    selection: PatchSelection
    valid_shape: tuple[int, int]

    def entropy_map(self, patch_size: int) -> torch.Tensor:
        """(K, h, w) ``Ent^k`` of each class, each patch's value repeated over its pixels."""
        h, w = self.valid_shape
        ent = self.selection.entropy[0]
        return ent.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)[:, :h, :w]


class PatchContrastMethod(MeanTeacher):
    """Mean teacher + CE regularisation + a contrastive loss on entropy-sampled patches.

    The shared part of PLGCL and Semi-AGCL (module docstring); subclasses add their loss in
    :meth:`contrastive_losses`.
    """

    #: the config section of the method (``config.<section>``)
    section: ClassVar[str] = ""
    #: the names of the losses :meth:`contrastive_losses` returns (zero while nothing can
    #: be contrasted)
    contrast_losses: ClassVar[tuple[str, ...]] = ()
    #: what the memory bank is called in messages
    bank_name: ClassVar[str] = "patch memory bank"
    review_layers = ("patch_entropy",)

    def __init__(self, config, student: nn.Module) -> None:
        super().__init__(config, student)
        cfg = self.cfg
        self.n_classes = int(config.model.n_classes)
        if config.data.patch_size < cfg.patch_size:
            raise ConfigError(
                f"{self.section}.patch_size ({cfg.patch_size}) must not exceed data.patch_size ({config.data.patch_size})"
            )
        in_channels = self.projection_in_channels(config, student)
        head = self.add_module("projection", ProjectionHead(in_channels, cfg.embed_dim))
        self.add_module("teacher_projection", self.make_ema_copy(head))
        self.bank = ClassMemoryBank(self.n_classes, cfg.queue_size, cfg.embed_dim, self.device, name=self.bank_name)
        self._last: dict[str, torch.Tensor] = {}

    @property
    def cfg(self):
        return getattr(self.config, self.section)

    def projection_in_channels(self, config, student: nn.Module) -> int:
        """Channels of the vectors the projection head gets (the decoder features')."""
        return getattr(student, "feature_channels", config.model.base_channels)

    def contrast_active(self, step: int) -> bool:
        """Whether the contrastive losses are computed at ``step`` (after the warm-up)."""
        return step >= self.cfg.warmup_steps

    # --- the step -------------------------------------------------------------------------
    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x, y = self.labelled_view(batch, generator)
        s_logits_l, s_feat_l = self.student(x, return_features=True)
        losses = supervised_loss(s_logits_l, y) if cfg.supervised_dice else {"ce": masked_cross_entropy(s_logits_l, y)}
        unl = None
        if batch.x_u is not None:
            u_weak, _ = weak_augment(batch.x_u, generator=generator)
            u_strong = strong_augment(u_weak, generator=generator)
            with torch.no_grad():
                t_logits_u, t_feat_u = self.teacher(u_weak, return_features=True)
            s_logits_u, s_feat_u = self.student(u_strong, return_features=True)
            losses["consistency"] = cfg.beta * regularisation_loss(s_logits_u, t_logits_u)
            unl = UnlabelledViews(u_weak, u_strong, t_logits_u, t_feat_u, s_feat_u)
        if self.contrast_active(step):
            patches = self.teacher_patches(x, y, s_feat_l, unl)
            if patches is None:  # nothing to contrast (and BatchNorm in the head needs 2 rows)
                log.debug("step %d: fewer than 2 labelled patches, no %s terms", step, self.name)
                self._last = {}
                zero = s_feat_l.sum() * 0.0
                losses.update({key: zero for key in self.contrast_losses})
            else:
                losses.update(self.contrastive_losses(patches, step, generator))
        return losses

    def teacher_patches(self, x, y, s_feat_l, unl: UnlabelledViews | None) -> PatchBatch | None:
        """The teacher-side patch selection of a step; None when fewer than 2 patches have
        a class.

        The teacher (no gradient) sees the weak views; the class confidence is the ground
        truth where painted and the teacher's softmax elsewhere (unpainted or padded pixels,
        unlabelled crops), the patch classes the painted labels resp. the teacher's arg-max.
        """
        cfg = self.cfg
        with torch.no_grad():
            t_logits_l, t_feat_l = self.teacher(x, return_features=True)
            conf = [one_hot_confidence(y, self.n_classes, fallback=t_logits_l.softmax(dim=1))]
            labels, t_views, s_views, t_feats, s_feats = [y], [x], [x], [t_feat_l], [s_feat_l]
            if unl is not None:
                conf.append(unl.teacher_logits.softmax(dim=1))
                labels.append(argmax_classes(unl.teacher_logits))
                t_views.append(unl.weak)
                s_views.append(unl.strong)
                t_feats.append(unl.teacher_features)
                s_feats.append(unl.student_features)
            t_view = torch.cat(t_views)
            sel = select_patches(
                t_view, torch.cat(conf), torch.cat(labels),
                patch_size=cfg.patch_size, n_positives=cfg.n_positives, eps=cfg.eps,
            )
            if sel.classes.numel() < 2:
                return None
            t_feat = torch.cat(t_feats)
        return PatchBatch(sel, t_view, tuple(s_views), t_feat, torch.cat(s_feats), x.shape[0])

    def project(self, side: str, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(N, D) unit embeddings of the valid patches: decoder features (B, C_f, H, W)
        averaged in each patch (:func:`~.patch_sampling.pool_patches`), then the student's
        (``side='student'``) or the teacher's projection head."""
        head = self.modules["projection" if side == "student" else "teacher_projection"]
        return head.project_vectors(flatten_patch_grid(pool_patches(features, self.cfg.patch_size), channels=True)[valid])

    def contrastive_losses(self, patches: PatchBatch, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The method's weighted losses on the step's patches, by name (``contrast_losses``);
        fills the memory bank and the review arrays."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        super().after_step(step)  # teacher network (PLGCL Eq. 9-10)
        ema_update(self.modules["teacher_projection"], self.modules["projection"], step, self.mt.ema_alpha)

    # --- the memory bank -------------------------------------------------------------------
    def buffers_state(self) -> dict:
        return self.bank.state_dict()

    def load_buffers_state(self, state: dict) -> None:
        s = self.section
        self.bank.load_state_dict(state, hint=f"classes, {s}.queue_size, {s}.embed_dim")

    # --- review ----------------------------------------------------------------------------
    def review(self):
        """Arrays of the last contrastive step (empty during the warm-up)."""
        return review_arrays(self._last)

    def slice_patches(self, x: torch.Tensor, valid_shape: tuple[int, int] | None = None) -> SlicePatches:
        """The sampler on one whole slice, as on an unlabelled crop (the start of
        ``review_slice``; the caller holds :func:`~.base.eval_mode` and ``no_grad``).

        The slice is padded further with zeros (bottom and right) to the lcm of P and the
        network's multiple, so that every pixel lies in a patch; the teacher's softmax is
        the class confidence and its arg-max the patch classes, padding excluded.
        """
        cfg = self.cfg
        h, w = valid_shape if valid_shape is not None else tuple(x.shape[-2:])
        x = pad_to_multiple(x, math.lcm(cfg.patch_size, int(getattr(self.teacher, "multiple", 1))))
        logits, feat = self.teacher(x, return_features=True)
        conf = logits.float().softmax(dim=1)
        labels = argmax_classes(conf)
        labels[:, h:, :] = IGNORE_INDEX  # padding never gives a patch its class
        labels[:, :, w:] = IGNORE_INDEX
        sel = select_patches(x, conf, labels, patch_size=cfg.patch_size, n_positives=cfg.n_positives, eps=cfg.eps)
        return SlicePatches(x, feat, sel, (h, w))
