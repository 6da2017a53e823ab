"""Checkpoints: plain tensors and JSON text, written atomically, loaded with weights_only.

A checkpoint is data, never code: :func:`load_checkpoint` uses
``torch.load(..., weights_only=True)``, so a pickle carrying code is refused before anything
in it runs. The config is stored as JSON text inside the file and beside it as config.json.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io.atomic import atomic_path

FORMAT = "napari-semicl/1"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | Path, *, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        Missing file, not a napari-semicl checkpoint, or content that is not plain data
        (e.g. a pickle that would run code), with a message saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        what = ("it holds objects other than plain tensors and values" if "Unsupported global" in detail
                else "it is corrupt or holds objects other than plain tensors and values")
        raise CheckpointError(
            f"refusing to load {path}: {what} (a checkpoint must never carry code). Detail: {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a PyTorch file ({reason})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a napari-semicl checkpoint (expected format {FORMAT!r})")
    return data


def _unpickler_detail(message: str) -> str:
    """The one informative line of torch's weights-only refusal (e.g. 'Unsupported global:
    GLOBAL builtins.exec ...'), else the message's first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest.split(". Please use", 1)[0]
            if i + 1 < len(lines):
                return lines[i + 1]
    return lines[0] if lines else "unknown"
