"""predict.largest_component (issue 26): the mask keeps each class's largest 3D piece in
Trainer.predict / predict_pair, the refresh previews, the Predictor (CLI predict, Apply dock)
and the Train dock's 'Keep largest piece' box; off by default."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.engine import TrainConfig, Trainer
from napari_semicl.engine import apply as apply_mod
from napari_semicl.engine.apply import Predictor
from napari_semicl.engine.inference import Prediction
from napari_semicl.engine.refresh import volume_previews

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
SHAPE = (8, 32, 32)


def _blobs() -> np.ndarray:
    """Class 1: a 4x8x8 block (kept) and a 2x2x2 cube apart; class 2: 8 voxels and 1 apart."""
    v = np.zeros(SHAPE, dtype=np.uint8)
    v[1:5, 2:10, 2:10] = 1
    v[6:8, 25:27, 25:27] = 1
    v[0, 20:22, 2:6] = 2
    v[7, 30, 0] = 2
    return v


def _trainer(largest: bool) -> Trainer:
    cfg = TrainConfig(method="supervised", iterations=1, refresh_every=1000, seed=0)
    cfg.data.patch_size, cfg.data.batch_labelled = 32, 2
    cfg.data.unpainted = "background"
    cfg.model.base_channels, cfg.model.depth = 8, 2
    cfg.predict.largest_component = largest
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    painted = np.zeros(SHAPE, dtype=np.uint8)
    painted[2] = _blobs()[2]
    painted[2, 0:3, 0:3] = 2
    return Trainer(cfg, [AnnotatedPair(image, painted)], device=CPU)


def _counts(labels: np.ndarray) -> tuple[int, int]:
    return int((labels == 1).sum()), int((labels == 2).sum())


def test_off_by_default():
    assert TrainConfig().predict.largest_component is False


@pytest.mark.parametrize("largest, expected", [(False, (256 + 8, 8 + 1)), (True, (256, 8))])
def test_trainer_predict_and_predict_pair(monkeypatch, largest, expected):
    trainer = _trainer(largest)
    entropy = np.full(SHAPE, 0.5, np.float32)
    monkeypatch.setattr(apply_mod, "predict_volume", lambda *a, **k: Prediction(_blobs(), entropy))
    pred = trainer.predict(np.zeros(SHAPE, np.float32))
    assert _counts(pred.labels) == expected and pred.entropy is entropy
    monkeypatch.setattr(trainer.predictions, "predict_pair", lambda *a, **k: Prediction(_blobs()))
    assert _counts(trainer.predict_pair(0).labels) == expected


@pytest.mark.parametrize("largest, expected", [(False, (256 + 8, 8 + 1)), (True, (256, 8))])
def test_refresh_preview(monkeypatch, largest, expected):
    trainer = _trainer(largest)
    monkeypatch.setattr(trainer.predictions, "labels", lambda idx, p_idx: _blobs())
    masks = [e.array for e in volume_previews(trainer) if getattr(e, "kind", None) == "prediction"]
    assert len(masks) == 1 and _counts(masks[0]) == expected


def test_predictor_and_cli_predict(monkeypatch, tmp_path):
    from napari_semicl.cli import main

    trainer = _trainer(False)
    ckpt = trainer.save(tmp_path / "run" / "checkpoint.pt")
    monkeypatch.setattr(apply_mod, "predict_volume", lambda *a, **k: Prediction(_blobs()))
    cfg = trainer.config
    assert _counts(Predictor(trainer.method.student, cfg, CPU, "x").predict(np.zeros(SHAPE, np.float32)).labels) \
        == (264, 9)
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros(SHAPE, np.float32))
    for flag, expected in (([], (264, 9)), (["--largest-component"], (256, 8))):
        out = tmp_path / f"mask{len(flag)}.tif"
        assert main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--out", str(out),
                     "--device", "cpu", *flag]) == 0
        assert _counts(tifffile.imread(out)) == expected


def test_the_dock_box_sets_the_config(make_napari_viewer):
    viewer = make_napari_viewer()
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    assert train.build_config().predict.largest_component is False
    train.largest_check.setChecked(True)
    assert train.build_config().predict.largest_component is True
