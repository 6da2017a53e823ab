"""ARCO (METHODS.md §4): the samplers' statistics, the loss by hand, the method in the loop.

Statistical tests use fixed seeds and vectorised draws (``repeats=R``). Tolerances:

* bias: ``|mean of R estimates - truth| < 4 SE`` with ``SE = std / sqrt(R)`` (a correct
  estimator fails this with probability ~6e-5 for a fresh seed);
* variances: the sample variance of R = 4000 estimates has a relative standard error of
  ``sqrt(2 / R) ~ 2.2 %``; inequalities from the paper get a 5 % slack (> 2 SE of a ratio).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_semicl.cli import main
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.dataset import Batch
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.errors import ConfigError
from napari_semicl.io import write_labels
from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir
from napari_semicl.methods import get_method
from napari_semicl.methods.arco import ARCO, ARCOConfig, PixelContrastiveLoss, pixel_contrastive_loss
from napari_semicl.methods.stratified_sampling import (
    antithetic_partners,
    grid_groups,
    proportional_counts,
    sample_class_pixels,
    sample_index_strata,
    sample_naive,
    sample_pixels,
    sample_stratified_antithetic,
    sample_stratified_groups,
)
from napari_semicl.models.unet import UNet2D

CPU = torch.device("cpu")
R = 4000  # repeated samples per estimator study
N_DRAWS = 32  # pixels per sample
GRID = 4


# --- a per-pixel quantity with strong spatial structure ------------------------------------------
@pytest.fixture(scope="module")
def field():
    """A 64 x 64 class mask (a disc and a bar: irregular groups) and h(p) with regional means."""
    h, w = 64, 64
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - 30) ** 2 + (xx - 28) ** 2 < 22**2) | ((yy > 44) & (xx > 8) & (xx < 60))
    values = (
        2.0 * yy / h + np.sin(xx / 6.0) + 1.5 * ((yy < 24) & (xx > 30)) - 1.0 * (yy > 44)
        + 0.2 * np.random.default_rng(0).standard_normal((h, w))
    )
    return mask, values, float(values[mask].mean())


def _estimates(sample, values):
    """R estimates sum_i w_i h(p_i) from a repeated sample."""
    return (sample.weights * values[sample.coords[..., 0], sample.coords[..., 1]]).sum(axis=1)


@pytest.fixture(scope="module")
def estimates(field):
    mask, values, _ = field
    out = {}
    for seed, name in enumerate(["ns", "sg", "sag", "index"]):
        s = sample_pixels(mask, N_DRAWS, np.random.default_rng(100 + seed), sampler=name, grid=GRID, strata=4, repeats=R)
        out[name] = _estimates(s, values)
    return out


@pytest.mark.parametrize("name", ["ns", "sg", "sag", "index"])
def test_every_sampler_estimates_the_class_mean_without_bias(estimates, field, name):
    _, _, truth = field
    est = estimates[name]
    se = est.std() / np.sqrt(R)
    assert abs(est.mean() - truth) < 4 * se, (name, est.mean() - truth, se)


def test_sg_variance_is_no_larger_than_ns_theorem_3_2(estimates, field):
    var_ns, var_sg = estimates["ns"].var(), estimates["sg"].var()
    mask, values, _ = field
    assert var_ns == pytest.approx(values[mask].var() / N_DRAWS, rel=0.1)  # NS: sigma^2 / n
    assert var_sg <= 1.05 * var_ns
    assert var_sg < 0.8 * var_ns  # strictly smaller: the groups' means differ


def test_sg_variance_matches_its_decomposition(estimates, field):
    """Var_SG = (1/n) sum_m W_m sigma_m^2 (Lemma 3.1 with n_m = n W_m) + the rounding term."""
    mask, values, _ = field
    g = grid_groups(mask, GRID)
    v = values[mask]  # np.nonzero order, as grid_groups' coords
    weight = g.sizes / g.sizes.sum()
    mu = np.bincount(g.group, weights=v) / g.sizes
    var_m = np.bincount(g.group, weights=v**2) / g.sizes - mu**2
    counts = proportional_counts(g.sizes, N_DRAWS, np.random.default_rng(7), repeats=R)
    rounding = ((counts * mu).sum(axis=1) / N_DRAWS).var()
    predicted = (weight * var_m).sum() / N_DRAWS + rounding
    assert estimates["sg"].var() == pytest.approx(predicted, rel=0.1)


def test_sag_variance_is_within_twice_sg_lemma_3_1(estimates):
    assert estimates["sag"].var() <= 2 * 1.05 * estimates["sg"].var()


def test_sag_weights_remove_the_bias_of_snapped_reflections(field):
    """On irregular groups the snapped reflection is not uniform: plain pair means are
    biased, the documented importance weights are not."""
    mask, values, truth = field
    g = grid_groups(mask, GRID)
    assert (np.bincount(antithetic_partners(g), minlength=len(g.coords)) != 1).any()  # T is no bijection
    s = sample_stratified_antithetic(mask, N_DRAWS, np.random.default_rng(5), grid=GRID, repeats=2 * R)
    h = values[s.coords[..., 0], s.coords[..., 1]]
    weighted, plain = (s.weights * h).sum(1), h.mean(1)
    se = weighted.std() / np.sqrt(2 * R)
    assert abs(weighted.mean() - truth) < 4 * se
    assert abs(plain.mean() - truth) > 4 * se


@pytest.mark.parametrize("seed", range(4))
def test_antithetic_partners_are_the_nearest_candidates_of_the_group(seed):
    """The table-lookup fast path and the k-d tree give the brute-force nearest candidate
    of the same group to every reflection (random masks over a batch of 3 images)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((3, 40, 37)) < (0.3 + 0.2 * seed)
    mask[1, 5:25, 3:30] = True  # a dense block: most reflections hit a candidate
    g = grid_groups(mask, 5)
    partners = antithetic_partners(g)
    yx = g.coords[:, -2:].astype(float)
    reflected = 2 * g.centres[g.group] - yx
    for i in rng.choice(len(yx), 400, replace=False):
        same = np.flatnonzero(g.group == g.group[i])
        d = np.linalg.norm(yx[same] - reflected[i], axis=1)
        assert g.group[partners[i]] == g.group[i]
        assert np.linalg.norm(yx[partners[i]] - reflected[i]) == pytest.approx(d.min(), abs=1e-9)


