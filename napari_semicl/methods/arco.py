"""ARCO: stratified group pixel contrast on the mean-teacher pipeline (METHODS.md §4).

You et al., "Rethinking Semi-Supervised Medical Image Segmentation: A Variance-Reduction
Perspective", NeurIPS 2023 (arXiv:2302.01735).

Per step, on top of Mean Teacher (supervised CE + Dice, ramped consistency):

1. a class map of the batch ``[labelled; unlabelled]``: ground truth on labelled crops,
   the teacher's arg-max on unlabelled ones where its softmax reaches ``confidence``;
2. per class, ``anchors_per_class`` pixels drawn by the configured sampler (NS, SG, SAG or
   index strata, :mod:`~napari_semicl.methods.stratified_sampling`);
3. anchors: student embeddings of those pixels (projection head on the student's decoder
   features; strong view for unlabelled crops); positive key: the class mean of the
   teacher embeddings over all candidate pixels of the class (EMA head on the teacher's
   weak-view features); negatives: teacher embeddings of the other classes from per-class
   queues (filled with the teacher embeddings of each step's sampled pixels);
4. :func:`pixel_contrastive_loss`, InfoNCE on cosine similarity / ``temperature`` (0.5),
   weighted by the sampler's unbiased-estimator weights, ramped in after ``warmup_steps``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, check_choice, check_positive
from ..models.heads import ProjectionHead
from ..models.ops import channels_last, in_float32
from .base import eval_mode
from .losses import consistency_loss, sigmoid_rampup, supervised_loss
from .mean_teacher import MeanTeacher, ema_update
from .stratified_sampling import SAMPLERS, sample_class_pixels

log = logging.getLogger(__name__)


@dataclass
class ARCOConfig:
    """ARCO settings (the ``arco`` section of the TrainConfig).

    sampler : {'ns', 'sg', 'sag', 'index'}
        Pixel sampler for the anchors (and the queued negatives).
    grid : int
        ``G``: SG/SAG groups are the cells of a ``G x G`` grid over each crop.
    strata : int
        'index' sampler: strata over the flattened candidate list (0 = one per anchor).
    anchors_per_class : int
        Anchors drawn per class present in the batch.
    negatives_per_class : int
        Negatives drawn from each other class's queue per step.
    queue_size : int
        Teacher embeddings kept per class (ring buffer, checkpointed).
    temperature : float
        InfoNCE temperature on cosine similarity.
    confidence : float
        Teacher softmax needed for an unlabelled pixel to be a candidate.
    embedding_dim : int
        Projection head output size ``D``.
    contrast_weight : float
        Maximum weight of the contrastive loss.
    rampup_steps : int
        Sigmoid ramp of that weight, counted from the end of the warm-up.
    warmup_steps : int
        Steps of plain Mean Teacher before the contrastive loss starts.
    """

    sampler: str = field(default="sag", metadata={"choices": SAMPLERS})
    grid: int = 4
    strata: int = 0
    anchors_per_class: int = 64
    negatives_per_class: int = 128
    queue_size: int = 512
    temperature: float = 0.5
    confidence: float = 0.95
    embedding_dim: int = 64
    contrast_weight: float = 0.1
    rampup_steps: int = 100
    warmup_steps: int = 50

    def validate(self, path: str = "arco") -> None:
        check_choice(f"{path}.sampler", self.sampler, SAMPLERS)
        for key in ("grid", "negatives_per_class", "queue_size", "embedding_dim"):
            check_positive(f"{path}.{key}", getattr(self, key))
        if self.anchors_per_class < 2:
            raise ConfigError(f"{path}.anchors_per_class must be >= 2, got {self.anchors_per_class}")
        for key in ("strata", "rampup_steps", "warmup_steps", "contrast_weight"):
            check_positive(f"{path}.{key}", getattr(self, key), allow_zero=True)
        check_positive(f"{path}.temperature", self.temperature)
        if not 0 <= self.confidence <= 1:
            raise ConfigError(f"{path}.confidence must be in [0, 1], got {self.confidence}")


@in_float32  # bf16/fp16 autocast: float32 here (engine.precision)
def pixel_contrastive_loss(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    prototypes: torch.Tensor,
    negatives: torch.Tensor,
    negative_classes: torch.Tensor,
    *,
    temperature: float = 0.5,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel InfoNCE against class prototypes and other-class negatives (ARCO Eq. E.2).

    For anchor ``a_i`` of class ``c`` with positive key ``k_c`` (the class prototype) and
    negatives ``{k_j : class(k_j) != c}``, with ``s(u, v) = cos(u, v) / tau``,

        l_i = -log( exp(s(a_i, k_c)) / (exp(s(a_i, k_c)) + sum_j exp(s(a_i, k_j))) )

    and ``L = (1/|C|) sum_c sum_{i in A_c} w_i l_i`` over the classes ``C`` with anchors;
    the weights default to ``1 / |A_c|`` (a plain class mean). With sampler weights,
    ``sum_{i in A_c} w_i l_i`` is the unbiased estimate of the class's mean loss over all its
    candidate pixels (the aggregation ``H`` of ARCO Eq. 3.1). Negatives of the anchor's
    own class are masked out; an anchor with no negative contributes 0.

    Parameters
    ----------
    anchors : Tensor, shape (N, D)
        Student embeddings (normalised here).
    anchor_classes : Tensor of int64, shape (N,)
    prototypes : Tensor, shape (K, D)
        Positive key per class (normalised here); rows of absent classes are unused.
    negatives : Tensor, shape (Q, D)
        Teacher embeddings (normalised here); Q may be 0.
    negative_classes : Tensor of int64, shape (Q,)
    temperature : float
        ``tau`` > 0.
    weights : Tensor, shape (N,), optional
        Per-anchor weights summing to about 1 within each class.

    Returns
    -------
    Tensor
        Scalar loss (0 with a gradient path when there is no anchor).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if anchors.ndim != 2 or prototypes.ndim != 2 or negatives.ndim != 2:
        raise ValueError("anchors, prototypes and negatives must be 2D (N, D), (K, D), (Q, D)")
    if anchors.shape[0] == 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors, dim=1)
    pos = (a * F.normalize(prototypes, dim=1)[anchor_classes]).sum(1, keepdim=True) / temperature  # (N, 1)
    neg = a @ F.normalize(negatives, dim=1).T / temperature  # (N, Q)
    neg = neg.masked_fill(negative_classes[None, :] == anchor_classes[:, None], float("-inf"))
    per_anchor = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos[:, 0]  # (N,)
    classes, inverse, counts = torch.unique(anchor_classes, return_inverse=True, return_counts=True)
    if weights is None:
        weights = 1.0 / counts[inverse].to(per_anchor.dtype)
    per_class = torch.zeros(len(classes), dtype=per_anchor.dtype, device=per_anchor.device)
    per_class = per_class.index_add(0, inverse, weights.to(per_anchor.dtype) * per_anchor)
    return per_class.mean()


class PixelContrastiveLoss(nn.Module):
    """Module form of :func:`pixel_contrastive_loss` (temperature checked here)."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, anchors, anchor_classes, prototypes, negatives, negative_classes, weights=None):
        return pixel_contrastive_loss(
            anchors, anchor_classes, prototypes, negatives, negative_classes,
            temperature=self.temperature, weights=weights,
        )


