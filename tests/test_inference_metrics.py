"""Whole-volume inference layouts and MONAI metrics against hand computation."""

import math

import numpy as np
import pytest
import torch

from napari_semicl.engine import evaluate_segmentation, predict_volume
from napari_semicl.engine.device import describe_device, pick_device
from napari_semicl.engine.metrics import dice_per_class
from napari_semicl.models import UNet2D

CPU = torch.device("cpu")


class _Threshold(torch.nn.Module):
    """A 'network' predicting class 1 where the (normalised) input is above 0.5."""

    multiple = 16

    def forward(self, x):
        fg = (x[:, :1] > 0.5).float() * 20 - 10
        return torch.cat([-fg, fg], dim=1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_volume_keeps_the_layout_along_any_axis(axis):
    vol = np.zeros((9, 20, 33), np.float32)
    vol[2:5, 3:15, 10:30] = 1.0
    pred = predict_volume(_Threshold(), vol, class_values=[0, 7], axis=axis, device=CPU, normalise="none",
                          with_entropy=True)
    assert pred.labels.shape == vol.shape and pred.labels.dtype == np.uint8
    assert np.array_equal(pred.labels == 7, vol > 0.5)
    assert pred.entropy.shape == vol.shape and 0 <= pred.entropy.min() and pred.entropy.max() < 1e-3


def test_predict_2d_and_rgb_images():
    net = UNet2D(3, 3, base_channels=4, depth=2)
    rgb = np.random.default_rng(0).integers(0, 255, (37, 50, 3)).astype(np.uint8)
    pred = predict_volume(net, rgb, class_values=[1, 2, 5], rgb=True, device=CPU, with_entropy=True)
    assert pred.labels.shape == (37, 50) and set(np.unique(pred.labels)) <= {1, 2, 5}
    assert pred.entropy.shape == (37, 50) and 0 <= pred.entropy.min() <= pred.entropy.max() <= 1


def test_uniform_prediction_has_entropy_one():
    class Uniform(torch.nn.Module):
        multiple = 16

        def forward(self, x):
            return torch.zeros(x.shape[0], 4, *x.shape[2:])

    pred = predict_volume(Uniform(), np.zeros((2, 16, 16), np.float32), class_values=[0, 1, 2, 3],
                          device=CPU, with_entropy=True)
    np.testing.assert_allclose(pred.entropy, 1.0, atol=1e-6)


def test_metrics_against_hand_computation():
    ref = np.zeros((1, 10, 10), np.uint8)
    ref[0, 2:6, 2:6] = 1          # 16 voxels
    pred = np.zeros_like(ref)
    pred[0, 2:6, 3:7] = 1         # shifted by one column: overlap 12
    out = evaluate_segmentation(pred, ref)
    assert out["classes"]["1"]["dice"] == pytest.approx(2 * 12 / 32)
    assert out["classes"]["1"]["hd95"] == pytest.approx(1.0)
    assert out["mean"]["dice"] == pytest.approx(0.75)
    # spacing scales distances
    scaled = evaluate_segmentation(pred, ref, spacing=(1.0, 1.0, 2.0))
    assert scaled["classes"]["1"]["hd95"] == pytest.approx(2.0)
    # a class missing from the prediction: Dice 0, distances undefined (null)
    missing = evaluate_segmentation(np.zeros_like(ref), ref)
    assert missing["classes"]["1"]["dice"] == 0.0 and missing["classes"]["1"]["hd95"] is None
    assert dice_per_class(pred, ref, [0, 1]) == {"1": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="differs from reference shape"):
        evaluate_segmentation(pred[:, :5], ref)


def test_device_choice_falls_back_to_cpu_and_says_so():
    dev = pick_device("auto")
    assert dev.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert pick_device("cuda").type in {"mps", "cpu"}
    assert describe_device(torch.device("cpu")).startswith("CPU (")
    with pytest.raises(ValueError, match="device must be one of"):
        pick_device("tpu")


def test_unet_rejects_sizes_it_cannot_pool():
    net = UNet2D(1, 2, base_channels=4, depth=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.zeros(1, 1, 20, 24))
    logits, feats = net(torch.zeros(2, 1, 16, 24), return_features=True)
    assert logits.shape == (2, 2, 16, 24) and feats.shape == (2, 4, 16, 24)
    assert math.isfinite(float(logits.sum()))
