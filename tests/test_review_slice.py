"""Method.review_slice (PLGCL patch entropy, ARCO sampled pixels) and Trainer.request_review."""

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import Reviewed, ReviewSlice, StepDone, TrainConfig, Trainer, run_sync
from napari_semicl.methods import get_method
from napari_semicl.methods.patch_sampling import patch_entropy
from napari_semicl.models import UNet2D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")



def _modes(*modules):
    return [m.training for module in modules for m in module.modules()]


def _plgcl(patch=8):
    cfg = TrainConfig(method="plgcl")
    cfg.model.n_classes, cfg.model.base_channels, cfg.model.depth = 3, 4, 2
    cfg.data.patch_size = 32
    cfg.plgcl.patch_size, cfg.plgcl.n_positives, cfg.plgcl.queue_size, cfg.plgcl.embed_dim = patch, 3, 16, 8
    cfg.validate()
    torch.manual_seed(0)
    student = UNet2D(1, 3, base_channels=4, depth=2)
    return get_method("plgcl")(cfg, student)


def _arco(sampler="sag", confidence=0.4):
    cfg = TrainConfig(method="arco")
    cfg.model.n_classes = 3
    cfg.arco.sampler, cfg.arco.anchors_per_class, cfg.arco.confidence = sampler, 8, confidence
    cfg.arco.embedding_dim = 8
    cfg.validate()
    torch.manual_seed(0)
    student = UNet2D(1, 3, base_channels=4, depth=2)
    return get_method("arco")(cfg, student)


def _slice(h=32, w=32):
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(1, 1, h, w)
    x[..., 8:20, 8:20] = 1.0
    x[..., 20:, 20:] = 2.0
    return x + 0.1 * torch.randn(1, 1, h, w, generator=g)


def test_plgcl_patch_entropy_is_eq2_per_patch_constant_inside_patches():
    method = _plgcl()
    x = _slice()
    modes = _modes(method.teacher, method.student, method.modules)
    out = method.review_slice(x)
    assert _modes(method.teacher, method.student, method.modules) == modes  # modes restored
    ent = out["patch_entropy"]
    assert ent.shape == (3, 32, 32) and ent.dtype == np.float32
    # constant inside each 8 x 8 patch, and equal to Eq. 2 of the teacher's softmax (eval mode)
    blocks = ent.reshape(3, 4, 8, 4, 8)
    assert np.allclose(blocks, blocks[:, :, :1, :, :1])
    method.teacher.eval()
    with torch.no_grad():
        conf = method.teacher(x).softmax(dim=1)
    expected = patch_entropy(x, conf, 8).numpy()[0]  # (3, 4, 4)
    np.testing.assert_allclose(blocks[:, :, 0, :, 0], expected, rtol=1e-5, atol=1e-6)
    assert 0 <= ent.min() and ent.max() <= np.log(2) + 1e-6
    # one embedding per patch with a class (all 16 here), classes from the teacher's argmax
    assert out["embeddings"].shape == (16, 8)
    assert out["embedding_labels"].shape == (16,) and set(out["embedding_labels"]) <= {0, 1, 2}
    assert out["patch_centres"].shape == (16, 2)


def test_plgcl_review_of_a_padded_slice_keeps_to_the_slice():
    method = _plgcl(patch=8)
    x = torch.nn.functional.pad(_slice(20, 28), (0, 4, 0, 12))  # 20 x 28 padded to 32 x 32
    out = method.review_slice(x, valid_shape=(20, 28))
    assert out["patch_entropy"].shape == (3, 20, 28)
    assert out["embeddings"].shape[0] == 3 * 4  # patches touching the 20 x 28 slice
    assert (out["patch_centres"][:, 0] < 24).all() and (out["patch_centres"][:, 1] < 32).all()


