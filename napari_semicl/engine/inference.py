"""Whole-volume inference: slices in batches, each slice by MONAI's sliding window; a 3D
network (``spatial_dims = 3``) gets the whole volume in 3D windows instead
(:func:`predict_slices` chooses by the network; :func:`predict_volume_probabilities` gives
its class probabilities, for a caller that uses them more than once).

Memory stays bounded by one batch of slices: only the label map (and, on request, the
normalised entropy map) of the whole volume is kept. When the device runs out of memory,
prediction goes on with fewer slices per batch, then smaller windows (tiles), and says so
(:attr:`Prediction.notes`, a log warning); only when one slice in the smallest window
does not fit does it raise :class:`~napari_semicl.errors.DataError`.

A 2D network predicts with its batch normalisation folded into the convolutions
(:func:`~napari_semicl.models.ops.fold_batch_norm`, a copy: the same labels up to rounding,
1.23-1.26x faster on 512 px slices, benchmarks/fold_bn.py). The network runs in the precision it
was trained in (its ``model.precision`` setting, recorded on it by
:func:`~napari_semicl.engine.precision.prepare_model`; fp32 for a network built elsewhere):
under bf16/fp16 autocast where that applies, each window's output cast to float32
before the windows are blended, so probabilities, labels and entropy come out float32.

With ``adapt_batch_norm`` (the ``predict.adapt_batch_norm`` setting; AdaBN, Li et al. 2016,
arXiv:1603.04779) every batch-normalisation layer's running mean and variance are first
re-estimated on the image being predicted (:func:`adapt_batch_norm`, on a copy of the network:
the trained weights are never changed), for images whose stain or intensity differs from the
painted ones (docs/wsi.md).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..data.annotation import decode_classes
from ..data.dataset import normalise_image, to_slices, with_context
from ..errors import DataError
from ..models.ops import argmax_classes, fold_batch_norm, normalised_entropy
from .memory import fit_inference_window, fit_slice_batch
from .precision import precision_of

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """labels: label values, the image's spatial shape; entropy: normalised to [0, 1]
    (divided by log K) or None."""

    labels: np.ndarray
    entropy: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (CUDA, MPS or CPU allocator) ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _in_channels(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            return int(module.in_channels)
    return None


def _window(size: int, multiple: int, max_window: int) -> int:
    return min(int(math.ceil(size / multiple)) * multiple, max_window)


def _retry_out_of_memory(attempt, shrink, size, *, device: torch.device, notes: list | None):
    """``attempt(size)``, tried again with a smaller ``size`` while the device runs out of memory.

    ``shrink(size)`` returns ``(smaller size, note)`` (the note is logged as a warning and
    appended to ``notes``, a list, when given) or raises
    :class:`~napari_semicl.errors.DataError` when ``size`` is already the smallest. Errors
    other than out of memory (:func:`is_out_of_memory`) pass through. Returns
    ``(attempt's result, the size that fitted)``.
    """
    while True:
        try:
            return attempt(size), size
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
        # out of the except block: the failed attempt's tensors went with its traceback
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size, note = shrink(size)
        log.warning(note)
        if notes is not None:
            notes.append(note)


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class _BatchNormAdapter:
    """A copy of a network whose batch-normalisation layers gather their input's statistics.

    :attr:`model` is an eval-mode copy of the network (dropout and everything else as in
    prediction) whose batch-norm layers normalise with the statistics of the batch they see
    (as in train mode: each window is normalised as AdaBN prescribes, by the image's own
    statistics rather than the training's; a pre-hook sets the layer's running statistics to
    its batch's before the eval-mode forward) while it keeps, per channel, the count, mean and
    sum of squared deviations of all the values each layer has received (float64).
    :meth:`finish` writes the mean and the (population) variance of everything seen into the
    layers' running statistics (every value weighted alike: ``momentum=None``'s cumulative
    average when the batches are equal, exact when they are not) and returns the copy in eval
    mode. The network given is never changed.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval()
        self.layers = _batch_norms(self.model)
        self.sums: dict[int, list] = {}
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i)))

    def _hook(self, i: int):
        # a per-channel shift (the trained mean) before summing squares: no E[x^2] - E[x]^2
        # cancellation when a channel's mean is large against its spread
        shift = self.layers[i].running_mean.detach().float().clone()

        def gather(module, inputs):
            x = inputs[0].detach()
            # (values, channels) rows, a view for channels_last: summed along the rows, 2x
            # cheaper than var_mean over (N, H, W) of a channels_last activation on a CPU
            y = x.movedim(1, -1).reshape(-1, x.shape[1]).float() - shift.to(x.device)
            n = y.shape[0]
            d = y.sum(dim=0) / n
            var = ((y * y).sum(dim=0) / n - d * d).clamp_min(0.0)
            mean = d + shift.to(x.device)
            # the layer (in eval mode: its fast path) normalises this batch by the batch's own
            # statistics, as in train mode: the running ones are set to them for this call
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            # combined with the earlier batches in float64 (Chan et al.'s pairwise update)
            mean, m2 = mean.double().cpu(), var.double().cpu() * n
            if i not in self.sums:
                self.sums[i] = [mean, m2, n]
                return
            old_mean, old_m2, old_n = self.sums[i]
            total = old_n + n
            delta = mean - old_mean
            self.sums[i] = [old_mean + delta * (n / total), old_m2 + m2 + delta * delta * (old_n * n / total), total]
        return gather

    def snapshot(self) -> dict:
        """The sums so far (to :meth:`restore` when a batch fails half-way, e.g. out of memory)."""
        return {i: [a.clone(), b.clone(), n] for i, (a, b, n) in self.sums.items()}

    def restore(self, saved: dict) -> None:
        self.sums = saved

    def finish(self) -> torch.nn.Module:
        for hook in self._hooks:
            hook.remove()
        for i, layer in enumerate(self.layers):
            if i not in self.sums:  # a layer no window reached (a branch not taken): its trained statistics stay
                continue
            mean, m2, n = self.sums[i]
            var = m2 / n
            layer.running_mean.copy_(mean.to(layer.running_mean))
            layer.running_var.copy_(var.to(layer.running_var))
        return self.model.eval()


