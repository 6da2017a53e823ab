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

from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget


def _plain_type(tp):
    return tp if typing.get_origin(tp) is None else None


class MethodSettingsForm(QWidget):
    """Controls for the fields of one method-config dataclass instance.

    Parameters
    ----------
    section : dataclass instance
        Defaults shown (e.g. ``TrainConfig().plgcl``).
    doc_tooltip : bool
        Put the dataclass docstring on every control as a tooltip.
    """

    def __init__(self, section, parent=None) -> None:
        super().__init__(parent)
        self._controls: dict[str, QWidget] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        hints = typing.get_type_hints(type(section))
        doc = (type(section).__doc__ or "").strip()
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
            if doc:
                w.setToolTip(doc)
            self._controls[f.name] = w
            layout.addRow(f.name.replace("_", " "), w)

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
