"""Issue 17, item 7, without Qt: the warm-up notice, readable method settings, the thread
count in the device line, and written shapes logged in the file's axis order."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Notice, Started, TrainConfig, Trainer, describe_device
from napari_semicl.engine.config import setting_help
from napari_semicl.methods.plgcl import PLGCLConfig

CPU = torch.device("cpu")


def _tiny_pair():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 32, 32)).astype(np.float32)
    reference = np.zeros((6, 32, 32), np.uint8)
    reference[:, 8:24, 8:24] = 1
    reference[:, :8] = 2
    return AnnotatedPair(image, reveal_slices(reference, [1, 4], 0))


def _first_events(trainer: Trainer) -> list:
    """The events before the first step's (Started and the notices at start)."""
    gen = trainer.run(previews=False)
    events = [next(gen)]
    while isinstance(events[-1], (Started, Notice)):
        events.append(next(gen))  # the first step's event ends the start
    gen.close()
    return events


@pytest.mark.parametrize(("iterations", "warned"), [(60, True), (150, False)])
def test_a_run_within_the_warm_up_says_so_at_start(iterations, warned, tmp_path):
    cfg = TrainConfig(method="plgcl", iterations=iterations, seed=0)
    cfg.data.patch_size = 32
    cfg.model.base_channels, cfg.model.depth = 8, 2
    trainer = Trainer(cfg, [_tiny_pair()], device=CPU)
    notices = [e.text for e in _first_events(trainer) if isinstance(e, Notice)]
    assert any("warm-up" in t for t in notices) == warned, notices
    if warned:
        assert any("100-step warm-up" in t and "step 60" in t for t in notices)


def test_plgcl_settings_have_readable_labels_and_help():
    helps = setting_help(PLGCLConfig)
    assert set(helps) == {f for f in PLGCLConfig.__dataclass_fields__}
    for name in ("beta", "gamma", "tau", "zeta", "eps"):
        label, text = helps[name]
        assert label != name and len(label) > 8, label  # words, not a bare symbol
        assert text.startswith(f"{name}: ") and len(text) > len(name) + 10, text
    assert "regularisation" in helps["beta"][1]
    assert "patch" in helps["patch_size"][0].lower() and "entropy" in helps["patch_size"][0].lower()


def test_device_line_says_the_given_thread_count():
    assert describe_device(CPU, 1, "fp32") == "CPU (1 thread, fp32)"
    assert describe_device(CPU, 3, "fp32") == "CPU (3 threads, fp32)"


def test_written_nifti_shape_is_logged_in_file_order(tmp_path, caplog):
    from napari_semicl.io import write_labels

    data = np.zeros((10, 216, 256), np.uint8)  # napari order of a (256, 216, 10) file
    data[0, 0, 0] = 1
    with caplog.at_level(logging.INFO, logger="napari_semicl.io.writers"):
        write_labels(tmp_path / "mask.nii.gz", data, metadata={"axes_reversed": True})
    import nibabel as nib

    assert nib.load(tmp_path / "mask.nii.gz").shape == (256, 216, 10)
    assert "(256, 216, 10)" in caplog.text, caplog.text
