"""What every command module shares: the one-line error, the command record, common flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.device import DEVICE_CHOICES
from ..errors import ConfigError


class CliError(Exception):
    """A usage problem reported as one line."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its one-line help, the function that declares its flags on
    its parser, and the function that runs it (``run(args) -> exit code``).

    ``hidden`` commands parse and run but are not listed by ``--help`` (the ``job`` a rank of
    the Train dock's torchrun run executes)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    hidden: bool = False


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES))


def add_training_options(parser: argparse.ArgumentParser, *, method_default: str | None = None) -> None:
    """The flags of every command that trains: method, budget, seed and device."""
    from ..methods import available_methods

    parser.add_argument("--method", choices=available_methods(), default=method_default,
                        help="learning method (default: supervised, or the --config's)")
    parser.add_argument("--iterations", type=int, help="training steps (with --resume: steps more)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget instead of --iterations")
    parser.add_argument("--seed", type=int)
    add_device_option(parser)


def set_items(args, *, sections: bool = False) -> list[tuple[str, str]]:
    """(key, value) of each ``--set KEY=VALUE``; ``sections``: the key must name its
    section (``SECTION.KEY``, for settings that apply to every method)."""
    items = []
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or (sections and "." not in key):
            raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        items.append((key.strip(), raw.strip()))
    return items
