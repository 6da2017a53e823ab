"""Annotation semantics: labelled slices, the class table, ignored pixels, revealing."""

import numpy as np
import pytest

from napari_semicl.data import IGNORE_INDEX, AnnotatedPair, SliceDataset, build_class_table, encode_targets
from napari_semicl.data import labelled_slice_indices
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.engine.config import DataConfig
from napari_semicl.errors import DataError


def test_a_slice_with_any_painted_pixel_is_labelled():
    lab = np.zeros((5, 4, 4), np.uint8)
    lab[1, 0, 0] = 3
    lab[3] = 1
    assert labelled_slice_indices(lab, 0).tolist() == [1, 3]
    assert labelled_slice_indices(lab, 1).tolist() == [0, 1, 2, 3]
    assert labelled_slice_indices(np.zeros((4, 4), int)).tolist() == []


def test_class_table_and_its_errors():
    assert build_class_table([np.array([[0, 2], [5, 2]])]) == [2, 5]
    assert build_class_table([np.array([[0, 2]])], "background") == [0, 2]
    with pytest.raises(DataError, match="no painted pixels"):
        build_class_table([np.zeros((2, 2), int)])
    with pytest.raises(DataError, match="only one class is painted"):
        build_class_table([np.array([[0, 4]])])


def test_unpainted_pixels_are_ignored_unless_background():
    lab = np.array([[0, 1], [2, 7]])
    ignore = encode_targets(lab, [1, 2], "ignore")
    assert ignore.tolist() == [[IGNORE_INDEX, 0], [1, IGNORE_INDEX]]  # 7: not in the table
    background = encode_targets(lab, [0, 1, 2], "background")
    assert background.tolist() == [[0, 1], [2, IGNORE_INDEX]]


def test_dataset_splits_slices_and_keeps_validation_out():
    img = np.random.default_rng(0).random((6, 20, 20)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1, :5] = 1
    lab[1, 5:] = 2
    lab[4, :3] = 2
    lab[4, 3:] = 1
    cfg = DataConfig(patch_size=16)
    ds = SliceDataset([AnnotatedPair(img, lab, validation_slices=(4,))], cfg)
    assert ds.labelled == [(0, 1)]
    assert ds.validation == [(0, 4)]
    assert (0, 4) not in ds.unlabelled and len(ds.unlabelled) == 4
    assert cfg.class_values == [1, 2]
    x, y = ds.sample_labelled(3, np.random.default_rng(0))
    assert x.shape == (3, 1, 16, 16) and y.shape == (3, 16, 16)
    assert set(np.unique(y)) <= {IGNORE_INDEX, 0, 1}


def test_dataset_errors_name_the_problem():
    img = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(DataError, match="no labelled slice"):
        SliceDataset([AnnotatedPair(img, np.zeros(img.shape, np.uint8))], DataConfig())
    with pytest.raises(DataError, match=r"labels shape \(3, 16, 8\) does not match"):
        SliceDataset([AnnotatedPair(img, np.zeros((3, 16, 8), np.uint8))], DataConfig())
    with pytest.raises(DataError, match="only 2D images and 3D volumes"):
        SliceDataset([AnnotatedPair(np.zeros((2, 3, 16, 16)), None)], DataConfig())
    with pytest.raises(DataError, match="no image"):
        SliceDataset([], DataConfig())


def test_reveal_slices_evenly_over_foreground():
    ref = np.zeros((20, 3, 3), np.uint8)
    ref[5:16] = 2
    assert choose_reveal_slices(ref, 3, 0) == [5, 10, 15]
    painted = reveal_slices(ref, [5, 10], 0)
    assert labelled_slice_indices(painted, 0).tolist() == [5, 10]
    with pytest.raises(DataError):
        choose_reveal_slices(np.zeros((4, 2, 2)), 2, 0)


@pytest.mark.parametrize("values, dtype", [([0, 1, 255], np.uint8), ([0, 300], np.uint16), ([0, 70000], np.int32)])
def test_decoded_labels_take_the_smallest_dtype_that_fits(values, dtype):
    from napari_semicl.data import decode_classes, decoded_dtype

    decoded = decode_classes(np.array([[0, len(values) - 1]]), values)
    assert decoded_dtype(values) == decoded.dtype == dtype
    assert decoded.tolist() == [[values[0], values[-1]]]
