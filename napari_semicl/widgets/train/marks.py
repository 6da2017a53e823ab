"""The Train dock's "Validation slices" and "Classes" boxes.

Both are views of :class:`.model.TrainRun`: the validation marks
(:class:`~napari_semicl.engine.validation.ValidationMarks`) and the class names live there;
the boxes get the callables they need (the chosen pairs, the slicing axis).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from napari.layers import Labels
from napari.utils import notifications
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...errors import SemiclError
from .. import _layers
from .model import TrainRun


class ValidationBox(QGroupBox):
    """Mark / Unmark the slice in view for validation, and which slices are marked.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    run : TrainRun
        Holds the marks (keyed by :func:`~napari_semicl.widgets._layers.layer_key`).
    active_pair : callable
        ``active_pair() -> (image, labels) | None``: the pair whose slice in view is meant.
    axis : callable
        ``axis() -> int``: the slicing axis.
    """

    def __init__(self, viewer, run: TrainRun, *, active_pair: Callable, axis: Callable[[], int],
                 parent: QWidget | None = None) -> None:
        super().__init__("Validation slices", parent)
        self.viewer, self.run = viewer, run
        self._active_pair, self._axis = active_pair, axis
        layout = QVBoxLayout(self)
        buttons = QHBoxLayout()
        self.mark_button = QPushButton("Mark slice for validation")
        self.mark_button.setToolTip("Hold the current (painted) slice out of training; live Dice is computed on it")
        self.mark_button.clicked.connect(self._on_mark_clicked)
        self.unmark_button = QPushButton("Unmark")
        self.unmark_button.setToolTip("Give the current slice back to training")
        self.unmark_button.clicked.connect(self._on_unmark_clicked)
        buttons.addWidget(self.mark_button, 1)
        buttons.addWidget(self.unmark_button)
        layout.addLayout(buttons)
        self.validation_label = QLabel("none")
        self.validation_label.setWordWrap(True)
        layout.addWidget(self.validation_label)

    def mark_validation(self, mark: bool = True) -> int | None:
        """(Un)mark the current slice of the active pair for validation; returns its index."""
        pair = self._active_pair()
        if pair is None:
            notifications.show_warning("Choose an image in the Train dock first.")
            return None
        image = pair[0]
        try:
            index = _layers.current_slice(self.viewer, image, self._axis())
        except SemiclError as exc:
            notifications.show_warning(str(exc))
            return None
        key = _layers.layer_key(image)
        if mark:
            self.run.validation.mark(key, image.name, index)
        else:
            self.run.validation.unmark(key, index)
        self.update_label()
        return index

    def slices_of(self, image) -> set[int]:
        """The slices of ``image`` marked for validation."""
        return set(self.run.validation.slices(_layers.layer_key(image)))

    def update_label(self) -> None:
        """Show the marks of the layers in the viewer (under their current names)."""
        keys = set()
        for layer in self.viewer.layers:
            key = _layers.layer_key(layer)
            self.run.validation.rename(key, layer.name)
            keys.add(key)
        self.validation_label.setText(self.run.validation.describe(keys))

    def _on_mark_clicked(self) -> None:
        self.mark_validation(True)

    def _on_unmark_clicked(self) -> None:
        self.mark_validation(False)


class ClassTable(QGroupBox):
    """The label values painted and their names (editable).

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    run : TrainRun
        Holds the names; hands them to its trainer.
    pairs : callable
        ``pairs() -> [(image, labels or None)]``: the chosen pairs (their labels are read and named).
    background : callable
        ``background() -> bool``: 'unpainted means background' (then 0 is a class).
    """

    def __init__(self, viewer, run: TrainRun, *, pairs: Callable, background: Callable[[], bool],
                 parent: QWidget | None = None) -> None:
        super().__init__("Classes", parent)
        self.viewer, self.run = viewer, run
        self._pairs, self._background = pairs, background
        self._filling = False
        layout = QVBoxLayout(self)
        self.class_table = QTableWidget(0, 2)
        self.class_table.setHorizontalHeaderLabels(["Label value", "Name"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.class_table.setSelectionMode(QAbstractItemView.NoSelection)
        self.class_table.setMinimumHeight(90)
        self.class_table.setMaximumHeight(120)  # scrolls beyond 3-4 classes: the dock fits 1000 px
        self.class_table.itemChanged.connect(self._on_class_item_changed)
        layout.addWidget(self.class_table)
        self.refresh_classes_button = QPushButton("Refresh classes")
        self.refresh_classes_button.clicked.connect(self._on_refresh_classes_clicked)
        layout.addWidget(self.refresh_classes_button)

    def refresh_classes(self) -> list[int]:
        """Fill the table from the label values painted in the chosen labels layers."""
        values: set[int] = set()
        for _, labels in self._pairs():
            if labels is not None:
                values.update(int(v) for v in np.unique(np.asarray(labels.data)) if v != 0)
        if self._background() and values:
            values.add(0)
        self.set_values(sorted(values))
        return sorted(values)

    def set_values(self, values) -> None:
        """Show label ``values`` (with their names, or default ones) and apply the names."""
        names = self.run.class_names_of(values)
        self._filling = True
        try:
            self.class_table.setRowCount(len(names))
            for i, (v, name) in enumerate(names.items()):
                value_item = QTableWidgetItem(str(v))
                value_item.setFlags(Qt.ItemIsEnabled)
                self.class_table.setItem(i, 0, value_item)
                self.class_table.setItem(i, 1, QTableWidgetItem(name))
        finally:
            self._filling = False
        self.apply_names()

    def values(self) -> list[int]:
        """The label values in the table."""
        out = []
        for i in range(self.class_table.rowCount()):
            item = self.class_table.item(i, 0)
            if item is not None:
                out.append(int(item.text()))
        return out

    def names(self) -> dict[int, str]:
        """{value: name} of the values in the table."""
        return {v: self.run.class_names[v] for v in self.values() if v in self.run.class_names}

    def apply_names(self) -> None:
        """Name the classes in the chosen labels layers, the run's prediction layers and the
        trainer's config."""
        names = self.run.sync_class_names(self.values())
        if not names:
            return
        for _, labels in self._pairs():
            if labels is not None:
                _layers.apply_class_names(labels, names)
        for image, _ in self.run.run_layers:
            pred = _layers._find(self.viewer, f"{image.name}{_layers.PREDICTION_SUFFIX}", Labels)
            if pred is not None:
                _layers.apply_class_names(pred, names)

    def _on_class_item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or item.column() != 1:
            return
        value_item = self.class_table.item(item.row(), 0)
        if value_item is None:
            return
        self.run.class_names[int(value_item.text())] = item.text().strip()
        self.apply_names()

    def _on_refresh_classes_clicked(self) -> None:
        if not self.refresh_classes():
            notifications.show_info("No painted label yet: paint a slice first.")
