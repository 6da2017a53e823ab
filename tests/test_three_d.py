"""3D networks on volume patches (model.spatial_dims = 3): shapes through every method, the
sliding window against a direct forward and its out-of-memory fallback, one prediction a volume
per refresh, the patch sampler, config and CLI, and a loss that falls on real left-atrium MRI."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from napari_semicl.cli import main
from napari_semicl.data import AnnotatedPair
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.augment import strong_augment, weak_augment
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.data.tiles import make_dataset
from napari_semicl.data.volume_patches import VolumePatchDataset
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.engine.inference import predict_slices, predict_volume_patches
from napari_semicl.errors import ConfigError, DataError
from napari_semicl.methods import available_methods
from napari_semicl.methods.stratified_sampling import antithetic_partners, grid_groups, sample_class_pixels
from napari_semicl.models import UNet3D, build_model
from napari_semicl.models.heads import AleatoricHead, ProjectionHead

# one thread: 3D convolutions on tiny patches gain nothing from two, and a busy machine makes them spin
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_volume(seed: int = 0, shape=(24, 40, 40)):
    """A noisy ellipsoid; slices 8, 12 and 16 painted (1 inside, 2 outside)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ball = ((zz - 12) / 9.0) ** 2 + ((yy - 20) / 12.0) ** 2 + ((xx - 18) / 11.0) ** 2 < 1
    image = (ball + rng.normal(0, 0.3, shape)).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for s in (8, 12, 16):
        labels[s] = np.where(ball[s], 1, 2)
    return image, labels


def tiny_config(method: str = "supervised", **data) -> TrainConfig:
    cfg = TrainConfig(method=method, iterations=2, refresh_every=10**6)
    cfg.model.spatial_dims, cfg.model.base_channels = 3, 4
    cfg.data.patch_size, cfg.data.patch_depth = 32, 32
    cfg.data.batch_labelled, cfg.data.batch_unlabelled = 1, 1
    for key, value in data.items():
        setattr(cfg.data, key, value)
    for name in ("plgcl", "agcl", "arco"):
        section = getattr(cfg, name)
        section.warmup_steps = 0
        if hasattr(section, "patch_size"):
            section.patch_size = 8
    cfg.aua.stage2_at = 0.5  # stage 2 from step 1: both stages run
    return cfg


# --- the network and heads --------------------------------------------------------------------------
def test_unet3d_logits_and_features_keep_the_patch_shape():
    model = build_model(tiny_config().model)
    assert isinstance(model, UNet3D) and model.spatial_dims == 3 and model.multiple == 16
    logits, feat = model(torch.rand(2, 1, 32, 48, 32), return_features=True)
    assert logits.shape == (2, 2, 32, 48, 32) and feat.shape == (2, model.feature_channels, 32, 48, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.rand(1, 1, 24, 32, 32))


def test_heads_take_3d_feature_maps():
    feat = torch.rand(2, 4, 4, 6, 8)
    z = ProjectionHead(4, 8)(feat)
    assert z.shape == (2, 8, 4, 6, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 6, 8))
    log_d, factor = AleatoricHead(4, 3, rank=2)(feat)
    assert log_d.shape == (2, 3, 4, 6, 8) and factor.shape == (2, 3, 2, 4, 6, 8)


def test_augmentation_keeps_volume_patches_aligned():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 16 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16, 16)
    y = x[:, 0].long()
    xw, yw = weak_augment(x, y, generator=g, max_rotation_deg=0)
    assert xw.shape == x.shape and torch.equal(xw[:, 0].long(), yw)  # flips/rot90 move both alike
    assert strong_augment(xw, generator=g).shape == x.shape


