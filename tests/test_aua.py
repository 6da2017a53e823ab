"""AUA + BCL + PCL (METHODS.md §2): the equations against hand computation, the two stages
in the one training loop, checkpoints, review and the CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Notice, StepDone, TrainConfig, Trainer, run_sync
from napari_semicl.engine.config import ConfigError
from napari_semicl.io.sample import load_sample_volume
from napari_semicl.methods import get_method
from napari_semicl.methods.aua import (
    ClassStatistics,
    boundary_mask,
    generalized_dice_distance,
    generalized_energy_distance,
    low_rank_logit_distribution,
    mc_supervised_loss,
    pixel_vectors,
    prototype_contrastive_loss,
    sample_disagreement,
    sample_logits,
    sample_pixels,
    supervised_contrastive_loss,
)
from napari_semicl.models import UNet2D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")



# --- Eq. 5: the low-rank Gaussian ----------------------------------------------------------------
@pytest.mark.parametrize("antithetic", [True, False])
def test_low_rank_samples_have_covariance_FFt_plus_D(antithetic):
    g = torch.Generator().manual_seed(0)
    k, h, w, r = 2, 2, 1, 2  # N = K*H*W = 4 logits per image
    mu = torch.randn(1, k, h, w, generator=g, dtype=torch.float64)
    log_d = torch.randn(1, k, h, w, generator=g, dtype=torch.float64) * 0.5
    factor = torch.randn(1, k, r, h, w, generator=g, dtype=torch.float64)
    dist = low_rank_logit_distribution(mu, log_d, factor)
    # the covariance by hand: F F^T + D with F flattened in (K, H, W) order
    f = factor.permute(0, 1, 3, 4, 2).reshape(k * h * w, r)
    sigma = f @ f.T + torch.diag(log_d.reshape(-1).exp() + 1e-5)
    torch.testing.assert_close(dist.covariance_matrix[0], sigma)
    n = 200_000
    torch.manual_seed(1)
    x = sample_logits(dist, n, antithetic=antithetic)[:, 0]  # (n, 4)
    dev = x - mu.reshape(-1)
    emp = dev.T @ dev / n  # the mean is known, so no degree of freedom is lost
    # standard error of each entry: sqrt((S_ii S_jj + S_ij^2) / n_eff); antithetic pairs share
    # their outer products, so n_eff = n/2 there. Tolerance: 5 standard errors.
    n_eff = n // 2 if antithetic else n
    se = torch.sqrt((torch.outer(sigma.diag(), sigma.diag()) + sigma**2) / n_eff)
    assert bool(((emp - sigma).abs() < 5 * se).all()), ((emp - sigma) / se)
    if antithetic:  # the pairs mu + e, mu - e average to mu exactly
        torch.testing.assert_close(x.mean(dim=0), mu.reshape(-1))


def test_low_rank_sampling_survives_a_singular_capacitance():
    # factor columns all alike and a diagonal at its floor: I + F^T D^-1 F is singular in
    # float32 and torch's LowRankMultivariateNormal failed to build ("not positive-definite",
    # the AUA cohort run's crash at step 587); sampling needs no factorisation
    g = torch.Generator().manual_seed(0)
    b, k, r, h, w = 2, 2, 8, 16, 16
    mu = torch.randn(b, k, h, w, generator=g)
    col = 3 * torch.randn(b, k, 1, h, w, generator=g)
    factor = col.expand(b, k, r, h, w).contiguous().requires_grad_()
    dist = low_rank_logit_distribution(mu, torch.full_like(mu, -30.0), factor)
    torch.manual_seed(2)
    x = sample_logits(dist, 4000)  # (S, B, N)
    assert bool(x.isfinite().all())
    # F F^T with r equal columns is r * c c^T: the variance of each logit is r c^2 (+ 1e-5)
    var = ((x - mu.reshape(b, -1)) ** 2).mean(dim=0)
    expected = r * col.reshape(b, -1) ** 2 + 1e-5
    assert float(((var - expected).abs() / expected).median()) < 0.1
    x.sum().backward()  # gradients reach the factor
    assert factor.grad is not None and bool(factor.grad.isfinite().all())


# --- Eq. 3-4: the Monte-Carlo likelihood -----------------------------------------------------------
def test_mc_loss_by_hand_on_two_samples():
    # one image, two pixels, K = 2, S = 2 samples
    g1 = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # (B=1, K=2, H=1, W=2)
    g2 = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    y = torch.tensor([[[1, 0]]])
    # pixel 0 (y = 1): logits (0, 1) in g1, (2, 0) in g2; pixel 1 (y = 0): (1, 0) and (0, 0)
    l1 = math.log(math.e / (1 + math.e)) + math.log(math.e / (math.e + 1))  # log p(y|g1)
    l2 = math.log(1 / (math.e**2 + 1)) + math.log(0.5)
    expected = -(math.log(math.exp(l1) + math.exp(l2)) - math.log(2)) / 2
    got = mc_supervised_loss(torch.stack([g1, g2]), y)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # an ignored pixel leaves the sum and the pixel count
    y_ign = torch.tensor([[[1, IGNORE_INDEX]]])
    l1, l2 = math.log(math.e / (1 + math.e)), math.log(1 / (math.e**2 + 1))
    expected = -(math.log(math.exp(l1) + math.exp(l2)) - math.log(2)) / 1
    assert float(mc_supervised_loss(torch.stack([g1, g2]), y_ign)) == pytest.approx(expected, rel=1e-6)


def test_mc_loss_equals_cross_entropy_when_the_covariance_vanishes():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 8, 8), generator=g)
    ce = F.cross_entropy(mu, y)
    # S identical samples: exactly the cross-entropy
    same = mu[None].expand(6, -1, -1, -1, -1)
    torch.testing.assert_close(mc_supervised_loss(same, y), ce)
    # through the distribution with F = 0 and D at its floor (1e-5): equal to 1e-4
    dist = low_rank_logit_distribution(mu, torch.full_like(mu, -60.0), torch.zeros(3, 4, 2, 8, 8, dtype=torch.float64))
    samples = sample_logits(dist, 8).view(8, *mu.shape)
    assert float(mc_supervised_loss(samples, y)) == pytest.approx(float(ce), abs=1e-4)


# --- Eq. 6-8: GED with the generalized Dice distance -------------------------------------------------
def test_generalized_dice_distance_on_tiny_arrays():
    a = torch.tensor([1.0, 0.0, 0.0, 1.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert float(generalized_dice_distance(a, b)) == pytest.approx(1 - 1 / 4)
    a = torch.tensor([0.5, 0.5])
    b = torch.tensor([1.0, 0.0])
    assert float(generalized_dice_distance(a, b)) == pytest.approx(1 - 0.5 / 1.5)
    assert float(generalized_dice_distance(b, b)) == pytest.approx(0.5)  # Eq. 8 as printed


def test_ged_is_zero_for_identical_deterministic_predictions_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3 * 16, generator=g).view(2, 3, 16).softmax(dim=1).view(2, -1)  # (B, N)
    q = torch.randn(2, 3 * 16, generator=g).view(2, 3, 16).softmax(dim=1).view(2, -1)
    same_s = p[None].expand(5, -1, -1)
    same_t = p[None].expand(4, -1, -1)
    assert abs(float(generalized_energy_distance(same_s, same_t))) < 1e-6
    # deterministic but different: 2 d(p, q) - d(p, p) - d(q, q) = 1 - 2<p,q>/(|p|^2 + |q|^2), per image
    got = generalized_energy_distance(same_s, q[None].expand(4, -1, -1))
    expected = (1 - 2 * (p * q).sum(-1) / ((p * p).sum(-1) + (q * q).sum(-1))).mean()
    assert float(got) > 0
    torch.testing.assert_close(got, expected)
    # stochastic samples: positive, and exactly half the GED with the usual (factor-2) Dice distance
    s = torch.randn(6, 2, 3, 16, generator=g).softmax(dim=2).view(6, 2, -1)
    t = torch.randn(6, 2, 3, 16, generator=g).softmax(dim=2).view(6, 2, -1)
    ged = generalized_energy_distance(s, t)

    def dice2(a, b):
        return 1 - 2 * (a * b).sum(-1) / ((a * a).sum(-1) + (b * b).sum(-1))

    by_hand = sum(
        2 * dice2(s[i], t[j]) - dice2(s[i], s[j]) - dice2(t[i], t[j]) for i in range(6) for j in range(6)
    ).mean() / 36
    assert float(ged) > 0
    torch.testing.assert_close(ged, 0.5 * by_hand)


# --- Eq. 10: BCL ---------------------------------------------------------------------------------------
def test_boundary_mask_of_a_known_square():
    y = torch.zeros(1, 10, 10, dtype=torch.long)
    y[0, 3:7, 3:7] = 1
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:8, 2:8] = True  # dilation of the square (outer ring + square) ...
    expected[4:6, 4:6] = False  # ... minus its erosion (the interior): ring 20 + rim 12
    got = boundary_mask(y, 2)[0]
    assert torch.equal(got, expected) and int(got.sum()) == 32
    # unpainted pixels neither are nor make boundary pixels
    y2 = y.clone()
    y2[0, :, 8:] = IGNORE_INDEX
    y2[0, 3:7, 7] = IGNORE_INDEX  # the ring to the square's right is unpainted
    got2 = boundary_mask(y2, 2)[0]
    assert not bool(got2[y2[0] == IGNORE_INDEX].any())
    # the rim pixels (4, 6) and (5, 6) now see only their own class and unpainted pixels
    expected2 = expected.clone()
    expected2[4:6, 6] = False
    assert torch.equal(got2[:, :7], expected2[:, :7])


def test_sampled_pixels_are_a_bounded_subset():
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :4] = True  # 32 pixels
    mask[1, 0, :3] = True  # 3 pixels
    sel = sample_pixels(mask, 10, torch.Generator().manual_seed(0))
    assert not bool((sel & ~mask).any())
    assert sel[0].sum() == 10 and sel[1].sum() == 3
    even = sample_pixels(mask, 10, None)
    assert even[0].sum() == 10 and torch.equal(even, sample_pixels(mask, 10, None))


def test_feature_vectors_stay_aligned_with_their_labels():
    b, h, w = 2, 5, 7
    bb, hh, ww = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    features = torch.stack([bb, hh, ww]).permute(1, 0, 2, 3).float()  # (B, 3, H, W): its own position
    labels = (bb * 100 + hh * 10 + ww)  # a label that names the pixel
    mask = torch.rand(b, h, w, generator=torch.Generator().manual_seed(3)) < 0.4
    vec = pixel_vectors(features, mask)
    lab = labels[mask]
    assert vec.shape == (int(mask.sum()), 3)
    torch.testing.assert_close(vec[:, 0] * 100 + vec[:, 1] * 10 + vec[:, 2], lab.float())
    torch.testing.assert_close(vec, mask.nonzero().float())


def test_supervised_contrastive_loss_by_hand():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    sim = (z @ z.T / tau).numpy()
    expected = []
    for i in range(4):
        others = [o for o in range(4) if o != i]
        pos = [p for p in others if labels[p] == labels[i]]
        denom = np.log(sum(np.exp(sim[i, o]) for o in others))
        expected.append(-np.mean([sim[i, p] - denom for p in pos]))
    got = supervised_contrastive_loss(z, labels, tau)
    assert float(got) == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # per image: pairs never cross images; an anchor without a positive in its image is skipped
    groups = torch.tensor([0, 0, 0, 1])
    expected = []
    for i in range(3):
        others = [o for o in range(3) if o != i]
        pos = [p for p in others if labels[p] == labels[i]]
        if not pos:
            continue
        denom = np.log(sum(np.exp(sim[i, o]) for o in others))
        expected.append(-np.mean([sim[i, p] - denom for p in pos]))
    got = supervised_contrastive_loss(z, labels, tau, groups=groups)
    assert float(got) == pytest.approx(float(np.mean(expected)), rel=1e-5)


# --- Eq. 12-13: PCL ------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagonal", [False, True])
def test_running_statistics_equal_numpy_over_the_same_stream(diagonal):
    rng = np.random.default_rng(0)
    stats = ClassStatistics(3, 4, diagonal=diagonal)
    seen_f, seen_y = [], []
    for t in range(6):
        n = int(rng.integers(5, 40))
        y = rng.integers(0, 2 if t < 2 else 3, n)  # class 2 only joins later
        f = rng.normal(size=(n, 4)) * (1 + y[:, None]) + y[:, None]
        stats.update(torch.from_numpy(f).float(), torch.from_numpy(y))
        seen_f.append(f.astype(np.float32).astype(np.float64))
        seen_y.append(y)
    f_all, y_all = np.concatenate(seen_f), np.concatenate(seen_y)
    for c in range(3):
        fc = f_all[y_all == c]
        assert float(stats.count[c]) == len(fc)
        np.testing.assert_allclose(stats.mean[c].numpy(), fc.mean(axis=0), rtol=1e-10, atol=1e-12)
        cov = np.cov(fc, rowvar=False, bias=True)
        np.testing.assert_allclose(stats.cov[c].numpy(), np.diag(cov) if diagonal else cov, rtol=1e-9, atol=1e-12)


def test_prototype_contrastive_loss_is_eq12_for_two_classes():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 3))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    y = np.array([0, 1, 0, 1, 1, 0])
    stats = ClassStatistics(2, 3)
    stats.update(torch.from_numpy(rng.normal(size=(20, 3))), torch.from_numpy(rng.integers(0, 2, 20)))
    mu, sig = stats.mean.numpy(), stats.cov.numpy()
    tau = 0.7
    terms, reg = [], []
    for i in range(6):
        p, n = y[i], 1 - y[i]
        zp = f[i] @ mu[p] / tau + f[i] @ sig[p] @ f[i] / (2 * tau**2)
        zn = f[i] @ mu[n] / tau + f[i] @ sig[n] @ f[i] / (2 * tau**2)
        terms.append(np.log(np.exp(zp) / (np.exp(zp) + np.exp(zn))))
        reg.append(f[i] @ sig[p] @ f[i])
    expected = np.mean(reg) - np.mean(terms)
    got = prototype_contrastive_loss(torch.from_numpy(f), torch.from_numpy(y), stats, tau)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # a class never seen is left out of the softmax
    stats3 = ClassStatistics(3, 3)
    stats3.update(stats.mean.float(), torch.tensor([0, 1]))
    out = prototype_contrastive_loss(torch.from_numpy(f).float(), torch.from_numpy(y), stats3, tau)
    assert torch.isfinite(out)


def test_disagreement_is_the_normalised_entropy_of_the_sample_histogram():
    samples = torch.tensor([[[0, 1]], [[0, 2]], [[0, 1]], [[0, 0]]])  # (S=4, 1, 2), K = 3
    got = sample_disagreement(samples, 3)
    p = np.array([0.25, 0.5, 0.25])
    assert float(got[0, 0]) == 0.0
    assert float(got[0, 1]) == pytest.approx(-(p * np.log(p)).sum() / np.log(3), rel=1e-6)


# --- the method ------------------------------------------------------------------------------------------
def test_config_is_validated():
    cfg = TrainConfig(method="aua")
    cfg.aua.n_samples = 5
    with pytest.raises(ConfigError, match="aua.n_samples"):
        cfg.validate()
    cfg.aua.n_samples, cfg.aua.stage2_init = 6, "later"
    with pytest.raises(ConfigError, match="aua.stage2_init"):
        cfg.validate()
    cfg.aua.stage2_init = "restart"
    assert TrainConfig.from_json(cfg.to_json()).aua == cfg.aua


@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[28:52].astype(np.float32), reference.data[28:52]


def _trainer(brain, iterations, stage2_at, init="continue", out_dir=None):
    image, reference = brain
    cfg = TrainConfig(method="aua", iterations=iterations, refresh_every=10**6, seed=0)
    cfg.data.patch_size, cfg.data.unpainted = 64, "background"
    cfg.data.batch_labelled = cfg.data.batch_unlabelled = 3
    cfg.aua.stage2_at, cfg.aua.stage2_init = stage2_at, init
    cfg.aua.n_samples = 6
    return Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [6, 17], 0))], device=CPU, out_dir=out_dir)


def test_both_stages_run_on_a_real_slice_and_lower_the_loss(brain):
    trainer = _trainer(brain, 48, 0.5, "restart")
    events = []
    finished = run_sync(trainer.run(previews=False), events.append)
    assert finished.reason == "budget", finished.error
    h = trainer.history
    stage1, stage2 = h[:24], h[24:]
    assert all({"ce", "dice", "bcl", "ged"} <= set(r) for r in stage1)
    assert all({"ce", "dice", "pcl"} <= set(r) and "ged" not in r for r in stage2)
    def sup(rows):
        return [r["ce"] + r["dice"] for r in rows]

    assert np.mean(sup(stage1[-6:])) < 0.8 * np.mean(sup(stage1[:6]))
    # stage 2 restarts from fresh weights: its loss starts high again and falls
    assert np.mean(sup(stage2[:3])) > np.mean(sup(stage1[-6:]))
    assert np.mean(sup(stage2[-6:])) < 0.8 * np.mean(sup(stage2[:6]))
    assert all(np.isfinite(r["total"]) for r in h)
    # the switch was announced once, between the steps 24 and 25
    kinds = [(type(e).__name__, getattr(e, "step", None)) for e in events]
    i = next(i for i, e in enumerate(events) if isinstance(e, Notice) and "stage 2" in e.text)
    assert [isinstance(e, StepDone) and e.step for e in events[i - 1:i + 2:2]] == [24, 25], kinds[i - 2:i + 3]
    assert sum(isinstance(e, Notice) and "stage 2" in e.text for e in events) == 1
    assert trainer.predict(brain[0]).labels.shape == brain[0].shape


def test_restart_reinitialises_the_student_and_resets_the_optimiser(brain):
    trainer = _trainer(brain, 4, 0.5, "restart")
    for _ in range(2):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.optimizer.state
    change = trainer.method.before_step(2)
    assert change.reset_optimizer and trainer.method.stage == 2
    fresh = trainer.model.state_dict()
    assert not torch.equal(fresh["head.weight"], before["head.weight"])
    # the pseudo-labeller is the stage-1 teacher, frozen
    t_state = trainer.method.pseudo_labeller.state_dict()
    assert all(not p.requires_grad for p in trainer.method.pseudo_labeller.parameters())
    # the same fresh weights every time (seeded), and the teacher follows the new student
    other = _trainer(brain, 4, 0.5, "restart")
    other.method.before_step(2)
    torch.testing.assert_close(other.model.state_dict()["head.weight"], fresh["head.weight"])
    torch.testing.assert_close(trainer.method.teacher.state_dict()["head.weight"], fresh["head.weight"])
    assert not torch.equal(t_state["head.weight"], fresh["head.weight"])
    # continue keeps the weights and the optimiser
    cont = _trainer(brain, 4, 0.5, "continue")
    cont.train_step()
    w = cont.model.state_dict()["head.weight"].clone()
    assert cont.method.before_step(2).reset_optimizer is False
    assert torch.equal(cont.model.state_dict()["head.weight"], w)


def test_resume_restores_stage_pseudo_labeller_and_class_statistics(brain, tmp_path):
    trainer = _trainer(brain, 6, 0.5, "continue", out_dir=tmp_path)
    run_sync(trainer.run(previews=False))
    m = trainer.method
    assert m.stage == 2 and float(m.stats.count.sum()) > 0
    resumed = Trainer.from_checkpoint(tmp_path / "checkpoint.pt", trainer.pairs, device=CPU)
    r = resumed.method
    assert r.stage == 2 and r.stage2_step == m.stage2_step == 3
    for key in ("count", "mean", "cov"):
        torch.testing.assert_close(getattr(r.stats, key), getattr(m.stats, key))
    for a, b in zip(r.pseudo_labeller.state_dict().values(), m.pseudo_labeller.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert r.before_step(resumed.step) is None  # no second switch
    # a stage-1 checkpoint resumes in stage 1
    early = _trainer(brain, 2, 0.9, out_dir=tmp_path / "early")
    run_sync(early.run(previews=False))
    assert Trainer.from_checkpoint(tmp_path / "early" / "checkpoint.pt", early.pairs, device=CPU).method.stage == 1


def _method(stage2=False):
    cfg = TrainConfig(method="aua")
    cfg.model.n_classes, cfg.model.base_channels, cfg.model.depth = 3, 4, 2
    cfg.aua.rank, cfg.aua.review_samples, cfg.aua.review_window = 2, 6, 16
    cfg.validate()
    torch.manual_seed(0)
    method = get_method("aua")(cfg, UNet2D(1, 3, base_channels=4, depth=2))
    if stage2:
        method.start_stage2(0)
    return method


@pytest.mark.parametrize("stage2", [False, True])
def test_review_slice_samples_in_windows_and_leaves_training_state_alone(stage2):
    method = _method(stage2)
    with torch.no_grad():  # an untrained network predicts one class: give its prediction boundaries
        method.student.head.weight.mul_(50)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 48, 64, generator=g)
    modes = [m.training for mod in (method.teacher, method.student, method.modules) for m in mod.modules()]
    rng_state = torch.get_rng_state()
    out = method.review_slice(x, valid_shape=(45, 61))
    assert torch.equal(torch.get_rng_state(), rng_state)  # training RNG untouched
    assert modes == [m.training for mod in (method.teacher, method.student, method.modules) for m in mod.modules()]
    s = out["aleatoric_samples"]
    assert s.shape == (6, 45, 61) and s.dtype == np.int64 and set(np.unique(s)) <= {0, 1, 2}
    d = out["aleatoric_disagreement"]
    assert d.shape == (45, 61) and d.dtype == np.float32 and 0 <= d.min() and d.max() <= 1
    np.testing.assert_allclose(d, sample_disagreement(torch.from_numpy(s), 3).numpy(), atol=1e-6)
    assert d.max() > 0  # an untrained head is unsure somewhere
    n = out["embeddings"].shape[0]
    assert out["embeddings"].shape == (n, 16) and out["embeddings"].dtype == np.float32
    assert out["embedding_labels"].shape == (n,) and out["pixel_coords"].shape == (n, 2)
    coords = out["pixel_coords"]
    assert n > 0 and coords[:, 0].max() < 45 and coords[:, 1].max() < 61
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1, rtol=1e-5)
    # on-demand sampling: same shapes, reproducible, and the network only ever sees windows
    net = method.pseudo_labeller if stage2 else method.teacher
    seen = []
    hook = net.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[-2:])))
    try:
        again = method.sample_aleatoric(x, 4, valid_shape=(45, 61))
    finally:
        hook.remove()
    assert seen and max(max(s) for s in seen) <= 16 and len(seen) == 3 * 4  # 48 x 64 in 16 x 16 windows
    assert again.shape == (4, 45, 61)
    np.testing.assert_array_equal(again, method.sample_aleatoric(x, 4, valid_shape=(45, 61)))


def test_baselines_have_no_aleatoric_head():
    # review capabilities are declared: only AUA says it answers 'aleatoric'
    assert get_method("aua").review_analyses == ("aleatoric",)
    for name in ("supervised", "mean_teacher", "plgcl", "agcl", "arco"):
        assert "aleatoric" not in get_method(name).review_analyses
        assert not hasattr(get_method(name), "sample_aleatoric")


def test_cli_trains_with_aua(tmp_path):
    from napari_semicl.cli import main
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir

    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0), metadata=image.metadata)
    out = tmp_path / "run"
    code = main([
        "-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(painted),
        "--method", "aua", "--iterations", "4", "--patch-size", "64", "--unpainted", "background",
        "--out", str(out),
    ])
    assert code == 0
    cfg = TrainConfig.from_json(out / "config.json")
    assert cfg.method == "aua"
    assert (out / "checkpoint.pt").exists()