def test_proportional_counts_are_exactly_proportional_in_expectation():
    sizes = np.array([3, 50, 7, 1, 20])
    counts = proportional_counts(sizes, 9, np.random.default_rng(0), repeats=R)
    quota = 9 * sizes / sizes.sum()
    assert (counts.sum(1) == 9).all()
    assert ((counts == np.floor(quota)) | (counts == np.floor(quota) + 1)).all()
    se = counts.std(0) / np.sqrt(R) + 1e-12
    assert (np.abs(counts.mean(0) - quota) < 4 * se + 1e-9).all()


def test_sg_draws_stay_in_their_groups_in_proportion(field):
    mask, _, _ = field
    g = grid_groups(mask, GRID)
    s = sample_stratified_groups(mask, N_DRAWS, np.random.default_rng(1), grid=GRID, repeats=200)
    assert mask[s.coords[..., 0], s.coords[..., 1]].all()
    lookup = np.full(mask.shape, -1)
    lookup[mask] = g.group
    assert (lookup[s.coords[..., 0], s.coords[..., 1]] == s.group).all()
    np.testing.assert_allclose(s.weights, 1 / N_DRAWS)


def test_sag_draws_come_in_reflected_pairs(field):
    """Each pair's midpoint lies within half the snapping distance of its group centre."""
    mask, _, _ = field
    g = grid_groups(mask, GRID)
    s = sample_stratified_antithetic(mask, 10, np.random.default_rng(2), grid=GRID, repeats=50)
    lookup = np.full(mask.shape, -1)
    lookup[mask] = g.group
    for coords, group, partner in zip(s.coords, s.group, s.partner):
        np.testing.assert_array_equal(partner, np.arange(10) ^ 1)
        for j in range(0, 10, 2):
            p, q, m = coords[j].astype(float), coords[j + 1].astype(float), group[j]
            assert lookup[tuple(coords[j])] == m and lookup[tuple(coords[j + 1])] == m
            target = 2 * g.centres[m] - p
            members = g.coords[g.group == m]
            nearest = np.sqrt(((members - target) ** 2).sum(1)).min()  # brute force
            snap = np.sqrt(((q - target) ** 2).sum())
            assert snap <= nearest + 1e-9
            assert np.sqrt((((p + q) / 2 - g.centres[m]) ** 2).sum()) <= snap / 2 + 1e-9


