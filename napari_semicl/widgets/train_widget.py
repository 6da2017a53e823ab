"""The "Train (semi-supervised)" dock: pick image/labels pairs, train, watch, stop, resume.

A thin view over :class:`~napari_semicl.engine.Trainer`: the dock snapshots (copies) the
chosen layers, builds the trainer on the Qt thread (so that a :class:`DataError` becomes
a notification at once) and runs ``trainer.run()`` in napari's thread worker
(:mod:`._worker`). Events come back on the Qt thread and become a progress bar, loss and
Dice text, and the '<image> prediction' / '<image> entropy' layers. Labels painted during
training are re-snapshotted at every refresh and handed to ``trainer.submit_data``.

Every button has a public method (:meth:`TrainWidget.start_training`,
:meth:`~TrainWidget.stop_training`, :meth:`~TrainWidget.resume_training`) that tests and
scripts call directly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
import math
import threading
from pathlib import Path

from napari.layers import Image, Labels
from napari.utils import notifications
from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..analysis import TrainingHistory
from ..analysis.plots import DICE
from ..engine import TrainConfig, Trainer, describe_device, load_checkpoint, pick_device
from ..engine.device import gui_thread_count
from ..engine.launch import DistributedRun, visible_devices
from ..engine.validation import ValidationMarks
from ..engine.events import (
    Checkpointed,
    DataUpdated,
    Evaluated,
    Finished,
    Notice,
    Preview,
    Reviewed,
    Started,
    StepDone,
)
from ..errors import SemiclError
from ..methods import available_methods
from . import _layers
from ._method_settings import MethodSettingsForm
from ._prior_controls import PriorControls
from ._worker import start_training_worker

log = logging.getLogger(__name__)

#: Where runs go when no folder is chosen in the dock.
DEFAULT_RUNS_ROOT = Path("~/.napari-semicl/runs")
NO_LABELS = "(none: unlabelled image)"
#: The Train dock's narrowest width (pixels): its buttons and two-column forms fit in it.
MIN_WIDTH = 340
#: How long closing the dock waits for the worker to checkpoint and end.
CLOSE_TIMEOUT_S = 5.0


class _PairRow(QWidget):
    """One image/labels pair: two combos, 'New labels layer for image' and remove."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.new_labels_button = QPushButton("New labels layer for image")
        self.new_labels_button.setToolTip(
            "Add an empty Labels layer with this image's shape, scale and metadata"
        )
        self.remove_button = QPushButton("remove")
        self.remove_button.setToolTip("Remove this pair")
        self.none_chosen = False  # the user picked 'no labels' on purpose
        for combo in (self.image_combo, self.labels_combo):  # long layer names elided
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.labels_combo.activated.connect(self._on_labels_activated)
        grid = QFormLayout(self)
        grid.setContentsMargins(0, 2, 0, 2)
        top = QHBoxLayout()
        top.addWidget(self.image_combo, 1)
        top.addWidget(self.remove_button)
        grid.addRow("Image", top)
        grid.addRow("Labels", self.labels_combo)
        grid.addRow("", self.new_labels_button)

    def _on_labels_activated(self, _index: int) -> None:
        self.none_chosen = self.labels_combo.currentText() == NO_LABELS