def class_prototypes(embeddings: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class mean of (N, D) embeddings, L2-normalised; (K, D), zero rows for absent classes."""
    sums = torch.zeros(n_classes, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums = sums.index_add(0, classes, embeddings)
    return F.normalize(sums, dim=1)


class ARCO(MeanTeacher):
    """Mean Teacher plus the stratified-group pixel contrastive loss.

    Losses by name: 'ce', 'dice', 'consistency', and 'contrast' (from step
    ``warmup_steps`` on). Trainable extras: the student projection head ('projection'); its
    EMA copy ('teacher_projection', frozen) follows the teacher. Queues of teacher
    embeddings per class are checkpointed through :meth:`buffers_state`.
    """

    name = "arco"
    config_class = ARCOConfig
    cli_settings = ('sampler',)
    review_layers = ("sampled_pixels",)
    uses_teacher = True
    uses_unlabelled = True

    def __init__(self, config, student: nn.Module) -> None:
        super().__init__(config, student)
        cfg = self.arco
        channels = getattr(student, "feature_channels", None) or config.model.base_channels
        head = self.add_module("projection", ProjectionHead(channels, cfg.embedding_dim))
        self.add_module("teacher_projection", self.make_ema_copy(head))
        self.n_classes = int(config.model.n_classes)
        k, q, d = self.n_classes, cfg.queue_size, cfg.embedding_dim
        self.queue = torch.zeros(k, q, d, device=self.device)
        self.queue_len = torch.zeros(k, dtype=torch.long)
        self.queue_ptr = torch.zeros(k, dtype=torch.long)
        self._review: dict[str, np.ndarray] = {}
        #: the review sampler's own stream, so that reviewing never shifts training's
        self._review_rng = np.random.default_rng(int(getattr(config, "seed", 0)))

    @property
    def arco(self) -> ARCOConfig:
        return self.config.arco

    def contrast_weight(self, step: int) -> float:
        """``w_c * ramp(step - warmup)``; 0 during the warm-up."""
        cfg = self.arco
        if step < cfg.warmup_steps:
            return 0.0
        return cfg.contrast_weight * sigmoid_rampup(step - cfg.warmup_steps, cfg.rampup_steps)

    # --- the step ---------------------------------------------------------------------------
    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y, u_weak, u_strong = self.student_views(batch, generator)
        n_l = x.shape[0]
        contrast = step >= self.arco.warmup_steps
        if u_strong is None:
            s_logits, s_feat = self.student(x, return_features=True)
        else:  # two passes: see MeanTeacher.student_forward
            (l_logits, l_feat), (u_logits, u_feat) = self.student_forward(x, u_strong, return_features=True)
            s_logits, s_feat = torch.cat([l_logits, u_logits]), torch.cat([l_feat, u_feat])
        losses = supervised_loss(s_logits[:n_l], y)
        # one teacher pass: weak unlabelled crops, plus the labelled ones once contrasting
        t_parts = ([x] if contrast else []) + ([] if u_weak is None else [u_weak])
        t_logits = t_feat = None
        if t_parts:
            with torch.no_grad():
                t_logits, t_feat = self.teacher(torch.cat(t_parts), return_features=True)
        if u_weak is not None:
            t_logits_u = t_logits[-u_weak.shape[0]:]
            losses["consistency"] = self.consistency_weight(step) * consistency_loss(
                s_logits[n_l:], t_logits_u, self.mt.consistency_type
            )
        if not contrast:
            return losses
        # the class map of [labelled; unlabelled]: ground truth, then confident pseudo-labels
        class_maps = [y]
        if u_weak is not None:
            conf, pseudo = t_logits_u.softmax(dim=1).max(dim=1)
            class_maps.append(torch.where(conf >= self.arco.confidence, pseudo, torch.full_like(pseudo, -1)))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        loss = self.contrastive_term(
            s_feat, t_feat, torch.cat(class_maps),
            rng=np.random.default_rng(seed), n_labelled=n_l, generator=generator,
        )
        losses["contrast"] = self.contrast_weight(step) * loss
        return losses

    def contrastive_term(
        self, s_feat: torch.Tensor, t_feat: torch.Tensor, class_map: torch.Tensor, *,
        rng: np.random.Generator, n_labelled: int, generator: torch.Generator,
    ) -> torch.Tensor:
        """The unweighted contrastive loss of one batch (and the queue/review updates).

        Parameters
        ----------
        s_feat, t_feat : Tensor, shape (B, C, H, W) or (B, C, D, H, W)
            Student and teacher decoder features, pixel-aligned.
        class_map : Tensor of int64, shape (B, H, W) or (B, D, H, W)
            Candidate class per pixel, negative where not a candidate.
        rng : numpy.random.Generator
            For the pixel sampler.
        n_labelled : int
            The first ``n_labelled`` images are labelled (for review).
        generator : torch.Generator
            For drawing negatives from the queues.
        """
        cfg = self.arco
        head = self.modules["projection"]
        t_head = self.modules["teacher_projection"]
        coords, classes, weights = sample_class_pixels(
            class_map, cfg.anchors_per_class, rng, sampler=cfg.sampler, grid=cfg.grid,
            strata=cfg.strata or None, n_classes=self.n_classes,
        )
        if coords.shape[0] < 2 or int((class_map >= 0).sum()) < 2:  # batch norm needs 2 vectors
            self._review = {}
            return s_feat.sum() * 0.0
        at = tuple(coords.unbind(1))  # (b, y, x), or (b, z, y, x) for volume patches
        b = at[0]
        anchors = head.project_vectors(channels_last(s_feat)[at])  # (N, D)
        with torch.no_grad():
            valid = class_map >= 0
            t_emb = t_head.project_vectors(channels_last(t_feat)[valid])  # (N_c, D)
            prototypes = class_prototypes(t_emb, class_map[valid], self.n_classes)
            position = torch.cumsum(valid.reshape(-1).long(), 0).reshape(valid.shape) - 1
            sampled_t = t_emb[position[at]]
            self._enqueue(sampled_t, classes)
            negatives, negative_classes = self._draw_negatives(generator)
        loss = pixel_contrastive_loss(
            anchors, classes, prototypes, negatives, negative_classes,
            temperature=cfg.temperature, weights=weights,
        )
        self._review = {
            "sampled_pixels": coords.cpu().numpy().astype(np.int64),
            "sampled_classes": classes.cpu().numpy().astype(np.int64),
            "embeddings": anchors.detach().float().cpu().numpy(),
            "embedding_labels": classes.cpu().numpy().astype(np.int64),
            "embedding_is_labelled": (b < n_labelled).cpu().numpy(),
        }
        return loss

    # --- queues -------------------------------------------------------------------------------
    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, classes: torch.Tensor) -> None:
        """Ring-buffer insert of teacher embeddings into their class queues."""
        q = self.queue.shape[1]
        for c in torch.unique(classes).tolist():
            e = embeddings[classes == c][-q:]
            n = e.shape[0]
            idx = (int(self.queue_ptr[c]) + torch.arange(n)) % q
            self.queue[c, idx.to(self.queue.device)] = e.to(self.queue.dtype)
            self.queue_ptr[c] = (int(self.queue_ptr[c]) + n) % q
            self.queue_len[c] = min(int(self.queue_len[c]) + n, q)

    @torch.no_grad()
    def _draw_negatives(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``negatives_per_class`` queued embeddings of every class, without replacement."""
        vecs, labels = [], []
        for c in range(self.n_classes):
            n = int(self.queue_len[c])
            if n == 0:
                continue
            pick = torch.randperm(n, generator=generator)[: self.arco.negatives_per_class]
            vecs.append(self.queue[c, pick.to(self.queue.device)])
            labels.append(torch.full((len(pick),), c, dtype=torch.long, device=self.queue.device))
        if not vecs:
            d = self.queue.shape[2]
            return self.queue.new_zeros((0, d)), torch.zeros(0, dtype=torch.long, device=self.queue.device)
        return torch.cat(vecs), torch.cat(labels)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        ema_update(self.modules["teacher_projection"], self.modules["projection"], step, self.mt.ema_alpha)

    # --- review and state -----------------------------------------------------------------------
    def review(self) -> dict[str, np.ndarray]:
        """The last contrastive step's samples and anchor embeddings.

        'sampled_pixels' (N, 3) int64 (batch index, y, x) in the step's batch
        ``[labelled; unlabelled]`` crops; 'sampled_classes' (N,); 'embeddings' (N, D) float32
        student anchor embeddings; 'embedding_labels' (N,); 'embedding_is_labelled' (N,) bool.
        Empty before the warm-up ends.
        """
        return dict(self._review)

    @torch.no_grad()
    def review_slice(self, x: torch.Tensor, *, valid_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The configured pixel sampler on one whole slice, as on an unlabelled crop.

        The teacher (eval mode) predicts the slice; the candidates of class c are the
        pixels whose teacher arg-max is c with a softmax of at least ``arco.confidence``
        (inside ``valid_shape``); :func:`~.stratified_sampling.sample_class_pixels` draws
        ``anchors_per_class`` of them per class with ``arco.sampler``, ``grid`` and
        ``strata``, from a generator of its own (training's streams are untouched).

        Returns
        -------
        dict
            'sampled_pixels' (N, 2) int64 (y, x) in slice pixels; 'sampled_classes' (N,)
            int64 class indices; 'sampled_weights' (N,) float32 the sampler's estimator
            weights. N is 0 (the arrays empty) when the teacher is confident nowhere.
        """
        cfg = self.arco
        h, w = valid_shape if valid_shape is not None else tuple(x.shape[-2:])
        with eval_mode(self.teacher):
            probs = self.teacher(x).float().softmax(dim=1)[:, :, :h, :w]
        conf, pseudo = probs.max(dim=1)
        coords, classes, weights = sample_class_pixels(
            pseudo, cfg.anchors_per_class, self._review_rng, confident=conf >= cfg.confidence,
            sampler=cfg.sampler, grid=cfg.grid, strata=cfg.strata or None, n_classes=self.n_classes,
        )
        return {
            "sampled_pixels": coords[:, 1:].cpu().numpy().astype(np.int64),
            "sampled_classes": classes.cpu().numpy().astype(np.int64),
            "sampled_weights": weights.cpu().numpy().astype(np.float32),
        }

    def buffers_state(self) -> dict:
        return {"queue": self.queue.detach().cpu().clone(), "queue_len": self.queue_len.clone(),
                "queue_ptr": self.queue_ptr.clone()}

    def load_buffers_state(self, state: dict) -> None:
        queue = state["queue"]
        if tuple(queue.shape) != tuple(self.queue.shape):
            raise CheckpointError(
                f"the checkpoint's ARCO queues have shape {tuple(queue.shape)}, this config needs "
                f"{tuple(self.queue.shape)} (classes, arco.queue_size, arco.embedding_dim)"
            )
        self.queue = queue.to(self.device).clone()
        self.queue_len = state["queue_len"].clone().long()
        self.queue_ptr = state["queue_ptr"].clone().long()


__all__ = ["ARCO", "ARCOConfig", "PixelContrastiveLoss", "class_prototypes", "pixel_contrastive_loss"]
