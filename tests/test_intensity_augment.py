"""``data.intensity_augment``: every method's labelled crops get the strong view's intensity
changes (issue 26: a network trained on a few volumes meets other contrasts; the semi-supervised
methods got them too from the cohort comparison on, so that they meet the same painted data)."""

from __future__ import annotations

import pytest
import torch

from napari_semicl.data.augment import weak_augment
from napari_semicl.data.dataset import Batch
from napari_semicl.engine import TrainConfig
from napari_semicl.errors import ConfigError
from napari_semicl.methods.mean_teacher import MeanTeacher
from napari_semicl.methods.supervised import Supervised


class _Recorder(torch.nn.Module):
    """A 'network' that records its input and predicts two constant classes."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, return_features: bool = False):
        self.seen.append(x.detach().clone())
        logits = self.bias.view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:])
        return (logits, x) if return_features else logits


METHODS = {"supervised": Supervised, "mean_teacher": MeanTeacher}


def _step(p: float, method: str = "supervised"):
    cfg = TrainConfig(method=method)
    cfg.data.intensity_augment = p
    net = _Recorder()
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 2 * 32 * 32).view(2, 1, 32, 32)
    y = (x[:, 0] > 0.5).long()
    u = None if method == "supervised" else x.flip(-1)  # Mean Teacher with unlabelled crops
    METHODS[method](cfg, net).compute_losses(Batch(x, y, u), step=0, generator=g)
    # what the network would see without the intensity changes: the same generator's weak view
    weak, weak_y = weak_augment(x, y, generator=torch.Generator().manual_seed(0))
    return net.seen[0], weak, weak_y


@pytest.mark.parametrize("method", sorted(METHODS))
def test_off_by_default_the_network_sees_the_weak_view(method):
    assert TrainConfig().data.intensity_augment == 0.0
    seen, weak, _ = _step(0.0, method)
    torch.testing.assert_close(seen, weak)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_on_the_intensities_change_but_not_the_geometry(method):
    seen, weak, _ = _step(1.0, method)
    assert seen.shape == weak.shape and not torch.allclose(seen, weak)
    # gamma, contrast and brightness keep the order of intensities along the ramp's rows
    # up to blur and noise: the image stays correlated with the weak view pixel by pixel
    corr = torch.corrcoef(torch.stack([seen.flatten(), weak.flatten()]))[0, 1]
    assert corr > 0.9


def test_the_probability_is_checked():
    cfg = TrainConfig()
    cfg.data.intensity_augment = 1.5
    with pytest.raises(ConfigError, match="intensity_augment"):
        cfg.validate()
