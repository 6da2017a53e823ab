"""The training loop on a tiny real image: losses fall, stop/resume, checkpoints, updates."""

import pickle

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import (
    DataUpdated,
    Finished,
    Preview,
    StepDone,
    Stop,
    TrainConfig,
    Trainer,
    UpdateData,
    load_checkpoint,
    load_predictor,
    run_sync,
)
from napari_semicl.errors import CheckpointError
from napari_semicl.io.sample import load_sample_volume

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def brain():
    """A real 24-slice crop of the bundled MNI152 sample and its tissue labels."""
    image, reference = load_sample_volume()
    return image.data[28:52].astype(np.float32), reference.data[28:52]


def _config(method, iterations=40, **data):
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=1000, seed=0)
    cfg.data.patch_size = 64
    cfg.data.batch_labelled = 4
    cfg.data.batch_unlabelled = 4
    cfg.data.unpainted = "background"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_loss_falls_on_a_real_slice(brain, method):
    image, reference = brain
    painted = reveal_slices(reference, [6, 17], 0)
    trainer = Trainer(_config(method, 60), [AnnotatedPair(image, painted)], device=CPU)
    run_sync(trainer.run())
    totals = [h["ce"] + h["dice"] for h in trainer.history]
    assert np.mean(totals[-10:]) < 0.7 * np.mean(totals[:10])
    assert trainer.dataset.class_values == [0, 1, 2, 3]
    pred = trainer.predict(image)
    assert pred.labels.shape == image.shape
    # it learned something about the unrevealed slices: better than chance on the tissue
    keep = np.ones(image.shape[0], bool)
    keep[[6, 17]] = False
    acc = (pred.labels[keep] == reference[keep]).mean()
    assert acc > 0.6


def test_stop_ends_within_one_step_and_keeps_the_model(brain, tmp_path):
    image, reference = brain
    trainer = Trainer(_config("mean_teacher", 500), [AnnotatedPair(image, reveal_slices(reference, [5, 15], 0))],
                      device=CPU, out_dir=tmp_path)
    gen = trainer.run()
    steps = []
    event = next(gen)
    while True:
        if isinstance(event, StepDone):
            steps.append(event.step)
            if event.step == 3:
                event = gen.send(Stop())
                continue
        if isinstance(event, Finished):
            break
        event = next(gen)
    assert steps == [1, 2, 3]
    assert event.reason == "stopped" and event.step == 3
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.json").exists()
    # resume continues from step 3 for the budget's steps more (issue 17: 2 more, not "to 2")
    trainer.config.iterations = 2
    finished = run_sync(trainer.run())
    assert finished.step == 5 and finished.reason == "budget"
    # a new trainer from the checkpoint continues too, with the same weights
    resumed = Trainer.from_checkpoint(tmp_path / "checkpoint.pt", [AnnotatedPair(image, reveal_slices(reference, [5, 15], 0))], device=CPU)
    assert resumed.step == 5
    for a, b in zip(resumed.model.state_dict().values(), trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_request_stop_from_another_thread_object(brain):
    image, reference = brain
    trainer = Trainer(_config("supervised", 1000), [AnnotatedPair(image, reveal_slices(reference, [5], 0))], device=CPU)
    seen = []

    def callback(event):
        if isinstance(event, StepDone):
            seen.append(event.step)
            if event.step == 2:
                trainer.request_stop()

    finished = run_sync(trainer.run(), callback)
    assert finished.reason == "stopped" and seen == [1, 2]


def test_new_annotations_join_at_the_next_step(brain):
    image, reference = brain
    cfg = _config("supervised", 6)
    trainer = Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [5], 0))], device=CPU)
    gen = trainer.run()
    event = next(gen)
    updates = []
    while not isinstance(event, Finished):
        if isinstance(event, StepDone) and event.step == 2:
            event = gen.send(UpdateData([AnnotatedPair(image, reveal_slices(reference, [5, 12, 20], 0))]))
            continue
        if isinstance(event, DataUpdated):
            updates.append(event)
        event = next(gen)
    assert len(updates) == 1 and updates[0].summary["labelled"] == 3
    assert trainer.dataset.summary()["labelled"] == 3


def test_refresh_emits_whole_volume_predictions_and_validation(brain):
    image, reference = brain
    cfg = _config("mean_teacher", 4)
    cfg.refresh_every = 2
    pair = AnnotatedPair(image, reveal_slices(reference, [5, 10, 15], 0), validation_slices=(10,))
    events = []
    run_sync(Trainer(cfg, [pair], device=CPU).run(), events.append)
    previews = [e for e in events if isinstance(e, Preview) and e.kind == "prediction"]
    assert [p.step for p in previews] == [2, 4, 4]  # every 2 steps, and once more at the end
    assert previews[0].array.shape == image.shape
    entropy = [e for e in events if isinstance(e, Preview) and e.kind == "entropy"][0].array
    assert entropy.min() >= 0 and entropy.max() <= 1
    evaluated = [e for e in events if type(e).__name__ == "Evaluated"]
    assert evaluated and 0 <= evaluated[0].metrics["dice"] <= 1 and evaluated[0].metrics["slices"] == 1


def test_an_error_in_a_step_stops_with_a_message_and_keeps_the_checkpoint(brain, tmp_path, monkeypatch):
    image, reference = brain
    trainer = Trainer(_config("supervised", 10), [AnnotatedPair(image, reveal_slices(reference, [5], 0))],
                      device=CPU, out_dir=tmp_path)
    good = trainer.save()
    before = good.read_bytes()
    calls = {"n": 0}
    original = trainer.method.compute_losses

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure inside a step")
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.method, "compute_losses", failing)
    finished = run_sync(trainer.run())
    assert finished.reason == "error" and "simulated failure" in finished.error
    assert finished.step == 2
    assert good.read_bytes() == before  # the last good checkpoint is untouched


def test_checkpoint_reproduces_the_prediction(brain, tmp_path):
    image, reference = brain
    trainer = Trainer(_config("mean_teacher", 8), [AnnotatedPair(image, reveal_slices(reference, [5, 15], 0))],
                      device=CPU, out_dir=tmp_path)
    run_sync(trainer.run())
    model, cfg = load_predictor(tmp_path / "checkpoint.pt", device=CPU)
    from napari_semicl.engine import predict_volume

    again = predict_volume(model, image, class_values=cfg.data.class_values, axis=0, device=CPU)
    assert np.array_equal(again.labels, trainer.predict(image).labels)


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "napari-semicl/1", "student": Payload()}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a napari-semicl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_of_another_architecture_is_refused(brain, tmp_path):
    image, reference = brain
    trainer = Trainer(_config("supervised", 1), [AnnotatedPair(image, reveal_slices(reference, [5], 0))],
                      device=CPU, out_dir=tmp_path)
    state = trainer.state()
    state["student"] = {"conv.weight": torch.zeros(3)}
    from napari_semicl.engine import save_checkpoint

    save_checkpoint(tmp_path / "wrong.pt", state)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer.from_checkpoint(tmp_path / "wrong.pt", [AnnotatedPair(image, reveal_slices(reference, [5], 0))], device=CPU)
