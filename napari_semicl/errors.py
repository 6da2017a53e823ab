"""Exceptions a user can cause. Front ends turn them into one clear message."""


class SemiclError(Exception):
    """Base class of errors caused by input, settings or files (not by bugs)."""


class ConfigError(SemiclError, ValueError):
    """A configuration value or file is invalid; the message names the key."""


class DataError(SemiclError, ValueError):
    """The images or annotations cannot be used for training; the message says why."""


class CheckpointError(SemiclError, ValueError):
    """A checkpoint cannot be loaded (wrong architecture, untrusted content, corrupt)."""


def check_choice(path: str, value, choices) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{path} must be one of {set(choices)}, got {value!r}")


def check_positive(path: str, value, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path} must be {bound}, got {value!r}")
