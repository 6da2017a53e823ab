"""The Train dock's generated settings form shows every AUA setting and feeds the config."""

import pytest

pytest.importorskip("qtpy")

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QLineEdit, QSpinBox  # noqa: E402

from napari_semicl.engine import TrainConfig  # noqa: E402
from napari_semicl.engine.config import ConfigError  # noqa: E402
from napari_semicl.widgets._method_settings import MethodSettingsForm  # noqa: E402


def test_aua_settings_form_round_trips_through_the_config(qtbot):
    section = TrainConfig().aua
    form = MethodSettingsForm(section)
    qtbot.addWidget(form)
    values = form.values()
    assert set(values) == set(vars(section))
    assert isinstance(form.control("antithetic"), QCheckBox)
    assert isinstance(form.control("rank"), QSpinBox)
    assert isinstance(form.control("stage2_at"), QDoubleSpinBox)
    assert isinstance(form.control("stage2_init"), QLineEdit)
    assert isinstance(form.control("ged_rampup_steps"), QLineEdit)  # optional int: empty = None
    form.control("stage2_init").setText("restart")
    form.control("stage2_at").setValue(0.5)
    form.control("ged_rampup_steps").setText("120")
    cfg = TrainConfig.from_dict({"method": "aua", "aua": form.values()})
    assert (cfg.aua.stage2_init, cfg.aua.stage2_at, cfg.aua.ged_rampup_steps) == ("restart", 0.5, 120)
    form.control("pcl_covariance").setText("sparse")
    with pytest.raises(ConfigError, match="aua.pcl_covariance"):
        TrainConfig.from_dict({"method": "aua", "aua": form.values()})
