"""Config dataclasses <-> JSON: exact round trips and strict, named errors."""

import json

import pytest

from napari_semicl.engine.config import TrainConfig
from napari_semicl.errors import ConfigError


def test_json_round_trip_is_exact(tmp_path):
    cfg = TrainConfig(method="mean_teacher", iterations=17, seed=3)
    cfg.data.class_values = [0, 2, 5]
    cfg.data.class_names = {"2": "myocardium"}
    cfg.data.validation_slices = {"0": [4, 9]}
    cfg.mean_teacher.ema_alpha = 0.95
    path = tmp_path / "config.json"
    cfg.to_json(path)
    back = TrainConfig.from_json(path)
    assert back == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"bogus": 1}, "unknown key(s): bogus"),
        ({"data": {"patch_sise": 64}}, "unknown key(s) in data: patch_sise"),
        ({"iterations": "10"}, "iterations must be an integer"),
        ({"iterations": True}, "iterations must be an integer"),
        ({"data": {"patch_size": 60}}, "data.patch_size must be a multiple of 16"),
        ({"data": {"unpainted": "zero"}}, "data.unpainted must be one of"),
        ({"method": "nope"}, "method must be one of"),
        ({"mean_teacher": {"ema_alpha": 1.5}}, "mean_teacher.ema_alpha must be in (0, 1)"),
        ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
        ({"data": {"class_values": [1, "2"]}}, "data.class_values[1] must be an integer"),
        ({"model": 3}, "model must be an object"),
    ],
)
def test_bad_values_name_the_key(patch, fragment):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(patch)
    assert fragment in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        TrainConfig.from_json(tmp_path / "missing.json")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        TrainConfig.from_json(bad)


def test_values_are_never_evaluated():
    # a string that would run code if evaluated is just a wrong type here
    with pytest.raises(ConfigError, match="must be an integer"):
        TrainConfig.from_dict({"iterations": "__import__('os').system('false')"})
