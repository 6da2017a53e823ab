"""Memory is estimated before it is spent (DESIGN.md): training and whole-volume inference
are sized against the memory the process can have, before anything large is allocated.

* :func:`available_memory` is what the process can still take: on CUDA the device's free
  memory (``torch.cuda.mem_get_info``); on the CPU the least of the system's available RAM
  (``MemAvailable``), the cgroup's limit less its usage, and the address-space limit
  (``ulimit -v``, ``prlimit --as``) less the process's size. :func:`memory_budget` keeps a
  share of it free.
* :func:`estimate_training` adds up one training step of a config: the network's
  activations for the patch, the batch and the method (its gradient passes, a teacher's
  pass, its extras), the weights with their gradients and optimiser state (and a teacher
  copy), the painted-slice prior's arrays and a refresh's whole-volume prediction.
* :func:`fit_training_memory` (called by the trainer before its first step) applies the 3D
  network's defaults (:func:`~napari_semicl.engine.config.apply_network_defaults`), then
  shrinks the settings the user left at their defaults until the estimate fits (the patch
  first, then the batch) and says so; a setting the user forced
  (:func:`~napari_semicl.engine.config.is_forced`) that cannot fit is refused with a
  :class:`~napari_semicl.errors.ConfigError` naming it and a value that fits.
* :func:`fit_inference_window` and :func:`fit_slice_batch` shrink whole-volume inference
  windows (and slice batches) to what fits, before predicting.

The activation figures are per voxel of a patch and per crop, measured as the growth of the
resident set size over a first training step with torch's CPU allocator on this project's
networks (``base_channels`` 16; they scale with the channels); docs/reliability.md
("Memory") gives the measurements. Estimates are meant to lie above the measured peaks
(``tests/test_memory.py`` checks a small config against a measured peak).
"""

from __future__ import annotations

import logging
import math
import os
import resource
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

MB = 2**20
GB = 2**30

#: the share of the available memory a run may plan to use (the rest: other programs, the
#: allocator's fragmentation, napari's own layers)
BUDGET_SHARE = 0.75
#: kept free on top of that on the CPU (the interpreter, libraries, napari)
RESERVE_BYTES = 256 * MB

# --- calibration: measured growth of the resident set size (docs/reliability.md, "Memory") ---
#: bytes a training crop costs per voxel (per pixel in 2D) of its patch, for the network with
#: base_channels = 16, in one forward and backward pass (2D U-Net, 3D BasicUNet)
TRAIN_BYTES_PER_VOXEL = {2: 2000, 3: 1600}
#: bytes per voxel of a patch that a training step costs once, whatever the batch (the
#: convolutions' work buffers)
STEP_BYTES_PER_VOXEL = {2: 300, 3: 700}
#: bytes a forward pass without gradients costs per voxel of its input (a teacher's pass,
#: an inference window), base_channels = 16
INFER_BYTES_PER_VOXEL = {2: 250, 3: 450}
#: a first training step's fixed cost (thread pools, the optimiser's state buffers, ...)
STEP_FIXED_BYTES = 200 * MB
#: per method: the activations as a multiple of the plain passes (student on the labelled
#: and, if the method uses them, the unlabelled crops; a teacher's pass without gradients);
#: methods not named here (a plugin's) get the largest
METHOD_FACTOR = {"supervised": 1.0, "mean_teacher": 1.0, "plgcl": 1.3, "aua": 1.5, "agcl": 1.3, "arco": 1.3}
#: bytes per voxel (and class) the painted-slice prior keeps and builds: scores (S, K, H, W)
#: float32 kept, and the fill's work arrays while it is built
PRIOR_BYTES_PER_VOXEL_CLASS = 24
#: bytes per voxel of a whole volume (and class) a 3D network's prediction holds at once:
#: MONAI's output and count maps, the probabilities, class indices and entropy
VOLUME_BYTES_PER_VOXEL_CLASS = 16
VOLUME_BYTES_PER_VOXEL = 24