# --- data ---------------------------------------------------------------------------------------------
def test_labelled_patches_are_centred_on_painted_slices_and_ignore_the_rest():
    image, labels = tiny_volume()
    cfg = tiny_config()
    ds = make_dataset([AnnotatedPair(image, labels)], cfg.data, spatial_dims=3)
    assert isinstance(ds, VolumePatchDataset)
    x, y = ds.sample_labelled(6, np.random.default_rng(0))
    assert x.shape == (6, 1, 32, 32, 32) and y.shape == (6, 32, 32, 32)
    for patch in y:
        painted = np.flatnonzero((patch != IGNORE_INDEX).any(axis=(1, 2)))
        assert 1 <= len(painted) <= 3  # whole painted slices, nothing in between
    u = ds.sample_unlabelled(2, np.random.default_rng(1))
    assert u.shape == (2, 1, 32, 32, 32)
    with pytest.raises(DataError, match="2D"):
        make_dataset([AnnotatedPair(image[0], labels[12])], cfg.data, spatial_dims=3)


def test_dense_targets_join_the_label_volume():
    image, labels = tiny_volume()
    ds = make_dataset([AnnotatedPair(image, labels)], tiny_config().data, spatial_dims=3)
    ds.set_dense_targets({(0, 10): np.ones((40, 40), np.int64)})
    _, y = ds.sample_labelled(4, np.random.default_rng(0), dense_share=1.0)
    assert (y == 1).any()


def test_config_spatial_dims_3_round_trips_and_refuses_what_does_not_fit():
    cfg = tiny_config()
    assert TrainConfig.from_json(cfg.to_json()).model.spatial_dims == 3
    for change, fragment in [
        (lambda c: setattr(c.data, "context_slices", 1), "context_slices"),
        (lambda c: setattr(c.model, "depth", 3), "depth must be 4"),
        (lambda c: setattr(c.data, "patch_depth", 16), ">= 32"),
        (lambda c: setattr(c.model, "spatial_dims", 4), "spatial_dims"),
    ]:
        bad = tiny_config()
        change(bad)
        with pytest.raises(ConfigError, match=fragment):
            bad.validate()
    bad = tiny_config("plgcl")
    bad.plgcl.embedding = "image"
    image, labels = tiny_volume()
    with pytest.raises(ConfigError, match="pooled"):
        Trainer(bad, [AnnotatedPair(image, labels)], device=torch.device("cpu"))


