"""The "Train (semi-supervised)" dock: pick image/labels pairs, train, watch, stop, resume.

The dock only assembles its parts (napari's model/view split):

========================  =================================================================
:class:`.model.TrainRun`   the run, Qt-free: trainer, running/stopping, history, replay,
                           validation marks, class names; emits psygnal signals
:class:`.pairs.PairsView`  the image/labels pair rows
:class:`.form.TrainForm`   method, budget and Advanced settings -> ``TrainConfig``
:class:`.controller.RunController`  Train / Stop / Resume / Devices: builds and runs trainers
:class:`.presenter.RunPresenter`    events -> progress bar, text lines, layers
:mod:`.marks`              the Validation slices and Classes boxes
========================  =================================================================

Each part gets the callables it needs, never the dock. The dock keeps the public API
(:meth:`TrainWidget.start_training`, :meth:`~TrainWidget.stop_training`,
:meth:`~TrainWidget.resume_training`, ...) that tests, scripts and the review docks use, and
the controls as attributes (``dock.iterations_spin``...).
"""

from __future__ import annotations

import functools

from napari.layers import Image, Labels
from qtpy.QtCore import QEvent, Qt, Signal
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea, QVBoxLayout, QWidget

from ...errors import DataError
from .. import _layers
from .controller import RunController, warm_up_torch
from .form import TrainForm
from .marks import ClassTable, ValidationBox
from .model import CLOSE_TIMEOUT_S, TrainRun
from .pairs import PairRow, PairsView
from .presenter import RunPresenter
from .prior import PriorControls

#: The Train dock's narrowest width (pixels): its buttons and two-column forms fit in it.
MIN_WIDTH = 340

#: Controls of the parts kept as attributes of the dock (scripts and tests set them there).
_FORM_CONTROLS = ("method_combo", "budget_combo", "iterations_spin", "minutes_spin", "background_check",
                  "advanced", "run_folder_edit", "method_settings_box")
_CONTROLLER_CONTROLS = ("device_label", "devices_spin", "devices_row", "train_button", "stop_button",
                        "resume_button", "resume_checkpoint_button")
