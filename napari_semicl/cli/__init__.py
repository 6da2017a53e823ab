"""Command line: everything the train dock does, without Qt.

    napari-semicl train --image IMG --labels LAB [--method NAME] [--iterations N] --out DIR
    napari-semicl predict --checkpoint CKPT --image IMG --out MASK [--entropy OUT]
        (IMG may be a whole-slide image: pyramidal TIFF/SVS/OME-TIFF or OME-Zarr, predicted
        tile by tile into MASK = *.ome.tif or *.zarr; or a folder of equal-size tiles)
    napari-semicl evaluate --pred P --reference R
    napari-semicl interpolate --labels PAINTED --image IMG --out MASK [--axis N] [--method sdf|flow]
        (fill between fully painted slices, as 3D Slicer / ITK-SNAP do; no training)
    napari-semicl demo [--out DIR]      (the whole loop on the bundled sample volume)
    napari-semicl bench within-volume|cohort|speed|report|ui|histology|wsi ...

Errors a user can cause print one line, ``napari-semicl: error: ...``, and exit with 2.

The package: :mod:`.parser` builds the parser from the list of commands; each command is one
module (``train``, ``predict``, ``evaluate``, ``interpolate``, ``demo``, ``bench``, ``job``)
declaring its flags and its function in a ``COMMAND``; :mod:`.running` runs a trainer to the
end; :mod:`.slides` is ``train``/``predict`` on whole-slide images.
"""

from __future__ import annotations

import logging
import sys

from ..engine.device import default_cpu_threads, set_threads
from ..engine.distributed import env_rank, env_world_size
from ..engine.distributed import shutdown as shutdown_distributed
from ..errors import SemiclError
from .common import CliError
from .parser import COMMANDS, build_parser

__all__ = ["COMMANDS", "CliError", "build_parser", "main"]


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # under torchrun: rank 0 logs progress, the other ranks only warnings and errors, named
    ranks = env_world_size() > 1
    where = f" (rank {env_rank()})" if ranks else ""
    logging.basicConfig(
        level=logging.WARNING if args.quiet or (ranks and env_rank() != 0) else logging.INFO,
        format=f"%(asctime)s %(levelname)s{where} %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    if not ranks:  # the cores the machine gives this process (OMP_NUM_THREADS wins), issue 26
        set_threads(default_cpu_threads())
    try:
        return int(args.func(args) or 0)
    except (SemiclError, CliError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"napari-semicl: error{where}: {message}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