def test_sag_on_full_cells_is_an_exact_reflection_with_plain_weights():
    mask = np.ones((16, 16), bool)  # 4 x 4 cells of 4 x 4 pixels: point-symmetric groups
    s = sample_stratified_antithetic(mask, 7, np.random.default_rng(3), grid=4)
    g = grid_groups(mask, 4)
    for j in range(0, 6, 2):
        np.testing.assert_allclose((s.coords[j] + s.coords[j + 1]) / 2, g.centres[s.group[j]])
    np.testing.assert_allclose(s.weights, 1 / 7)
    assert s.partner[-1] == -1  # the odd draw is unpaired


def test_index_strata_draw_equal_shares():
    mask = np.zeros((20, 20), bool)
    mask[3:17, 2:15] = True  # 182 candidates, strata of 45 or 46
    candidates = np.stack(np.nonzero(mask), 1)
    edges = (np.arange(5) * len(candidates)) // 4
    s = sample_index_strata(mask, 40, np.random.default_rng(0), strata=4, repeats=100)
    assert (np.stack([(s.group == k).sum(1) for k in range(4)], 1) == 10).all()
    flat = np.ravel_multi_index(tuple(s.coords.reshape(-1, 2).T), mask.shape)
    position = np.searchsorted(np.ravel_multi_index(tuple(candidates.T), mask.shape), flat)
    stratum = np.searchsorted(edges, position, side="right") - 1
    assert (stratum == s.group.ravel()).all()  # a draw lies in its stratum of the flat list
    s = sample_index_strata(mask, 42, np.random.default_rng(1), strata=4, repeats=100)
    shares = np.stack([(s.group == k).sum(1) for k in range(4)], 1)
    assert set(np.unique(shares)) == {10, 11} and ((shares == 11).sum(1) == 2).all()
    np.testing.assert_allclose(s.weights.sum(1), 1.0)


def test_samplers_handle_empty_masks_batches_and_bad_arguments():
    rng = np.random.default_rng(0)
    empty = np.zeros((2, 8, 8), bool)
    for name in ["ns", "sg", "sag", "index"]:
        s = sample_pixels(empty, 5, rng, sampler=name)
        assert s.coords.shape == (0, 3) and len(s) == 0
    batch = np.zeros((3, 16, 16), bool)
    batch[1, 4:12, 4:12] = True
    batch[2, :2, :] = True
    s = sample_stratified_antithetic(batch, 12, rng, grid=2)
    assert s.coords.shape == (12, 3) and batch[tuple(s.coords.T)].all()
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_pixels(batch, 4, rng, sampler="random")
    with pytest.raises(ValueError, match="boolean"):
        sample_naive(batch.astype(int), 4, rng)
    with pytest.raises(ValueError, match="grid"):
        sample_stratified_groups(batch, 4, rng, grid=0)


def test_sample_class_pixels_respects_classes_and_confidence():
    cmap = torch.full((2, 16, 16), IGNORE_INDEX, dtype=torch.long)
    cmap[0, :8] = 0
    cmap[0, 8:] = 1
    cmap[1, :, :8] = 2
    confident = torch.ones(2, 16, 16, dtype=torch.bool)
    confident[0, 12:] = False
    coords, classes, weights = sample_class_pixels(cmap, 6, np.random.default_rng(0), confident=confident,
                                                   sampler="sg", grid=2, n_classes=4)
    assert coords.shape == (18, 3) and classes.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    b, y, x = coords.unbind(1)
    assert (cmap[b, y, x] == classes).all() and confident[b, y, x].all()
    for c in range(3):
        assert float(weights[classes == c].sum()) == pytest.approx(1.0)