# --- what the process can have ------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _mem_available() -> int | None:
    """The system's available RAM (MemAvailable), from psutil or /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1), or None without a limit."""
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None:
        used = _read_int("/sys/fs/cgroup/memory.current") or 0
        return max(limit - used, 0)
    limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit is not None and limit < 2**60:
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0
        return max(limit - used, 0)
    return None


def _address_space_headroom() -> int | None:
    """The address-space limit (``ulimit -v``) less the process's virtual size, or None."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size = 0
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(int(soft) - size, 0)


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes the process can still allocate on ``device`` (the CPU when None).

    CUDA: the device's free memory. Otherwise the least of the system's available RAM, the
    cgroup's limit less its usage and the address-space limit less the process's size (each
    where it exists).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    found = [v for v in (_mem_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(found) if found else 8 * GB


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes a run may plan to use: :data:`BUDGET_SHARE` of :func:`available_memory`
    (on the CPU less :data:`RESERVE_BYTES`)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = BUDGET_SHARE * available_memory(device)
    if device.type != "cuda":
        budget -= RESERVE_BYTES
    return max(int(budget), 0)


def format_bytes(n: float) -> str:
    """'1.2 GB', '340 MB'."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB"


# --- estimates ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part (``parts``) and the peak they add up to (``total``)."""

    parts: dict = field(default_factory=dict)
    total: int = 0

    def describe(self) -> str:
        shown = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v >= MB)
        return f"{format_bytes(self.total)} ({shown})" if shown else format_bytes(self.total)


