"""The "Export mask" dock: write a Labels layer to NIfTI or TIFF in its source geometry.

The format follows the file name (``.nii.gz``, ``.nii``, ``.tif``, ``.tiff``). The
geometry (affine, NIfTI header, axis order) comes from the labels layer's own metadata
when it carries one (layers read by napari-semicl, predictions and labels made by the
Train dock), otherwise from the image layer chosen under "Geometry from". An existing
file is only replaced after the user says so (:attr:`ExportWidget.confirm_overwrite`).
The copy of the labels is taken on the Qt thread; compressing and writing run in a
napari thread worker.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils import notifications
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..io import write_labels
from . import _layers
from ._link import tabify_with_train_dock, watch_layers

log = logging.getLogger(__name__)

FORMATS = {".nii.gz": "NIfTI (compressed)", ".nii": "NIfTI", ".tif": "TIFF", ".tiff": "TIFF"}
FROM_LABELS = "(the labels layer's own)"
NO_GEOMETRY = "(none: voxel size from the layer scale)"


def format_of(path: str | Path) -> str | None:
    """The export format named by ``path``'s extension, or None if unsupported."""
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


class ExportWidget(QWidget):
    """Dock to export a Labels layer (a prediction or corrected labels) as a mask file.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    #: Emitted with the written path once a file is written.
    exported = Signal(str)
    #: Emitted with the message when an export fails.
    failed = Signal(str)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: ``confirm_overwrite(path) -> bool``; replace in tests to answer without a dialog.
        self.confirm_overwrite = self._ask_overwrite
        self._worker = None
        self._build_ui()
        QTimer.singleShot(0, self._on_docked)  # once napari has docked us: a tab beside Train
        watch_layers(self.viewer, self._on_layers_changed)
        self._on_layers_changed()

    def _on_docked(self) -> None:
        tabify_with_train_dock(self)

    # ------------------------------------------------------------------ public API
    @property
    def worker(self):
        """The worker of the export in progress, if any."""
        return self._worker

    def set_labels(self, layer: Labels) -> None:
        self._labels_chosen = True
        self.labels_combo.setCurrentText(layer.name)

    def set_path(self, path: str | Path) -> None:
        self.path_edit.setText(str(path))

    def geometry_metadata(self, labels: Labels) -> dict:
        """The metadata giving the written file its geometry (see the module doc)."""
        own = dict(labels.metadata or {})
        if _layers.has_geometry(own):
            return own
        source = self._layer(self.source_combo.currentText(), Image)
        if source is not None:
            return dict(source.metadata or {})
        if "spacing" not in own:
            own["spacing"] = tuple(float(s) for s in labels.scale)
        return own

    def export(self, path: str | Path | None = None) -> bool:
        """Start writing the chosen labels layer to ``path`` (or the path box); True if started.

        Asks before replacing a file; errors become notifications and :attr:`failed`.
        """
        if path is not None:
            self.set_path(path)
        labels = self._layer(self.labels_combo.currentText(), Labels)
        if labels is None:
            notifications.show_warning("Choose a Labels layer to export.")
            return False
        text = self.path_edit.text().strip()
        if not text:
            notifications.show_warning("Choose a file name to export to (.nii.gz, .nii or .tif).")
            return False
        target = Path(text).expanduser()
        if format_of(target) is None:
            self._fail(f"Cannot export to {target.name}: use one of {', '.join(FORMATS)}.")
            return False
        if self._worker is not None:
            notifications.show_warning("An export is already running.")
            return False
        overwrite = False
        if target.exists():
            if not self.confirm_overwrite(target):
                self.status_label.setText(f"Not exported: {target.name} exists and was kept.")
                return False
            overwrite = True
        data = np.array(labels.data, copy=True)  # the user may keep painting meanwhile
        metadata = self.geometry_metadata(labels)
        self.status_label.setText(f"Writing {target.name}...")
        self.export_button.setEnabled(False)
        self._start_write(target, data, metadata, overwrite)
        return True

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.labels_combo = QComboBox()
        self.labels_combo.currentTextChanged.connect(self._on_labels_changed)
        self.labels_combo.activated.connect(self._on_labels_activated)
        self._labels_chosen = False  # the user picked a layer: stop following new predictions
        form.addRow("Labels layer", self.labels_combo)
        self.source_combo = QComboBox()
        self.source_combo.setToolTip(
            "Image whose geometry (affine, header) the mask gets, when the labels layer has none"
        )
        form.addRow("Geometry from", self.source_combo)
        path_row = QHBoxLayout()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("mask.nii.gz")
        self.path_edit.textChanged.connect(self._on_path_changed)
        browse = QPushButton("...")
        browse.setToolTip("Choose the file to write")
        browse.clicked.connect(self._on_browse_clicked)
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)
        form.addRow("File", path_row)
        self.format_label = QLabel("")
        form.addRow("Format", self.format_label)
        layout.addLayout(form)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self._on_export_clicked)
        layout.addWidget(self.export_button)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _layer(self, name: str, kind: type):
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, kind):
                return layer
        return None

    def _ask_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(
            self, "Replace file?", f"{path} already exists.\nReplace it?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No,
        )
        return answer == QMessageBox.Yes

    def _fail(self, message: str) -> None:
        notifications.show_error(message)
        self.status_label.setText(message)
        self.failed.emit(message)

    def _start_write(self, target: Path, data: np.ndarray, metadata: dict, overwrite: bool) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(
            write_labels, target, data, metadata=metadata, overwrite=overwrite,
            _start_thread=False, _ignore_errors=True,
        )
        worker.returned.connect(self._on_write_returned)
        worker.errored.connect(self._on_write_errored)
        worker.finished.connect(self._on_write_finished)
        self._worker = worker
        worker.start()

    # ------------------------------------------------------------------ handlers
    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        labels = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        current = self.labels_combo.currentText()
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(labels)
        preds = [n for n in labels if _layers.role(self.viewer.layers[n]) == "prediction"]
        if current in labels and (self._labels_chosen or not preds or current in preds):
            self.labels_combo.setCurrentText(current)
        elif labels:
            # default: the newest prediction, else the newest labels layer
            self.labels_combo.setCurrentText((preds or labels)[-1])
        self.labels_combo.blockSignals(False)
        self._on_labels_changed()

    def _on_labels_activated(self, _index: int) -> None:
        self._labels_chosen = True

    def _on_labels_changed(self, _text: str = "") -> None:
        labels = self._layer(self.labels_combo.currentText(), Labels)
        own = labels is not None and _layers.has_geometry(labels.metadata)
        current = self.source_combo.currentText()
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        if own:
            self.source_combo.addItem(FROM_LABELS)
        else:
            images = [im.name for im in _layers.input_images(self.viewer.layers)]
            if labels is not None:
                shape = tuple(labels.data.shape)
                images = [n for n in images if _layers.spatial_shape(self.viewer.layers[n]) == shape]
            self.source_combo.addItems([*images, NO_GEOMETRY])
            if current in images:
                self.source_combo.setCurrentText(current)
        self.source_combo.setEnabled(not own)
        self.source_combo.blockSignals(False)

    def _on_path_changed(self, text: str) -> None:
        fmt = format_of(text.strip()) if text.strip() else None
        self.format_label.setText(fmt or ("" if not text.strip() else "unsupported: use .nii.gz, .nii or .tif"))

    def _on_browse_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export mask", self.path_edit.text() or "mask.nii.gz",
            "NIfTI (*.nii.gz *.nii);;TIFF (*.tif *.tiff)",
            options=QFileDialog.DontConfirmOverwrite,  # we ask ourselves, once
        )
        if path:
            self.path_edit.setText(path)

    def _on_export_clicked(self) -> None:
        self.export()

    def _on_write_returned(self, path) -> None:
        self._on_write_finished()  # the file is written: a new export may start
        message = f"Exported {path}"
        log.info(message)
        notifications.show_info(message)
        self.status_label.setText(message)
        self.exported.emit(str(path))

    def _on_write_errored(self, exc: Exception) -> None:
        self._on_write_finished()
        self._fail(f"Export failed: {exc}")

    def _on_write_finished(self) -> None:
        self._worker = None
        self.export_button.setEnabled(True)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        watch_layers(self.viewer, self._on_layers_changed, connect=False)
        super().closeEvent(event)