_PRESENTER_CONTROLS = ("progress_bar", "eta_label", "loss_label", "dice_label", "status_label", "review_label")


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
        self.run = TrainRun()
        warm_up_torch()
        self._build_ui()
        # closing the viewer deletes us without a closeEvent: the model stops the run
        self.destroyed.connect(functools.partial(_abandon, self.run))
        self._connect_viewer()
        self.add_pair()

    def _build_ui(self) -> None:
        """The dock, top to bottom: what to train on, method and budget, the run buttons with
        progress, ETA and losses (visible without scrolling on a 1000-pixel-high screen),
        validation slices, classes, then the rarely changed settings folded in 'Advanced'."""
        run, viewer = self.run, self.viewer
        self.pairs_view = PairsView(viewer)
        self.prior_controls = PriorControls(prepare=self._prepare_fill, show=self._show_fill,
                                            status=self._set_status)
        self.form = TrainForm(self.prior_controls)
        self.presenter = RunPresenter(viewer, run, class_names=self._table_names, refreshed=self._on_refreshed)
        self.validation_box = ValidationBox(viewer, run, active_pair=self.pairs_view.active_pair,
                                            axis=self.form.axis_spin.value)
        self.classes_box = ClassTable(viewer, run, pairs=self.pairs, background=self.form.background_check.isChecked)
        # late-bound: a script (or test) that replaces the dock's build_config is obeyed
        self.controller = RunController(
            viewer, run, build_config=lambda: self.build_config(), snapshot=lambda wsi=None: self.snapshot(wsi),
            chosen_layers=self.pairs,
            budget=self.form.budget, run_folder=self.form.run_folder_text,
            validation_of=self.validation_box.slices_of, active_pair=self.pairs_view.active_pair,
            began=self._on_began, status=self._set_status, starting=self.presenter.starting,
            joined=lambda images: self.presenter.prepare_output_layers(self.run.trainer, images),
        )
        run.run_starting.connect(self._on_run_starting)  # after the presenter made its layers
        run.event_received.connect(self._on_run_event)
        self.pairs_view.images_changed.connect(self._update_network_choice)
        self.pairs_view.pairs_changed.connect(self._on_pairs_changed)
        for signal in (self.form.iterations_spin.valueChanged, self.form.minutes_spin.valueChanged,
                       self.form.budget_combo.currentTextChanged):
            signal.connect(self._update_resume_text)
        self._update_resume_text()
        for name in _FORM_CONTROLS + tuple(f.attr for f in self.form.fields):
            setattr(self, name, getattr(self.form, name))
        for name in _CONTROLLER_CONTROLS:
            setattr(self, name, getattr(self.controller, name))
        for name in _PRESENTER_CONTROLS:
            setattr(self, name, getattr(self.presenter, name))
        self.validation_label = self.validation_box.validation_label
        self.mark_button, self.unmark_button = self.validation_box.mark_button, self.validation_box.unmark_button
        self.class_table = self.classes_box.class_table
        self.num_threads = self.controller.num_threads

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
        for part in (self.pairs_view, self.form, self.controller, self.presenter, self.validation_box,
                     self.classes_box, self.form.advanced):
            layout.addWidget(part)
        layout.addStretch(1)
        # as wide as the controls need (the scroll area only scrolls vertically); combos show
        # long layer names elided, so a long name never pushes buttons off the dock's edge
        for combo in self.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.scroll_area = scroll
        self.setMinimumWidth(max(MIN_WIDTH, content.minimumSizeHint().width()
                                 + scroll.verticalScrollBar().sizeHint().width() + 4))

    # ------------------------------------------------------------------ public API
    @property
    def trainer(self):
        """The current trainer (kept after a run ends, for Resume)."""
        return self.run.trainer

    @property
    def worker(self):
        """The napari thread worker of the run in progress (None when idle)."""
        return self.run.worker

    @property
    def is_training(self) -> bool:
        return self.run.running

    @property
    def run_layers(self) -> list:
        """(image layer, labels layer or None) of each pair of the current trainer."""
        return list(self.run.run_layers)

    @property
    def history(self):
        """Losses and validation Dice of the current trainer's runs (the curves dock draws it)."""
        return self.run.history

    @property
    def method_settings(self):
        """The current method's settings form (None for methods without settings)."""
        return self.form.method_settings

    @property
    def class_names(self) -> dict[int, str]:
        """Label value -> name, as named in the Classes table."""
        return self.run.class_names

    @property
    def rows(self) -> list[PairRow]:
        """The pair rows."""
        return self.pairs_view.rows

    def replay_events(self) -> list:
        """The current trainer's newest state as events (:meth:`.model.TrainRun.replay_events`)."""
        return self.run.replay_events()

    def add_pair(self) -> PairRow:
        """Add a pair row, defaulting to the first image (and labels) not yet chosen."""
        return self.pairs_view.add_pair()

    def pairs(self) -> list[tuple[Image, Labels | None]]:
        """The chosen (image layer, labels layer or None) pairs; rows without an image skipped."""
        return self.pairs_view.pairs()

    def set_pair(self, index: int, image: Image, labels: Labels | None) -> None:
        """Choose the layers of pair row ``index`` (adds rows as needed)."""
        self.pairs_view.set_pair(index, image, labels)

    def new_labels_layer(self, image: Image) -> Labels:
        """Add an empty Labels layer matching ``image`` (shape, scale, metadata)."""
        return self.pairs_view.new_labels_layer(image)

    def build_config(self):
        """A :class:`TrainConfig` from the dock's controls (not yet validated)."""
        return self.form.build_config(self.run.class_names)

    def snapshot(self, wsi=None) -> list:
        """Copies of the chosen layers as AnnotatedPairs (with their validation slices);
        multiscale images (slides) as SlidePairs at ``wsi.level`` (the dock's by default)."""
        pairs = self.pairs()
        if not pairs:
            raise DataError("no image layer chosen: open an image (File > Open) and pick it in the Train dock")
        if all(labels is None for _, labels in pairs):
            # the combos offer only labels of the image's shape: say why a painted layer is missing
            image = pairs[0][0]
            shape = _layers.spatial_shape(image)
            labels = _layers.input_labels(self.viewer.layers)
            others = [lab for lab in labels if _layers.spatial_shape(lab) != shape]
            if others and len(others) == len(labels):
                raise DataError(
                    f"labels layer '{others[0].name}' has shape {_layers.spatial_shape(others[0])} but image "
                    f"'{image.name}' has spatial shape {shape}: use 'New labels layer for image' to create a matching one"
                )
        wsi = wsi if wsi is not None else self.build_config().wsi
        return [
            _layers.snapshot_pair(image, labels, validation_slices=self.validation_box.slices_of(image), wsi=wsi)
            for image, labels in pairs
        ]

    def start_training(self) -> bool:
        """Build a NEW trainer (fresh weights) from snapshots and start it; True if started."""
        return self.controller.start_training()

    def stop_training(self) -> None:
        """Ask the trainer to stop after the current step (it checkpoints, then finishes)."""
        self.controller.stop_training()

    def resume_training(self) -> bool:
        """Continue the current trainer (same weights) with fresh label snapshots."""
        return self.controller.resume_training()

    def resume_from_checkpoint(self, path) -> bool:
        """Continue a saved run on the chosen layers (:meth:`.controller.RunController.resume_from_checkpoint`)."""
        return self.controller.resume_from_checkpoint(path)

    def resume_budget_text(self) -> str:
        """What Resume trains: '300 more steps' or '5.0 more minutes'."""
        return self.form.resume_budget_text()

    def refresh_classes(self) -> list[int]:
        """Fill the class table from the label values painted in the chosen labels layers."""
        return self.classes_box.refresh_classes()

    def mark_validation(self, mark: bool = True) -> int | None:
        """(Un)mark the current slice of the active pair for validation; returns its index."""
        return self.validation_box.mark_validation(mark)

    def validation_slices(self, image: Image) -> list[int]:
        return sorted(self.validation_box.slices_of(image))

    def shutdown(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop a running worker cleanly (checkpoint) and wait up to ``timeout`` seconds."""
        self.controller.shutdown(timeout)

    # ------------------------------------------------------------------ wiring
    def _table_names(self) -> dict[int, str]:
        return self.classes_box.names()

    def _set_status(self, text: str) -> None:
        self.presenter.status_label.setText(text)

    def _prepare_fill(self):
        cfg = self.build_config()
        return cfg, self.snapshot(cfg.wsi), [image.name for image, _ in self.pairs()]

    def _show_fill(self, image_name: str, labels) -> None:
        image = _layers._find(self.viewer, image_name, Image)
        if image is not None:
            _layers.show_prediction(self.viewer, image, labels)

    def _on_began(self, trainer) -> None:
        self.classes_box.set_values(trainer.dataset.class_values)

    def _on_run_starting(self, trainer) -> None:
        self.run_starting.emit(trainer)

    def _on_run_event(self, event) -> None:
        self.event_received.emit(event)

    def _on_pairs_changed(self) -> None:
        """While training runs, a pair added (a cohort's next volume) or given a labels layer
        joins the run at once: its mask is drawn before the next step."""
        if self.run.running and not self.run.stopping:
            self.controller.submit_snapshot()

    def _on_refreshed(self) -> None:
        self.controller.refreshed()

    def _update_resume_text(self, *_args) -> None:
        self.controller.update_resume_text(self.form.resume_budget_text())

    def _update_network_choice(self) -> None:
        """3D patches are offered for volumes only (Advanced: Network)."""
        images = [image for image, _ in self.pairs()]
        self.prior_controls.set_volumes(bool(images) and all(len(_layers.spatial_shape(im)) == 3 for im in images))

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _disconnect_viewer(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.pairs_view.refill()
        self.validation_box.update_label()

    # ------------------------------------------------------------------ closing
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        self._disconnect_viewer()
        super().closeEvent(event)

    def event(self, event) -> bool:
        # napari removes a dock (its "x") by un-parenting the widget: stop training then
        if event.type() == QEvent.ParentChange and self.parent() is None and self.run.running:
            self.shutdown()
        return super().event(event)


def _abandon(run: TrainRun, *_args) -> None:
    """Stop ``run`` from ``destroyed``, when the dock's C++ side is already gone."""
    run.abandon()
