"""The "Apply model" dock: predict another image (or image files) with a trained network.

The network comes from the current run (the Train dock's trainer: a copy of its predicting
network, taken when it is not training) or from a checkpoint file (loaded as plain data:
an untrusted file is refused). "Apply" predicts an image layer into '<image> prediction'
and '<image> entropy' layers with the image's geometry, with the network's class names;
"Apply to files..." predicts image files into '<name>_mask.nii.gz' (NIfTI sources) or
'<name>_mask.tif' beside each other in a folder the user picks, with each source's geometry.
Both run in a napari thread worker; the engine calls under them are
:meth:`napari_semicl.engine.apply.Predictor.predict` and
:func:`napari_semicl.engine.apply.predict_files` (the CLI's ``predict`` uses the same).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from napari.layers import Image
from napari.utils import notifications
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..data import decoded_dtype
from ..engine.apply import Predictor, mask_path, predict_files
from ..errors import SemiclError
from . import _layers
from ._link import StatusLabel, find_train_widget, start_worker, tabify_with_train_dock, watch_layers

log = logging.getLogger(__name__)

CURRENT_RUN = "Current run (Train dock)"
CHECKPOINT = "Checkpoint file"
IMAGE_FILTER = "Images (*.nii.gz *.nii *.tif *.tiff *.png *.jpg *.jpeg);;All files (*)"


def _predict_layer(source, data, rgb: bool):
    """Worker: (Predictor, Prediction) of ``data`` with ``source`` (a Predictor or a checkpoint path)."""
    predictor = source if isinstance(source, Predictor) else Predictor.from_checkpoint(source)
    return predictor, predictor.predict(np.asarray(data), rgb=rgb, with_entropy=True)


def _predict_files(source, paths, out_dir, overwrite, progress):
    predictor = source if isinstance(source, Predictor) else Predictor.from_checkpoint(source)
    return predict_files(predictor, paths, out_dir, overwrite=overwrite, progress=progress)


class ApplyWidget(QWidget):
    """Dock to apply a trained network to an image layer or to image files.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    #: Emitted with the image layer's name once its prediction layers are shown.
    applied = Signal(str)
    #: Emitted with the list of :class:`~napari_semicl.engine.apply.FileResult` of "Apply to files".
    files_done = Signal(list)
    #: Emitted with the message when applying fails (nothing was shown or written).
    failed = Signal(str)
    #: (done, total, file name) after each file (emitted from the worker thread).
    _file_progress = Signal(int, int, str)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: ``confirm_overwrite(paths) -> bool``; replace in tests to answer without a dialog.
        self.confirm_overwrite = self._ask_overwrite
        #: ``choose_files() -> (list of paths, out folder or None)``; replace in tests.
        self.choose_files = self._ask_files
        self._worker = None
        self._image_chosen = False
        self._build_ui()
        self._file_progress.connect(self._on_file_progress)
        QTimer.singleShot(0, self._on_docked)
        watch_layers(self.viewer, self._on_layers_changed)
        self._on_layers_changed()

    def _on_docked(self) -> None:
        tabify_with_train_dock(self)

    # ------------------------------------------------------------------ public API
    @property
    def worker(self):
        """The worker of the prediction in progress (None when idle)."""
        return self._worker

    def set_source(self, source: str) -> None:
        """'run' (the Train dock's current run) or 'checkpoint'."""
        self.source_combo.setCurrentText(CURRENT_RUN if source == "run" else CHECKPOINT)

    def set_checkpoint(self, path: str | Path) -> None:
        self.checkpoint_edit.setText(str(path))
        self.set_source("checkpoint")

    def set_image(self, name: str) -> None:
        self._image_chosen = True
        self.image_combo.setCurrentText(name)

    def apply(self) -> bool:
        """Predict the chosen image layer in a worker; True if started (else a message says why)."""
        if self._busy():
            return False
        image = self._image()
        if image is None:
            return self._fail("Choose an image layer to apply the model to (open one with File > Open).")
        if getattr(image, "multiscale", False):
            return self._fail(
                f"'{image.name}' is a multiscale image (a slide): predict it tile by tile with "
                "`napari-semicl predict --checkpoint ... --image ... --out mask.ome.tif`."
            )
        source = self._source()
        if source is None:
            return False
        if isinstance(source, Predictor):
            try:  # a quick answer for the user-fixable mismatches, before any work
                source.check_image(tuple(image.data.shape), rgb=bool(image.rgb))
            except SemiclError as exc:
                return self._fail(f"Cannot apply the model to '{image.name}': {exc}.")
        key, name = _layers.layer_key(image), image.name
        self.status_label.setText(f"Predicting '{name}' with {self._source_text(source)}...")
        self._set_busy(True)
        self._worker = start_worker(
            _predict_layer, source, image.data, bool(image.rgb),
            returned=lambda result: self._on_predicted(key, name, result),
            errored=lambda exc: self._on_errored(exc, f"Cannot apply the model to '{name}'"),
        )
        return True

    def apply_to_files(self, paths=None, out_dir=None) -> bool:
        """Predict image files into ``out_dir`` ('<name>_mask.nii.gz' or '.tif'); without
        arguments, asks for the files and the folder. True if started."""
        if self._busy():
            return False
        if paths is None or out_dir is None:
            paths, out_dir = self.choose_files()
        paths = [Path(p) for p in (paths or [])]
        if not paths or not out_dir:
            self.status_label.setText("No files chosen.")
            return False
        source = self._source()
        if source is None:
            return False
        out_dir = Path(out_dir).expanduser()
        existing = [t for t in (mask_path(p, out_dir) for p in paths) if t.exists()]
        overwrite = bool(existing) and self.confirm_overwrite(existing)
        self.status_label.setText(f"Predicting {len(paths)} file(s) into {out_dir} with {self._source_text(source)}...")
        self._set_busy(True)
        self._worker = start_worker(
            _predict_files, source, paths, out_dir, overwrite, self._emit_progress,
            returned=lambda results: self._on_files_predicted(out_dir, results),
            errored=lambda exc: self._on_errored(exc, "Cannot apply the model to the files"),
        )
        return True

    # ------------------------------------------------------------------ the network
    def _source(self) -> Predictor | str | None:
        """A Predictor (current run) or a checkpoint path (loaded in the worker); None with
        a message when there is neither."""
        if self.source_combo.currentText() == CHECKPOINT:
            text = self.checkpoint_edit.text().strip()
            if not text:
                self._fail("Choose a checkpoint file (a run folder's checkpoint.pt), or use the current run.")
                return None
            path = Path(text).expanduser()
            if not path.is_file():
                self._fail(f"Checkpoint {path} does not exist.")
                return None
            return str(path)
        train = find_train_widget(self.viewer)
        if train is None or train.trainer is None:
            self._fail(
                "No trained network: train in the Train dock (Plugins > napari-semicl > Train), "
                "or choose a checkpoint file."
            )
            return None
        if train.is_training:
            self._fail("Training is running: stop it (or let it finish) to apply the current run, "
                       "or apply a checkpoint file.")
            return None
        return Predictor.from_trainer(train.trainer)

    @staticmethod
    def _source_text(source) -> str:
        return source.source if isinstance(source, Predictor) else Path(source).name

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.source_combo = QComboBox()
        self.source_combo.addItems([CURRENT_RUN, CHECKPOINT])
        self.source_combo.setToolTip("The network to apply: the Train dock's current run, or a saved checkpoint")
        self.source_combo.currentTextChanged.connect(self._on_source_changed)
        form.addRow("Model", self.source_combo)
        row = QHBoxLayout()
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("run folder/checkpoint.pt")
        self.checkpoint_edit.setToolTip("A checkpoint written by a run (Train dock or CLI): plain data only")
        self.browse_button = QPushButton("...")
        self.browse_button.setToolTip("Choose a checkpoint file")
        self.browse_button.clicked.connect(self._on_browse_clicked)
        row.addWidget(self.checkpoint_edit, 1)
        row.addWidget(self.browse_button)
        form.addRow("Checkpoint", row)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Any opened image with the channels the network was trained on (grey or RGB)")
        self.image_combo.activated.connect(self._on_image_activated)
        form.addRow("Image", self.image_combo)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        self.apply_button = QPushButton("Apply")
        self.apply_button.setToolTip("Predict the image into '<image> prediction' and '<image> entropy' layers")
        self.apply_button.clicked.connect(self._on_apply_clicked)
        self.files_button = QPushButton("Apply to files...")
        self.files_button.setToolTip(
            "Predict image files into '<name>_mask.nii.gz' (NIfTI) or '<name>_mask.tif' in a folder you pick, "
            "with each file's geometry"
        )
        self.files_button.clicked.connect(self._on_files_clicked)
        buttons.addWidget(self.apply_button)
        buttons.addWidget(self.files_button)
        layout.addLayout(buttons)
        self.status_label = StatusLabel("", lines=3)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        self._on_source_changed(self.source_combo.currentText())

    def _image(self):
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, Image) and _layers.role(layer) is None:
                return layer
        return None

    def _busy(self) -> bool:
        if self._worker is not None:
            notifications.show_warning("A prediction is already running.")
            return True
        return False

    def _set_busy(self, busy: bool) -> None:
        self.apply_button.setEnabled(not busy)
        self.files_button.setEnabled(not busy)

    def _fail(self, message: str) -> bool:
        notifications.show_warning(message)
        self.status_label.setText(message)
        self.failed.emit(message)
        return False

    def _emit_progress(self, done: int, total: int, result) -> None:
        try:  # from the worker thread: a queued signal
            self._file_progress.emit(done, total, result.image.name)
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _ask_overwrite(self, paths: list[Path]) -> bool:
        names = ", ".join(p.name for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        answer = QMessageBox.question(
            self, "Replace masks?", f"{len(paths)} mask(s) exist already ({names}).\nReplace them?",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.No,
        )
        return answer == QMessageBox.Yes

    def _ask_files(self):
        paths, _ = QFileDialog.getOpenFileNames(self, "Images to predict", "", IMAGE_FILTER)
        if not paths:
            return [], None
        out = QFileDialog.getExistingDirectory(self, "Folder for the masks", str(Path(paths[0]).parent))
        return paths, out or None

    # ------------------------------------------------------------------ handlers
    def _on_source_changed(self, text: str) -> None:
        on = text == CHECKPOINT
        self.checkpoint_edit.setEnabled(on)
        self.browse_button.setEnabled(on)

    def _on_browse_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Checkpoint", self.checkpoint_edit.text(), "Checkpoints (*.pt *.pth);;All files (*)"
        )
        if path:
            self.set_checkpoint(path)

    def _on_image_activated(self, _index: int) -> None:
        self._image_chosen = True

    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        names = [layer.name for layer in _layers.input_images(self.viewer.layers)]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names and self._image_chosen:
            self.image_combo.setCurrentText(current)
        elif names:
            self.image_combo.setCurrentText(names[-1])  # the newest image: most likely the one to predict
        self.image_combo.blockSignals(False)

    def _on_apply_clicked(self) -> None:
        self.apply()

    def _on_files_clicked(self) -> None:
        self.apply_to_files()

    def _on_predicted(self, key: str, name: str, result) -> None:
        self._on_worker_finished()
        predictor, prediction = result
        image = next((la for la in self.viewer.layers if _layers.layer_key(la) == key), None)
        if image is None:
            self._fail(f"'{name}' was closed before its prediction was ready.")
            return
        labels = prediction.labels.astype(decoded_dtype(predictor.class_values), copy=False)
        layer = _layers.show_prediction(self.viewer, image, labels)
        _layers.show_entropy(self.viewer, image, prediction.entropy)
        names = predictor.class_names
        if names:
            _layers.apply_class_names(layer, {v: names.get(v, "background" if v == 0 else f"class {v}")
                                              for v in predictor.class_values})
        notes = f" ({'; '.join(prediction.notes)})" if prediction.notes else ""
        message = f"Predicted '{image.name}' with {predictor.source}: layers '{layer.name}' and '{image.name}{_layers.ENTROPY_SUFFIX}'{notes}."
        log.info(message)
        self.status_label.setText(message)
        self.applied.emit(image.name)

    def _on_file_progress(self, done: int, total: int, name: str) -> None:
        self.status_label.setText(f"Predicted {done} of {total} file(s) (last: {name})...")

    def _on_files_predicted(self, out_dir: Path, results: list) -> None:
        self._on_worker_finished()
        ok = [r for r in results if r.ok]
        bad = [r for r in results if not r.ok]
        message = f"{len(ok)} mask(s) written to {out_dir}."
        if bad:
            message += f" {len(bad)} failed: " + "; ".join(f"{r.image.name}: {r.error}" for r in bad[:3])
            notifications.show_warning(message)
        else:
            notifications.show_info(message)
        self.status_label.setText(message)
        self.files_done.emit(list(results))

    def _on_errored(self, exc: Exception, what: str) -> None:
        self._on_worker_finished()
        if not isinstance(exc, SemiclError):
            log.warning("%s", what, exc_info=(type(exc), exc, exc.__traceback__))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._fail(f"{what}: {reason}")

    def _on_worker_finished(self) -> None:
        self._worker = None
        try:
            self._set_busy(False)
        except RuntimeError:  # the dock was deleted meanwhile
            pass

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        watch_layers(self.viewer, self._on_layers_changed, connect=False)
        super().closeEvent(event)