@pytest.mark.parametrize("sampler", ["sag", "ns"])
def test_arco_review_samples_confident_teacher_classes_inside_the_slice(sampler):
    method = _arco(sampler)
    x = torch.nn.functional.pad(_slice(28, 30), (0, 2, 0, 4))
    modes = _modes(method.teacher, method.student, method.modules)
    out = method.review_slice(x, valid_shape=(28, 30))
    assert _modes(method.teacher, method.student, method.modules) == modes
    pix, cls = out["sampled_pixels"], out["sampled_classes"]
    assert pix.ndim == 2 and pix.shape[1] == 2 and len(pix) == len(cls) > 0
    assert pix.dtype.kind == "i" and cls.dtype.kind == "i"
    assert (pix >= 0).all() and (pix[:, 0] < 28).all() and (pix[:, 1] < 30).all()
    method.teacher.eval()
    with torch.no_grad():
        probs = method.teacher(x).softmax(dim=1)[0]
    conf, arg = probs.max(dim=0)
    np.testing.assert_array_equal(arg.numpy()[pix[:, 0], pix[:, 1]], cls)
    assert (conf.numpy()[pix[:, 0], pix[:, 1]] >= 0.4).all()
    counts = np.bincount(cls, minlength=3)
    assert counts.max() <= 8


def test_arco_review_is_empty_when_nothing_is_confident():
    out = _arco(confidence=1.0).review_slice(_slice())
    assert out["sampled_pixels"].shape == (0, 2) and out["sampled_classes"].shape == (0,)


# --- the trainer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 28, 36), np.uint8)
    labels[:, 6:18, 8:20] = 1
    labels[:, 16:, 22:] = 2
    image = labels.astype(np.float32) + 0.2 * rng.standard_normal(labels.shape).astype(np.float32)
    return image, reveal_slices(labels, [1], 0)


def _trainer(method, volume, iterations=3):
    image, painted = volume
    cfg = TrainConfig(method=method, iterations=iterations, refresh_every=1000, seed=0)
    cfg.model.base_channels, cfg.model.depth = 4, 2
    cfg.data.patch_size = 16
    cfg.data.batch_labelled = cfg.data.batch_unlabelled = 2
    cfg.data.unpainted = "background"
    cfg.plgcl.patch_size, cfg.plgcl.embed_dim, cfg.plgcl.queue_size = 8, 8, 16
    cfg.arco.embedding_dim, cfg.arco.anchors_per_class, cfg.arco.confidence = 8, 8, 0.0
    return Trainer(cfg, [AnnotatedPair(image, painted)], device=CPU)


@pytest.mark.parametrize("method", ["plgcl", "arco", "supervised"])
def test_request_review_yields_one_reviewed_event_before_the_next_step(method, volume):
    trainer = _trainer(method, volume)
    trainer.request_review(0, 1)
    trainer.request_review(0, 2)  # the latest request wins
    events = []
    run_sync(trainer.run(), events.append)
    reviewed = [e for e in events if isinstance(e, Reviewed)]
    if method == "supervised":
        assert reviewed == []
        return
    assert len(reviewed) == 1
    r = reviewed[0]
    assert (r.step, r.pair_index, r.slice_index) == (0, 0, 2)
    first_step = next(i for i, e in enumerate(events) if isinstance(e, StepDone))
    assert events.index(r) < first_step
    if method == "plgcl":
        assert r.arrays["patch_entropy"].shape == (3, 28, 36)
    else:
        pix = r.arrays["sampled_pixels"]
        assert len(pix) > 0 and (pix[:, 0] < 28).all() and (pix[:, 1] < 36).all()
    assert trainer.model.training and trainer.method.teacher.training  # modes restored


def test_review_requested_through_send(volume):
    trainer = _trainer("arco", volume, iterations=3)
    gen = trainer.run()
    events = [next(gen)]  # Started
    sent = False
    try:
        while True:
            e = events[-1]
            if isinstance(e, StepDone) and e.step == 1 and not sent:
                sent = True
                events.append(gen.send(ReviewSlice(0, 3)))
            else:
                events.append(next(gen))
    except StopIteration:
        pass
    reviewed = [e for e in events if isinstance(e, Reviewed)]
    assert [(r.step, r.slice_index) for r in reviewed] == [(1, 3)]
    # out-of-range requests are ignored
    trainer.request_review(5, 0)
    assert trainer._apply_review() is None