def parameter_count(model_cfg) -> int:
    """Parameters of the network a :class:`~napari_semicl.engine.config.ModelConfig`
    describes, counted on the meta device (nothing allocated)."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def _method_traits(name: str) -> tuple[bool, bool, float]:
    """(uses_teacher, uses_unlabelled, activation factor) of a registered method."""
    from ..methods import get_method

    try:
        cls = get_method(name)
    except (KeyError, ValueError, ConfigError):
        return True, True, max(METHOD_FACTOR.values())
    factor = METHOD_FACTOR.get(name, max(METHOD_FACTOR.values()))
    return bool(getattr(cls, "uses_teacher", False)), bool(getattr(cls, "uses_unlabelled", False)), factor


def _patch_voxels(cfg) -> int:
    d = cfg.data
    if cfg.model.spatial_dims == 3:
        return math.prod(d.patch_shape)
    return d.patch_size * d.patch_size


def _volume_shapes(dataset) -> list[tuple[int, ...]]:
    """(S, C, H, W) of each whole image the run predicts (none for slides' tiles)."""
    images = getattr(dataset, "images", None)
    if images is None or not isinstance(images, (list, tuple)):
        return []
    return [tuple(int(n) for n in getattr(img, "shape", ())) for img in images if getattr(img, "ndim", 0) == 4]


def estimate_step(cfg, *, n_unlabelled_ok: bool = True) -> MemoryEstimate:
    """The peak one training step of ``cfg`` adds: activations of the method's passes over
    the patch and batch, the convolutions' work buffers, and its fixed cost."""
    dims = int(cfg.model.spatial_dims)
    scale = cfg.model.base_channels / 16.0
    voxels = _patch_voxels(cfg)
    teacher, unlabelled, factor = _method_traits(cfg.method)
    b_l = cfg.data.batch_labelled
    b_u = cfg.data.batch_unlabelled if unlabelled and n_unlabelled_ok else 0
    grad = TRAIN_BYTES_PER_VOXEL[dims] * scale * voxels * (b_l + b_u) * factor
    parts = {
        "activations": int(grad),
        "work buffers": int(STEP_BYTES_PER_VOXEL[dims] * scale * voxels),
        "teacher pass": int(INFER_BYTES_PER_VOXEL[dims] * scale * voxels * b_u) if teacher else 0,
        "step overhead": STEP_FIXED_BYTES,
    }
    return MemoryEstimate(parts, sum(parts.values()))


def estimate_volume_prediction(shape, n_classes: int, *, base_channels: int, window: int, spatial_dims: int = 3,
                               batch: int = 1) -> MemoryEstimate:
    """The peak of predicting a whole image of (S, C, H, W) slices: a 3D network's windows
    of side at most ``window`` (one at a time) and the whole-volume arrays it holds, or a
    slice network's ``batch`` slices in windows of side at most ``window``."""
    s, c, h, w = shape
    scale = base_channels / 16.0
    voxels = s * h * w

    def side(n: int) -> int:
        return min(int(math.ceil(n / 16)) * 16, window)

    if spatial_dims == 3:
        win = side(s) * side(h) * side(w)
        parts = {
            "window": int(INFER_BYTES_PER_VOXEL[3] * scale * win),
            "volume arrays": int(voxels * (VOLUME_BYTES_PER_VOXEL + VOLUME_BYTES_PER_VOXEL_CLASS * n_classes + 4 * c)),
        }
    else:
        win = side(h) * side(w)
        parts = {
            "windows": int(INFER_BYTES_PER_VOXEL[2] * scale * win * min(batch, s)),
            "volume arrays": int(voxels * 16),  # class indices (int64), entropy, labels
        }
    return MemoryEstimate(parts, sum(parts.values()))


def estimate_training(cfg, dataset=None) -> MemoryEstimate:
    """What training ``cfg`` on ``dataset`` still needs at its peak, on top of what is
    allocated when the trainer is built (images, annotations, the network's weights).

    The step (:func:`estimate_step`), the gradients and optimiser state (and a teacher
    copy), the painted-slice prior's arrays, and a refresh's whole-volume prediction in its
    smallest window (windows shrink themselves, :func:`fit_inference_window`): the step and
    the refresh come one after the other, so the larger counts.
    """
    params = parameter_count(cfg.model)
    teacher, _, _ = _method_traits(cfg.method)
    step = estimate_step(cfg, n_unlabelled_ok=bool(getattr(dataset, "unlabelled", True)))
    shapes = _volume_shapes(dataset) if dataset is not None else []
    k = int(cfg.model.n_classes)
    prior = 0
    if getattr(cfg.prior, "active", False) and shapes:
        prior = sum(s * h * w for s, _, h, w in shapes) * PRIOR_BYTES_PER_VOXEL_CLASS * k
    refresh = 0
    if shapes and cfg.model.spatial_dims == 3:
        refresh = max(estimate_volume_prediction(sh, k, base_channels=cfg.model.base_channels, window=32).total
                      for sh in shapes)
    parts = {
        **step.parts,
        "gradients and optimiser": params * 4 * (3 + (1 if teacher else 0)),
        "prior": prior,
    }
    total = sum(parts.values())
    if refresh > step.total:  # the refresh's prediction is the larger peak of the two
        parts["whole-volume prediction"] = refresh - step.total
        total += refresh - step.total
    return MemoryEstimate(parts, total)


# --- fitting training ---------------------------------------------------------------------------
#: the smallest patch side the shrinking goes to (3D: the network's instance norm needs 32)
MIN_PATCH = {2: 32, 3: 32}


def _patch_text(cfg) -> str:
    if cfg.model.spatial_dims == 3:
        return " x ".join(str(n) for n in cfg.data.patch_shape)
    return f"{cfg.data.patch_size} x {cfg.data.patch_size}"


def _shrink_once(cfg, forced: set[str], unlabelled: bool) -> bool:
    """Shrink one setting that is not forced by one notch, the patch first (its largest side
    by 16), then the batch (the larger of the two by one); False when none can shrink."""
    d, dims = cfg.data, cfg.model.spatial_dims
    low = MIN_PATCH[dims]
    sides = []
    if "data.patch_size" not in forced and d.patch_size - 16 >= low:
        sides.append((d.patch_size, "size"))
    if dims == 3 and "data.patch_depth" not in forced and d.patch_shape[0] - 16 >= low:
        sides.append((d.patch_shape[0], "depth"))
    if sides:
        _, which = max(sides)
        if which == "size":
            if dims == 3 and d.patch_depth == 0:
                d.patch_depth = d.patch_size  # the depth stays where it was
            d.patch_size -= 16
        else:
            d.patch_depth = d.patch_shape[0] - 16
        return True
    batches = []
    if "data.batch_labelled" not in forced and d.batch_labelled > 1:
        batches.append((d.batch_labelled, "batch_labelled"))
    if unlabelled and "data.batch_unlabelled" not in forced and d.batch_unlabelled > 1:
        batches.append((d.batch_unlabelled, "batch_unlabelled"))
    if batches:
        _, name = max(batches)
        setattr(d, name, getattr(d, name) - 1)
        return True
    return False


def _fits(cfg, dataset, budget: int) -> bool:
    return estimate_training(cfg, dataset).total <= budget


def _largest_fitting(cfg, dataset, budget: int, key: str) -> int | None:
    """The largest value of the forced setting ``key`` ('data.patch_size', ...) that fits
    with the other settings as they are now, or None when even the smallest does not."""
    import copy

    section, name = key.split(".")
    trial = copy.deepcopy(cfg)
    current = getattr(trial.data, name)
    if name == "patch_depth" and current == 0:
        current = trial.data.patch_size
    if name == "patch_size" and trial.model.spatial_dims == 3 and trial.data.patch_depth == 0:
        trial.data.patch_depth = trial.data.patch_size  # keep the depth while the side shrinks
    step, low = (16, MIN_PATCH[trial.model.spatial_dims]) if name.startswith("patch") else (1, 1)
    value = current - step
    while value >= low:
        setattr(trial.data, name, value)
        if _fits(trial, dataset, budget):
            return value
        value -= step
    return None


def fit_training_memory(cfg, dataset=None, device: torch.device | str | None = None, *,
                        budget: int | None = None) -> list[str]:
    """Size ``cfg`` (a validated :class:`~napari_semicl.engine.config.TrainConfig`, changed in
    place) to the memory the process can have, before training allocates anything.

    The 3D network's defaults apply first
    (:func:`~napari_semicl.engine.config.apply_network_defaults`). When the estimate
    (:func:`estimate_training`) exceeds ``budget`` (:func:`memory_budget` of ``device`` when
    None), the settings left at their defaults shrink: the patch (its largest side by 16,
    down to 32; 3D sides stay multiples of 16), then the batch sizes. Returns the notes to
    show the user (empty when nothing changed).

    Raises
    ------
    ConfigError
        A setting the user forced (:func:`~napari_semicl.engine.config.is_forced`) does not
        fit even with the others at their smallest: the message names it, the memory it needs
        and a value that fits.
    """
    from .config import MEMORY_SETTINGS, apply_network_defaults, is_forced

    apply_network_defaults(cfg)
    if budget is None:
        budget = memory_budget(device)
    before = estimate_training(cfg, dataset)
    log.debug("training memory estimate %s, budget %s", before.describe(), format_bytes(budget))
    if before.total <= budget:
        return []
    forced = {key for key in MEMORY_SETTINGS if is_forced(cfg, key)}
    _, unlabelled, _ = _method_traits(cfg.method)
    was = (_patch_text(cfg), cfg.data.batch_labelled, cfg.data.batch_unlabelled)
    while not _fits(cfg, dataset, budget):
        if not _shrink_once(cfg, forced, unlabelled):
            break
    after = estimate_training(cfg, dataset)
    where = "on the GPU" if torch.device(device or "cpu").type == "cuda" else "of memory"
    if after.total > budget:
        said = f"training needs about {format_bytes(after.total)} but {format_bytes(budget)} {where} can be used"
        for key in sorted(forced):
            value = _largest_fitting(cfg, dataset, budget, key)
            if value is not None:
                raise ConfigError(
                    f"{key} = {getattr(cfg.data, key.split('.')[1])} does not fit in memory: {said}; "
                    f"{key} = {value} fits (or leave it at its default, which shrinks to fit)"
                )
        raise ConfigError(
            f"not enough memory to train: {said} even with {_patch_text(cfg)} patches and batches of "
            f"{cfg.data.batch_labelled} + {cfg.data.batch_unlabelled}; close other programs, use a smaller "
            "network (model.base_channels) or the 2D network (model.spatial_dims = 2)"
        )
    note = (f"training patches {_patch_text(cfg)}, batches {cfg.data.batch_labelled} labelled + "
            f"{cfg.data.batch_unlabelled} unlabelled (the defaults, {was[0]} and {was[1]} + {was[2]}, would need "
            f"{format_bytes(before.total)}; {format_bytes(budget)} {where} can be used)")
    return [note]


# --- fitting inference --------------------------------------------------------------------------
def _model_traits(model: torch.nn.Module) -> tuple[int, int]:
    """(base channels, classes) of one of this project's networks (or a guess for another)."""
    base = int(getattr(model, "feature_channels", 16))
    classes = 2
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            classes = int(module.out_channels)  # the last convolution: the head
    return base, classes


def fit_inference_window(model: torch.nn.Module, shape, device: torch.device, max_window: int, *,
                         notes: list | None = None) -> int:
    """The largest 3D window side (a multiple of 16, at most ``max_window``) whose prediction
    of a volume of (S, C, H, W) slices fits :func:`memory_budget`; a shrink is logged and
    appended to ``notes``. Raises :class:`~napari_semicl.errors.DataError` when the volume's
    own arrays do not fit even with the smallest window."""
    base, classes = _model_traits(model)
    budget = memory_budget(device)
    window = max(16, max_window // 16 * 16)
    est = estimate_volume_prediction(shape, classes, base_channels=base, window=window)
    first = est
    while est.total > budget and window > 16:
        window -= 16
        est = estimate_volume_prediction(shape, classes, base_channels=base, window=window)
    if est.total > budget:
        raise DataError(
            f"not enough memory to predict this {tuple(shape[:1]) + tuple(shape[2:])} volume: about "
            f"{format_bytes(est.total)} needed, {format_bytes(budget)} can be used; close other programs or crop it"
        )
    if window < max_window // 16 * 16 and first.total > budget:
        note = (f"predicting in {window}-voxel 3D windows to fit in memory ({format_bytes(budget)} can be used, "
                f"{max_window}-voxel windows would need {format_bytes(first.total)})")
        log.warning(note)
        if notes is not None:
            notes.append(note)
    return window


def fit_slice_batch(model: torch.nn.Module, shape, device: torch.device, batch_size: int, max_window: int, *,
                    notes: list | None = None) -> tuple[int, int]:
    """``(batch_size, max_window)`` for a slice network's prediction of (S, C, H, W) slices,
    shrunk (the batch first, then the window) until :func:`estimate_volume_prediction` fits
    :func:`memory_budget`; a shrink is logged and appended to ``notes``."""
    base, classes = _model_traits(model)
    budget = memory_budget(device)
    batch, window = max(1, batch_size), max_window

    def total() -> int:
        return estimate_volume_prediction(shape, classes, base_channels=base, window=window, spatial_dims=2,
                                          batch=batch).total

    while total() > budget and (batch > 1 or window > 16):
        if batch > 1:
            batch //= 2
        else:
            window = max(16, window // 2 // 16 * 16)
    if (batch, window) != (max(1, batch_size), max_window):
        note = f"predicting {batch} slice(s) at a time in windows of at most {window} pixels to fit in memory"
        log.warning(note)
        if notes is not None:
            notes.append(note)
    return batch, window


__all__ = [
    "MemoryEstimate",
    "available_memory",
    "estimate_step",
    "estimate_training",
    "estimate_volume_prediction",
    "fit_inference_window",
    "fit_slice_batch",
    "fit_training_memory",
    "memory_budget",
    "parameter_count",
]
