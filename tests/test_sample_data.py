"""Tests for the bundled MNI152 sample (File > Open Sample)."""

from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from napari_semicl.io import load_sample_volume, read_labels, sample_data_dir, write_labels
from napari_semicl.io import sample as sample_module
from napari_semicl.io._npe2 import sample_volume, write_labels_nifti
from napari_semicl.io.sample import SAMPLE_CLASSES, SAMPLE_IMAGE_FILE, SAMPLE_LABELS_FILE

REPO = pathlib.Path(__file__).resolve().parents[1]

#: Voxel (i, j, k) -> MNI mm of the shipped files: 2 mm, on the 1 mm template grid.
MNI_2MM_AFFINE = np.array(
    [
        [2.0, 0.0, 0.0, -76.0],
        [0.0, 2.0, 0.0, -110.0],
        [0.0, 0.0, 2.0, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
#: Shape on disk (i, j, k); napari-semicl shows it reversed.
SHAPE_IJK = (77, 94, 80)
MAX_BYTES = 2 * 1024**2


@pytest.fixture(scope="module")
def sample():
    return load_sample_volume()


def test_files_present_and_small():
    folder = sample_data_dir()
    sizes = [(folder / name).stat().st_size for name in (SAMPLE_IMAGE_FILE, SAMPLE_LABELS_FILE)]
    assert sum(sizes) < MAX_BYTES
    assert (REPO / "sample_data" / "README.md").is_file()


def test_shapes_types_and_classes(sample):
    image, labels = sample
    assert image.data.shape == labels.data.shape == SHAPE_IJK[::-1]
    assert image.data.dtype == np.uint8 and labels.data.dtype == np.uint8
    assert image.scale == labels.scale == (2.0, 2.0, 2.0)
    assert image.rgb is False
    assert image.name == "mni152_t1"
    classes, counts = np.unique(labels.data, return_counts=True)
    assert classes.tolist() == sorted(SAMPLE_CLASSES) == [0, 1, 2, 3]
    assert counts.min() > 1000  # every class is substantial


def test_labels_match_the_image(sample):
    """T1 contrast: white matter > grey matter > CSF/other > background."""
    image, labels = sample
    mean = {c: float(image.data[labels.data == c].mean()) for c in SAMPLE_CLASSES}
    assert mean[2] > mean[1] > mean[3] > mean[0]


def test_affine_is_mni(sample):
    image, labels = sample
    for name in (SAMPLE_IMAGE_FILE, SAMPLE_LABELS_FILE):
        img = nib.load(sample_data_dir() / name)
        assert img.shape == SHAPE_IJK
        np.testing.assert_array_equal(img.affine, MNI_2MM_AFFINE)
        assert int(img.header["sform_code"]) == 4  # NIFTI_XFORM_MNI_152
    np.testing.assert_array_equal(np.array(image.metadata["affine"]), MNI_2MM_AFFINE)
    np.testing.assert_array_equal(np.array(labels.metadata["affine"]), MNI_2MM_AFFINE)
    # The MNI origin (anterior commissure) lies inside the volume.
    origin_voxel = np.linalg.solve(MNI_2MM_AFFINE, [0, 0, 0, 1])[:3]
    assert np.all(origin_voxel >= 0) and np.all(origin_voxel < SHAPE_IJK)


def test_sample_round_trip(sample, tmp_path):
    image, labels = sample
    out = write_labels(tmp_path / "mni152_tissue_copy.nii.gz", labels.data, metadata=image.metadata)
    shipped = nib.load(sample_data_dir() / SAMPLE_LABELS_FILE)
    written = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(shipped.dataobj))
    np.testing.assert_array_equal(written.affine, shipped.affine)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_labels(out, like=image).data, labels.data)


def test_npe2_sample_layers(tmp_path):
    (img_data, img_attrs, img_kind), (lab_data, lab_attrs, lab_kind) = sample_volume()
    assert (img_kind, lab_kind) == ("image", "labels")
    assert lab_attrs["name"] == f"{img_attrs['name']} reference"
    assert lab_attrs["metadata"] == img_attrs["metadata"]
    assert img_attrs["rgb"] is False and "rgb" not in lab_attrs
    assert img_data.shape == lab_data.shape
    # Exporting the reference layer keeps the image geometry.
    [path] = write_labels_nifti(str(tmp_path / "reference.nii.gz"), lab_data, lab_attrs)
    np.testing.assert_array_equal(nib.load(path).affine, MNI_2MM_AFFINE)


def test_readme_carries_licence_and_citation():
    text = (REPO / "sample_data" / "README.md").read_text(encoding="utf-8")
    assert "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre" in text
    assert "provided that the above\ncopyright notice appear in all copies" in text
    assert "Copyright (c) The nilearn developers." in text
    assert "Fonov" in text and "10.1016/j.neuroimage.2010.07.033" in text


def test_missing_sample_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sample_module, "_candidate_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match=r"(?s)mni152_t1\.nii\.gz.*Searched:.*nowhere"):
        sample_data_dir()


@pytest.mark.skipif(
    not os.environ.get("NILEARN_WHEEL"),
    reason="set NILEARN_WHEEL to a nilearn-0.14.1 wheel to check that make_sample.py reproduces the files",
)
def test_make_sample_reproduces_files(tmp_path):
    import runpy

    module = runpy.run_path(str(REPO / "sample_data" / "make_sample.py"))
    module["main"]([os.environ["NILEARN_WHEEL"], "--out", str(tmp_path)])
    for name in (SAMPLE_IMAGE_FILE, SAMPLE_LABELS_FILE):
        assert (tmp_path / name).read_bytes() == (REPO / "sample_data" / name).read_bytes()
