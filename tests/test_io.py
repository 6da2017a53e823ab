"""Tests for napari_semicl.io: readers, writers, atomic writes and the npe2 glue."""

from __future__ import annotations

import copy
import gzip
import importlib
import logging
import os
import pathlib
import pickle

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_semicl.io import (
    ImageData,
    ReadError,
    WriteError,
    atomic_path,
    atomic_write,
    is_labels_file,
    read_image,
    read_labels,
    write_labels,
)
from napari_semicl.io._npe2 import get_reader, write_labels_nifti, write_labels_tiff
from napari_semicl.io.atomic import full_suffix

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx = np.cos(ax), np.sin(ax)
    cy, sy = np.cos(ay), np.sin(ay)
    cz, sz = np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """Anisotropic spacing (0.7, 1.1, 3.5) mm, rotated, with an offset."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.1, -0.25, 0.4) @ np.diag([0.7, 1.1, 3.5])
    affine[:3, 3] = [-91.5, 12.25, 40.0]
    return affine


@pytest.fixture
def nifti_path(tmp_path, oblique_affine) -> pathlib.Path:
    """A float32 volume, shape (i, j, k) = (9, 7, 5), with header fields set."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=(9, 7, 5)).astype(np.float32)
    img = nib.Nifti1Image(data, oblique_affine)
    img.header["descrip"] = b"napari-semicl round trip"
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.header.set_sform(oblique_affine, code="scanner")
    img.header.set_qform(oblique_affine, code="aligned")
    path = tmp_path / "patient_01.nii.gz"
    nib.save(img, path)
    return path


def _files(folder: pathlib.Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- NIfTI


def test_nifti_read_reverses_axes_and_spacing(nifti_path, oblique_affine):
    image = read_image(nifti_path)
    source = nib.load(nifti_path)
    assert image.data.shape == (5, 7, 9)
    np.testing.assert_array_equal(image.data, np.asanyarray(source.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(image.scale, (3.5, 1.1, 0.7), rtol=1e-6)
    assert image.rgb is False
    assert image.name == "patient_01"
    meta = image.metadata
    assert meta["format"] == "nifti"
    assert meta["source_path"] == str(nifti_path)
    assert meta["spacing"] == image.scale
    assert meta["axes_reversed"] is True
    assert meta["nifti_version"] == 1
    assert isinstance(meta["nifti_header"], bytes)
    np.testing.assert_allclose(np.array(meta["affine"]), oblique_affine, atol=1e-5)
    assert all(isinstance(v, float) for row in meta["affine"] for v in row)


def test_nifti_labels_round_trip_keeps_geometry_and_header(nifti_path, tmp_path):
    image = read_image(nifti_path)
    labels = np.zeros(image.data.shape, dtype=np.int64)
    labels[1:3, 2:5, 3:8] = 1
    labels[4, :, :2] = 2

    out = write_labels(tmp_path / "patient_01_seg.nii.gz", labels, metadata=image.metadata)

    source, written = nib.load(nifti_path), nib.load(out)
    assert written.shape == source.shape == (9, 7, 5)  # original (i, j, k) order
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.transpose(2, 1, 0))
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8
    assert written.header["descrip"] == source.header["descrip"]
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    assert int(written.header["qform_code"]) == int(source.header["qform_code"])
    np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms())
    assert written.header.get_slope_inter() == (None, None)
    assert written.header.get_intent()[0] == "label"

    # And napari-semicl reads the result back as labels on the image grid.
    back = read_labels(out, like=image)
    np.testing.assert_array_equal(back.data, labels)
    assert back.data.dtype == np.uint8


@pytest.mark.parametrize(
    ("high", "low", "dtype"),
    [(255, 0, np.uint8), (256, 0, np.uint16), (70000, 0, np.int32), (3, -1, np.int32)],
)
def test_nifti_label_dtype_rule(tmp_path, high, low, dtype):
    labels = np.zeros((4, 5, 6), dtype=np.int64)
    labels[0, 0, 0], labels[1, 1, 1] = high, low
    out = write_labels(tmp_path / "lab.nii", labels)
    written = nib.load(out)
    assert written.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


def test_nifti_write_without_metadata_uses_identity(tmp_path):
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = write_labels(tmp_path / "plain.nii.gz", labels)
    written = nib.load(out)
    assert written.shape == (2, 3, 4)  # axes as given
    np.testing.assert_array_equal(written.affine, np.eye(4))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


def test_nifti2_and_singleton_4d(tmp_path, oblique_affine):
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2, 1)
    img = nib.Nifti2Image(data, oblique_affine)
    path = tmp_path / "vol.nii"
    nib.save(img, path)
    image = read_image(path)
    assert image.data.shape == (2, 3, 4)
    assert image.metadata["nifti_version"] == 2
    out = write_labels(tmp_path / "vol_seg.nii", image.data > 5, metadata=image.metadata)
    written = nib.load(out)
    assert isinstance(written, nib.Nifti2Image)
    assert written.shape == (4, 3, 2)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data[..., 0] > 5)
    np.testing.assert_allclose(written.affine, img.affine)


