"""``napari-semicl interpolate``: fill between fully painted slices, as 3D Slicer and
ITK-SNAP do; no training."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..engine.config import UNPAINTED_CHOICES
from ..engine.prior import INTERPOLATION_CHOICES
from ..errors import DataError
from ..io import read_image, read_labels, write_labels
from .common import CliError, Command


def arguments(ip) -> None:
    ip.add_argument("--labels", required=True, help="painted labels: a few whole slices")
    ip.add_argument("--image", required=True,
                    help="the image: gives the geometry, and the intensities for --method flow")
    ip.add_argument("--out", required=True, help="mask file (.nii.gz, .nii, .tif), written with the image's geometry")
    ip.add_argument("--axis", type=int, help="slicing axis (default: the axis with the fewest slices)")
    ip.add_argument("--method", choices=INTERPOLATION_CHOICES, default="flow",
                    help="flow (default): carry the painted shapes along the image by optical flow, then blend "
                         "their signed distance maps; sdf: blend the maps directly (faster, ignores the image)")
    ip.add_argument("--unpainted", choices=UNPAINTED_CHOICES, default="background",
                    help="background (default): 0 is background on painted slices; ignore: 0 is unpainted, so "
                         "painted slices must be painted in every pixel")
    ip.add_argument("--shrink", type=float,
                    help="fall-off past the outermost painted slice, in-plane pixels per slice (default 1.5 x slice "
                         "spacing / pixel size)")
    ip.add_argument("--overwrite", action="store_true", help="replace an existing mask")


def cmd_interpolate(args) -> int:
    from ..data.interpolation import interpolate_labels

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} already exists: pass --overwrite or choose another name")
    img = read_image(args.image)
    if img.rgb:
        raise DataError(f"{Path(args.image).name} is an RGB image: interpolation needs a grey image or volume")
    labels = read_labels(args.labels, like=img)
    axis = int(np.argmin(labels.data.shape)) if args.axis is None else args.axis
    spacing = img.scale if img.metadata.get("format") == "nifti" else None
    t0 = time.perf_counter()
    result = interpolate_labels(labels.data, axis=axis, spacing=spacing, method=args.method, image=img.data,
                                unpainted=args.unpainted, shrink=args.shrink)
    seconds = time.perf_counter() - t0
    path = write_labels(out, result.labels, metadata=img.metadata, overwrite=args.overwrite)
    print(f"{len(result.painted)} painted slice(s) along axis {result.axis}: {result.painted.tolist()}; "
          f"classes {result.class_values} (background {result.class_values[0]})")
    print(f"interpolated ({result.method}, fall-off {result.shrink:.2f} px/slice) in {seconds:.2f} s")
    print(f"mask written to {path}")
    return 0


COMMAND = Command("interpolate", "fill between fully painted slices (no training), like 3D Slicer",
                  arguments, cmd_interpolate)
