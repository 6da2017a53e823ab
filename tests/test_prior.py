"""The painted-slice prior in the one training loop (engine/prior.py) and 2.5D input:
dense targets and fusion against hand computation, the prior kept off painted and validation
slices, and every method training with it on a real volume (the bundled sample)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.dataset import with_context
from napari_semicl.data.interpolation import interpolate_labels
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, load_predictor, run_sync
from napari_semicl.engine.inference import predict_volume
from napari_semicl.engine.prior import (
    PriorConfig,
    dense_share,
    dense_target,
    entropy_trust,
    footprint_trust,
    fuse_probabilities,
    prior_probabilities,
    prior_weight,
)
from napari_semicl.errors import ConfigError
from napari_semicl.io.sample import load_sample_volume
from napari_semicl.methods import available_methods

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


# --- the pieces against hand computation ------------------------------------------------------
def test_dense_share_falls_linearly_from_start_to_end():
    cfg = PriorConfig(mode="targets", dense_start=0.6, dense_end=0.2)
    assert dense_share(cfg, 0.0) == pytest.approx(0.6)
    assert dense_share(cfg, 0.5) == pytest.approx(0.4)
    assert dense_share(cfg, 1.0) == pytest.approx(0.2)
    assert dense_share(cfg, 3.0) == pytest.approx(0.2)


def test_prior_weight_is_one_on_painted_slices_and_falls_exponentially():
    np.testing.assert_allclose(prior_weight(np.array([0.0, 2.0, 4.0]), 2.0), [1.0, math.exp(-1), math.exp(-2)], rtol=1e-6)


def test_dense_target_leaves_out_a_band_that_widens_with_distance():
    # binary scores along a row: signed distance -3.5 .. +3.5 (foreground on the right)
    sdf = np.arange(-3.5, 4.0, 1.0, dtype=np.float32)[None]  # (1, 8)
    scores = np.stack([-sdf, sdf])  # background = minus the foreground
    class_index = np.array([0, 1])
    near = dense_target(scores, class_index, distance=1.0, boundary_px=1.0)  # |sdf| < 1 ignored
    np.testing.assert_array_equal(near[0], [0, 0, 0, IGNORE_INDEX, IGNORE_INDEX, 1, 1, 1])
    far = dense_target(scores, class_index, distance=3.0, boundary_px=1.0)  # |sdf| < 3 ignored
    np.testing.assert_array_equal(far[0], [0, *[IGNORE_INDEX] * 6, 1])
    # the prior's classes map onto the network's class indices
    mapped = dense_target(scores, np.array([0, 2]), distance=0.0, boundary_px=1.0)
    np.testing.assert_array_equal(mapped[0], [0, 0, 0, 0, 2, 2, 2, 2])


def test_prior_probabilities_soften_with_distance():
    scores = torch.tensor([[-2.0], [2.0]]).view(1, 2, 1, 1).repeat(2, 1, 1, 1)
    p = prior_probabilities(scores, torch.tensor([0.0, 3.0]), temperature_px=1.0)
    assert p[0, 1].item() == pytest.approx(1 / (1 + math.exp(-4.0)), rel=1e-5)  # T = 1
    assert p[1, 1].item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-5)  # T = 4


def test_fusion_follows_the_rule():
    p_prior = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    certain = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    uniform = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    # a certain network far from painted slices (w = 0) decides; on a painted slice (w = 1) the prior
    torch.testing.assert_close(fuse_probabilities(certain, p_prior, torch.tensor([0.0])), certain)
    torch.testing.assert_close(fuse_probabilities(certain, p_prior, torch.tensor([1.0])), p_prior)
    # an unsure network (entropy 1) falls back on the prior whatever the distance
    torch.testing.assert_close(fuse_probabilities(uniform, p_prior, torch.tensor([0.0])), p_prior)
    # in between: alpha = w + (1 - w) H
    p_net = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1)
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(2)
    alpha = 0.3 + 0.7 * h
    expected = alpha * p_prior + (1 - alpha) * p_net
    torch.testing.assert_close(fuse_probabilities(p_net, p_prior, torch.tensor([0.3])), expected)
    # the agreement gate scales the network's share: a = 0.5, power 2 -> a quarter of it
    share = (1 - alpha) * 0.25
    gated = (1 - share) * p_prior + share * p_net
    torch.testing.assert_close(fuse_probabilities(p_net, p_prior, torch.tensor([0.3]), 0.5, 2.0), gated)
    torch.testing.assert_close(fuse_probabilities(certain, p_prior, torch.tensor([0.0]), 0.0, 8.0), p_prior)


def test_entropy_trust_falls_past_the_outermost_painted_slices_only():
    dist = np.array([3, 2, 1, 0, 1, 2, 1, 0, 1, 2], np.float32)  # painted 3 and 7
    r = entropy_trust(dist, 4.0)
    np.testing.assert_array_equal(r[3:8], 1.0)  # between the painted slices: the rule as before
    np.testing.assert_allclose(r[[0, 1, 2, 8, 9]], np.exp(-np.array([3, 2, 1, 1, 2]) / 4.0), rtol=1e-6)
    np.testing.assert_array_equal(entropy_trust(dist, None), 1.0)  # None: trusted everywhere
    with pytest.raises(ConfigError, match="entropy_length"):
        PriorConfig(entropy_length=0.0).validate()


def test_footprint_trust_is_the_slice_s_trust_near_the_carried_shape_and_1_farther_out():
    # one row of fill scores three slices past the outermost painted one, fall-off 2 px a slice:
    # the carried shape is scores + 6 (foreground > -margin within the margin); background first
    fg = torch.tensor([-30.0, -22.0, -20.5, -8.0, -5.0]).view(1, 1, 1, 5)
    scores = torch.cat([-fg, fg], dim=1)
    r = footprint_trust(scores, torch.tensor([3.0]), torch.tensor([0.25]), shrink=2.0, margin_px=15.0)
    assert r.shape == (1, 1, 1, 5)
    np.testing.assert_allclose(r.flatten().numpy(), [1.0, 1.0, 0.25, 0.25, 0.25])  # carried -24, -16, -14.5, -2, 1
    between = footprint_trust(scores, torch.tensor([1.0]), torch.tensor([1.0]), shrink=2.0, margin_px=15.0)
    np.testing.assert_array_equal(between.flatten().numpy(), 1.0)  # between painted slices r = 1 anyway


def test_past_the_painted_slices_an_unsure_network_falls_back_on_the_fill_less_with_distance():
    """Hand-computed: p_net = (0.2, 0.8), p_prior = (0.9, 0.1), w = 0.1, four slices past
    the outermost painted one with entropy_length 4 (r = e^-1). Before issue 26's fix the
    network's entropy handed the voxel to the fill at any distance (r = 1): foreground
    0.275, background; now 0.563, foreground as the network says."""
    p_net = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1)
    p_prior = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(2)  # 0.7219
    r = math.exp(-1.0)
    share = 0.9 * (1 - r * h)  # (1 - w)(1 - r H) = 0.6610
    fused = fuse_probabilities(p_net, p_prior, torch.tensor([0.1]), trust=torch.tensor([r]))
    assert fused[0, 1].item() == pytest.approx(0.5627, abs=1e-4)
    assert fused[0, 1].item() == pytest.approx((1 - share) * 0.1 + share * 0.8, rel=1e-5)
    old = fuse_probabilities(p_net, p_prior, torch.tensor([0.1]))  # r = 1: the rule before
    assert old[0, 1].item() == pytest.approx(0.2752, abs=1e-4)
    assert old[0, 1].item() < 0.5 < fused[0, 1].item()


def test_the_fuser_trusts_the_fill_less_past_a_new_volume_s_one_painted_slice(brain):
    """A new volume of a cohort with one painted slice (slice 11) fused with a network that
    says foreground at 0.8 everywhere: past the painted slice the fill's share where the
    network is unsure falls as exp(-d / entropy_length) near the painted shape carried past
    it (issue 26: the first painted slice lowered a cohort network's mask). Hand formula on
    slice 11 + 6; a volume alone in its run keeps the rule before (r = 1)."""
    image, reference = brain
    cfg = _config("supervised", beyond_length=2.0, agreement_power=8.0)
    one = AnnotatedPair(image, reveal_slices(reference, [11], 0), name="one slice")
    trainer = Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [3, 20], 0), name="two"), one], device=CPU)
    prior = trainer.prior
    assert prior.cohort(1) and not prior.fill_only(1) and prior.config.entropy_length == 8.0  # the default
    k = len(trainer.dataset.class_values)
    probs = torch.zeros(1, k, *image.shape[1:])
    probs[:, 0], probs[:, 1] = 0.2, 0.8
    s, d = 17, 6.0
    assert prior.slice_distance(1)[s] == d
    p_prior = prior.probabilities(1, s, s + 1, probs)
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(k)  # normalised over the k classes
    w = math.exp(-d / 2.0)  # beyond_length

    def rule(r):
        share = (1 - w) * (1 - h * r)  # a = 1: one painted slice, no gate
        return (1 - share) * p_prior + share * probs

    # r = exp(-d / entropy_length) within entropy_margin_px (15) of the painted shape carried
    # past slice 11 (the fill's scores plus its 1.5 px a slice fall-off), 1 farther out
    carried = torch.from_numpy(prior.scores(1, s, s + 1))[:, 1:].amax(dim=1, keepdim=True) + 1.5 * d
    near = carried > -15.0
    assert 0 < int(near.sum()) < near.numel()
    for length in (8.0, 3.0):
        prior.config.entropy_length = length
        r = torch.where(near, torch.tensor(math.exp(-d / length)), torch.tensor(1.0))
        torch.testing.assert_close(prior.fuser(1, agreement=1.0)(s, s + 1, probs), rule(r))
    prior.config.entropy_margin_px = 0.0  # the carried shape itself
    r = torch.where(carried > 0, torch.tensor(math.exp(-d / 3.0)), torch.tensor(1.0))
    torch.testing.assert_close(prior.fuser(1, agreement=1.0)(s, s + 1, probs), rule(r))
    prior.config.entropy_margin_px = 15.0
    prior.config.entropy_length = None  # the rule before: the entropy hands unsure voxels to the fill
    torch.testing.assert_close(prior.fuser(1, agreement=1.0)(s, s + 1, probs), rule(1.0))
    prior.config.entropy_length = 8.0
    on = prior.fuser(1, agreement=1.0)(11, 12, probs)  # the painted slice stays what was painted
    torch.testing.assert_close(on, prior.probabilities(1, 11, 12, probs))
    # the same volume alone in its run (its network fused from one slice): r = 1
    cfg.prior.network_min_painted = 1
    alone = Trainer(cfg, [one], device=CPU).prior
    assert not alone.cohort(0) and not alone.fill_only(0)
    torch.testing.assert_close(alone.fuser(0, agreement=1.0)(s, s + 1, probs), rule(1.0))


def test_agreement_is_the_dice_against_the_prior_next_to_painted_slices(brain):
    image, reference = brain
    trainer = Trainer(_config("supervised"), [AnnotatedPair(image, reveal_slices(reference, PAINTED, 0))], device=CPU)
    prior = trainer.prior
    near = prior.near_slices(0)
    assert set(near) == {1, 2, 4, 5, 9, 10, 12, 13, 18, 19, 21, 22}  # within 2 slices of 3, 11 and 20
    mask = prior.mask(0)[near]
    assert prior.agreement(0, mask, near) == 1.0
    assert prior.agreement(0, np.zeros_like(mask), near) == 0.0
    half = mask.copy()
    half[: len(near) // 2] = 0
    assert 0.0 < prior.agreement(0, half, near) < 1.0


def test_prior_config_is_checked():
    with pytest.raises(ConfigError, match="prior.mode"):
        PriorConfig(mode="dense").validate()
    with pytest.raises(ConfigError, match="prior.dense_start"):
        PriorConfig(dense_start=1.5).validate()
    with pytest.raises(ConfigError, match="prior.confidence_length"):
        PriorConfig(confidence_length=0).validate()
    cfg = TrainConfig()
    cfg.prior.mode = "targets"
    assert TrainConfig.from_json(cfg.to_json()).prior.mode == "targets"


def test_leave_one_out_and_calibration_by_hand():
    from napari_semicl.engine.prior import calibrate, leave_one_out

    # a square whose side grows by 2 px a slice: the middle slice is exactly the blend of
    # its neighbours, so leaving it out costs nothing
    lab = np.zeros((9, 40, 40), np.uint8)
    for s in (0, 4, 8):
        r = 4 + s
        lab[s, 20 - r:20 + r, 20 - r:20 + r] = 1
    loo = leave_one_out(lab, [0, 4, 8], axis=0)
    assert len(loo) == 1
    d, dice, err = loo[0]
    assert d == 4 and dice > 0.97 and err < 0.5
    cal = calibrate(loo, PriorConfig(boundary_px=1.0, confidence_length=5.0))
    assert cal.length == 5.0 and cal.band_px == pytest.approx(max(err / 4, 0.25))
    # a square that jumps aside: the fill between is wrong, so the band widens and the
    # prior's weight falls quickly
    jump = np.zeros((9, 40, 40), np.uint8)
    jump[0, 2:12, 2:12] = 1
    jump[4, 28:38, 28:38] = 1
    jump[8, 2:12, 2:12] = 1
    (d, dice, err), = leave_one_out(jump, [0, 4, 8], axis=0)
    assert dice == 0.0 and err > 1.0
    cal = calibrate([(d, dice, err)], PriorConfig())
    assert cal.band_px == pytest.approx(err / 4) and cal.length == PriorConfig().confidence_length
    # fewer than three painted slices, or calibration off: the config's values
    none = calibrate([], PriorConfig(boundary_px=1.5, confidence_length=3.0))
    assert (none.band_px, none.length, none.loo) == (1.5, 3.0, ())
    off = calibrate([(d, dice, err)], PriorConfig(calibrate=False, confidence_length=3.0))
    assert (off.band_px, off.length) == (1.0, 3.0)


def test_with_context_stacks_neighbours_and_repeats_the_edges():
    slices = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    out = with_context(slices, 1)
    assert out.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(out[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    assert with_context(slices, 0) is slices


# --- in the training loop, on the bundled real volume -------------------------------------------
@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[28:52].astype(np.float32), reference.data[28:52]


def _config(method: str, iterations: int = 3, **prior) -> TrainConfig:
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=1000, seed=0)
    cfg.data.patch_size = 32
    cfg.data.batch_labelled = 2
    cfg.data.batch_unlabelled = 2
    cfg.data.unpainted = "background"
    cfg.model.base_channels = 8
    cfg.model.depth = 2
    cfg.prior.mode = "targets"
    for k, v in prior.items():
        setattr(cfg.prior, k, v)
    return cfg


PAINTED = [3, 11, 20]
VALIDATION = 7


def test_the_prior_never_reaches_painted_or_validation_slices(brain):
    image, reference = brain
    painted = reveal_slices(reference, [*PAINTED, VALIDATION], 0)
    pair = AnnotatedPair(image, painted, validation_slices=(VALIDATION,))
    trainer = Trainer(_config("supervised", calibrate=False), [pair], device=CPU)
    assert trainer.prior is not None  # built at its first use
    ds = trainer.dataset
    assert set(ds.dense_targets).isdisjoint(ds.labelled) and (0, VALIDATION) not in ds.dense_targets
    assert {s for _, s in ds.dense_targets} == set(range(image.shape[0])) - {*PAINTED, VALIDATION}
    # the validation slice is not an input of the interpolation: its prior is the fill
    # between its painted neighbours, as if it had never been painted
    alone = interpolate_labels(reveal_slices(reference, PAINTED, 0), axis=0)
    np.testing.assert_array_equal(trainer.prior.slice_distance(0), alone.slice_distance)
    target = ds.dense_targets[(0, 8)]
    expected = np.searchsorted(ds.class_values, alone.labels[8])
    known = target != IGNORE_INDEX
    # thin tissue classes: a band of 3 px (3 slices from the nearest painted one) leaves out
    # much of the slice, 1 px next to a painted slice much less
    assert 0.1 < known.mean() < (ds.dense_targets[(0, 10)] != IGNORE_INDEX).mean()
    np.testing.assert_array_equal(target[known], expected[known])
    # painted slices train on their own labels only
    np.testing.assert_array_equal(ds.target(0, 3), np.searchsorted(ds.class_values, reference[3]))


def test_fused_prediction_keeps_painted_slices_and_is_never_below_an_unsure_network(brain):
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    trainer = Trainer(_config("supervised", iterations=2), [AnnotatedPair(image, painted)], device=CPU)
    run_sync(trainer.run(previews=False))
    fused = trainer.predict_pair(0, with_entropy=True)
    assert fused.labels.shape == image.shape and fused.entropy.shape == image.shape
    for s in PAINTED:
        np.testing.assert_array_equal(fused.labels[s], reference[s])
    # after two steps the network is unsure: the mask is the prior's almost everywhere
    prior = trainer.prior_mask(0)
    np.testing.assert_array_equal(prior, interpolate_labels(painted, axis=0, method="flow", image=image).labels)
    assert (fused.labels == prior).mean() > 0.95
    trainer.prior.config.fuse = False
    raw = trainer.predict_pair(0).labels
    assert (raw == prior).mean() < (fused.labels == prior).mean()


def test_a_refresh_measures_the_agreement_once(brain, monkeypatch):
    # previews and validation Dice of one refresh share one prediction of the slices next to
    # the painted ones
    image, reference = brain
    painted = reveal_slices(reference, [*PAINTED, VALIDATION], 0)
    trainer = Trainer(_config("supervised", iterations=2), [AnnotatedPair(image, painted, validation_slices=(VALIDATION,))],
                      device=CPU)
    run_sync(trainer.run(previews=False))
    calls = []
    measure = trainer.prior.agreement
    monkeypatch.setattr(trainer.prior, "agreement", lambda *a: calls.append(a[0]) or measure(*a))
    events = trainer.refresh_events()
    assert any(type(e).__name__ == "Evaluated" for e in events) and calls == [0]
    trainer.predict_pair(0)  # the same step: measured already
    assert calls == [0]


def test_with_fewer_painted_slices_than_network_min_painted_the_mask_is_the_fill(brain):
    assert PriorConfig().network_min_painted == 2  # the default: one painted slice gets the fill alone
    image, reference = brain
    painted = reveal_slices(reference, [3, 20], 0)
    cfg = _config("supervised", iterations=3)
    cfg.prior.network_min_painted = 3
    trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=CPU)
    run_sync(trainer.run(previews=False))
    assert trainer.prior.painted_count[0] == 2
    np.testing.assert_array_equal(trainer.predict_pair(0).labels, trainer.prior_mask(0))
    # a confident network that says "background" everywhere on slice 11, far from both
    k = len(trainer.dataset.class_values)
    h, w = image.shape[1:]
    certain = torch.zeros(1, k, h, w)
    certain[:, 0] = 1.0
    fill = torch.from_numpy(trainer.prior_mask(0)[11].astype(np.int64))
    fused = trainer.prior.fuser(0, agreement=1.0)(11, 12, certain)
    assert torch.equal(fused.argmax(1)[0], fill)  # two painted slices, three needed: the fill alone
    trainer.prior.config.network_min_painted = 2  # the default lets the network take part
    fused = trainer.prior.fuser(0, agreement=1.0)(11, 12, certain)
    assert (fused.argmax(1)[0] == 0).all() and bool((fill != 0).any())


def test_a_cohort_network_takes_part_from_a_new_volume_s_first_painted_slice(brain):
    """One painted slice gets the fill alone, unless another volume of the run has
    ``network_min_painted`` painted slices: then painting the first slice of a new volume keeps
    the network's mask where the fill is far (issue 26's session: the mask fell from the
    network's 0.79 to the fill's 0.54)."""
    image, reference = brain
    one = AnnotatedPair(image, reveal_slices(reference, [11], 0), name="one slice")
    cfg = _config("supervised", iterations=2)
    alone = Trainer(cfg, [one], device=CPU)
    run_sync(alone.run(previews=False))
    assert alone.prior.painted_count == {0: 1} and alone.prior.fill_only(0)
    cohort = Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [3, 20], 0), name="two"), one],
                     device=CPU)
    run_sync(cohort.run(previews=False))
    assert cohort.prior.painted_count == {0: 2, 1: 1}
    assert not cohort.prior.fill_only(1) and not cohort.prior.fill_only(0)
    # a confident network that says "background" on the slice farthest from slice 11 where the
    # one-slice fill still holds foreground
    k = len(cohort.dataset.class_values)
    h, w = image.shape[1:]
    certain = torch.zeros(1, k, h, w)
    certain[:, 0] = 1.0
    mask = alone.prior_mask(0)
    far = max((z for z in range(mask.shape[0]) if z != 11 and mask[z].any()), key=lambda z: abs(z - 11))
    fill = torch.from_numpy(mask[far].astype(np.int64))
    assert torch.equal(alone.prior.fuser(0, agreement=1.0)(far, far + 1, certain).argmax(1)[0], fill)
    fused = cohort.prior.fuser(1, agreement=1.0)(far, far + 1, certain).argmax(1)[0]
    assert int((fused != 0).sum()) < int((fill != 0).sum())  # the network takes part
    # the agreement gate does not judge the network by a one-slice fill (an extrapolation): the
    # session's first painted slice took the cohort network's say away (mask 0.81 -> 0.36)
    assert len(cohort.prior.near_slices(1)) == 0 and len(cohort.prior.near_slices(0)) > 0
    assert cohort.predictions.agreement(1) == 1.0
    cohort.prior.config.network_min_painted = 3  # no volume has 3: the fill alone again
    assert cohort.prior.fill_only(1)


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_trains_with_the_prior(brain, method):
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    cfg = _config(method, iterations=3)
    if method == "plgcl":
        cfg.plgcl.warmup_steps = 1
    if method == "aua":
        pass  # stage 2 starts at round(0.6 * 3) = 2: both stages run
    trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=CPU)
    assert trainer.prior is not None and trainer.dataset.dense_targets
    finished = run_sync(trainer.run(previews=False))
    assert finished.reason == "budget" and trainer.step == 3
    assert all(np.isfinite(v) for h in trainer.history for v in h.values())
    pred = trainer.predict_pair(0)
    for s in PAINTED:
        np.testing.assert_array_equal(pred.labels[s], reference[s])


def test_scribbles_get_no_prior_and_a_notice(brain):
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0, shift=1)  # background painted as 1
    painted[3, :5] = 0  # a partly painted slice: a scribble
    cfg = _config("supervised")
    cfg.data.unpainted = "ignore"
    trainer = Trainer(cfg, [AnnotatedPair(image, painted, name="brain")], device=CPU)
    events = list(trainer.run(previews=False))
    assert trainer.prior is None and not trainer.dataset.dense_targets
    texts = [e.text for e in events if type(e).__name__ == "Notice"]
    assert any("no prior" in t and "scribble" in t for t in texts)


def test_context_slices_train_predict_and_reload(brain, tmp_path):
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    cfg = _config("supervised", iterations=2)
    cfg.data.context_slices = 1
    trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=CPU, out_dir=tmp_path)
    assert trainer.config.model.in_channels == 3 and trainer.dataset.images[0].shape[1] == 3
    run_sync(trainer.run(previews=False))
    direct = trainer.predict(image).labels
    model, saved = load_predictor(tmp_path / "checkpoint.pt", device=CPU)
    assert saved.data.context_slices == 1 and saved.model.in_channels == 3
    again = predict_volume(model, image, class_values=saved.data.class_values, axis=0, device=CPU,
                           context_slices=saved.data.context_slices).labels
    np.testing.assert_array_equal(direct, again)


def test_cli_trains_with_the_prior_and_context(tmp_path):
    from napari_semicl.cli import main
    from napari_semicl.io import read_labels, write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir

    image, reference = load_sample_volume()
    painted = reveal_slices(reference.data, [30, 40, 50], 0)
    labels = write_labels(tmp_path / "painted.nii.gz", painted, metadata=image.metadata)
    out = tmp_path / "run"
    code = main(["-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(labels),
                 "--iterations", "2", "--patch-size", "32", "--unpainted", "background", "--prior", "targets",
                 "--context-slices", "1", "--out", str(out)])
    assert code == 0
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["prior"]["mode"] == "targets" and config["data"]["context_slices"] == 1
    pred = read_labels(out / "prediction.nii.gz", like=image).data
    for s in (30, 40, 50):  # painted slices come back as painted
        np.testing.assert_array_equal(pred[s], reference.data[s])
    assert main(["-q", "predict", "--checkpoint", str(out / "checkpoint.pt"), "--image",
                 str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--out", str(tmp_path / "again.nii.gz")]) == 0


def test_scores_agree_with_the_labels_for_any_voxel_size(brain):
    # a regression: isotropic voxels of 2 mm were measured in pixels, then divided by 2
    # again, so thin structures scored 0 and lost the argmax on their own painted slice
    _, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    for spacing in (None, (2.0, 2.0, 2.0), (3.0, 1.0, 1.0), (1.0, 0.5, 1.0)):
        out = interpolate_labels(painted, axis=0, spacing=spacing)
        values = np.asarray(out.class_values)
        np.testing.assert_array_equal(values[out.full_scores().argmax(axis=0)], out.labels)
        for s in PAINTED:
            np.testing.assert_array_equal(out.labels[s], reference[s])


def test_bench_knows_recommended_and_dotted_overrides():
    from napari_semicl.bench.label_efficiency import apply_overrides, bench_config, check_methods
    from napari_semicl.engine import recommended_config

    cfg = bench_config("recommended", None, 3, 2, budget_steps=7)
    rec = recommended_config()
    assert (cfg.method, cfg.prior.mode, cfg.data.unpainted) == (rec.method, rec.prior.mode, "background")
    assert (cfg.budget, cfg.iterations, cfg.seed, cfg.data.axis) == ("iterations", 7, 3, 2)
    cfg = bench_config("mean_teacher", None, 0, 0, budget_steps=5)
    apply_overrides(cfg, "mean_teacher", {"prior.mode": "targets", "data.context_slices": "1", "ema_alpha": "0.9"})
    assert (cfg.prior.mode, cfg.data.context_slices, cfg.mean_teacher.ema_alpha) == ("targets", 1, 0.9)
    assert check_methods(["recommended", "interp", "supervised:prior.mode=targets"])


def test_the_prior_is_logged_once_in_a_cli_run(brain, caplog):
    # issue 27: the trainer logged its message and handed the same text on as a Notice, which
    # the CLI's progress printer logs: every CLI run printed it twice
    import logging

    from napari_semicl.cli.running import progress_printer

    image, reference = brain
    trainer = Trainer(_config("supervised", iterations=1), [AnnotatedPair(image, reveal_slices(reference, PAINTED, 0))],
                      device=CPU)
    with caplog.at_level(logging.INFO, logger="napari_semicl"):
        run_sync(trainer.run(previews=False), progress_printer())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("painted-slice prior")]
    assert len(lines) == 1, lines


def test_the_prior_keeps_the_fill_region_and_gives_whole_plane_scores(brain):
    # the prior stores the fill's region (half precision) and extends it to the plane on demand:
    # its mask is the fill's labels, its scores those of the fill to float16's precision
    image, reference = brain
    painted = reveal_slices(reference, PAINTED, 0)
    trainer = Trainer(_config("supervised", iterations=1, calibrate=False), [AnnotatedPair(image, painted)],
                      device=CPU)
    prior = trainer.prior
    fill = interpolate_labels(painted, axis=0, image=image, spacing=None, method="flow", unpainted="background")
    values = np.asarray(trainer.dataset.class_values)
    np.testing.assert_array_equal(values[prior.mask(0)], fill.labels)
    full = fill.full_scores()
    got = prior.scores(0, 5, 9)  # (slices, K, H, W)
    assert got.dtype == np.float32 and got.shape == (4, full.shape[0], *image.shape[1:])
    np.testing.assert_allclose(got, np.moveaxis(full[:, 5:9], 1, 0), atol=0.02, rtol=1e-3)


def test_leave_one_out_reuses_the_fills_flows(brain, monkeypatch):
    # issue 27: the leave-one-out fills took the prior's time at CT size; with the whole fill's
    # flow cache they measure only the two flows that reach each left-out slice, and score alike
    import napari_semicl.data.interpolation as interpolation
    from napari_semicl.data.interpolation import FlowCache
    from napari_semicl.engine.prior import leave_one_out

    image, reference = brain
    painted = reveal_slices(reference, [3, 8, 14, 20], 0)
    plain = leave_one_out(painted, [3, 8, 14, 20], axis=0, method="flow", image=image)
    cache = FlowCache()
    interpolate_labels(painted, axis=0, image=image, flow_cache=cache)
    measured = len(cache.flows)
    # both ways between painted slices, and outward past the ends (slices 0-2 and 21-23)
    assert measured == 2 * ((8 - 3 - 1) + (14 - 8 - 1) + (20 - 14 - 1)) + 3 + 3
    calls = []
    real = interpolation._flow_warper

    def counting(*args, **kwargs):
        warp = real(*args, **kwargs)
        return lambda maps, source, target: calls.append(1) or warp(maps, source, target)

    monkeypatch.setattr(interpolation, "_flow_warper", counting)
    before = len(cache.flows)
    cached = leave_one_out(painted, [3, 8, 14, 20], axis=0, method="flow", image=image, flow_cache=cache)
    assert len(cache.flows) - before == 2 * 2  # slices 8 and 14: the flows onto each from its neighbours
    assert calls  # the warps ran, on cached flows
    for (d0, q0, e0), (d1, q1, e1) in zip(plain, cached):
        assert d0 == d1 and q1 == pytest.approx(q0, abs=0.02) and e1 == pytest.approx(e0, rel=0.25, abs=0.1)


def test_a_prior_on_a_region_of_the_plane_is_the_fill_everywhere():
    # a small structure in a wide plane: the fill's region is a part of it; the prior's mask,
    # dense targets and fused probabilities cover the whole plane (background outside)
    yy, xx = np.mgrid[:90, :120]
    truth = np.stack([((yy - 40) ** 2 + (xx - 30 - 2 * s) ** 2 <= (8 + s % 3) ** 2) for s in range(12)]).astype(np.uint8)
    image = (truth * 100.0 + 10 + np.random.default_rng(0).normal(0, 3, truth.shape)).astype(np.float32)
    painted = reveal_slices(truth, [1, 5, 10], 0)
    trainer = Trainer(_config("supervised", iterations=1), [AnnotatedPair(image, painted)], device=CPU)
    prior = trainer.prior
    fill = interpolate_labels(painted, axis=0, image=image, method="flow")
    (y0, y1), (x0, x1) = prior._regions[0][0]
    assert (y1 - y0) * (x1 - x0) < 0.6 * 90 * 120 and prior._volumes[0][0].dtype == np.float16
    np.testing.assert_array_equal(prior.mask(0), fill.labels)  # class indices 0/1 = values 0/1
    targets = trainer.dataset.dense_targets
    assert targets and all(t.shape == (90, 120) and t.dtype == np.int16 for t in targets.values())
    for t in targets.values():
        assert (t[:y0] == 0).all() and (t[y1:] == 0).all() and (t[:, x1:] == 0).all()
    probs = torch.full((2, 2, 90, 120), 0.5)
    fused = prior.fuser(0, agreement=1.0)(3, 5, probs)
    assert fused.shape == probs.shape and torch.allclose(fused.sum(1), torch.ones(2, 90, 120))
    assert (fused[:, 0, :y0] > 0.5).all()  # outside the region the prior says background
