"""Semi-AGCL (METHODS.md §3): Eq. 2, 3, 6, 7 against hand computation; the method in the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.dataset import Batch
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Reviewed, TrainConfig, Trainer, run_sync
from napari_semicl.errors import CheckpointError, ConfigError
from napari_semicl.io.sample import load_sample_volume
from napari_semicl.methods import AGCL, get_method
from napari_semicl.methods.agcl import (
    AffinityGraphLoss,
    adaptive_bandwidth,
    affinity_matrix,
    closest_negative_pairs,
    info_nce,
    mix_hard_negatives,
    squared_distances,
)
from napari_semicl.methods.memory_bank import ClassMemoryBank
from napari_semicl.models import build_model
from test_plgcl import _tiny_batch  # the same small 3-class batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")



# --- Eq. 2 ------------------------------------------------------------------------------------------
def test_affinity_matrix_by_hand():
    y_t = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y_s = np.array([[0.8, 0.6], [0.0, -1.0], [1.0, 0.0]])
    sq = np.array([[((a - b) ** 2).sum() for b in y_s] for a in y_t])
    # by hand: |(1,0)-(0.8,0.6)|^2 = 0.04 + 0.36 = 0.4, |(0,1)-(0,-1)|^2 = 4, ...
    assert sq[0, 0] == pytest.approx(0.4) and sq[1, 1] == pytest.approx(4.0) and sq[2, 2] == pytest.approx(0.8)
    sigma = np.median(np.sqrt(sq))  # 9 entries: the middle one
    expected = np.exp(-sq / (2 * sigma**2))
    tt, ts = torch.tensor(y_t), torch.tensor(y_s)
    np.testing.assert_allclose(squared_distances(tt, ts).numpy(), sq, atol=1e-12)
    a, s = affinity_matrix(tt, ts)
    assert float(s) == pytest.approx(sigma)
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-12)
    a_fixed, s_fixed = affinity_matrix(tt, ts, sigma=0.5)
    assert float(s_fixed) == 0.5
    np.testing.assert_allclose(a_fixed.numpy(), np.exp(-sq / 0.5), rtol=1e-12)
    # rows are teacher, columns student: A is not symmetric in general
    assert not np.allclose(expected, expected.T)


def test_adaptive_bandwidth_is_numpy_median_of_distances_for_an_even_count():
    sq = torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64)
    assert float(adaptive_bandwidth(sq)) == pytest.approx(np.median([1.0, 2.0, 3.0, 4.0]))  # 2.5
    assert float(adaptive_bandwidth(torch.zeros(3, 3))) == pytest.approx(1e-6)  # collapse: clamped


def test_sigma_carries_no_gradient():
    g = torch.Generator().manual_seed(0)
    y_t = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    y_s = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    a, sigma = affinity_matrix(y_t, y_s)
    loss = AffinityGraphLoss(1.0)(a)
    (grad_adaptive,) = torch.autograd.grad(loss, y_s)
    a2, _ = affinity_matrix(y_t, y_s, sigma=float(sigma))
    (grad_fixed,) = torch.autograd.grad(AffinityGraphLoss(1.0)(a2), y_s)
    torch.testing.assert_close(grad_adaptive, grad_fixed)
    assert torch.isfinite(grad_adaptive).all() and float(grad_adaptive.abs().sum()) > 0


# --- Eq. 3 ------------------------------------------------------------------------------------------
def test_trace_and_nuclear_norm_match_numpy_svd():
    rng = np.random.default_rng(0)
    a = np.exp(-rng.uniform(0, 3, size=(7, 7)))
    trace, nuc = AffinityGraphLoss.terms(torch.tensor(a))
    assert float(trace) == pytest.approx(np.trace(a), rel=1e-12)
    assert float(nuc) == pytest.approx(np.linalg.svd(a, compute_uv=False).sum(), rel=1e-10)
    for gamma in (0.0, 1.0, 0.3):
        got = float(AffinityGraphLoss(gamma)(torch.tensor(a)))
        want = (-np.trace(a) + gamma * np.linalg.svd(a, compute_uv=False).sum()) / 7
        assert got == pytest.approx(want, rel=1e-10)
    # by hand on a 2 x 2: singular values of [[1, 0.5], [0.5, 1]] are 1.5 and 0.5
    small = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    trace, nuc = AffinityGraphLoss.terms(small)
    assert (float(trace), float(nuc)) == (pytest.approx(2.0), pytest.approx(2.0))
    assert float(AffinityGraphLoss(2.0)(small)) == pytest.approx((-2.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="square"):
        AffinityGraphLoss.terms(torch.ones(2, 3))
    with pytest.raises(ValueError, match="gamma"):
        AffinityGraphLoss(-1.0)


def test_pl_loss_pulls_each_student_patch_towards_its_teacher_patch():
    """-tr(A) alone (gamma = 0): a gradient step raises every A_ii."""
    g = torch.Generator().manual_seed(3)
    y_t = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    y_s = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    a, sigma = affinity_matrix(y_t, y_s)
    AffinityGraphLoss(0.0)(a).backward()
    with torch.no_grad():
        moved = y_s - 0.05 * y_s.grad
        after = affinity_matrix(y_t, moved, sigma=float(sigma))[0]
    assert (torch.diagonal(after) > torch.diagonal(a.detach())).all()


# --- Eq. 6 ------------------------------------------------------------------------------------------
def test_mixing_is_a_unit_convex_combination():
    rng = np.random.default_rng(1)
    n_i = rng.normal(size=(4, 3, 5))
    n_j = rng.normal(size=(4, 3, 5))
    a_ii = np.array([0.0, 0.25, 0.9, 1.0])
    h = mix_hard_negatives(torch.tensor(a_ii), torch.tensor(n_i), torch.tensor(n_j)).numpy()
    mix = a_ii[:, None, None] * n_i + (1 - a_ii[:, None, None]) * n_j
    np.testing.assert_allclose(h, mix / np.linalg.norm(mix, axis=-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(h, axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(h[0], n_j[0] / np.linalg.norm(n_j[0], axis=-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(h[3], n_i[3] / np.linalg.norm(n_i[3], axis=-1, keepdims=True), rtol=1e-12)
    # for unit n_i, n_j the unnormalised mixture lies on the chord: its norm is at most 1
    ui = n_i / np.linalg.norm(n_i, axis=-1, keepdims=True)
    uj = n_j / np.linalg.norm(n_j, axis=-1, keepdims=True)
    chord = a_ii[:, None, None] * ui + (1 - a_ii[:, None, None]) * uj
    assert (np.linalg.norm(chord, axis=-1) <= 1 + 1e-12).all()


def test_no_gradient_through_the_detached_a_ii():
    v = torch.tensor([0.3, -1.0], requires_grad=True)
    a_ii = torch.sigmoid(v)  # in (0, 1), on the graph
    n_i = torch.randn(2, 3, 4, requires_grad=True)
    n_j = torch.randn(2, 3, 4)
    q = torch.randn(2, 4)
    h = mix_hard_negatives(a_ii, n_i, n_j)
    (q.unsqueeze(1) * h).sum().backward()
    assert v.grad is None  # nothing flowed back into A_ii
    assert n_i.grad is not None and float(n_i.grad.abs().sum()) > 0


def test_closest_negative_pairs_come_from_the_closest_other_class_keys():
    # keys on the unit circle at angles 0, 10, 20, ... degrees; classes alternate 0/1/2
    angles = np.deg2rad(np.arange(0, 360, 10))
    keys = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    key_classes = torch.tensor([i % 3 for i in range(36)])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query_classes = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    ii, jj, has = closest_negative_pairs(queries, query_classes, keys, key_classes, n_closest=4, n_hard=200, generator=g)
    assert has.all() and ii.shape == jj.shape == (2, 200)
    # query 0 (angle 0, class 0): nearest non-class-0 keys are at +-10 and +-20 degrees
    assert set(ii[0].tolist()) | set(jj[0].tolist()) == {1, 2, 34, 35}
    # query 1 (angle 90, class 1): keys at 90 +- 10, +- 20 whose class is not 1 (key 10 is class 1)
    assert set(ii[1].tolist()) | set(jj[1].tolist()) == {8, 9, 11, 12}
    assert (ii != jj).all()
    assert (key_classes[ii] != query_classes[:, None]).all()
    # one negative only: n_i = n_j; none: no negative
    ii, jj, has = closest_negative_pairs(
        queries, torch.tensor([0, 1]), keys[:2], torch.tensor([0, 1]), n_closest=4, n_hard=3, generator=g
    )
    assert has.all() and ii[0].tolist() == jj[0].tolist() == [1, 1, 1] and ii[1].tolist() == jj[1].tolist() == [0, 0, 0]
    ii, jj, has = closest_negative_pairs(
        queries, torch.tensor([0, 1]), keys[:2], torch.tensor([0, 0]), n_closest=4, n_hard=3, generator=g
    )
    assert has.tolist() == [False, True] and (ii[0] == 0).all()
    ii, jj, has = closest_negative_pairs(queries, query_classes, keys[:0], key_classes[:0], n_closest=4, n_hard=3, generator=g)
    assert not has.any() and ii.shape == (2, 3)


# --- Eq. 4 / 7 ----------------------------------------------------------------------------------------
def test_info_nce_on_tiny_tensors_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    k_pos = torch.tensor([[[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    neg = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.8, 0.6]]], dtype=torch.float64)
    tau = 0.5

    def by_hand(p, ns):
        return -np.log(np.exp(p / tau) / (np.exp(p / tau) + sum(np.exp(n / tau) for n in ns)))

    l00 = by_hand(0.6, [0.0, -1.0])  # q0.k = 0.6; q0.n = 0, -1
    l01 = by_hand(1.0, [0.0, -1.0])
    l10 = by_hand(1.0, [0.0, 0.6])  # q1.k = 1; q1.n = 0, 0.6
    per = info_nce(q, k_pos, mask, neg, tau, reduction="none")
    np.testing.assert_allclose(per[mask].detach().numpy(), [l00, l01, l10], rtol=1e-12)
    assert torch.isnan(per[1, 1])
    loss = info_nce(q, k_pos, mask, neg, tau)
    assert float(loss.detach()) == pytest.approx((l00 + l01 + l10) / 3, rel=1e-12)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert float(info_nce(q, k_pos, torch.zeros_like(mask), neg, tau).detach()) == 0.0
    with pytest.raises(ValueError, match="tau"):
        info_nce(q, k_pos, mask, neg, 0.0)


def test_memory_bank_is_fifo_per_class_and_round_trips():
    bank = ClassMemoryBank(2, 3, 2, CPU, name="test bank")
    g = torch.Generator().manual_seed(0)
    keys = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    bank.push(keys[:3], torch.tensor([0, 0, 1]), g)
    bank.push(keys[3:], torch.tensor([0, 0]), g)
    assert bank.length.tolist() == [3, 1] and len(bank) == 4
    # class 0 got rows 0, 1, then 3, 4: row 4 overwrote the oldest (row 0)
    assert bank.keys[0].tolist() == [[8.0, 9.0], [2.0, 3.0], [6.0, 7.0]]
    assert bank.keys[1, 0].tolist() == [4.0, 5.0]
    k, c = bank.contents()
    assert k.shape == (4, 2) and c.tolist() == [0, 0, 0, 1]
    # more keys of a class than fit at once: a random subset of them fills the class
    many = 100 + torch.arange(10, dtype=torch.float32).reshape(5, 2)
    bank.push(many, torch.ones(5, dtype=torch.long), g)
    assert bank.length.tolist() == [3, 3]
    assert {tuple(r) for r in bank.keys[1].tolist()} <= {tuple(r) for r in many.tolist()}
    other = ClassMemoryBank(2, 3, 2, CPU)
    other.load_state_dict(bank.state_dict())
    torch.testing.assert_close(other.keys, bank.keys)
    with pytest.raises(CheckpointError, match="test bank"):
        ClassMemoryBank(2, 4, 2, CPU, name="test bank").load_state_dict(bank.state_dict())


# --- the method ---------------------------------------------------------------------------------------
def _tiny_config(**agcl):
    cfg = TrainConfig(method="agcl")
    cfg.model.n_classes, cfg.model.base_channels, cfg.model.depth = 3, 4, 2
    cfg.data.patch_size = 32
    a = cfg.agcl
    a.patch_size, a.n_positives, a.queue_size, a.embed_dim, a.warmup_steps = 8, 3, 16, 8, 0
    a.max_patches, a.n_closest, a.n_hard = 20, 6, 5
    for k, v in agcl.items():
        setattr(cfg.agcl, k, v)
    return cfg.validate()


def test_step_gradients_reach_the_student_and_not_the_teacher():
    cfg = _tiny_config()
    method = get_method("agcl")(cfg, build_model(cfg.model))
    assert isinstance(method, AGCL) and method.uses_teacher and method.uses_unlabelled
    losses = method.compute_losses(_tiny_batch(), step=0, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"ce", "dice", "consistency", "agg_pl", "agg_rw"}
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["agg_rw"].detach()) > 0
    # gamma = 1: ||A||_* >= tr(A), so L_AGG^PL >= 0
    assert float(losses["agg_pl"].detach()) >= -1e-6
    (losses["agg_pl"] + losses["agg_rw"]).backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in method.student.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in method.modules["projection"].parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.modules["teacher_projection"].parameters())
    review = method.review()
    n = review["affinity"].shape[0]
    assert n == 20 and review["affinity"].shape == (n, n) and review["affinity"].dtype == np.float32
    assert ((review["affinity"] > 0) & (review["affinity"] <= 1)).all()
    assert review["embeddings"].shape == (n, 8) and review["embeddings"].dtype == np.float32
    assert review["embedding_labels"].shape == (n,) and review["embedding_labels"].dtype == np.int64
    assert review["embedding_is_labelled"].dtype == bool and review["patch_centres"].shape == (n, 2)
    assert set(np.unique(review["embedding_labels"])) <= {0, 1, 2}
    assert method.last_sigma is not None and method.last_sigma > 0
    # the review affinity is Eq. 2 of the reviewed embeddings against the teacher's
    assert len(method.bank) > 0


def test_warmup_bank_and_checkpoint_state():
    cfg = _tiny_config(warmup_steps=2)
    method = AGCL(cfg, build_model(cfg.model))
    g = torch.Generator().manual_seed(0)
    losses = method.compute_losses(_tiny_batch(), step=1, generator=g)
    assert "agg_pl" not in losses and "agg_rw" not in losses and method.review() == {} and len(method.bank) == 0
    method.compute_losses(_tiny_batch(), step=2, generator=g)
    state = method.buffers_state()
    assert state["queue"].shape == (3, 16, 8) and int(state["queue_len"].sum()) > 0
    other = AGCL(cfg, build_model(cfg.model))
    other.load_state_dict(method.state_dict())
    torch.testing.assert_close(other.bank.keys, method.bank.keys)
    assert other.bank.length.tolist() == method.bank.length.tolist()
    smaller = _tiny_config(queue_size=4)
    with pytest.raises(CheckpointError, match="agcl.queue_size"):
        AGCL(smaller, build_model(smaller.model)).load_state_dict(method.state_dict())
    method.after_step(2)  # EMA of the teacher and the teacher head


def test_max_patches_bounds_the_graph_and_labelled_only_batches_work():
    cfg = _tiny_config(max_patches=7)
    method = AGCL(cfg, build_model(cfg.model))
    b = _tiny_batch()
    losses = method.compute_losses(Batch(b.x_l, b.y_l, None), step=0, generator=torch.Generator().manual_seed(0))
    assert "consistency" not in losses and torch.isfinite(losses["agg_pl"]) and torch.isfinite(losses["agg_rw"])
    assert method.review()["affinity"].shape == (7, 7)
    assert method.review()["embedding_is_labelled"].all()


def test_config_round_trips_and_names_bad_keys():
    cfg = TrainConfig(method="agcl")
    assert (cfg.agcl.tau, cfg.agcl.gamma, cfg.agcl.sigma, cfg.agcl.beta) == (0.2, 1.0, None, 0.25)
    cfg.agcl.sigma, cfg.agcl.max_patches = 0.7, 64
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.agcl.sigma == 0.7
    data = json.loads(cfg.to_json())
    for key, value in (("tau", 0), ("sigma", -1.0), ("max_patches", 5000), ("n_hard", 0), ("gamma", -1)):
        bad = json.loads(json.dumps(data))
        bad["agcl"][key] = value
        with pytest.raises(ConfigError, match=f"agcl.{key}"):
            TrainConfig.from_dict(bad)
    bad = _tiny_config()
    bad.agcl.patch_size = 64
    with pytest.raises(ConfigError, match="agcl.patch_size"):
        AGCL(bad, build_model(bad.model))


def test_review_slice_keeps_to_the_slice_and_restores_modes():
    cfg = _tiny_config(max_patches=12)
    method = AGCL(cfg, build_model(cfg.model))
    x = torch.rand(1, 1, 32, 40)
    out = method.review_slice(x, valid_shape=(30, 37))
    assert out["patch_entropy"].shape == (3, 30, 37) and out["patch_entropy"].dtype == np.float32
    n = out["embeddings"].shape[0]
    assert n == 12 and out["affinity"].shape == (n, n) and out["embedding_labels"].shape == (n,)
    assert (out["patch_centres"][:, 0] < 30).all() and (out["patch_centres"][:, 1] < 37).all()
    assert ((out["affinity"] > 0) & (out["affinity"] <= 1)).all()
    assert method.student.training and method.teacher.training
    assert all(m.training for m in method.modules.values())


# --- the loop and the CLI on real images ---------------------------------------------------------------
@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[30:50].astype(np.float32), reference.data[30:50]


def test_contrastive_terms_fall_on_a_real_slice(brain):
    """A few optimiser steps on one fixed batch of real slices lower L_AGG^PL + L_AGG^RW."""
    image, reference = brain
    cfg = _tiny_config(patch_size=8, max_patches=64, n_positives=5, n_closest=16, n_hard=8)
    cfg.model.n_classes, cfg.model.base_channels, cfg.model.depth = 4, 8, 3
    cfg.validate()
    torch.manual_seed(0)
    method = AGCL(cfg, build_model(cfg.model))
    lo, hi = np.percentile(image, [1, 99])
    crop = (slice(None), slice(14, 78), slice(6, 70))
    x = torch.tensor((np.clip(image[crop], lo, hi) - lo) / (hi - lo), dtype=torch.float32)[:, None]
    y = torch.tensor(reference[crop].astype(np.int64))
    batch = Batch(x[[3, 12]], y[[3, 12]], x[[0, 6, 9, 16]])
    params = [*method.student.parameters(), *method.extra_parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    totals = []
    for step in range(25):
        losses = method.compute_losses(batch, step=step, generator=torch.Generator().manual_seed(7))
        contrast = losses["agg_pl"] + losses["agg_rw"]
        totals.append(float(contrast))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        method.after_step(step)
    assert np.mean(totals[-5:]) < 0.9 * np.mean(totals[:5]), totals


def test_trains_in_the_loop_on_a_real_slice(brain):
    image, reference = brain
    cfg = TrainConfig(method="agcl", iterations=15, refresh_every=1000, seed=0)
    cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = 64, 4, 4
    cfg.data.unpainted = "background"
    cfg.agcl.warmup_steps, cfg.agcl.max_patches = 3, 64
    trainer = Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [5, 14], 0))], device=CPU)
    trainer.request_review(0, 9)
    events = []
    finished = run_sync(trainer.run(previews=False), events.append)
    assert finished.reason == "budget" and finished.step == 15
    hist = trainer.history
    assert all("agg_pl" not in h for h in hist[:3]) and all("agg_pl" in h and "agg_rw" in h for h in hist[3:])
    assert all(np.isfinite(h["agg_pl"]) and np.isfinite(h["agg_rw"]) for h in hist[3:])
    sup = [h["ce"] + h["dice"] for h in hist]
    assert np.mean(sup[-5:]) < 0.85 * np.mean(sup[:5])
    review = trainer.method.review()
    assert review["embeddings"].shape[1] == cfg.agcl.embed_dim and review["affinity"].shape == (64, 64)
    reviewed = [e for e in events if isinstance(e, Reviewed)]
    assert len(reviewed) == 1 and reviewed[0].arrays["patch_entropy"].shape[1:] == image.shape[1:]
    assert "affinity" in reviewed[0].arrays


def test_cli_trains_with_agcl(tmp_path):
    from napari_semicl.cli import main
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir

    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0), metadata=image.metadata)
    config = tmp_path / "agcl.json"
    config.write_text(json.dumps({"agcl": {"warmup_steps": 2, "max_patches": 32}}))
    out = tmp_path / "run"
    code = main([
        "-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(painted),
        "--config", str(config), "--method", "agcl", "--iterations", "4", "--patch-size", "64",
        "--unpainted", "background", "--out", str(out),
    ])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "agcl" and saved["agcl"]["warmup_steps"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ce", "dice", "consistency", "agg_pl", "agg_rw"} <= set(metrics["losses"])
