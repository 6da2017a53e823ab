"""Arithmetic precision and memory layout of training and inference.

One choice per run (``model.precision``):

- ``'auto'`` (the default): bf16 autocast for the 2D network on a CPU with bf16 instructions
  (the ``avx512_bf16`` or ``amx_bf16`` flags of ``/proc/cpuinfo``), else fp32 (the 3D network
  stays fp32 on the CPU, see :func:`resolve_precision`); on CUDA, AMP: bf16
  autocast where the card has it (``torch.cuda.is_bf16_supported()``), else fp16 autocast
  with a gradient scaler; fp32 on Apple MPS.
- ``'fp32'``: no autocast anywhere.
- ``'bf16'``: bf16 autocast on the CPU (emulated, and slower, on a CPU without the
  instructions: said in the log) or on a CUDA card that has it; refused on MPS and on a
  CUDA card without bf16.

Under autocast the convolutions and matrix products run in the low precision; the networks
hand out float32 (their logits and features, :mod:`~napari_semicl.models.unet`), the losses
that need it run in float32 (:func:`~napari_semicl.models.ops.in_float32`) and the weights,
gradients and optimiser state stay float32 (autocast casts a copy per operation).

A 2D network is kept in ``channels_last`` memory format on the CPU and CUDA (oneDNN's and
cuDNN's fast layout for convolutions); the 3D one stays contiguous (see :func:`wants_channels_last`).
The optimiser is AdamW in its fused form on the CPU and CUDA (:func:`make_optimizer`: one
kernel over all parameters instead of a loop of small operations per tensor).
Measured figures: ``bench speed --compare`` (docs/results/speed_bf16.json).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16")

#: /proc/cpuinfo flags that mean the CPU computes in bf16 natively (AVX-512 BF16, AMX)
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LABELS = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 AMP"}

#: the attribute that carries a network's precision setting to inference (see :func:`prepare_model`)
MODEL_ATTRIBUTE = "semicl_precision"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(flags=None) -> bool:
    """Whether the CPU has bf16 instructions (``flags``: a set of /proc/cpuinfo flags, by
    default this machine's)."""
    return bool(CPU_BF16_FLAGS & set(cpu_flags() if flags is None else flags))


def wants_channels_last(device: torch.device, spatial_dims: int) -> bool:
    """Whether the network runs in channels-last memory format on ``device``.

    2D on the CPU and CUDA: yes. 3D: no. MPS: no (not measured). Measured on this project's
    CPU (one thread, CPU seconds per forward+backward+AdamW step of the bare network, 3 rounds):
    2D U-Net, batch 8 at 128^2: fp32 0.357 s, channels_last 0.270 s; bf16 0.198 s,
    bf16 + channels_last 0.171 s. 3D U-Net (MONAI's BasicUNet, b = 16), batch 2 at 64^3:
    fp32 1.91 s, channels_last_3d 2.04 s; bf16 0.96 s, bf16 + channels_last_3d 1.21 s.
    """
    return spatial_dims == 2 and device.type in ("cpu", "cuda")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` in {'fp32', 'bf16', 'fp16'} on ``device_type``.

    ``scaled``: the loss is scaled for the backward pass (fp16 on CUDA, a
    :class:`torch.amp.GradScaler`); ``channels_last``: the network's memory format.
    """

    name: str
    device_type: str
    channels_last: bool = False
    scaled: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return _DTYPES[self.name]

    def describe(self) -> str:
        """E.g. 'bf16 autocast', 'fp16 AMP', 'fp32'."""
        return _LABELS[self.name]

    def autocast(self):
        """A context for the forward pass and the losses: autocast, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def predictor(self, model: torch.nn.Module):
        """``model`` as a callable whose output is float32, run under :meth:`autocast`
        (for MONAI's sliding window, which adds windows up in the output's dtype)."""

        def predict(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return model(x).float()

        return predict


def resolve_precision(setting: str, device: torch.device, *, spatial_dims: int = 2, flags=None,
                      cuda_bf16: bool | None = None) -> Precision:
    """The precision a run uses for ``setting`` (``model.precision``) on ``device``.

    Parameters
    ----------
    setting : {'auto', 'fp32', 'bf16'}
    device : torch.device
    spatial_dims : {2, 3}
        Chooses the memory format (:func:`wants_channels_last`).
    flags : set of str, optional
        The CPU's flags (default: this machine's, :func:`cpu_flags`); for tests.
    cuda_bf16 : bool, optional
        Whether the CUDA card has bf16 (default: ``torch.cuda.is_bf16_supported()``).

    Raises
    ------
    ConfigError
        ``setting`` is not a choice, or 'bf16' where the device cannot run it (MPS, a CUDA
        card without bf16).
    """
    if setting not in PRECISION_CHOICES:
        raise ConfigError(f"model.precision must be one of {', '.join(PRECISION_CHOICES)}, got {setting!r}")
    device = torch.device(device)
    kind = device.type
    last = wants_channels_last(device, spatial_dims)
    if setting == "fp32":
        return Precision("fp32", kind, last)
    if kind == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if has_bf16:
            return Precision("bf16", kind, last)
        if setting == "bf16":
            raise ConfigError("model.precision 'bf16': this GPU has no bf16; use 'auto' (fp16 AMP) or 'fp32'")
        return Precision("fp16", kind, last, scaled=True)
    if kind == "cpu":
        if setting == "bf16" and not cpu_has_bf16(flags):
            log.warning("model.precision 'bf16' on a CPU without bf16 instructions (avx512_bf16, amx_bf16): "
                        "emulated, likely slower than fp32")
            return Precision("bf16", kind, last)
        # 3D on the CPU stays fp32 under 'auto': bf16 halved its step, but a 3D test run once
        # gave a NaN loss at the second step (instance norm over 2 x 2 x 2 voxels in bf16?)
        bf16 = cpu_has_bf16(flags) and (setting == "bf16" or spatial_dims == 2)
        return Precision("bf16" if bf16 else "fp32", kind, last)
    if setting == "bf16":
        raise ConfigError(f"model.precision 'bf16' is not supported on {kind}: use 'auto' or 'fp32'")
    return Precision("fp32", kind, last)


def prepare_model(model: torch.nn.Module, precision: Precision, setting: str | None = None) -> torch.nn.Module:
    """Put ``model`` (already on its device) in ``precision``'s memory format and record the
    precision ``setting`` on it, so that inference (:func:`precision_of`) runs it the same
    way (copies of the network, e.g. a teacher, keep both). Returns ``model``."""
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    setattr(model, MODEL_ATTRIBUTE, setting if setting is not None else precision.name)
    return model


def precision_of(model: torch.nn.Module, device: torch.device) -> Precision:
    """The precision to run ``model`` with on ``device``: its recorded setting
    (:func:`prepare_model`: the trainer's and :func:`~napari_semicl.engine.trainer.load_predictor`'s
    networks), else fp32 (a network built elsewhere runs as it always did)."""
    setting = getattr(model, MODEL_ATTRIBUTE, "fp32")
    if setting == "fp16":
        setting = "auto"  # a CUDA AMP run: auto again on whatever device predicts now
    return resolve_precision(setting, device, spatial_dims=getattr(model, "spatial_dims", 2))


class MixedPrecision:
    """A run's precision at work: resolved once from ``setting`` (``model.precision``) for
    ``device``, it prepares the network (:meth:`prepare`), wraps the forward pass and the
    losses (:meth:`autocast`) and takes the backward pass and optimiser step
    (:meth:`step`: plain, or with the loss scaled for fp16 on CUDA by a
    :class:`torch.amp.GradScaler`, which skips steps with inf/NaN gradients and lowers the scale).
    """

    def __init__(self, setting: str, device: torch.device, spatial_dims: int = 2) -> None:
        self.setting = setting
        self.precision = resolve_precision(setting, device, spatial_dims=spatial_dims)
        self.scaler = torch.amp.GradScaler(self.precision.device_type) if self.precision.scaled else None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """:func:`prepare_model` with this run's precision and setting."""
        return prepare_model(model, self.precision, self.setting)

    def autocast(self):
        return self.precision.autocast()

    def describe(self) -> str:
        return self.precision.describe()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` then ``optimizer.step()``, the loss scaled where needed."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


#: devices whose AdamW has a fused kernel in this torch (MPS keeps the per-tensor loop)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(params, optim_config, device: torch.device, *, fused: bool | None = None) -> torch.optim.AdamW:
    """The training's AdamW (``optim_config``: ``lr``, ``weight_decay``), fused where the
    device has the kernel (``fused=None``) or as asked. The fused step computes the same
    update in one pass over all parameters: on this project's 2D U-Net (64 tensors, 1.9 M
    weights, one CPU thread) 1.1 ms a step against 4.4 ms for the loop, and the moments
    it keeps load into either form (a checkpoint moves between them)."""
    if fused is None:
        fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, lr=optim_config.lr, weight_decay=optim_config.weight_decay,
                             fused=bool(fused) or None)
