"""The argument parser: one subparser per :class:`~.common.Command` in :data:`COMMANDS`."""

from __future__ import annotations

import argparse

from .. import __version__
from . import bench, demo, evaluate, interpolate, job, predict, train
from .common import Command

DESCRIPTION = "Command line: everything the train dock does, without Qt."

#: Every subcommand, in the order ``--help`` lists them. A new command is a module with a
#: ``COMMAND`` (its flags and its function) and an entry here.
COMMANDS: tuple[Command, ...] = (
    train.COMMAND,
    predict.COMMAND,
    evaluate.COMMAND,
    interpolate.COMMAND,
    demo.COMMAND,
    bench.COMMAND,
    job.COMMAND,
)


class _Choices(dict):
    """The subcommands by name; iterating (argparse's "invalid choice ... (choose from ...)"
    message) skips the hidden ones, looking a name up finds every one."""

    def __init__(self, hidden: set[str]):
        super().__init__()
        self.hidden = hidden

    def __iter__(self):
        return (name for name in super().__iter__() if name not in self.hidden)


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-semicl`` argument parser; ``args.func(args)`` runs the chosen command."""
    parser = argparse.ArgumentParser(prog="napari-semicl", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"napari-semicl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    shown = [command.name for command in COMMANDS if not command.hidden]
    # argparse lists every subcommand in the metavar and in "invalid choice" errors, and one with
    # help=SUPPRESS as "==SUPPRESS==": name the shown commands in the metavar, give a hidden one
    # no help entry, and leave it out of the choices argparse iterates
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(shown) + "}")
    sub.choices = sub._name_parser_map = _Choices({c.name for c in COMMANDS if c.hidden})
    for command in COMMANDS:
        p = sub.add_parser(command.name) if command.hidden else sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser
