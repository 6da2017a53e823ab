"""The Train dock's settings: controls -> :class:`~napari_semicl.engine.TrainConfig`.

**A new dock control is one row in** :data:`BASIC` **or** :data:`ADVANCED` below: the
attribute name it gets on the form (and on the dock), its label, the config key it sets
(dotted, e.g. ``"data.patch_size"``), the widget with its range and default, and its
tooltip. :meth:`TrainForm.build_config` reads every row; nothing else changes. Controls
whose value is not one config key (the method's own settings, generated from its config
class; the prior's controls; the run folder) are written out in this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ...engine import TrainConfig
from ...methods import available_methods
from .._method_settings import MethodSettingsForm
from .prior import PriorControls

#: Where runs go when no folder is chosen in the dock.
DEFAULT_RUNS_ROOT = Path("~/.napari-semicl/runs")


def spin(lo: int, hi: int, value: int = 0, step: int = 1, special: str = "") -> Callable[[], QSpinBox]:
    def make() -> QSpinBox:
        w = QSpinBox()
        w.setRange(lo, hi)
        w.setSingleStep(step)
        w.setValue(value)
        if special:
            w.setSpecialValueText(special)
        return w
    return make


def dspin(lo: float, hi: float, value: float, decimals: int, step: float = 1.0) -> Callable[[], QDoubleSpinBox]:
    def make() -> QDoubleSpinBox:
        w = QDoubleSpinBox()
        w.setDecimals(decimals)
        w.setRange(lo, hi)
        w.setSingleStep(step)
        w.setValue(value)
        return w
    return make


def combo(*items: str) -> Callable[[], QComboBox]:
    def make() -> QComboBox:
        w = QComboBox()
        w.addItems(list(items))
        return w
    return make


class Field(NamedTuple):
    """One control of the form: ``attr`` on the form, its row ``label``, the config ``key``
    it sets (dotted path), a ``make()`` for the widget and its ``tooltip``."""

    attr: str
    label: str
    key: str
    make: Callable[[], QWidget]
    tooltip: str = ""


#: The rows above the run buttons (after Method and Budget, which are laid out by hand).
BASIC: tuple[Field, ...] = ()

#: Where the prior's rows (fill method, context slices, network, patch depth) and the run
#: folder go among the Advanced rows.
PRIOR_ROWS, RUN_FOLDER = "<prior rows>", "<run folder>"

#: The rarely changed rows, folded in 'Advanced' (the method's own settings follow them).
ADVANCED: tuple[Field | str, ...] = (
    Field("axis_spin", "Slicing axis", "data.axis", spin(0, 2),
          "Axis of the image along which 2D slices are taken (0: napari's slider)"),
    Field("seed_spin", "Seed", "seed", spin(0, 2**31 - 1), "Random seed of the weights, crops and augmentations"),
    Field("refresh_spin", "Refresh every", "refresh_every", spin(1, 1_000_000, 50),
          "Update the prediction (and pick up new labels) every N steps"),
    Field("patch_spin", "Patch size", "data.patch_size", spin(16, 1024, 128, 16),
          "Square training crop size in pixels (a multiple of 16)"),
    Field("slide_level_spin", "Slide level", "wsi.level", spin(0, 10),
          "Slides (multiscale images): the pyramid level to train on and predict (0 = full resolution)"),
    Field("tile_spin", "Slide tile size", "wsi.tile_size", spin(64, 4096, 512, 64),
          "Slides: tile size at that level; painted tiles train, other tissue tiles are the unlabelled pool"),
    PRIOR_ROWS,
    RUN_FOLDER,
    Field("intensity_spin", "Intensity augmentation", "data.intensity_augment", dspin(0.0, 1.0, 0.0, 2, 0.1),
          "Every method: the chance that a painted crop also gets gamma, contrast, brightness, blur and noise, so that "
          "a network trained on a few volumes meets other volumes' contrasts (0.8 for a cohort; 0: off)"),
    Field("largest_check", "Keep largest piece", "predict.largest_component", QCheckBox,
          "Keep only the largest connected 3D piece of each class in the mask (for one structure, e.g. a heart "
          "chamber: stray blobs elsewhere go); off for many objects (cells, nuclei)"),
    Field("adapt_bn_check", "Adapt to each image", "predict.adapt_batch_norm", QCheckBox,
          "Before predicting an image, re-estimate the network's batch-norm statistics on that image (AdaBN): for "
          "images whose stain or brightness differs from the painted ones, e.g. H&E tiles from other labs"),
    Field("lr_spin", "Learning rate", "optim.lr", dspin(1e-5, 1.0, 3e-3, 5, 1e-4)),
    Field("ema_spin", "EMA alpha (teacher)", "mean_teacher.ema_alpha", dspin(0.5, 0.9999, 0.99, 4, 0.001)),
    Field("consistency_spin", "Consistency weight", "mean_teacher.consistency", dspin(0.0, 100.0, 0.1, 3)),
    Field("rampup_spin", "Ramp-up steps", "mean_teacher.rampup_steps", spin(0, 10_000_000, 200)),
)


def read_value(widget: QWidget):
    """The value a control stands for: a spin box's number, a combo's text, a check box's state."""
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QComboBox):
        return widget.currentText()
    return widget.value()


def set_key(cfg, key: str, value) -> None:
    """``cfg.a.b = value`` for ``key`` 'a.b'."""
    *parents, name = key.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


class TrainForm(QWidget):
    """Method, budget and the Advanced settings of the Train dock.

    The form shows in two places of the dock: itself (Method, Budget, 'unpainted means
    background', the prior) and :attr:`advanced`, a folded section the dock puts below the
    run.

    Parameters
    ----------
    prior_controls : PriorControls
        The prior's controls (their Advanced rows go into :attr:`advanced`).
    """

    def __init__(self, prior_controls: PriorControls, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.prior_controls = prior_controls
        self.fields = [f for f in BASIC + ADVANCED if isinstance(f, Field)]
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.method_combo = QComboBox()
        self.method_combo.addItems(available_methods())
        form.addRow("Method", self.method_combo)
        budget_row = QHBoxLayout()
        self.budget_combo = QComboBox()
        self.budget_combo.addItems(["iterations", "minutes"])
        self.budget_combo.setToolTip("Train for a number of steps, or for a wall-clock time")
        self.iterations_spin = spin(1, 10_000_000, 300)()
        self.minutes_spin = dspin(0.1, 100_000.0, 5.0, 1)()
        self.minutes_spin.setVisible(False)
        self.budget_combo.currentTextChanged.connect(self._on_budget_changed)
        budget_row.addWidget(self.budget_combo)
        budget_row.addWidget(self.iterations_spin, 1)
        budget_row.addWidget(self.minutes_spin, 1)
        form.addRow("Budget", budget_row)
        self.background_check = QCheckBox("unpainted means background")
        self.background_check.setToolTip(
            "Tick when the painted slices are complete: their unpainted pixels become class 0.\n"
            "Otherwise unpainted pixels are ignored (scribbles)."
        )
        form.addRow(self.background_check)
        self._add_fields(form, BASIC)
        form.addRow(prior_controls)

        # rarely changed: folded, so that the run and its progress stay in view
        self.advanced = QCollapsible("Advanced")
        adv = QWidget()
        adv_form = QFormLayout(adv)
        adv_form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self._add_fields(adv_form, ADVANCED)
        # the current method's own settings, generated from its config section
        self.method_settings_box = QGroupBox("Method settings")
        self._method_settings_layout = QVBoxLayout(self.method_settings_box)
        self.method_settings: MethodSettingsForm | None = None
        adv_form.addRow(self.method_settings_box)
        self.method_combo.currentTextChanged.connect(self._on_method_changed)
        self._on_method_changed(self.method_combo.currentText())
        self.advanced.addWidget(adv)

    def _add_fields(self, form: QFormLayout, fields) -> None:
        for field in fields:
            if field == PRIOR_ROWS:
                for label, widget in self.prior_controls.advanced_rows():
                    form.addRow(label, widget)
                continue
            if field == RUN_FOLDER:
                form.addRow("Run folder", self._run_folder_row())
                continue
            widget = field.make()
            if field.tooltip:
                widget.setToolTip(field.tooltip)
            setattr(self, field.attr, widget)
            form.addRow(field.label, widget)

    def _run_folder_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.run_folder_edit = QLineEdit()
        self.run_folder_edit.setPlaceholderText(f"automatic: {DEFAULT_RUNS_ROOT}/<date-time>")
        self.run_folder_edit.setToolTip("Where checkpoints, config.json and autosaved annotations go")
        self.run_folder_edit.setMinimumWidth(60)
        browse = QPushButton("...")
        browse.setToolTip("Choose the folder where checkpoints are written")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._on_browse_clicked)
        row.addWidget(self.run_folder_edit, 1)
        row.addWidget(browse)
        return row

    # --- what the controls say -------------------------------------------------------------
    def build_config(self, class_names: dict[int, str] | None = None) -> TrainConfig:
        """A :class:`TrainConfig` from the controls (not yet validated); ``class_names``
        (label value -> name) from the dock's class table."""
        cfg = TrainConfig(
            method=self.method_combo.currentText(),
            iterations=self.iterations_spin.value(),
            minutes=self.minutes_spin.value(),
            budget=self.budget_combo.currentText(),
        )
        for field in self.fields:
            set_key(cfg, field.key, read_value(getattr(self, field.attr)))
        cfg.data.unpainted = "background" if self.background_check.isChecked() else "ignore"
        cfg.data.class_names = {str(v): n for v, n in (class_names or {}).items() if n}
        self.prior_controls.apply(cfg)
        if self.method_settings is not None:
            # through the strict JSON loader: wrong values become a ConfigError naming the key
            merged = cfg.to_dict()
            merged[cfg.method] = {**merged[cfg.method], **self.method_settings.values()}
            cfg = TrainConfig.from_dict(merged)
        return cfg

    def budget(self) -> dict:
        """The budget controls as keyword arguments of :func:`.model.apply_budget`."""
        return {"iterations": self.iterations_spin.value(), "minutes": self.minutes_spin.value(),
                "budget": self.budget_combo.currentText(), "refresh_every": self.refresh_spin.value()}

    def resume_budget_text(self) -> str:
        """What Resume (and Resume from checkpoint) trains: '300 more steps' or '5.0 more minutes'.

        The engine counts the budget from where a run starts (:meth:`Trainer.run`)."""
        if self.budget_combo.currentText() == "minutes":
            return f"{self.minutes_spin.value():g} more minutes"
        return f"{self.iterations_spin.value()} more steps"

    def run_folder_text(self) -> str:
        """The chosen run folder ('' for automatic)."""
        return self.run_folder_edit.text().strip()

    # --- handlers --------------------------------------------------------------------------
    def _on_method_changed(self, method: str) -> None:
        if self.method_settings is not None:
            self.method_settings.setParent(None)
            self.method_settings.deleteLater()
            self.method_settings = None
        section = getattr(TrainConfig(), method, None)
        if section is None or not dataclasses.is_dataclass(section) or method == "mean_teacher":
            self.method_settings_box.setVisible(False)
            return
        self.method_settings = MethodSettingsForm(section)
        self._method_settings_layout.addWidget(self.method_settings)
        self.method_settings_box.setTitle(f"{method} settings")
        self.method_settings_box.setVisible(True)

    def _on_budget_changed(self, text: str) -> None:
        self.iterations_spin.setVisible(text == "iterations")
        self.minutes_spin.setVisible(text == "minutes")

    def _on_browse_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Run folder (checkpoints)")
        if folder:
            self.run_folder_edit.setText(folder)
