"""benchmarks/cohort_transfer.py's flip averaging and benchmarks/cohort_diagnose.py's error
split, on hand-made volumes (issue 26)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cohort_diagnose import diagnose  # noqa: E402
from cohort_transfer import FlipAveraged  # noqa: E402


class _Shift(torch.nn.Module):
    """Foreground logit = the pixel to the right's value: not flip-equivariant."""

    spatial_dims, multiple = 2, 1

    def forward(self, x):
        right = torch.roll(x[:, :1], shifts=-1, dims=-1)
        return torch.cat([-right, right], dim=1) * 20


def test_flip_averaging_is_the_mean_softmax_over_four_flips():
    x = torch.randn(2, 1, 6, 7)
    model = _Shift()
    logp = FlipAveraged(model)(x)
    expected = torch.zeros(2, 2, 6, 7)
    for dims in ((), (-1,), (-2,), (-2, -1)):
        p = model(x.flip(dims) if dims else x).softmax(1)
        expected += (p.flip(dims) if dims else p) / 4
    assert torch.allclose(logp.softmax(1), expected, atol=1e-5)
    conv = torch.nn.Conv2d(1, 2, 1)  # pointwise: flips change nothing
    conv.spatial_dims = 2
    assert torch.allclose(FlipAveraged(conv)(x).softmax(1), conv(x).softmax(1), atol=1e-5)


def test_diagnose_splits_the_errors():
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[3:7, 5:15, 5:15] = 1                       # the structure: slices 3-6, 400 voxels
    pred = ref.copy()
    pred[3:7, 5:15, 15:17] = 1                     # too wide, joined: 80 voxels
    pred[4, 0:2, 0:2] = 1                          # a blob apart inside the range: 4 voxels
    pred[0, 8:10, 8:10] = 1                        # past the first end: 4 voxels
    pred[9, 8:10, 8:10] = 1                        # past the last end: 4 voxels
    pred[6, 5:15, 5:15] = 0                        # the last slice missed (left empty): 100 voxels
    pred[6, 5:15, 15:17] = 0
    d = diagnose(pred, ref, axis=0)
    assert (d["ref_first"], d["ref_last"], d["pred_first"], d["pred_last"]) == (3, 6, 0, 9)
    assert d["fp_before"] == 4 and d["fp_after"] == 4 and d["fp_blobs"] == 4 and d["fp_edge"] == 60
    assert d["fn"] == 100 and d["fn_ends"] == 100 and d["fn_empty_slices"] == 100 and d["empty_slices_in_range"] == 1
    tp = 300
    assert d["dice"] == pytest.approx(2 * tp / (pred.sum() + ref.sum()))
    assert d["dice_without_fp"] == pytest.approx(2 * tp / (tp + 400))
    assert d["dice_without_fp_beyond"] == pytest.approx(2 * tp / (pred.sum() - 8 + 400))
    # moved to the other axis: the same figures
    assert diagnose(np.moveaxis(pred, 0, 2), np.moveaxis(ref, 0, 2), axis=2)["fp_edge"] == 60