class TrainWidget(QWidget):
    """Dock to train a semi-supervised segmentation network on painted slices.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose layers are trained on and receive the predictions.
    """

    #: every trainer event, re-emitted on the Qt thread (the review docks listen to it)
    event_received = Signal(object)
    #: a freshly built trainer, emitted when Train is pressed, before its first step: the
    #: review docks create their layers then (adding a layer pauses napari for 0.1-0.3 s)
    run_starting = Signal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._trainer: Trainer | None = None
        self._worker = None
        self._control = None
        self._running = False
        self._stopping = False
        self._run_layers: list[tuple[Image, Labels | None]] = []  # layers of the current trainer
        self._validation = ValidationMarks()  # keyed by _layers.layer_key(image)
        self._class_names: dict[int, str] = {}
        #: losses and validation Dice of the current trainer's runs (the curves dock draws it)
        self.history = TrainingHistory()
        self._latest: dict = {}  # the newest events worth showing again (see replay_events)
        self._filling_table = False
        #: torch CPU threads while training (all cores but one, so the Qt thread keeps one)
        self.num_threads = gui_thread_count()
        # closing the viewer deletes us without a closeEvent: stop from a closure
        self._run_ref = {"trainer": None, "control": None, "worker": None}
        self.destroyed.connect(functools.partial(_abandon_run, self._run_ref))
        _warm_up_torch()
        self._build_ui()
        self._connect_viewer()
        self.add_pair()
        self._update_buttons()

    # ------------------------------------------------------------------ public API
    @property
    def trainer(self) -> Trainer | None:
        """The current trainer (kept after a run ends, for Resume)."""
        return self._trainer

    @property
    def worker(self):
        """The napari thread worker of the run in progress (None when idle)."""
        return self._worker

    @property
    def is_training(self) -> bool:
        return self._running

    @property
    def run_layers(self) -> list:
        """(image layer, labels layer or None) of each pair of the current trainer."""
        return list(self._run_layers)

    def replay_events(self) -> list:
        """The current trainer's newest state as events, for docks opened after it ran: its
        last Started, the last Preview of each kind and pair, the last Reviewed of each
        pair and the last Evaluated, in that order (empty before the first Train)."""
        latest = self._latest
        out = [latest["started"]] if "started" in latest else []
        out += [latest[k] for k in sorted(k for k in latest if k[0] == "preview")]
        out += [latest[k] for k in sorted(k for k in latest if k[0] == "reviewed")]
        if "evaluated" in latest:
            out.append(latest["evaluated"])
        return out

    def add_pair(self) -> _PairRow:
        """Add a pair row, defaulting to the first image (and labels) not yet chosen."""
        row = _PairRow(self)
        row.remove_button.clicked.connect(functools.partial(self._on_remove_pair_clicked, row))
        row.new_labels_button.clicked.connect(functools.partial(self._on_new_labels_clicked, row))
        row.image_combo.currentTextChanged.connect(functools.partial(self._on_image_changed, row))
        self._rows.append(row)
        self._pairs_layout.addWidget(row)
        taken = {r.image_combo.currentText() for r in self._rows[:-1]}
        self._fill_row(row, prefer_image=next(
            (im.name for im in _layers.input_images(self.viewer.layers) if im.name not in taken), None
        ))
        self._update_buttons()
        return row

    def pairs(self) -> list[tuple[Image, Labels | None]]:
        """The chosen (image layer, labels layer or None) pairs; rows without an image skipped."""
        out = []
        for row in self._rows:
            image = self._layer(row.image_combo.currentText(), Image)
            if image is None:
                continue
            out.append((image, self._layer(row.labels_combo.currentText(), Labels)))
        return out

    def set_pair(self, index: int, image: Image, labels: Labels | None) -> None:
        """Choose the layers of pair row ``index`` (adds rows as needed)."""
        while len(self._rows) <= index:
            self.add_pair()
        row = self._rows[index]
        row.image_combo.setCurrentText(image.name)
        self._fill_labels_combo(row, prefer=labels.name if labels is not None else NO_LABELS)

    def new_labels_layer(self, image: Image) -> Labels:
        """Add an empty Labels layer matching ``image`` (shape, scale, metadata)."""
        layer = _layers.new_labels_layer(self.viewer, image)
        layer.mode = "paint"
        return layer

    def build_config(self) -> TrainConfig:
        """A :class:`TrainConfig` from the dock's controls (not yet validated)."""
        cfg = TrainConfig(
            method=self.method_combo.currentText(),
            iterations=self.iterations_spin.value(),
            minutes=self.minutes_spin.value(),
            budget=self.budget_combo.currentText(),
            seed=self.seed_spin.value(),
            refresh_every=self.refresh_spin.value(),
        )
        cfg.data.axis = self.axis_spin.value()
        cfg.data.patch_size = self.patch_spin.value()
        cfg.wsi.level = self.slide_level_spin.value()
        cfg.wsi.tile_size = self.tile_spin.value()
        cfg.data.unpainted = "background" if self.background_check.isChecked() else "ignore"
        cfg.data.class_names = {str(v): n for v, n in self._class_names.items() if n}
        cfg.optim.lr = self.lr_spin.value()
        self.prior_controls.apply(cfg)
        cfg.mean_teacher.ema_alpha = self.ema_spin.value()
        cfg.mean_teacher.consistency = self.consistency_spin.value()
        cfg.mean_teacher.rampup_steps = self.rampup_spin.value()
        if self.method_settings is not None:
            # through the strict JSON loader: wrong values become a ConfigError naming the key
            merged = cfg.to_dict()
            merged[cfg.method] = {**merged[cfg.method], **self.method_settings.values()}
            cfg = TrainConfig.from_dict(merged)
        return cfg

    def snapshot(self, wsi=None) -> list:
        """Copies of the chosen layers as AnnotatedPairs (with their validation slices);
        multiscale images (slides) as SlidePairs at ``wsi.level`` (the dock's by default)."""
        from ..errors import DataError

        pairs = self.pairs()
        if not pairs:
            raise DataError("no image layer chosen: open an image (File > Open) and pick it in the Train dock")
        if all(labels is None for _, labels in pairs):
            # the combos offer only labels of the image's shape: say why a painted layer is missing
            image = pairs[0][0]
            shape = _layers.spatial_shape(image)
            others = [lab for lab in _layers.input_labels(self.viewer.layers) if _layers.spatial_shape(lab) != shape]
            if others and len(others) == len(_layers.input_labels(self.viewer.layers)):
                raise DataError(
                    f"labels layer '{others[0].name}' has shape {_layers.spatial_shape(others[0])} but image "
                    f"'{image.name}' has spatial shape {shape}: use 'New labels layer for image' to create a matching one"
                )
        wsi = wsi if wsi is not None else self.build_config().wsi
        return [
            _layers.snapshot_pair(image, labels, validation_slices=self._validation_of(image), wsi=wsi)
            for image, labels in pairs
        ]

    def start_training(self) -> bool:
        """Build a NEW trainer (fresh weights) from snapshots and start it; True if started."""
        if self._running:
            notifications.show_warning("Training is running: press Stop first.")
            return False
        try:
            cfg = self.build_config()
            pairs = self.snapshot(cfg.wsi)
            if self.devices_spin.value() > 1:
                trainer = self._distributed_run(cfg, pairs, self._run_folder())
            else:
                # leave a core to the Qt thread: napari stays fluent while training on the CPU
                trainer = Trainer(cfg, pairs, out_dir=self._run_folder(), num_threads=self.num_threads)
        except (SemiclError, ValueError, OSError) as exc:
            notifications.show_error(f"Cannot train: {exc}")
            return False
        self._begin(trainer)
        return True

    def resume_from_checkpoint(self, path) -> bool:
        """Continue a saved run (e.g. after napari was closed or killed) on the chosen layers.

        The checkpoint's config and weights with the dock's budget; checkpoints go to the run
        folder, or beside ``path`` when none is chosen. A checkpoint that is not plain data,
        belongs to another network or does not fit the layers becomes a notification and
        changes nothing. Returns True if training started.
        """
        if self._running:
            notifications.show_warning("Training is running: press Stop first.")
            return False
        path = Path(path)
        try:
            pairs = self.snapshot()
            out_dir = Path(self.run_folder_edit.text().strip()).expanduser() if self.run_folder_edit.text().strip() \
                else path.parent
            if self.devices_spin.value() > 1:
                cfg = TrainConfig.from_json(load_checkpoint(path)["config"])  # as the ranks will resume it
                trainer = self._distributed_run(cfg, pairs, out_dir, resume=path)
            else:
                trainer = Trainer.from_checkpoint(path, pairs, out_dir=out_dir, num_threads=self.num_threads)
        except (SemiclError, ValueError, OSError) as exc:
            notifications.show_error(f"Cannot resume from {path.name}: {exc}")
            return False
        trainer.config.iterations = self.iterations_spin.value()
        trainer.config.minutes = self.minutes_spin.value()
        trainer.config.budget = self.budget_combo.currentText()
        trainer.config.refresh_every = self.refresh_spin.value()
        self._begin(trainer)
        return True

    def _distributed_run(self, cfg: TrainConfig, pairs: list, out_dir: Path, *, resume=None) -> DistributedRun:
        """The same training on ``devices`` processes under torchrun (engine.launch); on the
        CPU the dock's threads are shared among them."""
        n = self.devices_spin.value()
        return DistributedRun(cfg, pairs, n_procs=n, out_dir=out_dir, device=self._device_kind, resume=resume,
                              num_threads=max(1, self.num_threads // n))

    def _begin(self, trainer: Trainer) -> None:
        """Show and launch a freshly built trainer."""
        self._trainer = trainer
        self.history.clear()
        self._latest.clear()
        self._run_layers = self.pairs()
        self._prepare_output_layers(trainer)
        self.run_starting.emit(trainer)
        self._set_class_values(trainer.dataset.class_values)
        names = {str(v): n for v, n in self._class_names.items() if n}
        if names or not trainer.config.data.class_names:  # a resumed run keeps its names
            trainer.config.data.class_names = names
        self.dice_label.setText("Validation Dice: mark a painted slice for validation to see it")
        self._launch()

    def stop_training(self) -> None:
        """Ask the trainer to stop after the current step (it checkpoints, then finishes)."""
        if self._trainer is None or not self._running:
            return
        self._trainer.request_stop()
        self._stopping = True
        self.status_label.setText("Stopping after the current step...")
        self._update_buttons()

    def resume_training(self) -> bool:
        """Continue the current trainer (same weights) with fresh label snapshots."""
        if self._running:
            notifications.show_warning("Training is already running.")
            return False
        if self._trainer is None:
            notifications.show_warning("Nothing to resume: press Train first.")
            return False
        cfg = self._trainer.config
        cfg.iterations = self.iterations_spin.value()
        cfg.minutes = self.minutes_spin.value()
        cfg.budget = self.budget_combo.currentText()
        cfg.refresh_every = self.refresh_spin.value()
        self._submit_snapshot(force=True)
        self._launch()
        return True

    def refresh_classes(self) -> list[int]:
        """Fill the class table from the label values painted in the chosen labels layers."""
        import numpy as np

        values: set[int] = set()
        for _, labels in self.pairs():
            if labels is not None:
                values.update(int(v) for v in np.unique(np.asarray(labels.data)) if v != 0)
        if self.background_check.isChecked() and values:
            values.add(0)
        self._set_class_values(sorted(values))
        return sorted(values)

    def mark_validation(self, mark: bool = True) -> int | None:
        """(Un)mark the current slice of the active pair for validation; returns its index."""
        pair = self._active_pair()
        if pair is None:
            notifications.show_warning("Choose an image in the Train dock first.")
            return None
        image = pair[0]
        try:
            index = _layers.current_slice(self.viewer, image, self.axis_spin.value())
        except SemiclError as exc:
            notifications.show_warning(str(exc))
            return None
        key = _layers.layer_key(image)
        if mark:
            self._validation.mark(key, image.name, index)
        else:
            self._validation.unmark(key, index)
        self._update_validation_label()
        return index

    def validation_slices(self, image: Image) -> list[int]:
        return sorted(self._validation_of(image))

    def shutdown(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop a running worker cleanly (checkpoint) and wait up to ``timeout`` seconds."""
        worker = self._worker
        if worker is not None:
            for signal, slot in (
                (worker.yielded, self._on_event),
                (worker.errored, self._on_worker_errored),
                (worker.finished, self._on_worker_finished),
            ):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass
        _abandon_run(self._run_ref, timeout=timeout)
        self._worker = None
        self._control = None
        self._running = False

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        """The dock, top to bottom: what to train on, method and budget, the run buttons with
        progress, ETA and losses (visible without scrolling on a 1000-pixel-high screen),
        validation slices, classes, then the rarely changed settings folded in 'Advanced'."""
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()  # the dock is taller than small screens: scroll, never squeeze
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)

        pairs_box = QGroupBox("Image / labels pairs")
        pairs_outer = QVBoxLayout(pairs_box)
        self._rows: list[_PairRow] = []
        self._pairs_layout = QVBoxLayout()
        pairs_outer.addLayout(self._pairs_layout)
        self.add_pair_button = QPushButton("+ pair")
        self.add_pair_button.setToolTip("Train on several images at once")
        self.add_pair_button.clicked.connect(self._on_add_pair_clicked)
        pairs_outer.addWidget(self.add_pair_button)
        layout.addWidget(pairs_box)

        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.method_combo = QComboBox()
        self.method_combo.addItems(available_methods())
        form.addRow("Method", self.method_combo)
        budget_row = QHBoxLayout()
        self.budget_combo = QComboBox()
        self.budget_combo.addItems(["iterations", "minutes"])
        self.budget_combo.setToolTip("Train for a number of steps, or for a wall-clock time")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 10_000_000)
        self.iterations_spin.setValue(300)
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 100_000.0)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setValue(5.0)
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
        self.prior_controls = PriorControls(self)
        form.addRow(self.prior_controls)
        layout.addLayout(form)

        self.device_label = QLabel(f"Device: {describe_device(pick_device(), self.num_threads)}")
        self.device_label.setWordWrap(True)
        layout.addWidget(self.device_label)
        # several GPUs (or NAPARI_SEMICL_CPU_RANKS): the same training under torchrun
        n_devices, self._device_kind = visible_devices()
        self.devices_spin = QSpinBox()
        self.devices_spin.setRange(1, n_devices)
        self.devices_spin.setValue(1)
        self.devices_spin.setToolTip(
            "Devices to train on: 1 trains in napari's worker thread; more starts the same training "
            "under torchrun, one process per device (docs/distributed.md)"
        )
        devices_row = QHBoxLayout()
        devices_row.addWidget(QLabel(f"Devices ({self._device_kind.upper()})"))
        devices_row.addWidget(self.devices_spin, 1)
        self.devices_row = QWidget()
        self.devices_row.setLayout(devices_row)
        self.devices_row.setVisible(n_devices > 1)
        layout.addWidget(self.devices_row)
        run_row = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Start a new training run (fresh weights)")
        self.train_button.clicked.connect(self._on_train_clicked)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step and keep the model")
        self.stop_button.clicked.connect(self._on_stop_clicked)
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self._on_resume_clicked)
        for button in (self.train_button, self.stop_button, self.resume_button):
            button.setMinimumWidth(0)
            run_row.addWidget(button)
        layout.addLayout(run_row)
        self.resume_checkpoint_button = QPushButton("Resume from checkpoint...")
        self.resume_checkpoint_button.clicked.connect(self._on_resume_checkpoint_clicked)
        layout.addWidget(self.resume_checkpoint_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%p%")
        layout.addWidget(self.progress_bar)
        self.eta_label = QLabel("")
        self.loss_label = QLabel("")
        self.dice_label = QLabel("")
        self.status_label = QLabel("Paint a few slices (two classes at least), then press Train.")
        self.review_label = QLabel("")  # which slice the review layers show
        for label in (self.eta_label, self.loss_label, self.dice_label, self.status_label, self.review_label):
            label.setWordWrap(True)  # long lines wrap: the dock is never widened by a message
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            layout.addWidget(label)

        val_box = QGroupBox("Validation slices")
        val_layout = QVBoxLayout(val_box)
        val_buttons = QHBoxLayout()
        self.mark_button = QPushButton("Mark slice for validation")
        self.mark_button.setToolTip(
            "Hold the current (painted) slice out of training; live Dice is computed on it"
        )
        self.mark_button.clicked.connect(self._on_mark_clicked)
        self.unmark_button = QPushButton("Unmark")
        self.unmark_button.setToolTip("Give the current slice back to training")
        self.unmark_button.clicked.connect(self._on_unmark_clicked)
        val_buttons.addWidget(self.mark_button, 1)
        val_buttons.addWidget(self.unmark_button)
        val_layout.addLayout(val_buttons)
        self.validation_label = QLabel("none")
        self.validation_label.setWordWrap(True)
        val_layout.addWidget(self.validation_label)
        layout.addWidget(val_box)

        classes_box = QGroupBox("Classes")
        classes_layout = QVBoxLayout(classes_box)
        self.class_table = QTableWidget(0, 2)
        self.class_table.setHorizontalHeaderLabels(["Label value", "Name"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.class_table.setSelectionMode(QAbstractItemView.NoSelection)
        self.class_table.setMinimumHeight(90)
        self.class_table.setMaximumHeight(120)  # scrolls beyond 3-4 classes: the dock fits 1000 px
        self.class_table.itemChanged.connect(self._on_class_item_changed)
        classes_layout.addWidget(self.class_table)
        self.refresh_classes_button = QPushButton("Refresh classes")
        self.refresh_classes_button.clicked.connect(self._on_refresh_classes_clicked)
        classes_layout.addWidget(self.refresh_classes_button)
        layout.addWidget(classes_box)

        # rarely changed: folded, so that the run and its progress stay in view
        self.advanced = QCollapsible("Advanced")
        adv = QWidget()
        adv_form = QFormLayout(adv)
        adv_form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.axis_spin = QSpinBox()
        self.axis_spin.setRange(0, 2)
        self.axis_spin.setToolTip("Axis of the image along which 2D slices are taken (0: napari's slider)")
        adv_form.addRow("Slicing axis", self.axis_spin)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Random seed of the weights, crops and augmentations")
        adv_form.addRow("Seed", self.seed_spin)
        self.refresh_spin = QSpinBox()
        self.refresh_spin.setRange(1, 1_000_000)
        self.refresh_spin.setValue(50)
        self.refresh_spin.setToolTip("Update the prediction (and pick up new labels) every N steps")
        adv_form.addRow("Refresh every", self.refresh_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(16, 1024)
        self.patch_spin.setSingleStep(16)
        self.patch_spin.setValue(128)
        self.patch_spin.setToolTip("Square training crop size in pixels (a multiple of 16)")
        adv_form.addRow("Patch size", self.patch_spin)
        self.slide_level_spin = QSpinBox()
        self.slide_level_spin.setRange(0, 10)
        self.slide_level_spin.setToolTip(
            "Slides (multiscale images): the pyramid level to train on and predict (0 = full resolution)"
        )
        adv_form.addRow("Slide level", self.slide_level_spin)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 4096)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(512)
        self.tile_spin.setToolTip(
            "Slides: tile size at that level; painted tiles train, other tissue tiles are the unlabelled pool"
        )
        adv_form.addRow("Slide tile size", self.tile_spin)
        for label, widget in self.prior_controls.advanced_rows():
            adv_form.addRow(label, widget)
        folder_row = QHBoxLayout()
        self.run_folder_edit = QLineEdit()
        self.run_folder_edit.setPlaceholderText(f"automatic: {DEFAULT_RUNS_ROOT}/<date-time>")
        self.run_folder_edit.setToolTip("Where checkpoints, config.json and autosaved annotations go")
        self.run_folder_edit.setMinimumWidth(60)
        browse = QPushButton("...")
        browse.setToolTip("Choose the folder where checkpoints are written")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._on_browse_clicked)
        folder_row.addWidget(self.run_folder_edit, 1)
        folder_row.addWidget(browse)
        adv_form.addRow("Run folder", folder_row)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(3e-3)
        adv_form.addRow("Learning rate", self.lr_spin)
        self.ema_spin = QDoubleSpinBox()
        self.ema_spin.setDecimals(4)
        self.ema_spin.setRange(0.5, 0.9999)
        self.ema_spin.setSingleStep(0.001)
        self.ema_spin.setValue(0.99)
        adv_form.addRow("EMA alpha (teacher)", self.ema_spin)
        self.consistency_spin = QDoubleSpinBox()
        self.consistency_spin.setDecimals(3)
        self.consistency_spin.setRange(0.0, 100.0)
        self.consistency_spin.setValue(0.1)
        adv_form.addRow("Consistency weight", self.consistency_spin)
        self.rampup_spin = QSpinBox()
        self.rampup_spin.setRange(0, 10_000_000)
        self.rampup_spin.setValue(200)
        adv_form.addRow("Ramp-up steps", self.rampup_spin)
        # the current method's own settings, generated from its config section
        self.method_settings_box = QGroupBox("Method settings")
        self._method_settings_layout = QVBoxLayout(self.method_settings_box)
        self.method_settings: MethodSettingsForm | None = None
        adv_form.addRow(self.method_settings_box)
        self.method_combo.currentTextChanged.connect(self._on_method_changed)
        self._on_method_changed(self.method_combo.currentText())
        self.advanced.addWidget(adv)
        layout.addWidget(self.advanced)
        layout.addStretch(1)

        for signal in (self.iterations_spin.valueChanged, self.minutes_spin.valueChanged,
                       self.budget_combo.currentTextChanged):
            signal.connect(self._update_resume_text)
        self._update_resume_text()
        # as wide as the controls need (the scroll area only scrolls vertically); combos show
        # long layer names elided, so a long name never pushes buttons off the dock's edge
        for combo in self.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self._scroll = scroll
        self.setMinimumWidth(max(MIN_WIDTH, content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 4))

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)
        events.moved.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _disconnect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)

    def _update_buttons(self) -> None:
        running = self._running
        self.train_button.setEnabled(not running)
        self.stop_button.setEnabled(running and not self._stopping)
        self.resume_button.setEnabled(not running and self._trainer is not None)
        self.resume_checkpoint_button.setEnabled(not running)
        for row in self._rows:
            row.remove_button.setEnabled(len(self._rows) > 1)

    # ------------------------------------------------------------------ layer choices
    def _layer(self, name: str, kind: type):
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, kind):
                return layer
        return None

    def _fill_row(self, row: _PairRow, prefer_image: str | None = None) -> None:
        images = [im.name for im in _layers.input_images(self.viewer.layers)]
        current = row.image_combo.currentText()
        keep = current if current in images else (prefer_image if prefer_image in images else None)
        row.image_combo.blockSignals(True)
        row.image_combo.clear()
        row.image_combo.addItems(images)
        if keep is None and images:
            keep = images[0]
        if keep is not None:
            row.image_combo.setCurrentText(keep)
        row.image_combo.blockSignals(False)
        self._fill_labels_combo(row)

    def _fill_labels_combo(self, row: _PairRow, prefer: str | None = None) -> None:
        """Labels layers of the row image's shape; keeps the choice, else a default."""
        image = self._layer(row.image_combo.currentText(), Image)
        names = []
        if image is not None:
            shape = _layers.spatial_shape(image)
            names = [
                lab.name for lab in _layers.input_labels(self.viewer.layers)
                if tuple(lab.data.shape) == shape
            ]
        current = prefer or row.labels_combo.currentText()
        if prefer is not None:
            row.none_chosen = prefer == NO_LABELS
        if current not in names and not (current == NO_LABELS and row.none_chosen):
            # the default: the active labels layer, else the first free one; never a reference
            # mask ('*_gt', '* reference'), which is for evaluation (choose it by hand if wanted)
            references = {lab.name for lab in _layers.input_labels(self.viewer.layers)
                          if _layers.looks_like_reference(lab)}
            active = self.viewer.layers.selection.active
            taken = {r.labels_combo.currentText() for r in self._rows if r is not row}
            if active is not None and active.name in names and active.name not in references:
                current = active.name
            else:
                current = next((n for n in names if n not in taken and n not in references), NO_LABELS)
        row.labels_combo.blockSignals(True)
        row.labels_combo.clear()
        row.labels_combo.addItems([*names, NO_LABELS])
        row.labels_combo.setCurrentText(current)
        row.labels_combo.blockSignals(False)

    def _active_pair(self):
        pairs = self.pairs()
        if not pairs:
            return None
        active = self.viewer.layers.selection.active
        for image, labels in pairs:
            if _layers.same_layer(active, image) or _layers.same_layer(active, labels):
                return image, labels
        return pairs[0]

    def _validation_of(self, image: Image) -> set[int]:
        return set(self._validation.slices(_layers.layer_key(image)))

    def _update_validation_label(self) -> None:
        keys = set()
        for layer in self.viewer.layers:
            key = _layers.layer_key(layer)
            self._validation.rename(key, layer.name)
            keys.add(key)
        self.validation_label.setText(self._validation.describe(keys))

    # ------------------------------------------------------------------ classes
    def _set_class_values(self, values) -> None:
        self._filling_table = True
        try:
            self.class_table.setRowCount(len(values))
            for i, v in enumerate(values):
                v = int(v)
                self._class_names.setdefault(v, "background" if v == 0 else f"class {v}")
                value_item = QTableWidgetItem(str(v))
                value_item.setFlags(Qt.ItemIsEnabled)
                self.class_table.setItem(i, 0, value_item)
                self.class_table.setItem(i, 1, QTableWidgetItem(self._class_names[v]))
        finally:
            self._filling_table = False
        self._apply_class_names()

    def _apply_class_names(self) -> None:
        names = {v: self._class_names[v] for v in self._table_values()}
        if self._trainer is not None:
            self._trainer.config.data.class_names = {str(v): n for v, n in names.items() if n}
        if not names:
            return
        for _, labels in self.pairs():
            if labels is not None:
                _layers.apply_class_names(labels, names)
        for image, _ in self._run_layers:
            pred = self._layer(f"{image.name}{_layers.PREDICTION_SUFFIX}", Labels)
            if pred is not None:
                _layers.apply_class_names(pred, names)

    def _table_values(self) -> list[int]:
        out = []
        for i in range(self.class_table.rowCount()):
            item = self.class_table.item(i, 0)
            if item is not None:
                out.append(int(item.text()))
        return out

    # ------------------------------------------------------------------ running
    def _run_folder(self) -> Path:
        text = self.run_folder_edit.text().strip()
        if text:
            return Path(text).expanduser()
        root = DEFAULT_RUNS_ROOT.expanduser()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder, n = root / stamp, 1
        while folder.exists():
            n += 1
            folder = root / f"{stamp}-{n}"
        return folder

    def _launch(self) -> None:
        trainer = self._trainer
        self._running, self._stopping = True, False
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Starting on {describe_device(trainer.device, trainer.num_threads)}...")
        self._worker, self._control = start_training_worker(  # freezes the heap until it ends
            trainer,
            on_event=self._on_event,
            on_error=self._on_worker_errored,
            on_finished=self._on_worker_finished,
        )
        self._run_ref.update(trainer=trainer, control=self._control, worker=self._worker)
        self._update_buttons()

    def _prepare_output_layers(self, trainer: Trainer) -> None:
        """Create the prediction/entropy layers and the method's review layers (patch
        entropy, sampled pixels) now, empty, not in the middle of training.

        Adding a layer costs napari a noticeable pause (visuals, shaders, layer controls:
        0.1-1 s measured by ``bench ui``); paying it when Train is pressed keeps the viewer
        smooth while the user paints during training. The refreshes then write into them.
        """
        import numpy as np

        from ..data import decoded_dtype

        dtype = decoded_dtype(trainer.dataset.class_values)
        wanted = set(getattr(trainer.method, "review_layers", ()))
        axis, k = trainer.config.data.axis, len(trainer.dataset.class_values)
        for image, _ in self._run_layers:
            if image.multiscale:
                continue  # a slide: its prediction pyramid arrives with the first refresh
            shape = _layers.spatial_shape(image)
            # until the run's first Preview (with the painted-slice prior: the filled shape, sent
            # as soon as the training thread has computed it) a layer there already, e.g. from
            # Fill between slices, is kept; else an empty one
            existing = _layers._find(self.viewer, f"{image.name}{_layers.PREDICTION_SUFFIX}", Labels)
            if existing is None or tuple(existing.data.shape) != tuple(shape) or existing.multiscale:
                _layers.show_prediction(self.viewer, image, np.zeros(shape, dtype=dtype))
            _layers.show_entropy(self.viewer, image, np.zeros(shape, dtype=np.float32))
            if "patch_entropy" in wanted:
                maps = np.zeros((k, *_layers.slice_shape(image, axis)), np.float32)
                _layers.show_patch_entropy(self.viewer, image, maps, 0, axis)
            if "sampled_pixels" in wanted:
                _layers.show_sampled_pixels(self.viewer, image, np.zeros((0, 2)), np.zeros(0, np.int64), 0, axis)

    def _submit_snapshot(self, force: bool = False) -> bool:
        """Hand the trainer fresh copies of the labels (and validation slices) if changed."""
        trainer = self._trainer
        if trainer is None:
            return False
        pairs, changed = [], False
        for pair, (image, labels) in zip(trainer.pairs, self._run_layers):
            alive_labels = labels if labels is not None and labels in self.viewer.layers else None
            new = _layers.refresh_pair(pair, alive_labels, self._validation_of(image))
            changed |= new is not None
            pairs.append(new if new is not None else pair)
        if changed or force:
            trainer.submit_data(pairs)
        return changed

    # ------------------------------------------------------------------ event handlers
    def _on_event(self, event) -> None:
        """One trainer event, on the Qt thread: handled here, then passed on to the docks."""
        self._handle_event(event)
        self._remember(event)
        self.event_received.emit(event)

    def _remember(self, event) -> None:
        """Keep what a dock opened later must show (:meth:`replay_events`, :attr:`history`)."""
        if isinstance(event, StepDone):
            self.history.add(event.step, event.losses)
        elif isinstance(event, Evaluated):
            self._latest["evaluated"] = event
            dice = event.metrics.get("dice")
            if dice is not None and not (isinstance(dice, float) and math.isnan(dice)):
                self.history.add(event.step, {DICE: dice})
        elif isinstance(event, Started):
            self._latest["started"] = event
        elif isinstance(event, Preview):
            # prediction before entropy: the pseudo-labels are made when the entropy comes
            self._latest[("preview", event.pair_index, event.kind != "prediction", event.kind)] = event
        elif isinstance(event, Reviewed):
            self._latest[("reviewed", event.pair_index)] = event

    def _handle_event(self, event) -> None:
        if isinstance(event, StepDone):
            self.progress_bar.setValue(int(round(1000 * min(max(event.fraction, 0.0), 1.0))))
            eta = "" if event.eta_s is None else f" · ETA {_format_seconds(event.eta_s)}"
            self.eta_label.setText(f"step {event.step} · {_format_seconds(event.elapsed_s)} elapsed{eta}")
            self.loss_label.setText("loss: " + " · ".join(f"{k} {v:.4f}" for k, v in event.losses.items()))
        elif isinstance(event, Preview):
            self._on_preview(event)
        elif isinstance(event, Reviewed):
            self._on_reviewed(event)
        elif isinstance(event, Evaluated):
            self._on_evaluated(event)
        elif isinstance(event, Started):
            self._show_summary(event.device, event.summary)
        elif isinstance(event, DataUpdated):
            self._show_summary(describe_device(self._trainer.device, self._trainer.num_threads), event.summary)
        elif isinstance(event, Notice):
            show = notifications.show_warning if event.level == "warning" else notifications.show_info
            show(event.text)
        elif isinstance(event, Checkpointed):
            self.status_label.setText(f"step {event.step}: checkpoint saved to {event.path}")
        elif isinstance(event, Finished):
            self._on_finished(event)

    def _on_preview(self, event: Preview) -> None:
        if not 0 <= event.pair_index < len(self._run_layers):
            return
        image = self._run_layers[event.pair_index][0]
        if image not in self.viewer.layers:
            return  # the user removed the image: nothing to draw on
        if event.kind == "prediction":
            layer = _layers.show_prediction(self.viewer, image, event.array)
            names = {v: self._class_names[v] for v in self._table_values() if v in self._class_names}
            if names:
                _layers.apply_class_names(layer, names)
            if event.pair_index == len(self._run_layers) - 1 and self._running and not self._stopping:
                self._submit_snapshot()  # labels painted meanwhile join now
                self._request_review()  # the slice in view, reviewed before the next step
        elif event.kind == "entropy":
            _layers.show_entropy(self.viewer, image, event.array)

    def _request_review(self) -> None:
        """Ask the trainer to review the slice in view of the active image (cheap here:
        the trainer does the work in its thread before its next step)."""
        trainer = self._trainer
        active = self._active_pair()
        if trainer is None or active is None:
            return
        image = active[0]
        index = next((i for i, (im, _) in enumerate(self._run_layers) if _layers.same_layer(im, image)), None)
        if index is None or image not in self.viewer.layers:
            return
        try:
            s_idx = _layers.current_slice(self.viewer, image, trainer.config.data.axis)
        except SemiclError as exc:
            log.debug("no review: %s", exc)
            return
        trainer.request_review(index, s_idx)

    def _on_reviewed(self, event: Reviewed) -> None:
        if not 0 <= event.pair_index < len(self._run_layers) or self._trainer is None:
            return
        image = self._run_layers[event.pair_index][0]
        if image not in self.viewer.layers:
            return
        axis = self._trainer.config.data.axis
        shown = []
        maps = event.arrays.get("patch_entropy")
        if maps is not None:
            _layers.show_patch_entropy(self.viewer, image, maps, event.slice_index, axis)
            shown.append(f"patch entropy of {maps.shape[0]} classes")
        pixels = event.arrays.get("sampled_pixels")
        if pixels is not None:
            classes = event.arrays.get("sampled_classes")
            _layers.show_sampled_pixels(self.viewer, image, pixels, classes, event.slice_index, axis)
            shown.append(f"{len(pixels)} sampled pixels")
        if shown:
            self.review_label.setText(
                f"Review of '{image.name}' slice {event.slice_index} at step {event.step}: {', '.join(shown)}"
            )

    def _on_evaluated(self, event: Evaluated) -> None:
        m = event.metrics
        per_class = m.get("dice_per_class", {})
        detail = ", ".join(
            f"{self._class_names.get(int(v), v)} {d:.3f}" for v, d in per_class.items()
            if not (isinstance(d, float) and math.isnan(d))
        )
        self.dice_label.setText(
            f"Validation Dice {m.get('dice', float('nan')):.3f} at step {event.step} "
            f"({m.get('slices', 0)} slice(s)){': ' + detail if detail else ''}"
        )

    def _show_summary(self, device: str, summary: dict) -> None:
        self.status_label.setText(
            f"Device: {device} · {summary.get('unit', 'slices')}: {summary.get('labelled', 0)} labelled, "
            f"{summary.get('unlabelled', 0)} unlabelled, {summary.get('validation', 0)} validation"
        )

    def _on_finished(self, event: Finished) -> None:
        if event.reason == "error":
            notifications.show_error(f"Training stopped by an error: {event.error}")
            self.status_label.setText(f"Error at step {event.step}: {event.error}")
        else:
            if event.reason == "budget":
                self.progress_bar.setValue(1000)
            where = f"; checkpoint: {event.checkpoint}" if event.checkpoint else ""
            verb = "Stopped" if event.reason == "stopped" else "Finished"
            self.status_label.setText(f"{verb} at step {event.step} after {_format_seconds(event.seconds)}{where}")
        self._running, self._stopping = False, False
        self._update_buttons()

    def _on_worker_errored(self, exc: Exception) -> None:
        log.error("training worker crashed", exc_info=(type(exc), exc, exc.__traceback__))
        notifications.show_error(f"Training crashed: {exc}")
        self._running, self._stopping = False, False
        self._update_buttons()

    def _on_worker_finished(self) -> None:
        if self._control is not None:
            self._control.close_generator()  # only does something after a napari cancel
        self._worker, self._control = None, None
        self._run_ref.update(control=None, worker=None)
        if self._running:  # ended without a Finished event (cancelled)
            self.status_label.setText("Training cancelled; press Resume to continue.")
        self._running, self._stopping = False, False
        self._update_buttons()

    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        for row in self._rows:
            self._fill_row(row)
        self._update_validation_label()
        self._update_network_choice()

    def _on_image_changed(self, row: _PairRow, _text: str = "") -> None:
        self._fill_labels_combo(row)
        self._update_network_choice()

    def _update_network_choice(self) -> None:
        """3D patches are offered for volumes only (Advanced: Network)."""
        controls = getattr(self, "prior_controls", None)
        if controls is not None:
            images = [image for image, _ in self.pairs()]
            controls.set_volumes(bool(images) and all(len(_layers.spatial_shape(im)) == 3 for im in images))

    def _on_add_pair_clicked(self) -> None:
        self.add_pair()

    def _on_remove_pair_clicked(self, row: _PairRow) -> None:
        if len(self._rows) <= 1:
            return
        self._rows.remove(row)
        row.setParent(None)
        row.deleteLater()
        self._update_buttons()

    def _on_new_labels_clicked(self, row: _PairRow) -> None:
        image = self._layer(row.image_combo.currentText(), Image)
        if image is None:
            notifications.show_warning("Open an image first (File > Open, or File > Open Sample).")
            return
        try:
            layer = self.new_labels_layer(image)
        except SemiclError as exc:
            notifications.show_error(str(exc))
            return
        self._fill_labels_combo(row, prefer=layer.name)

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

    def resume_budget_text(self) -> str:
        """What Resume (and Resume from checkpoint) trains: '300 more steps' or '5.0 more minutes'.

        The engine counts the budget from where a run starts (:meth:`Trainer.run`)."""
        if self.budget_combo.currentText() == "minutes":
            return f"{self.minutes_spin.value():g} more minutes"
        return f"{self.iterations_spin.value()} more steps"

    def _update_resume_text(self, *_args) -> None:
        more = self.resume_budget_text()
        self.resume_button.setText(f"Resume (+{more.replace(' more', '')})")
        self.resume_button.setToolTip(f"Continue the last run with the current labels: {more}")
        self.resume_checkpoint_button.setToolTip(
            f"Continue a saved run (checkpoint.pt in its run folder) on the chosen layers for {more}; "
            "the run's annotations are autosaved in its 'annotations' folder"
        )

    def _on_budget_changed(self, text: str) -> None:
        self.iterations_spin.setVisible(text == "iterations")
        self.minutes_spin.setVisible(text == "minutes")

    def _on_browse_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Run folder (checkpoints)")
        if folder:
            self.run_folder_edit.setText(folder)

    def _on_refresh_classes_clicked(self) -> None:
        if not self.refresh_classes():
            notifications.show_info("No painted label yet: paint a slice first.")

    def _on_class_item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling_table or item.column() != 1:
            return
        value_item = self.class_table.item(item.row(), 0)
        if value_item is None:
            return
        self._class_names[int(value_item.text())] = item.text().strip()
        self._apply_class_names()

    def _on_mark_clicked(self) -> None:
        self.mark_validation(True)

    def _on_unmark_clicked(self) -> None:
        self.mark_validation(False)

    def _on_train_clicked(self) -> None:
        self.start_training()

    def _on_stop_clicked(self) -> None:
        self.stop_training()

    def _on_resume_clicked(self) -> None:
        self.resume_training()

    def _on_resume_checkpoint_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Resume from checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.resume_from_checkpoint(path)

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        self._disconnect_viewer()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari removes a dock (its "x") by un-parenting the widget: stop training then
        if event.type() == QEvent.ParentChange and self.parent() is None and self._running:
            self.shutdown()
        return super().event(event)


def _abandon_run(run_ref: dict, *_args, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Stop the trainer in ``run_ref`` and wait (briefly) for its worker to checkpoint.

    A module-level function so that it still works from ``destroyed``, when the widget's
    C++ side is already gone.
    """
    trainer, control, worker = run_ref.get("trainer"), run_ref.get("control"), run_ref.get("worker")
    run_ref.update(control=None, worker=None)
    if isinstance(trainer, DistributedRun):
        # even when the worker is already gone (napari may quit it first as the viewer closes,
        # leaving the job's generator suspended): the ranks checkpoint and end in the background
        trainer.abandon()
    if control is None:
        return
    if trainer is not None and not isinstance(trainer, DistributedRun):
        trainer.request_stop()
    control.abandon.set()
    if control.wait(timeout):
        control.close_generator()  # checkpoints when a worker quit left the trainer suspended
    else:
        log.warning("the training worker did not end within %.1f s; it will checkpoint when it does", timeout)
        if worker is not None:
            try:
                worker.quit()
            except RuntimeError:
                pass

        def close_when_done() -> None:
            control.wait(None)
            control.close_generator()

        threading.Thread(target=close_when_done, name="napari-semicl-close", daemon=True).start()


_WARM_UP_STARTED = threading.Event()


def _warm_up_torch() -> None:
    """Import torch's lazily loaded optimiser machinery in a background thread, once.

    The first optimiser a process builds imports ``torch._dynamo`` (seconds on a busy
    CPU); doing it while the user paints keeps the Train button from freezing the viewer.
    """
    if _WARM_UP_STARTED.is_set():
        return
    _WARM_UP_STARTED.set()

    def warm() -> None:
        try:
            import torch

            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        except Exception:  # noqa: BLE001 - only a warm-up: training reports real errors
            log.debug("torch warm-up failed", exc_info=True)

    threading.Thread(target=warm, name="napari-semicl-warm-up", daemon=True).start()


def _format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
