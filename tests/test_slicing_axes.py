"""Issue 27: every slicing axis gives what axis 0 gives on the transposed volume, for the
fill inside training (the prior, its dense targets) and the trained network's fused mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.io.sample import load_sample_volume

from test_prior import _config as prior_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
PAINTED = [3, 11, 20]


@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[28:52, 8:72, 10:74].astype(np.float32), reference.data[28:52, 8:72, 10:74]


def _config(axis: int) -> TrainConfig:
    cfg = prior_config("supervised", iterations=2, interpolation="flow")
    cfg.data.axis = axis
    return cfg


@pytest.mark.parametrize("axis", [1, 2])
def test_training_with_the_flow_prior_on_any_axis_equals_axis_0_transposed(brain, axis):
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    ref = Trainer(_config(0), [AnnotatedPair(image, painted)], device=CPU)
    moved = Trainer(_config(axis), [AnnotatedPair(np.moveaxis(image, 0, axis), np.moveaxis(painted, 0, axis))],
                    device=CPU)
    # the prior is kept in slice layout (slicing axis first): the same arrays
    assert ref.prior is not None and moved.prior is not None
    np.testing.assert_array_equal(moved.prior.mask(0), ref.prior.mask(0))
    np.testing.assert_array_equal(moved.prior.slice_distance(0), ref.prior.slice_distance(0))
    assert set(moved.dataset.dense_targets) == set(ref.dataset.dense_targets)
    for key in ref.dataset.dense_targets:
        np.testing.assert_array_equal(moved.dataset.dense_targets[key], ref.dataset.dense_targets[key])
    # it trains, and the fused mask comes back in the volume's own layout, painted slices exact
    run_sync(moved.run(previews=False))
    fused = moved.predict_pair(0).labels
    assert fused.shape == np.moveaxis(image, 0, axis).shape
    for s in PAINTED:
        np.testing.assert_array_equal(np.take(fused, s, axis=axis), reference[s])
    np.testing.assert_array_equal(moved.prior_mask(0), np.moveaxis(ref.prior_mask(0), 0, axis))
