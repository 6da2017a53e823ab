"""A form generated from a method's config dataclass (its section of TrainConfig).

Every setting of every registered method appears in the Train dock's Advanced section
without a hand-written control per setting: numbers get spin boxes, booleans check boxes,
other values (strings, optional numbers) a line edit whose text is read as JSON when it
parses and as a plain string otherwise. The engine validates the result (a ConfigError
names the key).
"""

from __future__ import annotations

import dataclasses
import json
import typing

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QWidget

from ..engine.config import setting_help


def _plain_type(tp):
    return tp if typing.get_origin(tp) is None else None


class MethodSettingsForm(QWidget):
    """Controls for the fields of one method-config dataclass instance.

    Each row is labelled readably (the field's ``metadata['label']``, else its name) and
    says what it does in a tooltip (:func:`~napari_semicl.engine.config.setting_help`).

    Parameters
    ----------
    section : dataclass instance
        Defaults shown (e.g. ``TrainConfig().plgcl``).
    """

    def __init__(self, section, parent=None) -> None:
        super().__init__(parent)
        self._controls: dict[str, QWidget] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setRowWrapPolicy(QFormLayout.WrapLongRows)
        hints = typing.get_type_hints(type(section))
        helps = setting_help(section)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            tp = _plain_type(hints.get(f.name))
            if tp is bool:
                w = QCheckBox()
                w.setChecked(bool(value))
            elif tp is int:
                w = QSpinBox()
                w.setRange(-(2**31) + 1, 2**31 - 1)
                w.setValue(int(value))
            elif tp is float:
                w = QDoubleSpinBox()
                w.setDecimals(6)
                w.setRange(-1e9, 1e9)
                w.setValue(float(value))
            else:
                w = QLineEdit("" if value is None else (value if isinstance(value, str) else json.dumps(value)))
                w.setPlaceholderText("empty = default (None)" if value is None else "")
            w.setObjectName(f.name)
            label_text, help_text = helps[f.name]
            w.setToolTip(help_text)
            label = QLabel(label_text)
            label.setToolTip(help_text)
            label.setWordWrap(True)
            self._controls[f.name] = w
            layout.addRow(label, w)

    def values(self) -> dict:
        """Raw values by field name, for TrainConfig's strict loader to check."""
        out = {}
        for name, w in self._controls.items():
            if isinstance(w, QCheckBox):
                out[name] = w.isChecked()
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                out[name] = w.value()
            else:
                text = w.text().strip()
                if not text:
                    out[name] = None
                    continue
                try:
                    out[name] = json.loads(text)
                except json.JSONDecodeError:
                    out[name] = text
        return out

    def control(self, name: str) -> QWidget:
        return self._controls[name]
