"""A few steps of every method on real benchmark data (skips when ../shared/data is absent)."""

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.io import read_image, read_labels
from napari_semicl.methods import available_methods

from conftest import requires_shared

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def acdc_volume():
    folder = requires_shared("acdc/train")
    image = read_image(folder / "patient003_frame01.nii.gz")
    reference = read_labels(folder / "patient003_frame01_gt.nii.gz", like=image)
    return image, reference


@pytest.mark.parametrize("method", available_methods())
def test_every_method_lowers_the_loss_on_an_acdc_volume(acdc_volume, method):
    image, reference = acdc_volume
    axis = int(np.argmin(image.data.shape))
    painted = reveal_slices(reference.data, choose_reveal_slices(reference.data, 3, axis), axis)
    cfg = TrainConfig(method=method, iterations=24, refresh_every=10**6, seed=0)
    cfg.data.unpainted, cfg.data.axis, cfg.data.patch_size = "background", axis, 64
    for section in ("plgcl", "arco"):
        if hasattr(cfg, section) and hasattr(getattr(cfg, section), "warmup_steps"):
            getattr(cfg, section).warmup_steps = 4
    if method == "aua":  # stage 2 redefines the supervised loss (pseudo-labels join it): stage 1 here,
        cfg.aua.stage2_at = 1.0  # both stages in tests/test_aua.py
    trainer = Trainer(cfg, [AnnotatedPair(image.data, painted)], device=torch.device("cpu"))
    finished = run_sync(trainer.run())
    assert finished.reason == "budget", finished.error
    assert trainer.dataset.class_values == [0, 1, 2, 3]
    sup = [h["ce"] + h["dice"] for h in trainer.history]
    assert np.mean(sup[-6:]) < np.mean(sup[:6])
    assert all(np.isfinite(h["total"]) for h in trainer.history)
    assert trainer.predict(image.data).labels.shape == image.data.shape
