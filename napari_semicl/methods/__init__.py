"""Methods by name. A method is a :class:`~napari_semicl.methods.base.Method` subclass.

Register a new one with :func:`register_method`; the train dock and the CLI list
:func:`available_methods`.
"""

from __future__ import annotations

from .agcl import AGCL, AGCLConfig
from .arco import ARCO, ARCOConfig
from .aua import AUA, AUAConfig
from .base import Method
from .mean_teacher import MeanTeacher, MeanTeacherConfig, ema_update
from .plgcl import PLGCL, PLGCLConfig
from .supervised import Supervised

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError("a method class needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ValueError naming the valid ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {available_methods()}") from None


register_method(Supervised)
register_method(MeanTeacher)
register_method(ARCO)
register_method(PLGCL)
register_method(AGCL)
register_method(AUA)

__all__ = [
    "AGCL",
    "AGCLConfig",
    "ARCO",
    "ARCOConfig",
    "AUA",
    "AUAConfig",
    "MeanTeacher",
    "MeanTeacherConfig",
    "Method",
    "PLGCL",
    "PLGCLConfig",
    "Supervised",
    "available_methods",
    "ema_update",
    "get_method",
    "register_method",
]
