"""The Train dock's run model (widgets/train/model.py) without Qt: state, replay, stopping."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from napari_semicl.analysis.plots import DICE

from napari_semicl.engine.events import Evaluated, Finished, Preview, Reviewed, Started, StepDone
from napari_semicl.widgets.train.model import TrainRun, abandon_run, apply_budget, format_seconds


class FakeTrainer:
    def __init__(self) -> None:
        self.config = SimpleNamespace(data=SimpleNamespace(class_names={}), iterations=1, minutes=1.0,
                                      budget="iterations", refresh_every=1)
        self.stops = 0

    def request_stop(self) -> None:
        self.stops += 1


class FakeControl:
    """widgets._worker.RunControl's surface: abandon flag, wait, close_generator."""

    def __init__(self, ends: bool) -> None:
        self.abandon = threading.Event()
        self.ends = ends
        self.closed = 0

    def wait(self, timeout) -> bool:
        return self.ends

    def close_generator(self) -> None:
        self.closed += 1


def _step(step: int) -> StepDone:
    return StepDone(step=step, losses={"sup": 1.0 / step}, lr=1e-3, fraction=step / 10, elapsed_s=step, eta_s=None)


def test_a_run_goes_from_start_to_finish_and_says_so():
    run, states, events, starting = TrainRun(), [], [], []
    run.state_changed.connect(lambda r, s: states.append((r, s)))
    run.event_received.connect(events.append)
    run.run_starting.connect(starting.append)
    trainer = FakeTrainer()
    run.begin(trainer, [("image", "labels")])
    assert starting == [trainer] and run.run_layers == [("image", "labels")]
    run.attach("worker", FakeControl(ends=True))
    assert run.running and states == [(True, False)]
    assert run.request_stop() and trainer.stops == 1 and states[-1] == (True, True)
    run.handle(_step(1))
    finished = Finished(step=1, reason="stopped", seconds=1.0, losses={}, checkpoint=None)
    seen_running = []
    run.event_received.connect(lambda e: seen_running.append(run.running))
    run.handle(finished)
    # the review docks see Finished with the run already over
    assert events[-1] is finished and seen_running == [False] and states[-1] == (False, False)
    assert list(run.history.series("sup")[0]) == [1]
    run.detach()
    assert run.worker is None and run.control is None
    assert not run.request_stop()  # nothing runs: nothing asked


def test_replay_gives_the_newest_state_in_order():
    run = TrainRun()
    run.begin(FakeTrainer(), [])
    started = Started(device="cpu", step=0, target_step=10, budget_s=None, summary={})
    previews = [Preview(step=s, kind=k, pair_index=p, array=np.zeros(1))
                for s in (5, 10) for p in (1, 0) for k in ("entropy", "prediction")]
    reviewed = Reviewed(step=10, pair_index=0, slice_index=3, arrays={})
    evaluated = Evaluated(step=10, metrics={"dice": 0.5})
    for event in (started, *previews, reviewed, evaluated):
        run.handle(event)
    replay = run.replay_events()
    assert replay[0] is started and replay[-2] is reviewed and replay[-1] is evaluated
    shown = [(e.pair_index, e.kind, e.step) for e in replay[1:-2]]
    assert shown == [(0, "prediction", 10), (0, "entropy", 10), (1, "prediction", 10), (1, "entropy", 10)]
    assert list(run.history.series(DICE)[0]) == [10]  # the curves dock's Dice series
    run.begin(FakeTrainer(), [])  # a new trainer forgets the last one's
    assert run.replay_events() == [] and run.history.names() == []


def test_class_names_reach_the_trainer_and_a_resumed_run_keeps_its_own():
    run = TrainRun()
    assert run.class_names_of([0, 2]) == {0: "background", 2: "class 2"}
    run.class_names[2] = "tumour"
    trainer = FakeTrainer()
    run.begin(trainer, [])
    assert run.sync_class_names([2]) == {2: "tumour"}
    assert trainer.config.data.class_names == {"2": "tumour"}
    resumed, fresh = FakeTrainer(), TrainRun()
    resumed.config.data.class_names = {"1": "liver"}
    fresh.begin(resumed, [])
    fresh.adopt_class_names()
    assert resumed.config.data.class_names == {"1": "liver"}


def test_abandon_stops_the_trainer_and_closes_its_generator():
    trainer, control = FakeTrainer(), FakeControl(ends=True)
    abandon_run(trainer, control, None, timeout=0.1)
    assert trainer.stops == 1 and control.abandon.is_set() and control.closed == 1
    quits = []
    late = FakeControl(ends=False)
    abandon_run(FakeTrainer(), late, SimpleNamespace(quit=lambda: quits.append(1)), timeout=0.0)
    assert quits == [1] and late.abandon.is_set()  # closed by a thread once the worker ends


def test_budget_and_time_format():
    cfg = FakeTrainer().config
    apply_budget(cfg, iterations=300, minutes=2.5, budget="minutes", refresh_every=20)
    assert (cfg.iterations, cfg.minutes, cfg.budget, cfg.refresh_every) == (300, 2.5, "minutes", 20)
    assert [format_seconds(s) for s in (0, 61.4, 3600 + 62)] == ["0:00", "1:01", "1:01:02"]
