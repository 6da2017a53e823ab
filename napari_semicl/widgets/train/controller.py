"""The Train dock's run controller: Train, Stop, Resume, Resume from checkpoint, Devices.

Builds the trainer on the Qt thread (so that a :class:`DataError` becomes a notification at
once) and runs ``trainer.run()`` in napari's thread worker (:mod:`.._worker`); with Devices
above 1, an :class:`~napari_semicl.engine.launch.DistributedRun` in its place. The run's
state is :class:`.model.TrainRun`; what the controller needs from the rest of the dock comes
as callables.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from napari.utils import notifications
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget

from ...engine import TrainConfig, Trainer, describe_device, load_checkpoint, pick_device
from ...engine.device import gui_thread_count
from ...engine.launch import DistributedRun, visible_devices
from ...errors import SemiclError
from .. import _layers
from .._worker import start_training_worker
from .form import DEFAULT_RUNS_ROOT
from .model import TrainRun, apply_budget, join_problem

log = logging.getLogger(__name__)

#: the errors building a trainer can raise that the user can fix: shown, never a traceback
USER_ERRORS = (SemiclError, ValueError, OSError)


class RunController(QWidget):
    """The run buttons of the Train dock and what they do.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    run : TrainRun
        The model the controller drives.
    build_config : callable
        ``build_config() -> TrainConfig`` from the dock's controls.
    snapshot : callable
        ``snapshot(wsi=None) -> [AnnotatedPair | SlidePair]``: copies of the chosen pairs.
    chosen_layers : callable
        ``chosen_layers() -> [(image, labels or None)]``: the pairs' live layers.
    budget : callable
        ``budget() -> dict``: the dock's budget (keyword arguments of :func:`.model.apply_budget`).
    run_folder : callable
        ``run_folder() -> str``: the chosen run folder ('' for automatic).
    validation_of : callable
        ``validation_of(image) -> set[int]``: the image's validation slices.
    active_pair : callable
        ``active_pair() -> (image, labels) | None``: the pair in view (its slice is reviewed).
    began : callable
        ``began(trainer)``: a new trainer is about to start (the class table shows its classes).
    status : callable
        ``status(text)``; ``starting(device text)``: the presenter's lines.
    joined : callable, optional
        ``joined(images)``: image layers that joined the run (their output layers are made
        then, on the user's click, not at their first preview).
    """

    def __init__(self, viewer, run: TrainRun, *, build_config: Callable, snapshot: Callable,
                 chosen_layers: Callable, budget: Callable[[], dict], run_folder: Callable[[], str],
                 validation_of: Callable, active_pair: Callable, began: Callable, status: Callable,
                 starting: Callable, joined: Callable | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer, self.run = viewer, run
        self._build_config, self._snapshot, self._chosen_layers = build_config, snapshot, chosen_layers
        self._budget, self._run_folder_text, self._validation_of = budget, run_folder, validation_of
        self._active_pair, self._began, self._status, self._starting = active_pair, began, status, starting
        self._joined = joined
        #: torch CPU threads while training (all cores but one, so the Qt thread keeps one)
        self.num_threads = gui_thread_count()
        self._finished_slot = None  # the running worker's 'finished' handler
        self._refused: dict[str, str] = {}  # image layer key -> why it cannot join the run
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.device_label = QLabel(f"Device: {describe_device(pick_device(), self.num_threads)}")
        self.device_label.setWordWrap(True)
        layout.addWidget(self.device_label)
        # several GPUs (or NAPARI_SEMICL_CPU_RANKS): the same training under torchrun
        n_devices, self.device_kind = visible_devices()
        self.devices_spin = QSpinBox()
        self.devices_spin.setRange(1, n_devices)
        self.devices_spin.setValue(1)
        self.devices_spin.setToolTip(
            "Devices to train on: 1 trains in napari's worker thread; more starts the same training "
            "under torchrun, one process per device (docs/distributed.md)"
        )
        devices_row = QHBoxLayout()
        devices_row.setContentsMargins(0, 0, 0, 0)
        devices_row.addWidget(QLabel(f"Devices ({self.device_kind.upper()})"))
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
        run.state_changed.connect(self.update_buttons)
        self.update_buttons()

    # --- starting ----------------------------------------------------------------------------
    def start_training(self) -> bool:
        """Build a NEW trainer (fresh weights) from snapshots and start it; True if started."""
        if self.run.running:
            notifications.show_warning("Training is running: press Stop first.")
            return False
        try:
            cfg = self._build_config()
            pairs = self._snapshot(cfg.wsi)
            if self.devices_spin.value() > 1:
                trainer = self._distributed_run(cfg, pairs, self.run_folder())
            else:
                # leave a core to the Qt thread: napari stays fluent while training on the CPU
                trainer = Trainer(cfg, pairs, out_dir=self.run_folder(), num_threads=self.num_threads)
        except USER_ERRORS as exc:
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
        if self.run.running:
            notifications.show_warning("Training is running: press Stop first.")
            return False
        path = Path(path)
        try:
            pairs = self._snapshot()
            folder = self._run_folder_text()
            out_dir = Path(folder).expanduser() if folder else path.parent
            if self.devices_spin.value() > 1:
                cfg = TrainConfig.from_json(load_checkpoint(path)["config"])  # as the ranks will resume it
                trainer = self._distributed_run(cfg, pairs, out_dir, resume=path)
            else:
                trainer = Trainer.from_checkpoint(path, pairs, out_dir=out_dir, num_threads=self.num_threads)
        except USER_ERRORS as exc:
            notifications.show_error(f"Cannot resume from {path.name}: {exc}")
            return False
        apply_budget(trainer.config, **self._budget())
        self._begin(trainer)
        return True

    def resume_training(self) -> bool:
        """Continue the current trainer (same weights) with fresh label snapshots."""
        if self.run.running:
            notifications.show_warning("Training is already running.")
            return False
        if self.run.trainer is None:
            notifications.show_warning("Nothing to resume: press Train first.")
            return False
        apply_budget(self.run.trainer.config, **self._budget())
        self.submit_snapshot(force=True)
        self._launch()
        return True

    def stop_training(self) -> None:
        """Ask the trainer to stop after the current step (it checkpoints, then finishes)."""
        if self.run.request_stop():
            self._status("Stopping after the current step...")

    def run_folder(self) -> Path:
        """The chosen run folder, else a new dated one under :data:`.form.DEFAULT_RUNS_ROOT`."""
        text = self._run_folder_text()
        if text:
            return Path(text).expanduser()
        root = DEFAULT_RUNS_ROOT.expanduser()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder, n = root / stamp, 1
        while folder.exists():
            n += 1
            folder = root / f"{stamp}-{n}"
        return folder

    def _distributed_run(self, cfg: TrainConfig, pairs: list, out_dir: Path, *, resume=None) -> DistributedRun:
        """The same training on ``devices`` processes under torchrun (engine.launch); on the
        CPU the dock's threads are shared among them."""
        n = self.devices_spin.value()
        return DistributedRun(cfg, pairs, n_procs=n, out_dir=out_dir, device=self.device_kind, resume=resume,
                              num_threads=max(1, self.num_threads // n))

    def _begin(self, trainer) -> None:
        """Show and launch a freshly built trainer."""
        self.run.begin(trainer, self._chosen_layers())
        self._began(trainer)
        self.run.adopt_class_names()
        self._launch()

    def _launch(self) -> None:
        trainer = self.run.trainer
        self._starting(describe_device(trainer.device, trainer.num_threads))
        started: list = []  # this worker's control, to tell its end from a later run's
        self._finished_slot = functools.partial(self._on_worker_finished, started)
        worker, control = start_training_worker(  # freezes the heap until it ends
            trainer,
            on_event=self._on_event,
            on_error=self._on_worker_errored,
            on_finished=self._finished_slot,
        )
        started.append(control)
        self.run.attach(worker, control)

    # --- during a run ------------------------------------------------------------------------
    def submit_snapshot(self, force: bool = False) -> bool:
        """Hand the trainer fresh copies of the labels (and validation slices) if changed.

        Pairs chosen in the dock since the run began join it (a cohort's next volume: with
        no labels layer it is unlabelled data and its mask the network's at once; a labels
        layer created for it afterwards takes over); the trainer goes on from its weights."""
        trainer = self.run.trainer
        if trainer is None:
            return False
        known = len(self.run.run_layers)
        self.run.join(self._chosen_layers(), _layers.same_layer)
        pairs, layers, changed = [], [], False
        for index, (image, labels) in enumerate(self.run.run_layers):
            alive_labels = labels if labels is not None and labels in self.viewer.layers else None
            if index < len(trainer.pairs):
                new = _layers.refresh_pair(trainer.pairs[index], alive_labels, self._validation_of(image))
                changed |= new is not None
                pairs.append(new if new is not None else trainer.pairs[index])
                layers.append((image, labels))
                continue
            try:
                new = _layers.snapshot_pair(image, alive_labels, validation_slices=self._validation_of(image),
                                            wsi=trainer.config.wsi)
                problem = join_problem(pairs, new, trainer.config.model.spatial_dims)
            except USER_ERRORS as exc:
                problem = str(exc)
            if problem is not None:  # said once per image and reason; it may join once fixed
                if self._refused.get(_layers.layer_key(image)) != problem:
                    notifications.show_warning(f"'{image.name}' does not join the run: {problem}")
                self._refused[_layers.layer_key(image)] = problem
                continue
            self._refused.pop(_layers.layer_key(image), None)
            pairs.append(new)
            layers.append((image, labels))
            changed = True
        self.run.run_layers = layers
        if len(layers) > known:
            if self._joined is not None:
                self._joined([image for image, _ in layers[known:]])
            joined = ", ".join(f"'{image.name}'" for image, _ in layers[known:])
            self._status(f"{joined} joined the run at step {trainer.step}"
                         + (": the network's mask follows" if self.run.running else ": it trains at Resume"))
        if changed or force:
            trainer.submit_data(pairs)
        return changed

    def request_review(self) -> None:
        """Ask the trainer to review the slice in view of the active image (cheap here:
        the trainer does the work in its thread before its next step)."""
        trainer = self.run.trainer
        active = self._active_pair()
        if trainer is None or active is None:
            return
        image = active[0]
        index = next((i for i, (im, _) in enumerate(self.run.run_layers) if _layers.same_layer(im, image)), None)
        if index is None or image not in self.viewer.layers:
            return
        try:
            s_idx = _layers.current_slice(self.viewer, image, trainer.config.data.axis)
        except SemiclError as exc:
            log.debug("no review: %s", exc)
            return
        trainer.request_review(index, s_idx)

    def refreshed(self) -> None:
        """A refresh was drawn: labels painted meanwhile join now, and the slice in view is
        reviewed before the next step."""
        self.submit_snapshot()
        self.request_review()

    def update_buttons(self, *_state) -> None:
        running = self.run.running
        self.train_button.setEnabled(not running)
        self.stop_button.setEnabled(running and not self.run.stopping)
        self.resume_button.setEnabled(not running and self.run.trainer is not None)
        self.resume_checkpoint_button.setEnabled(not running)

    def update_resume_text(self, more: str) -> None:
        """``more``: what Resume trains, e.g. '300 more steps'."""
        self.resume_button.setText(f"Resume (+{more.replace(' more', '')})")
        self.resume_button.setToolTip(f"Continue the last run with the current labels: {more}")
        self.resume_checkpoint_button.setToolTip(
            f"Continue a saved run (checkpoint.pt in its run folder) on the chosen layers for {more}; "
            "the run's annotations are autosaved in its 'annotations' folder"
        )

    # --- the worker ----------------------------------------------------------------------------
    def _on_event(self, event) -> None:
        # a slot of this widget, not the model's: Qt stops delivering when the dock is deleted
        self.run.handle(event)

    def _on_worker_errored(self, exc: Exception) -> None:
        log.error("training worker crashed", exc_info=(type(exc), exc, exc.__traceback__))
        notifications.show_error(f"Training crashed: {exc}")
        self.run.set_idle()

    def _on_worker_finished(self, started: list) -> None:
        control = started[0] if started else None
        if control is not None:
            control.close_generator()  # only does something after a napari cancel
        if control is not self.run.control:
            return  # a run that ended after Resume started the next one: that one goes on
        if self.run.running:  # ended without a Finished event (cancelled)
            self._status("Training cancelled; press Resume to continue.")
        self.run.detach()

    def shutdown(self, timeout: float) -> None:
        """Stop a running worker cleanly (checkpoint) and wait up to ``timeout`` seconds."""
        worker = self.run.worker
        if worker is not None:
            for signal, slot in (
                (worker.yielded, self._on_event),
                (worker.errored, self._on_worker_errored),
                (worker.finished, self._finished_slot),
            ):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass
        self.run.abandon(timeout)

    # --- buttons -----------------------------------------------------------------------------
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


_WARM_UP_STARTED = threading.Event()


def warm_up_torch() -> None:
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
