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