def test_float_image_with_nan_is_kept_and_warned(tmp_path, caplog):
    data = np.ones((3, 4, 5), dtype=np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with caplog.at_level(logging.WARNING, logger="napari_semicl.io"):
        image = read_image(path)
    assert np.isnan(image.data).sum() == 1 and np.isinf(image.data).sum() == 1
    assert any("NaN/Inf" in r.getMessage() and "nan.nii.gz" in r.getMessage() for r in caplog.records)


def test_float_labels_cast_and_fractional_refused(tmp_path):
    integral = np.zeros((3, 4, 5), dtype=np.float32)
    integral[0, 1, 2] = 2.0
    nib.save(nib.Nifti1Image(integral, np.eye(4)), tmp_path / "ok_seg.nii.gz")
    labels = read_labels(tmp_path / "ok_seg.nii.gz")
    assert labels.data.dtype == np.uint8
    assert labels.data[2, 1, 0] == 2

    fractional = integral.copy()
    fractional[1, 1, 1] = 0.4
    nib.save(nib.Nifti1Image(fractional, np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(ReadError, match="prob.nii.gz.*fractional"):
        read_labels(tmp_path / "prob.nii.gz")


# --------------------------------------------------------------------------- TIFF / PNG


def test_tiff_stack_round_trip(tmp_path):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) * 100
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    image = read_image(path)
    assert image.data.shape == (3, 4, 5)
    assert image.data.dtype == np.uint16
    assert image.rgb is False
    assert image.scale == (1.0, 1.0, 1.0)
    assert image.metadata["format"] == "tiff"
    np.testing.assert_array_equal(image.data, stack)

    labels = (stack > 2000).astype(np.int32) + (stack > 4000)
    out = write_labels(tmp_path / "stack_labels.tiff", labels, metadata=image.metadata)
    back = tifffile.imread(out)
    assert back.shape == (3, 4, 5)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert is_labels_file(out)
    np.testing.assert_array_equal(read_labels(out, like=image).data, labels)


def test_tiff_resolution_in_cm_becomes_mm(tmp_path):
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, np.zeros((6, 8), np.uint8), resolution=(20.0, 40.0), resolutionunit="CENTIMETER")
    image = read_image(path)
    np.testing.assert_allclose(image.scale, (0.25, 0.5))  # (Y, X) in mm


def test_rgb_tiff_and_rgba_png(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", rgb, photometric="rgb")
    image = read_image(tmp_path / "photo.tif")
    assert image.rgb is True
    assert image.data.shape == (6, 7, 3)
    assert image.scale == (1.0, 1.0)
    np.testing.assert_array_equal(image.data, rgb)

    rgba = np.concatenate([rgb, np.full((6, 7, 1), 128, np.uint8)], axis=-1)
    iio.imwrite(tmp_path / "photo.png", rgba)
    image = read_image(tmp_path / "photo.png")
    assert image.rgb is True
    assert image.data.shape == (6, 7, 3)
    assert image.data.dtype == np.uint8
    assert image.metadata["format"] == "png"
    np.testing.assert_array_equal(image.data, rgb)


def test_grey_png_and_jpeg(tmp_path):
    grey = (np.arange(48, dtype=np.uint8).reshape(6, 8) * 5).astype(np.uint8)
    iio.imwrite(tmp_path / "grey.png", grey)
    image = read_image(tmp_path / "grey.png")
    assert image.data.shape == (6, 8)
    assert image.data.dtype == np.uint8
    assert image.rgb is False
    assert image.scale == (1.0, 1.0)
    np.testing.assert_array_equal(image.data, grey)

    iio.imwrite(tmp_path / "grey.jpg", np.repeat(grey[..., None], 3, axis=-1))
    image = read_image(tmp_path / "grey.jpg")
    assert image.metadata["format"] == "jpeg"
    assert image.data.shape[:2] == (6, 8)


def test_png_labels_and_palette(tmp_path):
    from PIL import Image

    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:5] = 2
    iio.imwrite(tmp_path / "slice_mask.png", mask)
    assert is_labels_file(tmp_path / "slice_mask.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "slice_mask.png").data, mask)

    palette = Image.fromarray(mask, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    palette.save(tmp_path / "slice_label.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "slice_label.png").data, mask)


# --------------------------------------------------------------------------- safety of writes


def test_overwrite_refused_leaves_file_identical(tmp_path):
    path = tmp_path / "mask.nii.gz"
    write_labels(path, np.ones((3, 4, 5), np.uint8))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_labels(path, np.zeros((3, 4, 5), np.uint8))
    assert path.read_bytes() == before
    assert _files(tmp_path) == {"mask.nii.gz"}

    write_labels(path, np.zeros((3, 4, 5), np.uint8), overwrite=True)
    assert not np.asanyarray(nib.load(path).dataobj).any()


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.tif"])
def test_failed_write_leaves_no_temp_and_old_file(tmp_path, monkeypatch, name):
    path = tmp_path / name
    write_labels(path, np.ones((3, 4, 5), np.uint8))
    before = path.read_bytes()
    seen = []

    def broken_writer(*args, **kwargs):
        target = pathlib.Path(args[1] if name.endswith(".nii.gz") else args[0])
        seen.append(target)
        target.write_bytes(b"half a file")  # the library got halfway...
        raise OSError("disk full")  # ...and failed

    if name.endswith(".nii.gz"):
        monkeypatch.setattr(nib, "save", broken_writer)
    else:
        monkeypatch.setattr(tifffile, "imwrite", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        write_labels(path, np.zeros((3, 4, 5), np.uint8), overwrite=True)
    assert seen and seen[0].parent == tmp_path
    assert full_suffix(seen[0]) == full_suffix(path)  # libraries see the real format
    assert path.read_bytes() == before
    assert _files(tmp_path) == {name}


def test_atomic_helpers(tmp_path):
    target = tmp_path / "case.001.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_bytes(b"abc")
    assert target.read_bytes() == b"abc"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600) or os.name != "posix"

    with pytest.raises(FileExistsError, match="another file name"):
        atomic_write(target, lambda p: p.write_bytes(b"new"), overwrite=False)
    assert target.read_bytes() == b"abc"

    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"abc"
    assert _files(tmp_path) == {"case.001.nii.gz"}

    assert full_suffix("a.b.TIF") == ".TIF"
    assert full_suffix("noext") == ""


def test_write_errors(tmp_path):
    with pytest.raises(WriteError, match=r"\.nii\.gz.*\.tif"):
        write_labels(tmp_path / "mask.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(WriteError, match="fractional"):
        write_labels(tmp_path / "mask.tif", np.full((3, 3), 0.5))
    assert _files(tmp_path) == set()


# --------------------------------------------------------------------------- bad input


def test_truncated_nifti_gz(nifti_path, tmp_path):
    broken = tmp_path / "broken_scan.nii.gz"
    broken.write_bytes(nifti_path.read_bytes()[: nifti_path.stat().st_size // 2])
    with pytest.raises(ReadError, match="broken_scan.nii.gz"):
        read_image(broken)


def test_truncated_nifti_gz_with_intact_header(tmp_path):
    """Cut inside the voxel data: the header parses, the voxels do not."""
    data = np.random.default_rng(2).normal(size=(40, 40, 40)).astype(np.float32)
    whole = tmp_path / "whole.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), whole)
    broken = tmp_path / "cut_scan.nii.gz"
    broken.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ReadError, match=r"cut_scan\.nii\.gz.*truncated"):
        read_image(broken)


def test_truncated_uncompressed_nifti(tmp_path):
    path = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ReadError, match="short.nii"):
        read_image(path)


def test_text_file_named_nii(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 30)
    with pytest.raises(ReadError, match="notes.nii"):
        read_image(path)


def test_gzipped_garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(ReadError, match="garbage.nii.gz"):
        read_image(path)


def test_4d_volume_refused(tmp_path):
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), path)
    with pytest.raises(ReadError, match=r"bold\.nii\.gz.*only 2D and 3D.*axis 3"):
        read_image(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ReadError, match="does not exist"):
        read_image(tmp_path / "nothing.nii.gz")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ReadError, match=r"table\.csv.*\.nii\.gz"):
        read_image(tmp_path / "table.csv")
    with pytest.raises(ValueError, match="kind"):
        read_image(tmp_path / "table.csv", kind="mask")


def test_labels_shape_mismatch_names_both_shapes(nifti_path, tmp_path):
    image = read_image(nifti_path)
    nib.save(nib.Nifti1Image(np.zeros((9, 7, 4), np.uint8), np.eye(4)), tmp_path / "other_gt.nii.gz")
    with pytest.raises(ValueError, match=r"\(4, 7, 9\).*\(5, 7, 9\)") as info:
        read_labels(tmp_path / "other_gt.nii.gz", like=image)
    assert not isinstance(info.value, ReadError)
    assert "other_gt.nii.gz" in str(info.value)


def test_is_labels_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "a_GT.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "b_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "c.nii.gz")
    tifffile.imwrite(tmp_path / "d_labels.tif", np.zeros((3, 3), np.uint16))
    assert is_labels_file(tmp_path / "a_GT.nii.gz")
    assert not is_labels_file(tmp_path / "b_seg.nii.gz")  # float: an image
    assert not is_labels_file(tmp_path / "c.nii.gz")
    assert is_labels_file(tmp_path / "d_labels.tif")
    assert not is_labels_file(tmp_path / "missing_mask.nii.gz")
    assert not is_labels_file(tmp_path / "x_mask.txt")


# --------------------------------------------------------------------------- npe2 glue


def test_get_reader_rejects_unsupported(tmp_path):
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.tif")]) is None
    assert get_reader([]) is None


def test_get_reader_layer_types(nifti_path, tmp_path):
    image = read_image(nifti_path)
    gt = tmp_path / "patient_01_gt.nii.gz"
    write_labels(gt, image.data > 100, metadata=image.metadata)

    reader = get_reader(str(nifti_path))
    assert callable(reader)
    [(data, attrs, kind)] = reader(str(nifti_path))
    assert kind == "image"
    assert data.shape == (5, 7, 9)
    assert set(attrs) == {"name", "scale", "metadata", "rgb"}
    assert attrs["name"] == "patient_01" and attrs["rgb"] is False
    np.testing.assert_allclose(attrs["scale"], image.scale)

    [(data, attrs, kind)] = get_reader(str(gt))(str(gt))
    assert kind == "labels"
    assert set(attrs) == {"name", "scale", "metadata"}
    assert attrs["name"] == "patient_01_gt"
    assert np.issubdtype(data.dtype, np.integer)

    layers = get_reader([str(nifti_path), str(gt)])([str(nifti_path), str(gt)])
    assert [kind for _, _, kind in layers] == ["image", "labels"]


def test_reader_raises_read_error_on_broken_file(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"not gzip at all")
    reader = get_reader(str(path))
    assert reader is not None
    with pytest.raises(ReadError, match="bad.nii.gz"):
        reader(str(path))


def test_npe2_writers(nifti_path, tmp_path):
    [(data, attrs, _)] = get_reader(str(nifti_path))(str(nifti_path))
    labels = (data > 100).astype(np.uint8)
    target = tmp_path / "export.nii.gz"
    target.write_bytes(b"old")  # napari's dialog already confirmed the overwrite
    written = write_labels_nifti(str(target), labels, {"metadata": attrs["metadata"], "scale": attrs["scale"]})
    assert written == [str(target)]
    np.testing.assert_array_equal(nib.load(target).affine, nib.load(nifti_path).affine)

    # Without napari-semicl metadata the layer scale becomes the voxel size.
    [path] = write_labels_nifti(str(tmp_path / "noext"), labels, {"metadata": {}, "scale": (3.0, 2.0, 1.0)})
    assert path.endswith("noext.nii.gz")
    np.testing.assert_allclose(nib.load(path).header.get_zooms(), (3.0, 2.0, 1.0))

    [path] = write_labels_tiff(str(tmp_path / "export.tiff"), labels, {"metadata": attrs["metadata"]})
    np.testing.assert_array_equal(tifffile.imread(path), labels)


def test_metadata_survives_layers_and_copies(nifti_path, tmp_path):
    image = read_image(nifti_path)
    clone = copy.deepcopy(image.metadata)
    assert clone == image.metadata
    assert pickle.loads(pickle.dumps(image.metadata)) == image.metadata

    napari_layers = pytest.importorskip("napari.layers")
    [layer_data] = get_reader(str(nifti_path))(str(nifti_path))
    layer = napari_layers.Layer.create(*layer_data)
    labels_layer = napari_layers.Labels(np.zeros(layer.data.shape, np.uint8), metadata=dict(layer.metadata))
    labels_layer.data[0, 1, 2] = 3
    out = write_labels(tmp_path / "from_layer.nii.gz", labels_layer.data, metadata=labels_layer.metadata)
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, nib.load(nifti_path).affine)
    assert np.asanyarray(written.dataobj)[2, 1, 0] == 3


