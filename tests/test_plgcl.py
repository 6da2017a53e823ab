"""PLGCL (METHODS.md §1): the entropy patch sampler and Eq. 5 by hand, the method in the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.dataset import Batch
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.errors import ConfigError
from napari_semicl.io.sample import load_sample_volume
from napari_semicl.methods import PLGCL, get_method
from napari_semicl.methods.patch_sampling import (
    average_patch_confidence,
    binary_entropy,
    extract_patches,
    flatten_patch_grid,
    nearest_entropy_positives,
    negative_mask,
    one_hot_confidence,
    patch_entropy,
    patch_majority_labels,
    pool_patches,
    select_patches,
)
from napari_semicl.methods.plgcl import PLGCLLoss
from napari_semicl.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")



def _np_entropy(x, eps=1e-6):
    x = np.clip(x, eps, 1 - eps)
    return -x * np.log(x) - (1 - x) * np.log(1 - x)


# --- Eq. 3, Eq. 2, Eq. 1 ---------------------------------------------------------------------
def test_binary_entropy_matches_numpy():
    x = np.array([0.0, 1e-3, 0.2, 0.5, 0.9, 1.0])
    got = binary_entropy(torch.tensor(x, dtype=torch.float64), 1e-6).numpy()
    np.testing.assert_allclose(got, _np_entropy(x), rtol=1e-10)
    assert got[3] == pytest.approx(np.log(2))
    assert np.all(np.isfinite(got)) and got[0] < 2e-5
    with pytest.raises(ValueError, match="eps"):
        binary_entropy(torch.zeros(1), 0.7)


def test_patch_entropy_and_confidence_match_numpy():
    rng = np.random.default_rng(0)
    b, c, k, h, w, p = 2, 2, 3, 8, 12, 4
    img = rng.normal(size=(b, c, h, w)) * 5 + 3
    logits = rng.normal(size=(b, k, h, w))
    conf = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ent = patch_entropy(torch.tensor(img), torch.tensor(conf), p).numpy()
    avg = average_patch_confidence(torch.tensor(conf), p).numpy()
    assert ent.shape == avg.shape == (b, k, h // p, w // p)
    for i in range(b):
        scaled = (img[i] - img[i].min()) / (img[i].max() - img[i].min())
        for kk in range(k):
            attended = scaled * conf[i, kk]  # (C, H, W)
            for r in range(h // p):
                for q in range(w // p):
                    win = (slice(None), slice(r * p, (r + 1) * p), slice(q * p, (q + 1) * p))
                    assert ent[i, kk, r, q] == pytest.approx(_np_entropy(attended[win]).mean(), rel=1e-9)
                    assert avg[i, kk, r, q] == pytest.approx(conf[i, kk][win[1:]].mean(), rel=1e-9)


def test_patch_classes_majority_ignoring_unlabelled():
    y = torch.full((1, 4, 6), IGNORE_INDEX)
    y[0, :2, :2] = torch.tensor([[1, 1], [2, IGNORE_INDEX]])  # patch (0,0): 1 wins 2:1
    y[0, 2:, 0:2] = torch.tensor([[2, 0], [IGNORE_INDEX, IGNORE_INDEX]])  # tie 0:2 -> 0
    y[0, 0:2, 2:4] = 2  # patch (0,1): all 2; (0,2),(1,1),(1,2) hold nothing
    y[0, 3, 5] = 1
    got = patch_majority_labels(y, 3, 2)
    expected = torch.tensor([[[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, 1]]])
    assert torch.equal(got, expected)
    conf = one_hot_confidence(y, 3)
    assert conf.shape == (1, 3, 4, 6) and float(conf[0, :, 1, 1].sum()) == 0.0
    fallback = torch.full((1, 3, 4, 6), 0.25)
    assert float(one_hot_confidence(y, 3, fallback)[0, 0, 1, 1]) == 0.25


def test_pooling_and_patch_images_follow_grid_order():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = flatten_patch_grid(pool_patches(feats, 2))
    patches = extract_patches(feats, 2)
    assert pooled.shape == (8, 3) and patches.shape == (8, 3, 2, 2)
    torch.testing.assert_close(pooled, patches.mean(dim=(-2, -1)))
    torch.testing.assert_close(pooled[5], feats[1, :, 0:2, 2:4].mean(dim=(-2, -1)))


# --- positives and negatives -------------------------------------------------------------------
def test_nearest_entropy_positives_by_hand():
    own = torch.tensor([0.10, 0.50, 0.15, 0.30, 0.90, 0.32, 0.11])
    classes = torch.tensor([0, 0, 0, 1, 1, 1, IGNORE_INDEX])
    idx, mask = nearest_entropy_positives(own, classes, 1)
    assert idx[:6, 0].tolist() == [2, 2, 0, 5, 5, 3]
    assert mask[:6].all() and not mask[6].any()  # an unclassified patch has no positive
    idx, mask = nearest_entropy_positives(own, classes, 3)
    assert idx[0, :2].tolist() == [2, 1] and mask[0].tolist() == [True, True, False]
    assert idx[4, :2].tolist() == [5, 3]
    idx, mask = nearest_entropy_positives(own, classes, 10)  # more than there are patches
    assert idx.shape == (7, 10) and int(mask.sum(1)[0]) == 2
    neg = negative_mask(classes)
    assert neg[0].tolist() == [False, False, False, True, True, True, False]
    assert not neg[6].any()


def test_select_patches_on_a_hand_built_batch():
    # two 8 x 8 crops, four 4 x 4 patches each, constant intensity per patch
    values = [[0.0, 0.5, 0.2, 1.0], [0.0, 0.45, 0.1, 1.0]]
    classes = [[0, 1, 1, 0], [IGNORE_INDEX, 1, 1, 0]]
    img = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    lab = torch.zeros(2, 8, 8, dtype=torch.long)
    for b in range(2):
        for n in range(4):
            r, q = divmod(n, 2)
            img[b, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] = values[b][n]
            lab[b, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] = classes[b][n]
    conf = one_hot_confidence(lab, 2).double()
    sel = select_patches(img, conf, lab, patch_size=4, n_positives=1)
    # patch (1, 0) holds no label: 7 valid patches
    assert sel.valid.tolist() == [True] * 4 + [False, True, True, True]
    assert sel.classes.tolist() == [0, 1, 1, 0, 1, 1, 0]
    np.testing.assert_allclose(sel.own_entropy.numpy(), _np_entropy(np.array([0, 0.5, 0.2, 1, 0.45, 0.1, 1])), rtol=1e-9)
    # Ent of a class-1 patch for class 0 is F(0) ~ 0 (its confidence for class 0 is 0)
    assert float(sel.entropy[0, 0, 0, 1]) < 1e-4
    # class 1, nearest in Ent^1 across images: F(.5)=.693 <-> F(.45)=.688, F(.2)=.500 <-> F(.1)=.325
    pos = sel.positives[:, 0].tolist()
    assert [pos[1], pos[2], pos[4], pos[5]] == [4, 5, 1, 2]
    # class 0 patches all have F(0) = F(1) ~ 0 (a tie): any other class-0 patch
    assert pos[0] in (3, 6) and pos[3] in (0, 6) and pos[6] in (0, 3)
    assert sel.centres.tolist()[0] == [1.5, 1.5] and sel.centres.tolist()[4] == [1.5, 5.5]
    assert sel.image_index.tolist() == [0, 0, 0, 0, 1, 1, 1]


# --- Eq. 5 ---------------------------------------------------------------------------------
def _unit(rng, *shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _keys_case(rng, d=4):
    f = _unit(rng, 1, d)
    pos = _unit(rng, 1, 3, d)
    keys = _unit(rng, 7, d)
    key_classes = np.array([0, 0, 1, 1, 1, 2, 2])
    return f, pos, keys, key_classes


def _loss(f, pos, keys, key_classes, *, anchor_class=0, zeta=None, lam=0.0, tau=0.2, eps=1e-6, mask=None):
    fn = PLGCLLoss(tau, eps=eps, zeta=zeta)
    mask = np.ones(pos.shape[:2], bool) if mask is None else mask
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return fn(t(f), torch.tensor([anchor_class]), t(pos), torch.tensor(mask), t(keys), torch.tensor(key_classes),
              n_classes=3, lam=lam)


def test_eq5_with_lambda_zero_is_log_sum_exp_by_hand():
    rng = np.random.default_rng(1)
    f, pos, keys, key_classes = _keys_case(rng)
    tau = 0.2
    a = f[0] @ pos[0].mean(0) / tau
    b = [f[0] @ keys[key_classes == c].mean(0) / tau for c in (1, 2)]
    for zeta in (3.0, None):
        z = [3.0, 3.0] if zeta else [3.0, 2.0]  # None: the key count of each negative class
        expected = np.log(np.exp(a) + sum(zc * np.exp(bc) for zc, bc in zip(z, b))) - a
        assert float(_loss(f, pos, keys, key_classes, zeta=zeta)) == pytest.approx(expected, rel=1e-10)
    # masked positives do not count
    mask = np.array([[True, True, False]])
    a2 = f[0] @ pos[0, :2].mean(0) / tau
    expected = np.log(np.exp(a2) + 3 * np.exp(b[0]) + 3 * np.exp(b[1])) - a2
    assert float(_loss(f, pos, keys, key_classes, zeta=3.0, mask=mask)) == pytest.approx(expected, rel=1e-10)


def test_eq5_covariance_term_matches_numpy():
    rng = np.random.default_rng(2)
    f, pos, keys, key_classes = _keys_case(rng)
    tau, lam, eps, zeta = 0.2, 4.0, 1e-3, 5.0
    d = f.shape[1]
    u = f[0]

    def term(samples):
        cov = np.cov(samples, rowvar=False, bias=True) + eps * np.eye(d)
        return u @ samples.mean(0) / tau + lam / (2 * tau**2) * u @ cov @ u

    a = u @ pos[0].mean(0) / tau
    inner = np.exp(term(pos[0])) + zeta * sum(np.exp(term(keys[key_classes == c])) for c in (1, 2))
    expected = np.log(inner) - a
    got = float(_loss(f, pos, keys, key_classes, zeta=zeta, lam=lam, eps=eps, tau=tau))
    assert got == pytest.approx(expected, rel=1e-10)


def test_eq5_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction must be one of"):
        PLGCLLoss(reduction="sum")
    with pytest.raises(ValueError, match="tau"):
        PLGCLLoss(0.0)


# --- the method ------------------------------------------------------------------------------
def _tiny_config(**plgcl):
    cfg = TrainConfig(method="plgcl")
    cfg.model.n_classes, cfg.model.base_channels, cfg.model.depth = 3, 4, 2
    cfg.data.patch_size = 32
    cfg.plgcl.patch_size, cfg.plgcl.n_positives, cfg.plgcl.queue_size, cfg.plgcl.embed_dim = 8, 3, 16, 8
    cfg.plgcl.warmup_steps, cfg.plgcl.lambda_rampup_steps = 0, 0
    for k, v in plgcl.items():
        setattr(cfg.plgcl, k, v)
    return cfg.validate()


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 8:20, 8:20] = 1
    y[:, 20:, 20:] = 2
    y[1, :, :6] = IGNORE_INDEX
    x = y[:, None].float() + 0.1 * torch.randn(2, 1, 32, 32, generator=g)
    return Batch(x, y, torch.rand(2, 1, 32, 32, generator=g))


@pytest.mark.parametrize("embedding", ["pooled", "image"])
def test_gradients_reach_the_student_and_not_the_teacher(embedding):
    cfg = _tiny_config(embedding=embedding)
    method = get_method("plgcl")(cfg, build_model(cfg.model))
    assert isinstance(method, PLGCL) and method.uses_teacher and method.uses_unlabelled
    losses = method.compute_losses(_tiny_batch(), step=0, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {"ce", "dice", "consistency", "plgcl"}
    assert torch.isfinite(losses["plgcl"]) and float(losses["plgcl"]) > 0
    losses["plgcl"].backward()
    student_grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert student_grads and any(float(g.abs().sum()) > 0 for g in student_grads)
    assert all(p.grad is not None for p in method.modules["projection"].parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.modules["teacher_projection"].parameters())
    assert not any(p is q for p in method.extra_parameters() for q in method.modules["teacher_projection"].parameters())
    review = method.review()
    n = review["embeddings"].shape[0]
    assert review["embeddings"].shape == (n, 8) and review["embeddings"].dtype == np.float32
    assert review["patch_entropy"].shape == (4, 3, 4, 4)
    assert review["embedding_labels"].shape == (n,) and review["embedding_is_labelled"].dtype == bool
    assert review["patch_centres"].shape == (n, 2) and review["embedding_is_labelled"].sum() == 32
    assert set(np.unique(review["embedding_labels"])) <= {0, 1, 2}


def test_warmup_queue_and_checkpoint_state():
    cfg = _tiny_config(warmup_steps=2, lambda_rampup_steps=4)
    method = PLGCL(cfg, build_model(cfg.model))
    g = torch.Generator().manual_seed(0)
    assert "plgcl" not in method.compute_losses(_tiny_batch(), step=1, generator=g) and method.review() == {}
    assert method.lambda_at(2) == 0.0 and method.lambda_at(4) == 2.0 and method.lambda_at(100) == 4.0
    method.compute_losses(_tiny_batch(), step=2, generator=g)
    state = method.buffers_state()
    assert state["queue"].shape == (3, 16, 8) and int(state["queue_len"].sum()) > 0
    other = PLGCL(cfg, build_model(cfg.model))
    other.load_state_dict(method.state_dict())
    torch.testing.assert_close(other.bank.keys, method.bank.keys)
    method.after_step(2)  # EMA of teacher and teacher head runs


def test_config_round_trips_and_names_bad_keys():
    cfg = TrainConfig(method="plgcl")
    assert (cfg.plgcl.beta, cfg.plgcl.gamma, cfg.plgcl.tau, cfg.plgcl.lambda_cov) == (0.25, 0.2, 0.2, 4.0)
    assert (cfg.plgcl.n_positives, cfg.plgcl.patch_size, cfg.plgcl.embed_dim, cfg.plgcl.zeta) == (20, 16, 128, None)
    cfg.plgcl.zeta, cfg.plgcl.embedding, cfg.plgcl.warmup_steps = 8.0, "image", 7
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and back.plgcl.zeta == 8.0
    data = json.loads(cfg.to_json())
    data["plgcl"]["embedding"] = "pixels"
    with pytest.raises(ConfigError, match="plgcl.embedding"):
        TrainConfig.from_dict(data)
    data["plgcl"].update(embedding="pooled", tau=0)
    with pytest.raises(ConfigError, match="plgcl.tau"):
        TrainConfig.from_dict(data)
    bad = _tiny_config()
    bad.plgcl.patch_size = 6
    bad.plgcl.embedding = "image"
    with pytest.raises(ConfigError, match="plgcl.patch_size"):
        PLGCL(bad, build_model(bad.model))


# --- the loop and the CLI on the bundled sample ------------------------------------------------
@pytest.fixture(scope="module")
def brain():
    image, reference = load_sample_volume()
    return image.data[30:50].astype(np.float32), reference.data[30:50]


def test_trains_on_a_real_slice(brain):
    image, reference = brain
    cfg = TrainConfig(method="plgcl", iterations=15, refresh_every=1000, seed=0)
    cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = 64, 4, 4
    cfg.data.unpainted = "background"
    cfg.plgcl.warmup_steps, cfg.plgcl.lambda_rampup_steps = 3, 5
    trainer = Trainer(cfg, [AnnotatedPair(image, reveal_slices(reference, [5, 14], 0))], device=CPU)
    finished = run_sync(trainer.run())
    assert finished.reason == "budget" and finished.step == 15
    hist = trainer.history
    assert all("plgcl" not in h for h in hist[:3]) and all("plgcl" in h for h in hist[3:])
    assert all(np.isfinite(h["plgcl"]) and h["plgcl"] > 0 for h in hist[3:])
    sup = [h["ce"] + h["dice"] for h in hist]
    assert np.mean(sup[-5:]) < 0.85 * np.mean(sup[:5])
    assert trainer.method.review()["embeddings"].shape[1] == cfg.plgcl.embed_dim


def test_cli_trains_with_plgcl(tmp_path):
    from napari_semicl.cli import main
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, sample_data_dir

    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0), metadata=image.metadata)
    config = tmp_path / "plgcl.json"
    config.write_text(json.dumps({"plgcl": {"warmup_steps": 2}}))
    out = tmp_path / "run"
    code = main([
        "-q", "train", "--image", str(sample_data_dir() / SAMPLE_IMAGE_FILE), "--labels", str(painted),
        "--config", str(config), "--method", "plgcl", "--iterations", "4", "--patch-size", "64",
        "--unpainted", "background", "--out", str(out),
    ])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "plgcl" and saved["plgcl"]["warmup_steps"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ce", "dice", "consistency", "plgcl"} <= set(metrics["losses"])
