"""Weak and strong augmentation on the training device (torch, batched).

* weak view: random flips, rot90 (square crops), a small rotation; applied identically to
  image and target.
* strong view: the weak view plus, for RGB (3-channel) crops, HED stain jitter
  (:func:`hed_jitter`), then intensity perturbation (brightness, contrast, gamma),
  Gaussian blur, Gaussian noise and cutout. Being computed *from* the weak view, it stays
  pixel-aligned with it, so student (strong) and teacher (weak) predictions compare pixel by
  pixel.

Layout: images (B, C, H, W) float, targets (B, H, W) long with ``IGNORE_INDEX`` padding;
volume patches (B, C, D, H, W) and (B, D, H, W) take the same path: flips along D too,
rot90 and the small rotation in the (H, W) plane, a 3D blur and a cutout cube (see
:func:`weak_augment`, :func:`strong_augment`). All randomness comes from the ``torch.Generator`` passed in (CPU), so runs are repeatable.
"""

from __future__ import annotations

import math

import numpy as np
import skimage.color as _skcolor
import torch
import torch.nn.functional as F

from .annotation import IGNORE_INDEX


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def weak_augment(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    max_rotation_deg: float = 15.0,
    max_scale: float = 0.0,
):
    """Random flips, rot90 and a small rotation, the same for ``x`` and ``y``.

    ``max_scale`` > 0 also zooms each crop in the (H, W) plane by a factor drawn
    log-uniformly in ``[1 / (1 + max_scale), 1 + max_scale]`` (with the rotation, one
    resampling); 0 (the default) draws nothing more from ``generator``.

    ``x`` is (B, C, H, W) or, for volume patches, (B, C, D, H, W) (``y`` without C). In 3D
    the flips run along D as well; rot90 and the rotation stay in the (H, W) plane (slices
    are often thicker than pixels are wide, so D is never rotated into H or W).
    Returns ``(x_aug, y_aug)`` (``y_aug`` is None when ``y`` is None). Pixels rotated in
    from outside are 0 in the image and ``IGNORE_INDEX`` in the target.
    """
    b = x.shape[0]
    volume = x.dim() == 5
    x = x.clone()
    y = None if y is None else y.clone()
    flips_h = torch.rand(b, generator=generator) < 0.5
    flips_v = torch.rand(b, generator=generator) < 0.5
    k90 = torch.randint(0, 4, (b,), generator=generator) if x.shape[-1] == x.shape[-2] else torch.zeros(b, dtype=torch.long)
    flips_d = torch.rand(b, generator=generator) < 0.5 if volume else torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        dims = []
        if flips_h[i]:
            dims.append(-1)
        if flips_v[i]:
            dims.append(-2)
        if flips_d[i]:
            dims.append(-3)
        if dims:
            x[i] = x[i].flip(dims)
            if y is not None:
                y[i] = y[i].flip(dims)
        if k90[i]:
            x[i] = torch.rot90(x[i], int(k90[i]), dims=(-2, -1))
            if y is not None:
                y[i] = torch.rot90(y[i], int(k90[i]), dims=(-2, -1))
    if max_rotation_deg > 0 or max_scale > 0:
        angles = _uniform(b, -max_rotation_deg, max_rotation_deg, generator) * math.pi / 180
        cos, sin = torch.cos(angles), torch.sin(angles)
        if max_scale > 0:  # sampling grid shrunk by the zoom factor: content grows by it
            log_s = math.log1p(max_scale)
            zoom = torch.exp(_uniform(b, -log_s, log_s, generator))
            cos, sin = cos / zoom, sin / zoom
        theta = torch.zeros(b, 3, 4) if volume else torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        if volume:  # grid coordinates are (x, y, z) = (W, H, D): D stays where it is
            theta[:, 2, 2] = 1.0
        theta = theta.to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if y is not None:
            # shift by one so that 0 marks "outside", then nearest-neighbour resample
            y1 = (y + 1 - IGNORE_INDEX).unsqueeze(1).to(x.dtype)
            y1 = F.grid_sample(y1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
            y1 = y1.squeeze(1).round().long()
            y = torch.where(y1 == 0, torch.full_like(y1, IGNORE_INDEX), y1 - 1 + IGNORE_INDEX)
    return x, y


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) or (B, C, D, H, W) with reflect padding
    (along every spatial axis)."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    c = x.shape[1]
    r = k.numel() // 2
    nd = x.dim() - 2
    conv = {2: F.conv2d, 3: F.conv3d}[nd]
    mode = "reflect" if min(x.shape[2:]) > r else "replicate"
    for axis in range(nd):  # the last axis first, as the 2D blur always did
        shape = [1] * nd
        shape[nd - 1 - axis] = -1
        pad = [0] * (2 * nd)
        pad[2 * axis:2 * axis + 2] = [r, r]
        x = conv(F.pad(x, tuple(pad), mode=mode), k.view(1, 1, *shape).repeat(c, *[1] * (nd + 1)), groups=c)
    return x


#: Stain vectors (rows: haematoxylin, eosin, DAB) in optical density, Ruifrok & Johnston
#: (2001): scikit-image's ``rgb_from_hed`` and its inverse ``hed_from_rgb``.
RGB_FROM_HED = torch.from_numpy(np.asarray(_skcolor.rgb_from_hed, dtype=np.float64))
HED_FROM_RGB = torch.from_numpy(np.asarray(_skcolor.hed_from_rgb, dtype=np.float64))
_OD_EPS = 1e-6


