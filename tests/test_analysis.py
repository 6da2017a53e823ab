"""analysis/: entropy, pseudo-label thresholds, slice suggestions, bounded embedding
samples, t-SNE and history; engine/review.py: the analyses the trainer serves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_semicl.analysis import (
    TrainingHistory,
    bounded_sample,
    nearest_point,
    normalised_entropy,
    rank_slices,
    sample_disagreement,
    slice_means,
    threshold_pseudo_labels,
    tsne_2d,
)
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Analysed, StepDone, TrainConfig, Trainer, run_sync
from napari_semicl.engine.review import sample_embeddings, slice_disagreement
from napari_semicl.errors import ConfigError
from napari_semicl.io.sample import load_sample_volume
from napari_semicl.methods import MeanTeacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")



# --- entropy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5])
def test_entropy_is_zero_for_one_hot_and_log_k_for_uniform(k):
    one_hot = np.eye(k)  # (K classes, K pixels): each pixel certain of one class
    assert np.allclose(normalised_entropy(one_hot, axis=0), 0.0)
    uniform = np.full((k, 4), 1.0 / k)
    # normalised: 1; unnormalised (times log K): log K
    assert np.allclose(normalised_entropy(uniform, axis=0), 1.0)
    assert np.allclose(normalised_entropy(uniform, axis=0) * math.log(k), math.log(k))


def test_entropy_against_hand_computation():
    p = np.array([0.7, 0.2, 0.1])
    hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert normalised_entropy(p) == pytest.approx(hand, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        normalised_entropy(np.ones((1, 3)))


def test_entropy_matches_the_inference_entropy_map():
    from napari_semicl.engine.inference import predict_slices
    from napari_semicl.models import UNet2D

    torch.manual_seed(0)
    model = UNet2D(1, 3, base_channels=4, depth=2)
    x = torch.randn(1, 1, 16, 16)
    _, ent = predict_slices(model, x.numpy(), device=CPU, with_entropy=True)
    model.eval()
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0].numpy()
    np.testing.assert_allclose(ent[0], normalised_entropy(probs, axis=0), atol=1e-5)


def test_sample_disagreement_by_hand():
    # 4 samples of 3 pixels, K = 2: all agree; 2-2 split (uniform: 1); 3-1 split
    samples = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])
    got = sample_disagreement(samples, 2)
    h31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    np.testing.assert_allclose(got, [0.0, 1.0, h31], atol=1e-6)


def test_threshold_pseudo_labels_sets_uncertain_pixels_unknown():
    labels = np.array([[1, 2], [3, 1]], np.uint8)
    entropy = np.array([[0.1, 0.5], [0.9, 0.0]], np.float32)
    out = threshold_pseudo_labels(labels, entropy, 0.6)  # keep certainty >= 0.6: entropy <= 0.4
    np.testing.assert_array_equal(out, [[1, 0], [0, 1]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(threshold_pseudo_labels(labels, entropy, 0.0), labels)
    with pytest.raises(ValueError):
        threshold_pseudo_labels(labels, entropy, 1.5)


# --- suggestions -----------------------------------------------------------------------------
def test_uniform_slice_ranks_above_a_confident_one():
    k = 4
    probs = np.zeros((k, 3, 8, 8))        # (K, S, H, W)
    probs[0, 0] = 1.0                      # slice 0: certain
    probs[:, 1] = 1.0 / k                  # slice 1: uniform
    probs[0, 2], probs[1, 2] = 0.6, 0.4    # slice 2: in between
    ent = normalised_entropy(probs, axis=0)
    scores = slice_means(ent, axis=0)
    ranked = rank_slices(scores)
    assert [s.slice_index for s in ranked] == [1, 2, 0]
    assert ranked[0].entropy == pytest.approx(1.0)
    assert ranked[-1].entropy == pytest.approx(0.0)
    # labelled slices are left out; the second score can order the list
    assert [s.slice_index for s in rank_slices(scores, exclude=[1])] == [2, 0]
    dis = np.array([0.9, np.nan, 0.1])
    assert [s.slice_index for s in rank_slices(scores, disagreement_scores=dis, by="disagreement")] == [0, 2, 1]
    with pytest.raises(ValueError, match="by must be"):
        rank_slices(scores, by="colour")


def test_slice_means_along_another_axis():
    vol = np.zeros((2, 3, 4))
    vol[:, 1] = 1.0
    np.testing.assert_allclose(slice_means(vol, axis=1), [0, 1, 0])


# --- embeddings ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_points", [1, 7, 50, 1000])
def test_bounded_sample_is_bounded_and_stratified(max_points):
    rng = np.random.default_rng(0)
    classes = np.array([0] * 900 + [1] * 90 + [2] * 10)
    idx = bounded_sample(classes, max_points, rng)
    assert len(idx) == min(max_points, len(classes))
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    if max_points == 50:  # 10 of the small class (all it has), 20 of each other
        counts = np.bincount(classes[idx], minlength=3)
        np.testing.assert_array_equal(counts, [20, 20, 10])


def test_tsne_separates_two_clusters_and_nearest_point():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (40, 8)), rng.normal(5, 0.1, (40, 8))]).astype(np.float32)
    y = tsne_2d(x, perplexity=10, seed=0)
    assert y.shape == (80, 2)
    ca, cb = y[:40].mean(0), y[40:].mean(0)
    spread = max(y[:40].std(0).max(), y[40:].std(0).max())
    assert np.linalg.norm(ca - cb) > 3 * spread
    assert tsne_2d(x[:2]).shape == (2, 2)
    # capped to one thread (the review dock's setting): the same map, and the cap is lifted after
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info()]
    np.testing.assert_allclose(tsne_2d(x, perplexity=10, seed=0, n_threads=1), y, atol=1e-3)
    assert [p["num_threads"] for p in threadpool_info()] == before
    assert nearest_point(y, y[17] + 1e-3) == 17
    assert nearest_point(y, (1e6, 1e6), max_distance=1.0) is None


def test_history_keeps_series_bounded_and_restarts_with_a_new_run():
    h = TrainingHistory(max_points=10)
    for step in range(1, 101):
        h.add(step, {"ce": 1.0 / step, "bad": float("nan"), "name": "x"})
    steps, values = h.series("ce")
    assert len(steps) <= 10 and steps[0] == 1 and steps[-1] == 100
    np.testing.assert_allclose(values, 1.0 / steps)
    assert h.names() == ["ce"]
    h.add(1, {"ce": 0.5})  # steps went back: a new run
    assert h.series("ce")[0].tolist() == [1]


# --- engine glue -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[28:52].astype(np.float32), reference.data[28:52]


def _trainer(brain, method="mean_teacher", iterations=4):
    image, reference = brain
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=1000, seed=0)
    cfg.model.base_channels, cfg.model.depth = 4, 2
    cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = 32, 2, 2
    cfg.data.unpainted = "background"
    return Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [6, 17], 0))], device=CPU)


@pytest.mark.parametrize("max_points", [5, 300])
def test_embedding_sample_is_bounded_with_positions(brain, max_points):
    trainer = _trainer(brain)
    out = sample_embeddings(trainer.method, trainer.dataset, device=CPU, max_points=max_points, max_slices=4)
    n = len(out["embeddings"])
    assert 0 < n <= max_points
    assert out["embedding_labels"].shape == (n,) and out["embedding_is_labelled"].shape == (n,)
    pos = out["positions"]
    assert pos.shape == (n, 4)
    assert set(pos[:, 1][out["embedding_is_labelled"]]) <= {6, 17}  # labelled points from painted slices
    assert set(pos[:, 1][~out["embedding_is_labelled"]]).isdisjoint({6, 17})
    assert np.all(pos[:, 2] < brain[0].shape[1]) and np.all(pos[:, 3] < brain[0].shape[2])
    # a labelled point's class is the painted one at its position
    lab = out["embedding_is_labelled"]
    if lab.any():
        p = pos[lab][0]
        value = brain[1][p[1], p[2], p[3]]
        assert trainer.dataset.class_values[out["embedding_labels"][lab][0]] == value
    # raw decoder features (no projection head for mean teacher), L2-normalised
    assert out["embeddings"].shape[1] == trainer.model.feature_channels
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, atol=1e-4)


def test_disagreement_is_zero_when_teacher_equals_student(brain):
    trainer = _trainer(brain)
    out = slice_disagreement(trainer.method, trainer.dataset, device=CPU)
    assert out["disagreement"].shape == (24,)
    np.testing.assert_allclose(out["disagreement"], 0.0)  # the teacher starts as a copy
    with torch.no_grad():
        for p in trainer.method.student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    out = slice_disagreement(trainer.method, trainer.dataset, device=CPU)
    assert out["disagreement"].max() > 0 and out["disagreement"].max() <= 1
    sup = _trainer(brain, method="supervised")
    assert slice_disagreement(sup.method, sup.dataset, device=CPU) == {}


def test_trainer_serves_analyses_between_steps(brain):
    trainer = _trainer(brain, iterations=3)
    events = []
    gen = trainer.run(previews=False)

    def callback(event):
        events.append(event)
        if isinstance(event, StepDone) and event.step == 1:
            trainer.request_analysis("embeddings", max_points=20, max_slices=2)
            trainer.request_analysis("disagreement", pair_index=0)
            trainer.request_analysis("aleatoric", pair_index=0, slice_index=3)  # MT: no head
            trainer.request_analysis("nonsense")

    run_sync(gen, callback)
    kinds = [e.kind for e in events if isinstance(e, Analysed)]
    assert kinds == ["embeddings", "disagreement", "aleatoric"]
    analysed = {e.kind: e for e in events if isinstance(e, Analysed)}
    assert analysed["embeddings"].step == 1 and len(analysed["embeddings"].arrays["embeddings"]) <= 20
    assert analysed["aleatoric"].arrays == {}
    assert any("nonsense" in getattr(e, "text", "") for e in events)
    with pytest.raises(ConfigError, match="unknown analysis"):
        trainer.analyse("nonsense")


class FakeAleatoric(MeanTeacher):
    """A mean teacher with an 'aleatoric head' that flips the teacher's arg-max at random
    (for the AUA contract: sample_aleatoric -> (S, H, W) int64)."""

    name = "fake_aleatoric"
    review_analyses = ("aleatoric",)  # declared: the review asks it for samples

    def sample_aleatoric(self, x, n_samples, valid_shape=None):
        h, w = valid_shape
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            idx = self.inference_model().eval()(x).argmax(dim=1)[0]
        flips = torch.randint(0, self.student.head.out_channels, (n_samples, *idx.shape), generator=g)
        keep = torch.rand((n_samples, *idx.shape), generator=g) < 0.7
        return torch.where(keep, idx.expand(n_samples, -1, -1), flips)[:, :h, :w]


def test_aleatoric_samples_through_the_contract(brain):
    from napari_semicl.engine.review import aleatoric_samples

    trainer = _trainer(brain)
    method = FakeAleatoric(trainer.config, trainer.model)
    out = aleatoric_samples(method, trainer.dataset, device=CPU, pair_index=0, slice_index=5, n_samples=6)
    assert out["aleatoric_samples"].shape == (6, *brain[0].shape[1:])
    assert out["aleatoric_samples"].dtype == np.int64
    assert set(np.unique(out["aleatoric_samples"])) <= set(range(4))
    with pytest.raises(ConfigError):
        aleatoric_samples(method, trainer.dataset, device=CPU, pair_index=0, slice_index=5, n_samples=0)


def test_embeddings_go_through_the_teacher_projection_head(brain):
    from napari_semicl.engine.review import projection_head

    trainer = _trainer(brain, method="arco")
    head = projection_head(trainer.method)
    assert head is trainer.method.modules["teacher_projection"]
    out = sample_embeddings(trainer.method, trainer.dataset, device=CPU, max_points=50, max_slices=2)
    assert out["embeddings"].shape[1] == trainer.config.arco.embedding_dim
    # the head's own projection of the teacher's features at one sampled pixel
    p, s, r, c = out["positions"][0]
    x = torch.from_numpy(trainer.dataset.images[p][s])[None]
    pad = (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4)
    teacher = trainer.method.teacher.eval()
    head.eval()
    with torch.no_grad():
        _, feat = teacher(torch.nn.functional.pad(x, pad), return_features=True)
        expected = head.project_vectors(feat[0, :, r, c][None])[0].numpy()
    np.testing.assert_allclose(out["embeddings"][0], expected, atol=1e-5)


def test_real_methods_feed_the_review_analyses(brain):
    """The contract between the method issues and the review docks, with the real methods:
    AUA's aleatoric head answers the 'aleatoric' analysis, AGCL's last step gives the
    affinity heat map through 'method_review'."""
    aua = _trainer(brain, method="aua", iterations=2)
    run_sync(aua.run(previews=False), lambda e: None)
    out = aua.analyse("aleatoric", pair_index=0, slice_index=3, n_samples=4).arrays
    h, w = brain[0].shape[1:]
    assert out["aleatoric_samples"].shape == (4, h, w)
    assert out["aleatoric_samples"].min() >= 0 and out["aleatoric_samples"].max() < len(out["class_values"])

    agcl = _trainer(brain, method="agcl", iterations=3)
    agcl.config.agcl.warmup_steps = 0
    run_sync(agcl.run(previews=False), lambda e: None)
    review = agcl.analyse("method_review").arrays
    n = len(review["embeddings"])
    assert n >= 2 and review["affinity"].shape == (n, n)
    assert np.all(review["affinity"] >= 0) and np.all(review["affinity"] <= 1 + 1e-6)
