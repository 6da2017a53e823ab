"""``napari-semicl job DIR``: one rank of a run the Train dock started on several devices
(engine/launch.py runs it under torchrun). Not for users: hidden from ``--help``."""

from __future__ import annotations

from .common import Command


def arguments(j) -> None:
    j.add_argument("job_dir")


def cmd_job(args) -> int:
    from ..engine.launch import run_job

    return run_job(args.job_dir)


COMMAND = Command("job", "one rank of the Train dock's torchrun run", arguments, cmd_job, hidden=True)