def test_manifest_is_valid_and_every_command_imports():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(REPO / "napari_semicl" / "napari.yaml")
    ids = {cmd.id for cmd in manifest.contributions.commands}
    assert all(cid.startswith("napari-semicl.") for cid in ids)
    used = {r.command for r in manifest.contributions.readers}
    used |= {w.command for w in manifest.contributions.writers}
    used |= {s.command for s in manifest.contributions.sample_data}
    used |= {w.command for w in manifest.contributions.widgets}
    assert used <= ids
    for cmd in manifest.contributions.commands:
        module, _, func = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), cmd.python_name
    # the installed package exposes the same manifest under the napari.manifest entry point
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="napari.manifest")}
    assert "napari_semicl:napari.yaml" in names


def test_io_does_not_import_napari_or_qt():
    root = REPO / "napari_semicl" / "io"
    for source in root.glob("*.py"):
        text = source.read_text()
        for name in ("import napari", "from napari ", "qtpy", "PyQt", "magicgui"):
            assert name not in text, f"{source.name} mentions {name!r}"


def test_image_data_is_a_plain_dataclass():
    item = ImageData(data=np.zeros((2, 2)), scale=(1.0, 1.0), metadata={}, rgb=False, name="x")
    assert item.name == "x" and item.scale == (1.0, 1.0)
