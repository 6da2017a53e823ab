"""models.ops: the shared padding, entropy and window helpers against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_semicl.analysis import normalised_entropy as normalised_entropy_np
from napari_semicl.models.ops import normalised_entropy, pad_to_multiple, window_slices


@pytest.mark.parametrize(
    ("shape", "multiple", "expected"),
    [((1, 1, 5, 7), 4, (1, 1, 8, 8)), ((1, 2, 8, 8), 4, (1, 2, 8, 8)), ((3, 1, 1), 16, (3, 16, 16))],
)
def test_pad_to_multiple_pads_bottom_and_right_with_zeros(shape, multiple, expected):
    x = torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).reshape(shape)
    out = pad_to_multiple(x, multiple)
    assert tuple(out.shape) == expected
    h, w = shape[-2:]
    torch.testing.assert_close(out[..., :h, :w], x)
    assert float(out.sum()) == float(x.sum())  # the rest is zeros
    assert out.data_ptr() != x.data_ptr()  # a new tensor even without padding
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(x, 0)


def test_normalised_entropy_by_hand_and_as_the_numpy_helper():
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    got = normalised_entropy(p, dim=1)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, math.log(2) / math.log(3)]))
    maps = torch.softmax(torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    np.testing.assert_allclose(normalised_entropy(maps).numpy(), normalised_entropy_np(maps.numpy(), axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="2 classes"):
        normalised_entropy(torch.ones(3, 1), dim=1)


def test_window_slices_tile_the_plane_once():
    windows = list(window_slices(5, 7, 4))
    assert windows == [
        (slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 7)),
        (slice(4, 5), slice(0, 4)), (slice(4, 5), slice(4, 7)),
    ]
    cover = np.zeros((5, 7), int)
    for rows, cols in windows:
        cover[rows, cols] += 1
    assert (cover == 1).all()


def test_fold_batch_norm_keeps_the_outputs_and_leaves_the_network_alone():
    from napari_semicl.models.ops import fold_batch_norm
    from napari_semicl.models.unet import UNet2D

    torch.manual_seed(0)
    net = UNet2D(1, 3, base_channels=8, depth=2)
    net.train()
    with torch.no_grad():  # running statistics far from the identity (mean 0, variance 1)
        for _ in range(5):
            net(torch.randn(4, 1, 32, 32) * 3 + 2)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 2.0)
            torch.nn.init.uniform_(m.bias, -1.0, 1.0)
    net = net.to(memory_format=torch.channels_last).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norm(net)
    assert net.training  # the original keeps its mode and its modules
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 10  # 5 blocks of 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and folded.multiple == net.multiple
    first = folded.encoders[0][0]
    assert first.bias is not None and first.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = net.eval()(x)
        got = folded(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_fold_batch_norm_copies_a_network_without_batch_norm_unchanged():
    from napari_semicl.models.ops import fold_batch_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.InstanceNorm2d(2), torch.nn.ReLU())
    folded = fold_batch_norm(net)
    assert [type(m) for m in folded] == [type(m) for m in net]
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(folded(x), net.eval()(x))