def hed_jitter(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    sigma: float = 0.05,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stain augmentation in HED space (Tellez et al., 2018, doi:10.1109/TMI.2018.2820199).

    Each RGB pixel (in [0, 1]) goes to optical density ``od = -log(max(x, 1e-6))``, to
    stain concentrations ``s = od @ HED_FROM_RGB``, is perturbed per sample and stain as
    ``s * alpha + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)``,
    ``beta ~ U(-sigma, sigma)``, and goes back: ``x' = exp(-(s' @ RGB_FROM_HED))``,
    clipped to [0, 1].

    Parameters
    ----------
    x : Tensor, shape (B, 3, H, W)
        RGB crops scaled to [0, 1].
    sigma : float
        Jitter strength (0 returns the input up to rounding).
    alpha, beta : Tensor, shape (B, 3), optional
        Explicit factors and offsets (tests); drawn from ``generator`` when None.
    """
    if x.shape[1] != 3:
        raise ValueError(f"hed_jitter needs 3 RGB channels, got {x.shape[1]}")
    b = x.shape[0]
    if alpha is None:
        alpha = 1.0 + (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    if beta is None:
        beta = (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    dev, dt = x.device, x.dtype
    m_in = HED_FROM_RGB.to(dev, dt)
    m_out = RGB_FROM_HED.to(dev, dt)
    od = -torch.log(x.clamp(_OD_EPS, 1.0))  # (B, 3, H, W)
    stains = torch.einsum("bchw,cs->bshw", od, m_in)
    stains = stains * alpha.to(dev, dt).view(b, 3, 1, 1) + beta.to(dev, dt).view(b, 3, 1, 1)
    od2 = torch.einsum("bshw,sc->bchw", stains, m_out)
    return torch.exp(-od2).clamp(0.0, 1.0)


def strong_augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    stain: float = 0.05,
    brightness: float = 0.15,
    contrast: float = 0.25,
    gamma: float = 0.3,
    blur_sigma: tuple[float, float] = (0.1, 1.2),
    noise_std: float = 0.05,
    cutout: float = 0.25,
    p: float = 0.8,
) -> torch.Tensor:
    """Intensity, blur, noise and cutout perturbation of an (already weak) view.

    ``x`` is (B, C, H, W) or (B, C, D, H, W); in 3D the blur is 3D and the cutout a box of
    ``cutout`` times each side. Each perturbation is applied to a sample with probability ``p``; ``cutout`` is the side
    of the erased square as a fraction of the crop (0 disables it). For 3-channel (RGB)
    crops, HED stain jitter of strength ``stain`` (:func:`hed_jitter`; 0 disables it)
    comes first.
    """
    b = x.shape[0]
    out = x.clone()
    dev, dt = x.device, x.dtype
    per_sample = (b,) + (1,) * (x.dim() - 1)  # broadcast one value per sample
    axes = tuple(range(1, x.dim()))

    def coin() -> torch.Tensor:
        return (torch.rand(b, generator=generator) < p).to(dev, dt).view(per_sample)

    if stain > 0 and x.shape[1] == 3 and x.dim() == 4:
        m = coin()
        out = m * hed_jitter(out, generator=generator, sigma=stain) + (1 - m) * out

    lo = out.amin(dim=axes, keepdim=True)
    hi = out.amax(dim=axes, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    # gamma on the per-sample [0, 1] range, mapped back
    g = torch.exp(_uniform(b, -gamma, gamma, generator)).to(dev, dt).view(per_sample)
    m = coin()
    out = m * (((out - lo) / span).clamp(0, 1) ** g * span + lo) + (1 - m) * out
    # contrast around the mean, then brightness relative to the range
    c = _uniform(b, 1 - contrast, 1 + contrast, generator).to(dev, dt).view(per_sample)
    mean = out.mean(dim=axes, keepdim=True)
    m = coin()
    out = m * ((out - mean) * c + mean) + (1 - m) * out
    br = _uniform(b, -brightness, brightness, generator).to(dev, dt).view(per_sample)
    out = out + coin() * br * span
    # blur (one sigma per batch keeps it a single convolution), noise, cutout
    sigma = float(_uniform(1, *blur_sigma, generator))
    m = coin()
    out = m * gaussian_blur(out, sigma) + (1 - m) * out
    noise = torch.randn(out.shape, generator=generator).to(dev, dt) * noise_std
    out = out + coin() * noise * span
    if cutout > 0:
        h, w = out.shape[-2:]
        side_h, side_w = max(1, int(h * cutout)), max(1, int(w * cutout))
        do = torch.rand(b, generator=generator) < p * 0.5
        ys = torch.randint(0, h - side_h + 1, (b,), generator=generator)
        xs = torch.randint(0, w - side_w + 1, (b,), generator=generator)
        depth: tuple = ()
        if x.dim() == 5:  # a box: the same fraction of D
            d = out.shape[2]
            side_d = max(1, int(d * cutout))
            zs = torch.randint(0, d - side_d + 1, (b,), generator=generator)
        for i in torch.nonzero(do).flatten().tolist():
            if x.dim() == 5:
                depth = (slice(int(zs[i]), int(zs[i]) + side_d),)
            out[(i, slice(None), *depth, slice(ys[i], ys[i] + side_h), slice(xs[i], xs[i] + side_w))] = mean[i]
    return out
