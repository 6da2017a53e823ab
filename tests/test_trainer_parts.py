"""The parts the training loop calls (issue 25): budget, inbox, refresh steps, checkpoints."""

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.engine import Checkpointed, Evaluated, Finished, Notice, Preview, StepDone, Stop, TrainConfig
from napari_semicl.engine import UpdateData, load_checkpoint
from napari_semicl.engine.budget import Budget, warm_up_notice
from napari_semicl.engine.inbox import Inbox
from napari_semicl.engine.persistence import AnnotationsAutosave
from napari_semicl.engine.refresh import volume_previews
from napari_semicl.engine.trainer import CHECKPOINT_NAME, Trainer, load_predictor, run_sync

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def blobs(seed=0, shape=(12, 32, 32)):
    """A volume of one bright box whose extent changes along the slices, and its labels."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.2, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for s in range(2, shape[0] - 2):
        r = 5 + s % 4
        labels[s, 16 - r:16 + r, 14 - r:14 + r] = 1
    image[labels == 1] += 1.0
    return image, labels


def tiny_config(iterations=4, method="supervised") -> TrainConfig:
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=2, seed=0)
    cfg.model.base_channels, cfg.model.depth = 4, 2
    cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = 32, 2, 2
    cfg.data.unpainted = "background"
    return cfg


def painted(labels, slices):
    out = np.zeros_like(labels)
    out[list(slices)] = labels[list(slices)]
    return out


# --- the budget ---------------------------------------------------------------------------------
def test_an_iteration_budget_counts_from_where_the_run_starts():
    cfg = tiny_config(iterations=10)
    budget = Budget.of(cfg, step=30)
    assert (budget.target, budget.seconds) == (40, None)
    assert not budget.spent(39, 1e9) and budget.spent(40, 0.0)
    assert budget.lr_fraction(30, 0.0) == 30 / 40  # the schedule runs over all the steps
    fraction, eta = budget.progress(35, elapsed=10.0)  # 5 of 10 done in 10 s
    assert fraction == 0.5 and eta == pytest.approx(10.0)


def test_a_time_budget_ends_on_the_clock_and_says_the_seconds_left():
    cfg = tiny_config()
    cfg.budget, cfg.minutes = "minutes", 2.0
    budget = Budget.of(cfg, step=7)
    assert (budget.target, budget.seconds) == (None, 120.0)
    assert not budget.spent(10_000, 119.9) and budget.spent(0, 120.0)
    assert budget.lr_fraction(7, 30.0) == 0.25
    assert budget.progress(8, 30.0) == (0.25, 90.0)
    assert budget.progress(9, 500.0) == (1.0, 0.0)


def test_a_run_that_ends_within_the_warm_up_is_warned():
    cfg = TrainConfig(method="plgcl")
    warm = cfg.plgcl.warmup_steps
    assert "warm-up" in warm_up_notice(cfg, warm).text
    assert warm_up_notice(cfg, warm + 1) is None and warm_up_notice(cfg, None) is None
    assert warm_up_notice(TrainConfig(method="supervised"), 1) is None


# --- the inbox ---------------------------------------------------------------------------------
def test_the_inbox_keeps_the_latest_request_of_each_kind_and_hands_it_over_once():
    inbox = Inbox()
    assert inbox.take_pairs() is None and inbox.take_review() is None and inbox.take_analyses() == {}
    inbox.submit_data(["a"])
    inbox.handle(UpdateData(["b", "c"]))
    inbox.request_review(0, 3)
    inbox.request_review(1, 4)
    inbox.request_analysis("embeddings", n=1)
    inbox.request_analysis("embeddings", n=2)
    inbox.request_analysis("disagreement")
    assert inbox.take_pairs() == ["b", "c"] and inbox.take_pairs() is None
    assert inbox.take_review() == (1, 4) and inbox.take_review() is None
    assert inbox.take_analyses() == {"embeddings": {"n": 2}, "disagreement": {}}
    assert inbox.take_analyses() == {}
    assert not inbox.stop_requested
    inbox.handle(None)
    assert not inbox.stop_requested
    inbox.handle(Stop())
    assert inbox.stop_requested
    inbox.clear_stop()
    assert not inbox.stop_requested


# --- persistence ----------------------------------------------------------------------------------
def test_annotations_are_written_once_per_change(tmp_path):
    image, labels = blobs()
    pairs = [AnnotatedPair(image, painted(labels, (3, 8)), name="v")]
    autosave = AnnotationsAutosave(tmp_path)
    assert autosave.save(pairs) is None and (tmp_path / "annotations").is_dir()
    written = sorted(p.stat().st_mtime_ns for p in (tmp_path / "annotations").rglob("*") if p.is_file())
    assert autosave.save(pairs) is None  # unchanged: not written again
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "annotations").rglob("*") if p.is_file()) == written
    autosave.changed()
    assert autosave.saved != autosave.version
    autosave.save(pairs)
    assert autosave.saved == autosave.version
    assert AnnotationsAutosave(None).save(pairs) is None  # no folder, nothing to do


def test_the_loop_checkpoints_on_time_and_a_predictor_loads_the_result(tmp_path, monkeypatch):
    import napari_semicl.engine.trainer as trainer_module

    class Clock:  # every reading of the loop's clock advances 40 s
        t = 0.0

        def monotonic(self):
            self.t += 40.0
            return self.t

    image, labels = blobs()
    cfg = tiny_config(iterations=3)
    cfg.checkpoint_minutes = 0.5
    trainer = Trainer(cfg, [AnnotatedPair(image, painted(labels, (3, 8)))], device=CPU, out_dir=tmp_path)
    monkeypatch.setattr(trainer_module, "time", Clock())
    events = []
    finished = run_sync(trainer.run(previews=False), events.append)
    checkpointed = [e.step for e in events if isinstance(e, Checkpointed)]
    assert checkpointed == [1, 2, 3]  # 30 s a checkpoint, 80 s a step
    assert finished.reason == "budget" and finished.checkpoint == str(tmp_path / CHECKPOINT_NAME)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3
    model, config = load_predictor(tmp_path / CHECKPOINT_NAME, device=CPU)
    assert config.model.n_classes == 2 and not model.training
    resumed = Trainer.from_checkpoint(tmp_path / CHECKPOINT_NAME, trainer.pairs, device=CPU)
    assert resumed.step == 3
    for a, b in zip(resumed.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


# --- refresh steps ----------------------------------------------------------------------------------
def test_a_refresh_runs_its_steps_in_order_at_every_refresh_and_at_the_end():
    image, labels = blobs()
    trainer = Trainer(tiny_config(iterations=4), [AnnotatedPair(image, painted(labels, (3, 5, 8)), validation_slices=(5,))],
                      device=CPU)
    calls = []

    def count_step(t):
        calls.append(t.step)
        return [Notice("info", f"refreshed at {t.step}")]

    trainer.refresh_steps.append(count_step)
    events = []
    run_sync(trainer.run(), events.append)
    assert calls == [2, 4, 4]  # refresh_every 2, and once after the budget
    kinds = [type(e).__name__ for e in events if not isinstance(e, StepDone)]
    first = kinds.index("Preview")
    # previews (mask, entropy), validation, then the new step: in the order of refresh_steps
    assert kinds[first:first + 4] == ["Preview", "Preview", "Evaluated", "Notice"]
    assert isinstance(events[-1], Finished)
    assert [e.text for e in events if isinstance(e, Notice) and e.text.startswith("refreshed")] == [
        "refreshed at 2", "refreshed at 4", "refreshed at 4"]


def test_refresh_steps_can_be_replaced_and_each_returns_events():
    image, labels = blobs()
    trainer = Trainer(tiny_config(), [AnnotatedPair(image, painted(labels, (3, 5, 8)), validation_slices=(5,))],
                      device=CPU)
    previews = volume_previews(trainer)
    assert [(e.kind, e.pair_index) for e in previews] == [("prediction", 0), ("entropy", 0)]
    assert previews[0].array.shape == image.shape and previews[0].array.dtype == np.uint8
    trainer.refresh_steps = [volume_previews]
    events = trainer.refresh_events()
    assert all(isinstance(e, Preview) for e in events)  # no validation step, no Evaluated
    trainer.refresh_steps = []
    assert trainer.refresh_events() == []
    assert not any(isinstance(e, Evaluated) for e in events)
