"""A method is one module plus one registry line (issue 19, item 1): a tiny method class
registered from this test trains from the CLI and from the Train dock (opened the way napari
opens it), with its own settings, without editing any project module."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from napari_semicl.engine import TrainConfig
from napari_semicl.errors import ConfigError
from napari_semicl.methods import _REGISTRY, available_methods, register_method
from napari_semicl.methods.base import Method
from napari_semicl.methods.losses import supervised_loss


@dataclass
class TinyConfig:
    """Settings of the tiny test method.

    weight : factor on the supervised loss.
    """

    weight: float = 1.0

    def validate(self, path: str = "tiny") -> None:
        if self.weight <= 0:
            raise ConfigError(f"{path}.weight must be > 0, got {self.weight}")


class Tiny(Method):
    """Supervised loss times a weight: the smallest complete method."""

    name = "tiny"
    config_class = TinyConfig
    cli_settings = ("weight",)

    def compute_losses(self, batch, *, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        w = self.config.tiny.weight
        return {k: w * v for k, v in supervised_loss(self.student(batch.x_l), batch.y_l).items()}


@pytest.fixture
def tiny():
    register_method(Tiny)
    yield Tiny
    _REGISTRY.pop("tiny", None)


def test_the_config_carries_a_registered_methods_settings(tiny):
    cfg = TrainConfig(method="tiny")
    assert cfg.tiny.weight == 1.0
    cfg.tiny.weight = 0.25
    data = json.loads(cfg.to_json())
    assert data["tiny"] == {"weight": 0.25} and "method_sections" not in data
    again = TrainConfig.from_json(cfg.to_json())
    assert again.tiny.weight == 0.25 and again == cfg
    with pytest.raises(ConfigError, match="tiny.weight must be > 0"):
        TrainConfig.from_dict({**data, "tiny": {"weight": -1.0}})
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({**data, "nomethod": {}})


def test_a_registered_method_trains_from_the_cli(tiny, tmp_path):
    from napari_semicl.cli import main
    from napari_semicl.data.reveal import reveal_slices
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir

    image, reference = load_sample_volume()
    labels = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0),
                          metadata=image.metadata)
    out = tmp_path / "run"
    assert "tiny" in available_methods()
    code = main(["-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(labels),
                 "--method", "tiny", "--weight", "0.5", "--set", "data.patch_size=32", "--iterations", "2",
                 "--unpainted", "background", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "tiny" and config["tiny"] == {"weight": 0.5} and config["data"]["patch_size"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and {"ce", "dice"} <= set(metrics["losses"])
    assert (out / "prediction.nii.gz").is_file()


@pytest.mark.gui
@pytest.mark.usefixtures("one_torch_thread")
def test_a_registered_method_trains_from_the_dock(tiny, make_napari_viewer, qtbot, tmp_path):
    pytest.importorskip("napari")
    from napari_semicl.engine.events import Finished
    from napari_semicl.io.sample import load_sample_volume

    viewer = make_napari_viewer()
    image, reference = load_sample_volume()
    viewer.add_image(image.data[28:40].copy(), name="t1")
    painted = np.zeros(image.data[28:40].shape, np.uint16)
    painted[[2, 9]] = reference.data[28:40][[2, 9]]
    viewer.add_labels(painted, name="painted")
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    train.set_pair(0, viewer.layers["t1"], viewer.layers["painted"])
    train.background_check.setChecked(True)
    train.method_combo.setCurrentText("tiny")
    assert train.method_combo.currentText() == "tiny"
    assert train.method_settings is not None and train.method_settings_box.isVisibleTo(train)
    weight = train.method_settings.findChild(type(train.lr_spin), "weight")
    weight.setValue(0.5)
    train.iterations_spin.setValue(2)
    train.patch_spin.setValue(32)
    train.run_folder_edit.setText(str(tmp_path / "run"))
    cfg = train.build_config()
    assert cfg.method == "tiny" and cfg.tiny.weight == 0.5
    finished = []
    train.event_received.connect(lambda e: finished.append(e) if isinstance(e, Finished) else None)
    assert train.start_training()
    qtbot.waitUntil(lambda: bool(finished) and not train.is_training, timeout=120_000)
    assert finished[0].reason == "budget" and train.trainer.step == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["tiny"] == {"weight": 0.5}