# --- the loss ----------------------------------------------------------------------------------------
def _infonce_by_hand(anchors, classes, protos, negs, neg_classes, tau, weights=None):
    def unit(v):
        return v / np.linalg.norm(v)

    per_anchor = []
    for a, c in zip(anchors, classes):
        pos = np.exp(unit(a) @ unit(protos[c]) / tau)
        neg = sum(np.exp(unit(a) @ unit(k) / tau) for k, kc in zip(negs, neg_classes) if kc != c)
        per_anchor.append(-np.log(pos / (pos + neg)))
    per_anchor = np.array(per_anchor)
    total = []
    for c in sorted(set(classes)):
        sel = np.array(classes) == c
        w = np.full(sel.sum(), 1 / sel.sum()) if weights is None else np.asarray(weights)[sel]
        total.append((w * per_anchor[sel]).sum())
    return float(np.mean(total))


def test_pixel_contrastive_loss_matches_hand_computation():
    anchors = np.array([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, -1.0, 2.0], [3.0, 1.0, 1.0]])
    classes = [0, 0, 1, 2]
    protos = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.5, 0.0]])
    negs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [2.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    neg_classes = [0, 1, 2, 1]
    weights = [0.7, 0.4, 1.0, 1.0]
    t = lambda a, dt=torch.float64: torch.tensor(a, dtype=dt)  # noqa: E731
    for w in (None, weights):
        got = pixel_contrastive_loss(
            t(anchors), t(classes, torch.long), t(protos), t(negs), t(neg_classes, torch.long),
            temperature=0.5, weights=None if w is None else t(w),
        )
        assert float(got) == pytest.approx(_infonce_by_hand(anchors, classes, protos, negs, neg_classes, 0.5, w), rel=1e-10)
    # an anchor whose class is the only one left has no negative: its term is log(1) = 0
    only = pixel_contrastive_loss(t(anchors[:1]), t([1], torch.long), t(protos), t(negs[1:2]), t([1], torch.long))
    assert float(only) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        PixelContrastiveLoss(temperature=0.0)


def _tiny_arco(sampler="sag", warmup=0):
    cfg = TrainConfig(method="arco")
    cfg.model.n_classes = 3
    cfg.arco.sampler, cfg.arco.warmup_steps, cfg.arco.rampup_steps = sampler, warmup, 0
    cfg.arco.anchors_per_class, cfg.arco.confidence, cfg.arco.embedding_dim = 8, 0.0, 8
    cfg.arco.contrast_weight = 1.0
    torch.manual_seed(0)
    student = UNet2D(1, 3, base_channels=4, depth=2)
    return get_method("arco")(cfg, student), student


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 5:11, 5:11] = 1
    y[:, 12:, :] = 2
    y[1, :2] = IGNORE_INDEX
    return Batch(torch.rand(2, 1, 16, 16, generator=g), y, torch.rand(2, 1, 16, 16, generator=g))


def test_gradients_reach_the_student_and_never_the_teacher():
    method, student = _tiny_arco()
    losses = method.compute_losses(_tiny_batch(), step=0, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"ce", "dice", "consistency", "contrast"}
    losses["contrast"].backward()  # the contrastive term alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoders[0].parameters())
    assert all(p.grad is not None for p in method.modules["projection"].parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.modules["teacher_projection"].parameters())
    assert method.modules["teacher_projection"].parameters().__next__().requires_grad is False
    assert method.extra_parameters() == list(method.modules["projection"].parameters())