def adapt_batch_norm(model: torch.nn.Module, windows) -> torch.nn.Module:
    """A copy of ``model`` with every batch-normalisation layer's running mean and variance
    re-estimated on ``windows`` (AdaBN): ``windows`` is an iterable of input batches (N, C, ...)
    (e.g. the windows of one image), each passed once through the copy in eval mode except
    for the batch-norm layers, which normalise by their batch's statistics; each layer's new
    running mean and variance are the mean and population variance, per channel, of all it
    received over all batches (every value weighted alike). ``model`` is not changed; a
    network without batch normalisation is returned as it is (logged). The copy is returned in
    eval mode.

    :func:`predict_slices` and :func:`predict_volume_probabilities` do this with the windows
    of the image they predict (their ``adapt_batch_norm`` argument), under the network's precision.
    """
    if not _batch_norms(model):
        log.info("adapt_batch_norm: the network has no batch normalisation; predicting it as it is")
        return model
    adapter = _BatchNormAdapter(model)
    with torch.no_grad():
        for x in windows:
            adapter.model(x)
    return adapter.finish()


@torch.no_grad()
def predict_slices(
    model: torch.nn.Module,
    slices: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 8,
    max_window: int = 512,
    overlap: float = 0.25,
    with_entropy: bool = False,
    notes: list | None = None,
    fuse=None,
    fold: bool = True,
    adapt_batch_norm: bool = False,
):
    """Class indices (S, H, W) int64 and optional normalised entropy of (S, C, H, W) slices.

    A 3D network (``model.spatial_dims == 3``) takes the S slices as one volume
    (:func:`predict_volume_patches`; ``max_window`` then caps each side of its 3D windows
    at :data:`MAX_WINDOW_3D`).

    ``fuse(start, stop, probs)``, when given, returns new class probabilities (B, K, H, W)
    for slices ``[start, stop)`` before the argmax and the entropy (e.g. the painted-slice
    prior's fusion, :meth:`napari_semicl.engine.prior.SlicePrior.fuser`).

    Each slice is covered by windows of the slice size rounded up to the network's size
    multiple (capped at ``max_window``), blended with Gaussian weights where they overlap.
    Out of memory, the batch is halved down to one slice, then the window down to the
    network's size multiple; each fallback is logged and appended to ``notes`` (a list).
    ``fold=False`` predicts with the network as it is (its batch normalisation unfolded:
    the benchmarks' baseline). ``adapt_batch_norm``: first a pass over all the windows of all
    the slices re-estimates the batch-norm statistics on them (:func:`adapt_batch_norm`, on a
    copy), then the prediction pass (folded) uses them.

    Raises
    ------
    DataError
        The slices' channels differ from the network's (RGB where grey is expected, or the
        reverse), or one slice does not fit in memory even in the smallest window.
    """
    s, c, h, w = slices.shape
    expected = _in_channels(model)
    if expected is not None and c != expected:
        kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
        raise DataError(
            f"the network was trained on {kind.get(expected, f'{expected}-channel')} images but this "
            f"image is {kind.get(c, f'{c}-channel')}: predict images like the ones it was trained on"
        )
    if getattr(model, "spatial_dims", 2) == 3:
        return predict_volume_patches(model, slices, device=device, max_window=min(max_window, MAX_WINDOW_3D),
                                      overlap=overlap, with_entropy=with_entropy, notes=notes, fuse=fuse,
                                      adapt_batch_norm=adapt_batch_norm)
    batch_size, max_window = fit_slice_batch(model, slices.shape, device, batch_size, max_window, notes=notes)
    was_training = model.training
    model.eval()
    precision = precision_of(model, device)
    adapter = None
    if adapt_batch_norm:
        if _batch_norms(model):
            adapter = _BatchNormAdapter(model)
        else:
            log.info("adapt_batch_norm: the network has no batch normalisation; predicting it as it is")
    predictor = None  # set below, after the adaptation pass when there is one
    multiple = getattr(model, "multiple", 16)
    labels = np.empty((s, h, w), dtype=np.int64)
    entropy = np.empty((s, h, w), dtype=np.float32) if with_entropy else None

    def roi(window: int) -> tuple[int, int]:
        return _window(h, multiple, window), _window(w, multiple, window)

    def predict_batch(start: int, size: tuple[int, int]) -> None:
        batch, window = size
        x = torch.from_numpy(slices[start:start + batch]).to(device)
        if adapting:  # the adaptation pass: only the batch-norm statistics gathered matter
            saved = adapter.snapshot()
            try:
                sliding_window_inference(x, roi(window), sw_batch_size=batch, predictor=predictor, overlap=overlap,
                                         mode="gaussian")
            except BaseException:
                adapter.restore(saved)  # a batch that failed half-way (out of memory) counts for nothing
                raise
            return
        logits = sliding_window_inference(
            x, roi(window), sw_batch_size=batch, predictor=predictor, overlap=overlap, mode="gaussian"
        )
        idx, ent = classes_from_probabilities(logits.float().softmax(dim=1), fuse=fuse, start=start,
                                              with_entropy=with_entropy)
        labels[start:start + batch] = idx
        if with_entropy:
            entropy[start:start + batch] = ent

    def shrink(size: tuple[int, int]) -> tuple[tuple[int, int], str]:
        batch, window = size
        side = max(roi(window))
        if batch > 1:
            batch //= 2
            return (batch, window), f"out of memory on {device.type}: predicting {batch} slice(s) at a time"
        if side > multiple:
            window = max(multiple, side // 2 // multiple * multiple)
            return (batch, window), f"out of memory on {device.type}: predicting in {window}-pixel tiles"
        raise DataError(
            f"out of memory on {device.type} even for one slice in {side}-pixel tiles: "
            "free memory (close other programs) or predict on the CPU"
        )

    size = (batch_size, max(multiple, max_window // multiple * multiple))
    try:
        passes = ([True] if adapter is not None else []) + [False]
        for adapting in passes:
            if adapting:
                predictor = precision.predictor(adapter.model)
            else:
                net = adapter.finish() if adapter is not None else model
                # the training's autocast, float32 out; batch normalisation folded into the convolutions
                predictor = precision.predictor(fold_batch_norm(net) if fold else net)
            start = 0
            while start < s:
                _, size = _retry_out_of_memory(lambda sz: predict_batch(start, sz), shrink, size, device=device,
                                               notes=notes)
                start += size[0]
    finally:
        model.train(was_training)
    return labels, entropy


#: the largest side of a 3D inference window (voxels): 128^3 windows keep the activations
#: of the 3D U-Net (b = 16) near 1 GB in float32
MAX_WINDOW_3D = 128


@torch.no_grad()
def predict_volume_probabilities(
    model: torch.nn.Module,
    slices: np.ndarray,
    *,
    device: torch.device,
    max_window: int = MAX_WINDOW_3D,
    overlap: float = 0.25,
    notes: list | None = None,
    adapt_batch_norm: bool = False,
) -> torch.Tensor:
    """A 3D network's class probabilities (S, K, H, W) float32, on the CPU, of a volume
    given as (S, C, H, W) slices.

    The volume (1, C, S, H, W) is covered by windows of each side rounded up to the
    network's size multiple and capped at ``max_window``, blended with Gaussian weights
    (MONAI's ``sliding_window_inference``, ``mode='gaussian'``). Out of memory, the window
    is halved down to the network's multiple (each fallback logged and appended to
    ``notes``); below that it raises :class:`~napari_semicl.errors.DataError`.
    ``adapt_batch_norm``: a first pass over the same windows re-estimates the batch-norm
    statistics on the volume (:func:`adapt_batch_norm`, on a copy; the 3D U-Net's instance
    normalisation has none: a no-op, logged).
    """
    s, _, h, w = slices.shape
    was_training = model.training
    model.eval()
    precision = precision_of(model, device)
    net = model
    multiple = getattr(model, "multiple", 16)
    volume = torch.from_numpy(np.ascontiguousarray(slices.transpose(1, 0, 2, 3)))[None]  # (1, C, S, H, W)

    def roi(window: int) -> tuple[int, ...]:
        return tuple(_window(n, multiple, window) for n in (s, h, w))

    def predict(window: int) -> torch.Tensor:
        predictor = precision.predictor(net)  # the training's autocast, float32 out
        logits = sliding_window_inference(
            volume.to(device), roi(window), sw_batch_size=1, predictor=predictor, overlap=overlap, mode="gaussian",
            sw_device=device, device=torch.device("cpu"),
        )
        return logits.float().softmax(dim=1)[0].transpose(0, 1)  # (S, K, H, W)

    def adapt(window: int) -> torch.nn.Module:
        adapter = _BatchNormAdapter(model)  # afresh at each try: a failed try counts for nothing
        sliding_window_inference(volume.to(device), roi(window), sw_batch_size=1,
                                 predictor=precision.predictor(adapter.model), overlap=overlap, mode="gaussian",
                                 sw_device=device, device=torch.device("cpu"))
        return adapter.finish()

    def shrink(window: int) -> tuple[int, str]:
        side = max(roi(window))
        if side <= multiple:
            raise DataError(
                f"out of memory on {device.type} even in {multiple}-voxel 3D windows: "
                "free memory (close other programs) or predict on the CPU"
            )
        window = max(multiple, side // 2 // multiple * multiple)
        return window, f"out of memory on {device.type}: predicting in {window}-voxel 3D windows"

    max_window = fit_inference_window(model, slices.shape, device, max_window, notes=notes)
    try:
        if adapt_batch_norm:
            if _batch_norms(model):
                net, _ = _retry_out_of_memory(adapt, shrink, max(multiple, max_window // multiple * multiple),
                                              device=device, notes=notes)
            else:
                log.info("adapt_batch_norm: the network has no batch normalisation; predicting it as it is")
        probs, _ = _retry_out_of_memory(predict, shrink, max(multiple, max_window // multiple * multiple),
                                        device=device, notes=notes)
    finally:
        model.train(was_training)
    return probs


def classes_from_probabilities(probs: torch.Tensor, *, fuse=None, start: int = 0, with_entropy: bool = False):
    """Class indices (B, H, W) int64 numpy and, with ``with_entropy``, the normalised entropy
    (B, H, W) float32 of class probabilities ``probs`` (B, K, H, W) of slices
    ``[start, start + B)``, after ``fuse(start, start + B, probs)`` when given (as in
    :func:`predict_slices`). ``probs`` is only read.
    """
    if fuse is not None:
        probs = fuse(start, start + probs.shape[0], probs)
    labels = argmax_classes(probs).cpu().numpy()
    entropy = normalised_entropy(probs, dim=1).cpu().numpy() if with_entropy else None
    return labels, entropy


def predict_volume_patches(
    model: torch.nn.Module,
    slices: np.ndarray,
    *,
    device: torch.device,
    max_window: int = MAX_WINDOW_3D,
    overlap: float = 0.25,
    with_entropy: bool = False,
    notes: list | None = None,
    fuse=None,
    adapt_batch_norm: bool = False,
):
    """3D sliding-window prediction of a volume given as (S, C, H, W) slices.

    The probabilities of :func:`predict_volume_probabilities` (its windows, its fallbacks
    out of memory), fused by ``fuse(0, S, probs)`` when given, as for slices. Returns class
    indices (S, H, W) int64 and, with ``with_entropy``, the normalised entropy (S, H, W)
    float32.
    """
    probs = predict_volume_probabilities(model, slices, device=device, max_window=max_window, overlap=overlap,
                                         notes=notes, adapt_batch_norm=adapt_batch_norm)
    return classes_from_probabilities(probs, fuse=fuse, with_entropy=with_entropy)


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    class_values,
    axis: int = 0,
    rgb: bool = False,
    normalise: str = "percentile",
    device: torch.device,
    batch_size: int = 8,
    with_entropy: bool = False,
    context_slices: int = 0,
    fold: bool = True,
    adapt_batch_norm: bool = False,
) -> Prediction:
    """Predict a 2D image or 3D volume as the network saw it in training.

    Parameters
    ----------
    image : ndarray
        Raw image (normalised here with the training ``normalise`` mode).
    class_values : sequence of int
        The class table: network class i is label value ``class_values[i]``.
    axis : int
        Slicing axis used in training.
    context_slices : int
        2.5D: neighbours on either side stacked as channels, as in training
        (``data.context_slices``; ignored for 2D images).
    fold : bool
        Batch normalisation folded into the convolutions (:func:`predict_slices`).
    adapt_batch_norm : bool
        Re-estimate the batch-norm statistics on this image first (all its slices and
        windows; :func:`adapt_batch_norm`, on a copy of the network): the
        ``predict.adapt_batch_norm`` setting.

    A 3D network predicts the volume in 3D windows (:func:`predict_volume_patches`); a 2D
    image raises :class:`~napari_semicl.errors.DataError` for it.
    """
    if getattr(model, "spatial_dims", 2) == 3 and image.ndim - (1 if rgb else 0) != 3:
        raise DataError("this network is 3D (trained on volume patches): it predicts volumes, not 2D images")
    norm = normalise_image(image, normalise, rgb=rgb)
    slices = to_slices(norm, axis, rgb=rgb)
    if image.ndim - (1 if rgb else 0) == 3:
        slices = with_context(slices, context_slices)
    notes: list[str] = []
    idx, ent = predict_slices(model, slices, device=device, batch_size=batch_size, with_entropy=with_entropy,
                              notes=notes, fold=fold, adapt_batch_norm=adapt_batch_norm)
    spatial = image.ndim - (1 if rgb else 0)
    labels = decode_classes(idx, class_values)
    if spatial == 2:
        return Prediction(labels[0], None if ent is None else ent[0], notes)
    labels = np.moveaxis(labels, 0, axis)
    ent = None if ent is None else np.moveaxis(ent, 0, axis)
    return Prediction(np.ascontiguousarray(labels), None if ent is None else np.ascontiguousarray(ent), notes)