# --- every method --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_on_3d_patches(method):
    image, labels = tiny_volume()
    trainer = Trainer(tiny_config(method), [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    for step in range(2):
        losses = trainer.train_step(step / 2)
        assert all(np.isfinite(v) for v in losses.values()), losses
    if method in ("plgcl", "agcl", "arco"):
        assert set(losses) > {"ce", "dice", "consistency"}  # the contrastive terms ran
    pred = trainer.predict(image)
    assert pred.labels.shape == image.shape and set(np.unique(pred.labels)) <= {1, 2}


def test_arco_grid_is_a_cube_and_antithetic_partners_reflect_in_3d():
    mask = np.ones((1, 8, 8, 8), bool)
    groups = grid_groups(mask, 2, spatial_dims=3)
    assert len(groups.sizes) == 8 and (groups.sizes == 64).all() and groups.centres.shape == (8, 3)
    partner = antithetic_partners(groups)
    c = groups.centres[groups.group]
    np.testing.assert_allclose(groups.coords[partner][:, 1:], 2 * c - groups.coords[:, 1:])
    coords, classes, _ = sample_class_pixels(torch.zeros(2, 8, 8, 8, dtype=torch.long), 6, np.random.default_rng(0),
                                             grid=2, n_classes=1)
    assert coords.shape == (6, 4) and (classes == 0).all()


# --- inference ------------------------------------------------------------------------------------------
class _Local3D(nn.Module):
    """A voxel-wise 'network' (1x1x1 convolution): every window sees the same value at a voxel."""

    spatial_dims, multiple = 3, 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_matches_a_direct_forward():
    torch.manual_seed(0)
    volume = np.random.default_rng(0).random((40, 1, 48, 56)).astype(np.float32)  # (S, C, H, W)
    direct_input = torch.from_numpy(volume.transpose(1, 0, 2, 3))[None]
    net = UNet3D(1, 2, base_channels=4).eval()
    with torch.no_grad():  # one window over the volume, padded as MONAI does (evenly on both sides)
        padded = nn.functional.pad(direct_input, (4, 4, 0, 0, 4, 4))  # (40, 48, 56) -> (48, 48, 64)
        direct = net(padded)[0, :, 4:44, :, 4:60].argmax(0).numpy()
    labels, ent = predict_volume_patches(net, volume, device=torch.device("cpu"), max_window=64, with_entropy=True)
    assert labels.shape == (40, 48, 56) and ent.shape == (40, 48, 56)
    assert np.array_equal(labels, direct)
    # many overlapping 16-voxel windows, Gaussian-blended: exact for a voxel-wise network
    local = _Local3D().eval()
    with torch.no_grad():
        direct = local(direct_input)[0].softmax(0)
    labels, ent = predict_volume_patches(local, volume, device=torch.device("cpu"), max_window=16, with_entropy=True)
    assert np.array_equal(labels, direct.argmax(0).numpy())
    # predict_slices hands a 3D network the whole volume
    assert np.array_equal(predict_slices(local, volume, device=torch.device("cpu"), max_window=16)[0], labels)


class _OOMAbove3D(nn.Module):
    """Wraps a 3D network; raises the CUDA OOM error for windows above ``max_voxels`` (D*H*W)."""

    spatial_dims, multiple = 3, 16

    def __init__(self, net: nn.Module, max_voxels: int) -> None:
        super().__init__()
        self.net, self.max_voxels = net, max_voxels
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        if x.shape[2] * x.shape[3] * x.shape[4] > self.max_voxels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_3d_prediction_out_of_memory_falls_back_to_smaller_windows_then_says_so():
    torch.manual_seed(0)
    volume = np.random.default_rng(0).random((40, 1, 48, 56)).astype(np.float32)  # (S, C, H, W)
    local = _Local3D().eval()
    reference, _ = predict_volume_patches(local, volume, device=torch.device("cpu"), max_window=64)
    # a 48x48x64 window does not fit, 32^3 does: one halving, logged as a note
    wrapped = _OOMAbove3D(local, max_voxels=32**3).train()
    notes: list[str] = []
    labels, ent = predict_volume_patches(wrapped, volume, device=torch.device("cpu"), max_window=64,
                                         with_entropy=True, notes=notes)
    assert notes == ["out of memory on cpu: predicting in 32-voxel 3D windows"]
    assert wrapped.seen[0] == (48, 48, 64) and set(wrapped.seen[1:]) == {(32, 32, 32)}
    assert np.array_equal(labels, reference) and ent.shape == labels.shape  # a voxel-wise network: exact
    assert wrapped.training  # the mode it came in with
    # nothing fits: each halving said, then a clear error at the network's multiple
    notes = []
    with pytest.raises(DataError, match="out of memory on cpu even in 16-voxel 3D windows"):
        predict_volume_patches(_OOMAbove3D(local, max_voxels=0), volume, device=torch.device("cpu"), max_window=64,
                               notes=notes)
    assert notes == ["out of memory on cpu: predicting in 32-voxel 3D windows",
                     "out of memory on cpu: predicting in 16-voxel 3D windows"]
    # any other error is the network's own: raised as it is, at the first try

    class Broken(_OOMAbove3D):
        def forward(self, x):
            self.seen.append(tuple(x.shape[2:]))
            raise RuntimeError("expected 5D input")

    broken, notes = Broken(local, max_voxels=0), []
    with pytest.raises(RuntimeError, match="expected 5D input"):
        predict_volume_patches(broken, volume, device=torch.device("cpu"), max_window=64, notes=notes)
    assert len(broken.seen) == 1 and notes == []


# --- the CLI: train, config.json, predict with the 3D checkpoint ------------------------------------
def test_cli_trains_and_predicts_in_3d_keeping_geometry(tmp_path):
    from napari_semicl.io import write_labels
    from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir

    image, reference = load_sample_volume()
    painted = write_labels(tmp_path / "painted.nii.gz", reveal_slices(reference.data, [30, 50], 0),
                           metadata=image.metadata)
    src = sample_data_dir() / SAMPLE_IMAGE_FILE
    run = tmp_path / "run"
    assert main(["-q", "train", "--image", str(src), "--labels", str(painted), "--spatial-dims", "3",
                 "--patch-size", "32", "--patch-depth", "32", "--iterations", "2", "--unpainted", "background",
                 "--set", "model.base_channels=4", "--set", "data.batch_labelled=1", "--set", "data.batch_unlabelled=1",
                 "--method", "mean_teacher", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["spatial_dims"] == 3 and config["data"]["patch_depth"] == 32
    mask = tmp_path / "mask.nii.gz"
    assert main(["-q", "predict", "--checkpoint", str(run / "checkpoint.pt"), "--image", str(src),
                 "--out", str(mask)]) == 0
    out, ref = nib.load(mask), nib.load(src)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(run / "prediction.nii.gz").dataobj))
    from napari_semicl.engine.apply import Predictor  # the Apply-model dock's engine call

    predictor = Predictor.from_checkpoint(run / "checkpoint.pt")
    assert predictor.model.spatial_dims == 3
    with pytest.raises(DataError, match="3D"):
        predictor.check_image((94, 77))


# --- real data -----------------------------------------------------------------------------------------
@pytest.mark.shared_data("la/train")
def test_loss_falls_on_real_left_atrium_patches(shared_data):
    from napari_semicl.bench.common import find_cases, thinnest_axis
    from napari_semicl.data.reveal import choose_reveal_slices

    case = find_cases(shared_data / "la" / "train", limit=1)[0]
    ref = case.reference.data
    axis = thinnest_axis(ref.shape)
    # a sub-volume around the atrium keeps the test small
    centre = [int(np.mean(ix)) for ix in np.nonzero(ref)]
    box = tuple(slice(max(c - 24, 0), max(c - 24, 0) + 48) for c in centre)
    image, ref = case.image.data[box], ref[box]
    painted = reveal_slices(ref, choose_reveal_slices(ref, 5, axis), axis)
    cfg = tiny_config(unpainted="background", batch_labelled=2, axis=axis)
    cfg.optim.lr = 1e-2
    trainer = Trainer(cfg, [AnnotatedPair(image, painted)], device=torch.device("cpu"))
    totals = [trainer.train_step(i / 20)["total"] for i in range(20)]
    assert np.mean(totals[-5:]) < 0.8 * np.mean(totals[:5]), totals


def test_painted_slice_prior_gives_3d_patches_dense_targets_and_fuses_the_volume():
    image, labels = tiny_volume()
    cfg = tiny_config(unpainted="background")
    cfg.prior.mode = "targets"
    trainer = Trainer(cfg, [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    assert trainer.prior is not None and len(trainer.dataset.dense_targets) > 0
    trainer.train_step(0.5)  # half-way: a share of the patches comes from the dense label volume
    pred = trainer.predict_pair(0).labels
    assert pred.shape == image.shape
    for s in (8, 12, 16):  # the fused mask keeps the painted slices
        np.testing.assert_array_equal(pred[s], labels[s])


def _count_volume_predictions(monkeypatch) -> list:
    """The (S, C, H, W) shapes of every whole-volume 3D prediction from now on, whoever asks."""
    import napari_semicl.engine.inference as inference_module
    import napari_semicl.engine.fusion as fusion_module

    calls: list[tuple] = []
    for module in (inference_module, fusion_module):
        def counted(model, slices, *args, _predict=module.predict_volume_probabilities, **kwargs):
            calls.append(slices.shape)
            return _predict(model, slices, *args, **kwargs)

        monkeypatch.setattr(module, "predict_volume_probabilities", counted)
    return calls


def test_a_3d_refresh_predicts_each_volume_once_and_fuses_as_unshared_predictions_did(monkeypatch):
    from napari_semicl.data.annotation import decode_classes
    from napari_semicl.engine.metrics import dice_per_class

    image, labels = tiny_volume()
    for s in (4, 20):  # five painted slices, one held out: four feed the prior, the network takes part
        labels[s] = labels[12]
    other, other_labels = tiny_volume(seed=1)
    cfg = tiny_config(unpainted="background")
    cfg.prior.mode, cfg.prior.interpolation = "targets", "sdf"
    pairs = [AnnotatedPair(image, labels, validation_slices=(12,)), AnnotatedPair(other, other_labels)]
    trainer = Trainer(cfg, pairs, device=torch.device("cpu"))
    run_sync(trainer.run(previews=False))
    assert trainer.prior.config.fuse and [trainer.prior.painted_count[p] for p in (0, 1)] == [4, 3]

    calls = _count_volume_predictions(monkeypatch)
    events = trainer.refresh_events()
    assert calls == [image.shape[:1] + (1,) + image.shape[1:]] * 2  # one a volume: agreement, preview, validation
    assert trainer.predictions.volume_probs == {}  # released with the refresh
    monkeypatch.undo()

    # the same masks, entropy and Dice as the three predictions of each volume before
    model, values = trainer.method.inference_model(), trainer.dataset.class_values
    previews = {(e.kind, e.pair_index): e.array for e in events if type(e).__name__ == "Preview"}
    fused = {}
    for p in (0, 1):
        images, near = trainer.dataset.images[p], trainer.prior.near_slices(p)
        agreement = trainer.prior.agreement(p, predict_slices(model, images, device=torch.device("cpu"))[0][near], near)
        assert agreement == trainer.predictions.agreements[(trainer.step, p)]
        fused[p], ent = predict_slices(model, images, device=torch.device("cpu"), with_entropy=True,
                                       fuse=trainer.prior.fuser(p, agreement))
        np.testing.assert_array_equal(previews[("prediction", p)], decode_classes(fused[p], values))
        np.testing.assert_array_equal(previews[("entropy", p)], ent)
    (evaluated,) = [e for e in events if type(e).__name__ == "Evaluated"]
    expected = dice_per_class(decode_classes(fused[0][12], values).ravel(), trainer.dataset.targets[0][12].ravel(),
                              values)
    assert evaluated.metrics["dice_per_class"] == expected and evaluated.metrics["slices"] == 1
    # the user's mask at the same step: the agreement is known, one prediction for the mask
    calls = _count_volume_predictions(monkeypatch)
    np.testing.assert_array_equal(trainer.predict_pair(1).labels, decode_classes(fused[1], values))
    assert len(calls) == 1 and trainer.predictions.volume_probs == {}


def test_slice_reviews_of_a_3d_run_are_notices_that_say_why():
    image, labels = tiny_volume()
    trainer = Trainer(tiny_config("mean_teacher"), [AnnotatedPair(image, labels)], device=torch.device("cpu"))
    trainer.request_review(0, 12)
    assert "3D network" in trainer._apply_review().text
    trainer.request_analysis("embeddings")
    trainer.request_analysis("disagreement", pair_index=0)
    events = trainer._apply_analyses()
    assert "3D network" in events[0].text
    assert events[1].arrays["disagreement"].shape == (image.shape[0],)  # one value a slice


def test_complete_labels_make_every_slice_of_a_reference_labelled():
    image, _ = tiny_volume()
    reference = np.zeros(image.shape, np.uint8)
    reference[6:18, 10:30, 10:30] = 1  # foreground on slices 6-17 only
    cfg = tiny_config(unpainted="background")
    default = make_dataset([AnnotatedPair(image, reference)], cfg.data, spatial_dims=3)
    assert len(default.labelled) == 12
    complete = make_dataset([AnnotatedPair(image, reference, complete=True)], tiny_config(unpainted="background").data,
                            spatial_dims=3)
    assert len(complete.labelled) == 24 and not complete.unlabelled
    _, y = complete.sample_labelled(2, np.random.default_rng(0))
    assert (y[:, 4:10] == 0).all()  # volume slices 0-5 (the patch pads 4 slices each side): background
