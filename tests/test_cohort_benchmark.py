"""benchmarks/cohort_transfer.py's flip averaging, benchmarks/cohort_diagnose.py's error
split and benchmarks/cohort_sampling.py's account of the training targets, on hand-made
volumes (issue 26)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cohort_diagnose import diagnose  # noqa: E402
from cohort_sampling import describe, summarise  # noqa: E402
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


def test_sampling_accounts_for_every_slice_and_finds_the_fill_s_early_end():
    from napari_semicl.data import AnnotatedPair
    from napari_semicl.data.dataset import SliceDataset
    from napari_semicl.data.reveal import reveal_slices
    from napari_semicl.engine import recommended_config
    from napari_semicl.engine.fusion import build_prior

    # a disc on slices 4-29 of 30 (radius 6), painted on 8, 14, 20: the fill's fall-off
    # (1.5 px a slice) has it gone by slice 24, the structure goes on to the last slice
    yy, xx = np.mgrid[:40, :40]
    truth = np.stack([((yy - 20) ** 2 + (xx - 20) ** 2 <= 36) & (s >= 4) for s in range(30)]).astype(np.uint8)
    pair = AnnotatedPair((truth * 100.0 + 10).astype(np.float32), reveal_slices(truth, [8, 14, 20], 0))
    cfg = recommended_config()
    cfg.prior.interpolation, cfg.prior.calibrate, cfg.prior.boundary_px, cfg.data.patch_size = "sdf", False, 0.25, 32
    dataset = SliceDataset([pair], cfg.data)
    build_prior([pair], dataset, cfg.prior, [])
    (vol,) = describe(dataset, [truth], [[8, 14, 20]], share=0.5)
    roles = [r["role"] for r in vol["slices"]]
    assert [s for s, r in enumerate(roles) if r == "painted"] == [8, 14, 20] and roles.count("dense") == 27
    assert sum(r["crop_share"] for r in vol["slices"]) == pytest.approx(1.0)
    assert vol["slices"][8]["crop_share"] == pytest.approx(0.5 / 3) and vol["slices"][0]["crop_share"] == pytest.approx(0.5 / 27)
    assert (vol["first"], vol["last"]) == (4, 29) and vol["slices"][2]["where"] == "before"
    # slices 0-3: background targets where the reference has none; 27-29: background where it has the disc
    assert all(vol["slices"][s]["bg_wrong"] == 0 and vol["slices"][s]["bg"] > 0.9 for s in range(4))
    assert all(vol["slices"][s]["bg_wrong"] == pytest.approx(truth[s].mean()) for s in (27, 28, 29))
    summary = summarise([vol])
    assert summary["before"]["slices"] == 4 and summary["after"]["slices"] == 0
    assert summary["before"]["crop_share"] == pytest.approx(4 * 0.5 / 27)
    profile = summary["dense_target_dice_profile"]
    assert profile[-1] < 0.2 < 0.9 < profile[4]  # the targets miss the structure's last tenth
