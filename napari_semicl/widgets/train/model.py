"""The Train dock's run, without Qt: what is running, what it has shown, how to stop it.

:class:`TrainRun` is the model of napari's model/view split: it holds the current trainer
(a :class:`~napari_semicl.engine.Trainer` or an
:class:`~napari_semicl.engine.launch.DistributedRun`), whether it runs or is stopping, the
losses and Dice so far (:class:`~napari_semicl.analysis.TrainingHistory`), the newest events
a dock opened later must see again (:meth:`TrainRun.replay_events`), the validation marks and
the class names. It emits psygnal signals and never knows its views; the Qt views in this
package listen to it. Nothing here imports Qt or napari (``tests/test_import_cycles.py``
checks it), so scripts and tests can drive it alone.
"""

from __future__ import annotations

import logging
import math
import threading

from psygnal import Signal

from ...analysis import TrainingHistory
from ...analysis.plots import DICE
from ...engine.events import Evaluated, Finished, Preview, Reviewed, Started, StepDone
from ...engine.launch import DistributedRun
from ...engine.validation import ValidationMarks

log = logging.getLogger(__name__)

#: How long closing the dock waits for the worker to checkpoint and end.
CLOSE_TIMEOUT_S = 5.0


class TrainRun:
    """The state of the Train dock's run (see the module doc).

    Signals
    -------
    run_starting(trainer)
        A freshly built trainer, before its first step (views create their layers then).
    state_changed(running: bool, stopping: bool)
        Training started, is stopping, or ended.
    event_received(event)
        Every trainer event, after the model remembered it.
    """

    run_starting = Signal(object)
    state_changed = Signal(bool, bool)
    event_received = Signal(object)

    def __init__(self) -> None:
        self.trainer = None  # kept after a run ends, for Resume
        self.running = False
        self.stopping = False
        self.run_layers: list[tuple] = []  # (image, labels or None) of each pair of the trainer
        #: losses and validation Dice of the current trainer's runs (the curves dock draws it)
        self.history = TrainingHistory()
        self.validation = ValidationMarks()  # keyed by the image layer's key (widgets._layers)
        self.class_names: dict[int, str] = {}
        self._latest: dict = {}
        # the worker of the run in progress: an opaque handle (napari's thread worker) and its
        # widgets._worker.RunControl; kept here so that stopping needs no widget
        self.worker = None
        self.control = None

    # --- a run ---------------------------------------------------------------------------
    def begin(self, trainer, run_layers: list) -> None:
        """A new trainer (Train, Resume from checkpoint): forget the last one's history."""
        self.trainer = trainer
        self.history.clear()
        self._latest.clear()
        self.run_layers = list(run_layers)
        self.run_starting.emit(trainer)

    def adopt_class_names(self) -> None:
        """Hand the dock's class names to the new trainer (saved with its checkpoints); a
        resumed run keeps its own when the dock has none."""
        names = {str(v): n for v, n in self.class_names.items() if n}
        if names or not self.trainer.config.data.class_names:
            self.trainer.config.data.class_names = names

    def attach(self, worker, control) -> None:
        """The worker now running the trainer."""
        self.worker, self.control = worker, control
        self._set_state(True, False)

    def request_stop(self) -> bool:
        """Ask the trainer to stop after the current step; False when nothing runs."""
        if self.trainer is None or not self.running:
            return False
        self.trainer.request_stop()
        self._set_state(True, True)
        return True

    def detach(self) -> None:
        """The worker has ended (however it ended)."""
        self.worker, self.control = None, None
        self._set_state(False, False)

    def join(self, chosen: list, same) -> list[int]:
        """The dock's chosen pairs (``chosen``: [(image, labels or None)]) become the run's:
        the run's pairs keep their order (the trainer's pair indices, its previews' too), an
        image not yet in the run is appended (a cohort's next volume, while training runs or
        before Resume) and a run image without labels takes the labels layer chosen for it
        since (one created to paint it). An image the dock no longer offers stays in the run. ``same(a,
        b)``: whether two layers are the same. Returns the indices of the pairs appended."""
        self.run_layers, added = merge_pairs(self.run_layers, chosen, same)
        return added

    def set_idle(self) -> None:
        self._set_state(False, False)

    def _set_state(self, running: bool, stopping: bool) -> None:
        self.running, self.stopping = running, stopping
        self.state_changed.emit(running, stopping)

    def handle(self, event) -> None:
        """One trainer event: remember it, then pass it on to the views."""
        self._remember(event)
        if isinstance(event, Finished):
            self._set_state(False, False)
        self.event_received.emit(event)

    def abandon(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the run and wait (briefly) for its worker to checkpoint: the dock is closing."""
        trainer, control, worker = self.trainer, self.control, self.worker
        self.worker, self.control = None, None
        self.running, self.stopping = False, False
        abandon_run(trainer, control, worker, timeout=timeout)

    # --- what the views show -------------------------------------------------------------
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

    def _remember(self, event) -> None:
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

    def class_names_of(self, values) -> dict[int, str]:
        """Names of label ``values``; a value never named gets 'background' or 'class N'."""
        for v in values:
            self.class_names.setdefault(int(v), "background" if int(v) == 0 else f"class {int(v)}")
        return {int(v): self.class_names[int(v)] for v in values}

    def sync_class_names(self, shown_values) -> dict[int, str]:
        """The names of ``shown_values``, also handed to the trainer's config (saved with it)."""
        names = {int(v): self.class_names[int(v)] for v in shown_values if int(v) in self.class_names}
        if self.trainer is not None:
            self.trainer.config.data.class_names = {str(v): n for v, n in names.items() if n}
        return names


def merge_pairs(run_layers: list, chosen: list, same) -> tuple[list, list[int]]:
    """:meth:`TrainRun.join` as a function: (the merged pairs, the indices appended)."""
    merged = list(run_layers)
    added = []
    for image, labels in chosen:
        index = next((i for i, (im, _) in enumerate(merged) if same(im, image)), None)
        if index is None:
            added.append(len(merged))
            merged.append((image, labels))
        elif labels is not None and merged[index][1] is None:  # a labels layer made for it
            merged[index] = (merged[index][0], labels)
    return merged, added


def join_problem(pairs: list, new, spatial_dims: int = 2) -> str | None:
    """Why the snapshot ``new`` cannot join a run on ``pairs`` ('it ...'; None when it can): one
    network takes images of the same channels (grey or RGB), and a 3D network
    (``spatial_dims`` 3) volumes only. Checked before the trainer gets it: its thread would
    stop the run with the error."""
    if not pairs or not hasattr(new, "spatial_shape") or not hasattr(pairs[0], "spatial_shape"):
        return None  # slides: the engine decides
    if spatial_dims == 3 and len(new.spatial_shape) != 3:
        return "it is not a volume and this run trains a 3D network: press Stop, then Train for a new run with it"
    if _channels(new) != _channels(pairs[0]):
        return (f"it has {_channels(new)} channel(s) but this run's images have {_channels(pairs[0])}: "
                "press Stop, then Train for a new run with it")
    return None


def _channels(pair) -> int:
    return int(pair.image.shape[-1]) if pair.rgb else 1


def apply_budget(cfg, *, iterations: int, minutes: float, budget: str, refresh_every: int) -> None:
    """The dock's budget on a config: Resume trains ``iterations`` (or ``minutes``) more."""
    cfg.iterations, cfg.minutes, cfg.budget, cfg.refresh_every = iterations, minutes, budget, refresh_every


def abandon_run(trainer, control, worker, *, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Stop ``trainer`` and wait (briefly) for its worker to checkpoint.

    A function of plain objects so that it still works from a widget's ``destroyed``,
    when the widget's C++ side is already gone.
    """
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


def format_seconds(seconds: float) -> str:
    """'m:ss', or 'h:mm:ss' from an hour on."""
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