def test_review_queues_and_warmup_of_the_method():
    method, _ = _tiny_arco(warmup=2)
    gen = torch.Generator().manual_seed(1)
    assert "contrast" not in method.compute_losses(_tiny_batch(), step=1, generator=gen)
    assert method.review() == {}
    method.compute_losses(_tiny_batch(), step=2, generator=gen)
    r = method.review()
    n = len(r["sampled_classes"])
    assert r["sampled_pixels"].shape == (n, 3) and r["sampled_pixels"].dtype == np.int64
    assert r["embeddings"].shape == (n, 8) and r["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(r["embedding_labels"], r["sampled_classes"])
    np.testing.assert_array_equal(r["embedding_is_labelled"], r["sampled_pixels"][:, 0] < 2)
    assert r["embedding_is_labelled"].dtype == bool and set(r["sampled_classes"]) <= {0, 1, 2}
    state = method.buffers_state()
    assert state["queue"].shape == (3, 512, 8) and int(state["queue_len"].sum()) == n
    other, _ = _tiny_arco()
    other.load_buffers_state(state)
    assert torch.equal(other.queue, method.queue) and torch.equal(other.queue_len, method.queue_len)


# --- config ---------------------------------------------------------------------------------------
def test_config_round_trips_through_train_config_json():
    cfg = TrainConfig(method="arco")
    cfg.arco = ARCOConfig(sampler="index", grid=3, strata=8, anchors_per_class=32, temperature=0.2, warmup_steps=7)
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.arco.sampler == "index" and back.arco.temperature == 0.2
    assert TrainConfig().arco.sampler == "sag" and TrainConfig().arco.temperature == 0.5
    bad = json.loads(cfg.to_json())
    bad["arco"]["sampler"] = "uniform"
    with pytest.raises(ConfigError, match=r"arco\.sampler"):
        TrainConfig.from_json(json.dumps(bad))
    for key, value in [("temperature", 0.0), ("confidence", 1.5), ("grid", 0), ("anchors_per_class", 1)]:
        bad = json.loads(cfg.to_json())
        bad["arco"][key] = value
        with pytest.raises(ConfigError, match=rf"arco\.{key}"):
            TrainConfig.from_json(json.dumps(bad))


# --- the loop on the bundled sample ------------------------------------------------------------------
@pytest.fixture(scope="module")
def brain():
    """A real 20-slice crop of the bundled sample with two revealed slices."""
    image, reference = load_sample_volume()
    img, ref = image.data[30:50].astype(np.float32), reference.data[30:50]
    return img, reveal_slices(ref, [5, 14], 0)


@pytest.mark.parametrize("sampler", ["ns", "sg", "sag", "index"])
def test_arco_trains_on_a_real_slice(brain, sampler):
    img, painted = brain
    cfg = TrainConfig(method="arco", iterations=15, refresh_every=1000, seed=0)
    cfg.data.patch_size, cfg.data.unpainted = 64, "background"
    cfg.arco.sampler, cfg.arco.warmup_steps, cfg.arco.rampup_steps = sampler, 5, 0
    trainer = Trainer(cfg, [AnnotatedPair(img, painted)], device=CPU, num_threads=1)
    finished = run_sync(trainer.run())
    assert finished.reason == "budget", finished.error
    hist = trainer.history  # entry "step" k holds the losses of step index k - 1
    assert all("contrast" not in h for h in hist if h["step"] <= 5)
    contrast = [h["contrast"] for h in hist if h["step"] > 5]
    assert len(contrast) == 10 and np.isfinite(contrast).all() and min(contrast) > 0
    sup = [h["ce"] + h["dice"] for h in hist]
    assert np.mean(sup[-3:]) < 0.9 * np.mean(sup[:3])
    assert len(trainer.method.review()["sampled_classes"]) > 0


def test_cli_trains_arco_with_a_chosen_sampler(tmp_path):
    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0), metadata=image.metadata)
    cfg = TrainConfig(method="arco")
    cfg.arco.warmup_steps = 2
    config = tmp_path / "start.json"
    cfg.to_json(config)
    out = tmp_path / "run"
    code = main([
        "-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(painted),
        "--config", str(config), "--method", "arco", "--sampler", "sg", "--iterations", "4",
        "--patch-size", "64", "--unpainted", "background", "--seed", "1", "--out", str(out),
    ])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "arco" and saved["arco"]["sampler"] == "sg" and saved["arco"]["warmup_steps"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ce", "dice", "consistency", "contrast"} <= set(metrics["losses"])
    assert np.isfinite(metrics["losses"]["contrast"])


def test_arco_is_registered():
    assert get_method("arco") is ARCO
