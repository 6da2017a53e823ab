"""engine.postprocess.keep_largest_component: per class, the largest 3D component stays."""

import numpy as np

from napari_semicl.engine.postprocess import keep_largest_component


def _volume():
    v = np.zeros((6, 10, 10), dtype=np.uint8)
    v[1:4, 1:5, 1:5] = 1      # class 1, 48 voxels: kept
    v[5, 8:10, 8:10] = 1      # class 1, 4 voxels, apart: removed
    v[0, 7:9, 0:2] = 2        # class 2, 4 voxels: kept (the larger of class 2)
    v[4, 0, 9] = 2            # class 2, 1 voxel: removed
    v[1:4, 5, 1:5] = 3        # class 3 touching class 1: a class of its own, kept whole
    return v


def test_keeps_the_larger_blob_per_class():
    v = _volume()
    out = keep_largest_component(v)
    assert out.dtype == v.dtype and out.shape == v.shape
    assert (out[1:4, 1:5, 1:5] == 1).all() and (out[5, 8:10, 8:10] == 0).all()
    assert (out[0, 7:9, 0:2] == 2).all() and out[4, 0, 9] == 0
    assert (out[1:4, 5, 1:5] == 3).all()
    assert (out == 1).sum() == 48 and (out == 2).sum() == 4 and (out == 3).sum() == 12
    assert (v[5, 8:10, 8:10] == 1).all()  # the input is not changed


def test_components_are_3d_and_face_connected_by_default():
    v = np.zeros((3, 5, 5), dtype=np.int32)
    v[0, 0:2, 0:2] = 1
    v[1, 0:2, 0:2] = 1        # joined to the slice above through faces: one component of 8
    v[2, 3:5, 3:5] = 1
    v[2, 2, 2] = 1            # touches the 8 (at [1, 1, 1]) and the 4 (at [2, 3, 3]) by corners only
    out = keep_largest_component(v)
    assert (out == 1).sum() == 8 and out[2, 2, 2] == 0 and not out[2, 3:5, 3:5].any()
    full = keep_largest_component(v, connectivity=3)
    assert (full == 1).sum() == 13  # corners join all three
    v[2, 4, 0] = 7
    assert (keep_largest_component(v) == 7).sum() == 1


def test_background_value_and_empty():
    v = np.full((4, 4), 5, dtype=np.int16)
    v[0, 0] = 1
    v[3, 3] = 1
    v[1:3, 1:3] = 1
    out = keep_largest_component(v, background=5)
    assert (out == 1).sum() == 4 and out[0, 0] == 5 and out[3, 3] == 5
    assert not keep_largest_component(np.zeros((3, 3, 3), np.uint8)).any()
