"""Weak views keep image and target aligned; strong views stay aligned with the weak one."""

import torch

from napari_semicl.data import IGNORE_INDEX
from napari_semicl.data.augment import gaussian_blur, strong_augment, weak_augment


def _blob_batch():
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:20, 5:14] = 1.0
    x[1, :, 20:30, 20:28] = 1.0
    y = (x[:, 0] > 0.5).long()
    return x, y


def test_weak_augment_moves_image_and_target_together():
    x, y = _blob_batch()
    g = torch.Generator().manual_seed(1)
    xa, ya = weak_augment(x, y, generator=g, max_rotation_deg=0)
    assert torch.equal((xa[:, 0] > 0.5).long(), ya)  # pure flips/rot90 are exact
    xr, yr = weak_augment(x, y, generator=g, max_rotation_deg=15)
    valid = yr != IGNORE_INDEX
    agree = ((xr[:, 0] > 0.5).long() == yr)[valid].float().mean()
    assert agree > 0.97  # bilinear vs nearest differ only on edges
    assert set(torch.unique(yr).tolist()) <= {IGNORE_INDEX, 0, 1}


def test_weak_augment_is_repeatable():
    x, y = _blob_batch()
    a = weak_augment(x, y, generator=torch.Generator().manual_seed(3))
    b = weak_augment(x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_strong_augment_changes_intensities_not_geometry():
    x, _ = _blob_batch()
    xs = strong_augment(x, generator=torch.Generator().manual_seed(0), cutout=0)
    assert xs.shape == x.shape and not torch.equal(xs, x)
    # the object stays where it was: correlation with the weak view remains high
    for i in range(4):
        c = torch.corrcoef(torch.stack([x[i].flatten(), xs[i].flatten()]))[0, 1]
        assert c > 0.6


def test_gaussian_blur_preserves_constants_and_mass():
    x = torch.full((1, 2, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)
    d = torch.zeros(1, 1, 15, 15)
    d[0, 0, 7, 7] = 1
    assert abs(float(gaussian_blur(d, 1.0).sum()) - 1.0) < 1e-5


def test_weak_augment_zoom_scales_the_content_and_its_target():
    x, y = _blob_batch()
    plain = weak_augment(x, y, generator=torch.Generator().manual_seed(5))
    # max_scale=0 (the default) draws nothing more: the same views as before the option
    same = weak_augment(x, y, generator=torch.Generator().manual_seed(5), max_scale=0.0)
    assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])
    areas = []
    for seed in range(6):
        xz, yz = weak_augment(x, y, generator=torch.Generator().manual_seed(seed), max_rotation_deg=0, max_scale=0.5)
        valid = yz != IGNORE_INDEX
        assert ((xz[:, 0] > 0.5).long() == yz)[valid].float().mean() > 0.97
        areas.append((yz[0] == 1).sum().item())
    base = (y[0] == 1).sum().item()  # 108 pixels
    assert min(areas) >= base / 1.5**2 * 0.8 and max(areas) <= base * 1.5**2 * 1.2
    assert max(areas) / min(areas) > 1.3  # the zoom varies between draws
