"""``predict.adapt_batch_norm`` (AdaBN): the batch-norm statistics re-estimated on the image
being predicted, on a copy of the network; checked by hand on networks with one BatchNorm."""

import copy
import logging

import numpy as np
import pytest
import torch

from napari_semicl.engine.config import PredictConfig, TrainConfig, set_option
from napari_semicl.engine.inference import adapt_batch_norm, predict_slices, predict_volume_probabilities
from napari_semicl.engine.precision import MODEL_ATTRIBUTE, precision_of
from napari_semicl.errors import ConfigError

CPU = torch.device("cpu")


def one_bn_net(in_channels: int = 1, dims: int = 2) -> torch.nn.Module:
    """conv 1x1 (fixed weights) -> BatchNorm -> ReLU -> conv 1x1 to 2 classes. Its trained
    statistics (mean 0, variance 1, momentum updates from a few batches of standard noise)
    describe an image with values near 0."""
    conv, bn = (torch.nn.Conv2d, torch.nn.BatchNorm2d) if dims == 2 else (torch.nn.Conv3d, torch.nn.BatchNorm3d)
    torch.manual_seed(0)
    net = torch.nn.Sequential(conv(in_channels, 3, 1), bn(3), torch.nn.ReLU(), conv(3, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0, 0.5]).reshape(3, 1, *([1] * dims)).repeat(1, in_channels,
                                                                                              *([1] * dims)))
        net[0].bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
        net[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        net[1].bias.copy_(torch.tensor([0.0, -0.5, 0.3]))
        net[3].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]]).reshape(2, 3, *([1] * dims)))
        net[3].bias.zero_()
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(4, in_channels, *([32] * dims)))
    net.multiple = 16
    net.spatial_dims = dims
    return net.eval()


def by_hand(net: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance of the first conv's output on ``x``: what the
    BatchNorm receives."""
    with torch.no_grad():
        a = net[0](x).double()
    dims = [d for d in range(a.dim()) if d != 1]
    return a.mean(dim=dims).numpy(), a.var(dim=dims, unbiased=False).numpy()


def stats(net):
    return net[1].running_mean.clone(), net[1].running_var.clone(), net[1].num_batches_tracked.clone()


def test_running_statistics_become_the_images_and_the_original_is_unchanged():
    net = one_bn_net()
    before = stats(net)
    state = copy.deepcopy(net.state_dict())
    windows = [torch.rand(2, 1, 32, 32) * 3 + 5, torch.rand(3, 1, 32, 32) * 2 + 4]  # unequal batches
    adapted = adapt_batch_norm(net, windows)
    mean, var = by_hand(net, torch.cat(windows))
    np.testing.assert_allclose(adapted[1].running_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(adapted[1].running_var.numpy(), var, rtol=1e-5)
    assert mean[0] > 4  # far from the trained statistics (near 0): the test can fail
    assert adapted is not net and not adapted.training and not adapted[1].training
    for a, b in zip(before, stats(net)):
        assert torch.equal(a, b)  # the given network's statistics unchanged
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not net.training
    # the affine weights and the convolutions are the network's own
    assert torch.equal(adapted[0].weight, net[0].weight) and torch.equal(adapted[1].weight, net[1].weight)


def test_predict_slices_adapts_on_the_image_it_predicts():
    """One 32 x 32 slice is one window: adapting inside predict_slices equals adapting on the
    slices by hand, then predicting without; and it changes the labels of a shifted image."""
    net = one_bn_net()
    before = stats(net)
    rng = np.random.default_rng(0)
    slices = (rng.random((3, 1, 32, 32)) * 2 + 3).astype(np.float32)  # shifted: values 3-5, trained near 0
    plain, _ = predict_slices(net, slices, device=CPU)
    adapted, _ = predict_slices(net, slices, device=CPU, adapt_batch_norm=True)
    by_hand_net = adapt_batch_norm(net, [torch.from_numpy(slices)])
    expected, _ = predict_slices(by_hand_net, slices, device=CPU)
    assert np.array_equal(adapted, expected)
    assert not np.array_equal(adapted, plain)
    for a, b in zip(before, stats(net)):
        assert torch.equal(a, b)
    # unfolded as well (the benchmarks' baseline)
    unfolded, _ = predict_slices(net, slices, device=CPU, adapt_batch_norm=True, fold=False)
    assert np.array_equal(unfolded, expected)


def test_batches_of_slices_all_count():
    """Slices predicted 2 at a time (batch_size=2, 5 slices: 3 batches) adapt on all 5."""
    net = one_bn_net()
    rng = np.random.default_rng(1)
    slices = (rng.random((5, 1, 32, 32)) * np.arange(1, 6)[:, None, None, None]).astype(np.float32)
    got, _ = predict_slices(net, slices, device=CPU, batch_size=2, adapt_batch_norm=True)
    expected, _ = predict_slices(adapt_batch_norm(net, [torch.from_numpy(slices)]), slices, device=CPU,
                                 batch_size=2)
    assert np.array_equal(got, expected)
    first_two, _ = predict_slices(adapt_batch_norm(net, [torch.from_numpy(slices[:2])]), slices, device=CPU)
    assert not np.array_equal(got, first_two)


def test_bf16_channels_last_network_adapts_close_to_float32():
    """A network recorded as bf16 (autocast) in channels_last: the same statistics within bf16 rounding."""
    net = one_bn_net().to(memory_format=torch.channels_last)
    setattr(net, MODEL_ATTRIBUTE, "bf16")
    x = torch.rand(4, 1, 32, 32) * 3 + 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = adapt_batch_norm(net, [x.to(memory_format=torch.channels_last)])
    mean, var = by_hand(net, x)
    np.testing.assert_allclose(adapted[1].running_mean.numpy(), mean, rtol=2e-2)
    np.testing.assert_allclose(adapted[1].running_var.numpy(), var, rtol=5e-2)
    assert adapted[1].running_mean.dtype == torch.float32
    assert adapted[0].weight.is_contiguous(memory_format=torch.channels_last)
    slices = x.numpy()
    labels, _ = predict_slices(net, slices, device=CPU, adapt_batch_norm=True)
    reference, _ = predict_slices(adapt_batch_norm(one_bn_net(), [x]), slices, device=CPU)  # fp32
    assert (labels == reference).mean() > 0.99


def test_a_network_without_batch_norm_predicts_as_it_is(caplog):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.InstanceNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1)).eval()
    slices = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32) + 3
    with caplog.at_level(logging.INFO, logger="napari_semicl.engine.inference"):
        assert adapt_batch_norm(net, [torch.from_numpy(slices)]) is net
        got, _ = predict_slices(net, slices, device=CPU, adapt_batch_norm=True)
    assert "no batch normalisation" in caplog.text
    plain, _ = predict_slices(net, slices, device=CPU)
    assert np.array_equal(got, plain)


def test_volume_network_adapts_on_its_3d_windows():
    """A 3D network with one BatchNorm3d: the volume (one 16^3 window) adapts it, as by hand."""
    net = one_bn_net(dims=3)
    before = stats(net)
    vol = (np.random.default_rng(2).random((16, 1, 16, 16)) * 2 + 3).astype(np.float32)  # (S, C, H, W)
    probs = predict_volume_probabilities(net, vol, device=CPU, adapt_batch_norm=True)
    plain = predict_volume_probabilities(net, vol, device=CPU)
    x = torch.from_numpy(vol.transpose(1, 0, 2, 3).copy())[None]
    by_hand_net = adapt_batch_norm(net, [x])
    mean, _ = by_hand(net, x)
    np.testing.assert_allclose(by_hand_net[1].running_mean.numpy(), mean, rtol=1e-5)
    expected = predict_volume_probabilities(by_hand_net, vol, device=CPU)
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, plain, atol=1e-3)
    for a, b in zip(before, stats(net)):
        assert torch.equal(a, b)


def test_slices_of_a_volume_with_a_2d_network():
    """A 2D network predicting a volume's slices adapts on all its slices (the image, not one slice)."""
    from napari_semicl.engine.inference import predict_volume

    net = one_bn_net()
    vol = (np.random.default_rng(3).random((4, 32, 32)) * 2 + 3).astype(np.float32)
    got = predict_volume(net, vol, class_values=[0, 1], normalise="none", device=CPU, adapt_batch_norm=True)
    slices = vol[:, None]
    expected, _ = predict_slices(adapt_batch_norm(net, [torch.from_numpy(slices)]), slices, device=CPU)
    assert np.array_equal(got.labels, expected)


# --- the setting ---------------------------------------------------------------------------------
def test_setting_defaults_off_validates_and_parses():
    assert TrainConfig().predict.adapt_batch_norm is False
    cfg = TrainConfig()
    set_option(cfg, "predict.adapt_batch_norm", "true")
    assert cfg.predict.adapt_batch_norm is True
    assert TrainConfig.from_json(cfg.to_json()).predict.adapt_batch_norm is True
    with pytest.raises(ConfigError, match="adapt_batch_norm"):
        PredictConfig(adapt_batch_norm="yes").validate()
    with pytest.raises(ConfigError, match="adapt_batch_norm"):
        set_option(TrainConfig(), "predict.adapt_batch_norm", "2")
    with pytest.raises(ConfigError, match="adapt_batch_norm"):
        TrainConfig.from_dict({"predict": {"adapt_batch_norm": "yes"}})


def test_predictor_follows_the_setting():
    """The product path (Predictor.predict, as the Apply dock and `predict` use it)."""
    from napari_semicl.engine.apply import Predictor

    net = one_bn_net()
    cfg = TrainConfig()
    cfg.data.class_values = [0, 1]
    cfg.data.normalise = "none"
    image = (np.random.default_rng(4).random((32, 32)) * 2 + 3).astype(np.float32)
    plain = Predictor(net, cfg, CPU, "test").predict(image).labels
    cfg.predict.adapt_batch_norm = True
    adapted = Predictor(net, cfg, CPU, "test").predict(image).labels
    expected, _ = predict_slices(adapt_batch_norm(net, [torch.from_numpy(image[None, None])]), image[None, None],
                                 device=CPU)
    assert np.array_equal(adapted, expected[0]) and not np.array_equal(adapted, plain)


# --- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A grey 64 x 64 training image with bright discs painted, and a darker version (gamma 3:
    percentile normalisation cannot undo it) to predict."""
    from napari_semicl.io import write_image, write_labels

    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    mask = (((yy - 20) ** 2 + (xx - 20) ** 2) < 100) | (((yy - 44) ** 2 + (xx - 40) ** 2) < 64)
    image = (0.3 + 0.5 * mask + 0.1 * rng.random((64, 64))).astype(np.float32)
    paths = {"image": write_image(folder / "train.tif", image), "labels": write_labels(folder / "labels.tif",
                                                                                       mask.astype(np.uint8)),
             "dark": write_image(folder / "dark.tif", (image ** 3).astype(np.float32))}
    return paths


def _train(tiles, out, *extra):
    from napari_semicl.cli import main

    code = main(["-q", "train", "--image", str(tiles["image"]), "--labels", str(tiles["labels"]), "--iterations", "3",
                 "--patch-size", "32", "--unpainted", "background", "--seed", "0", "--out", str(out), *extra])
    assert code == 0
    return out / "checkpoint.pt"


def _expected(checkpoint, image_path, adapt: bool) -> np.ndarray:
    from napari_semicl.engine import load_predictor
    from napari_semicl.engine.inference import predict_volume
    from napari_semicl.io import read_image

    model, cfg = load_predictor(checkpoint, device=CPU)
    image = read_image(image_path, kind="image").data
    return predict_volume(model, image, class_values=cfg.data.class_values, normalise=cfg.data.normalise,
                          device=CPU, adapt_batch_norm=adapt).labels


def test_cli_predict_flag_and_train_setting(tiles, tmp_path):
    """``predict --adapt-batch-norm`` adapts; a run trained with ``--set predict.adapt_batch_norm=true``
    keeps the setting in its checkpoint, so its ``predict`` adapts without the flag."""
    from napari_semicl.cli import main
    from napari_semicl.io import read_labels

    plain_ckpt = _train(tiles, tmp_path / "plain")
    masks = {}
    for name, flag in (("off", []), ("on", ["--adapt-batch-norm"])):
        masks[name] = tmp_path / f"{name}.tif"
        assert main(["-q", "predict", "--checkpoint", str(plain_ckpt), "--image", str(tiles["dark"]), "--out",
                     str(masks[name]), *flag]) == 0
    got = {k: read_labels(v).data for k, v in masks.items()}
    assert np.array_equal(got["off"], _expected(plain_ckpt, tiles["dark"], False))
    assert np.array_equal(got["on"], _expected(plain_ckpt, tiles["dark"], True))
    assert not np.array_equal(got["on"], got["off"])

    set_ckpt = _train(tiles, tmp_path / "set", "--set", "predict.adapt_batch_norm=true")
    out = tmp_path / "set.tif"
    assert main(["-q", "predict", "--checkpoint", str(set_ckpt), "--image", str(tiles["dark"]), "--out",
                 str(out)]) == 0
    assert np.array_equal(read_labels(out).data, _expected(set_ckpt, tiles["dark"], True))
    assert not np.array_equal(read_labels(out).data, _expected(set_ckpt, tiles["dark"], False))


def test_the_dock_box_sets_the_config(make_napari_viewer):
    viewer = make_napari_viewer()
    _, train = viewer.window.add_plugin_dock_widget("napari-semicl", "Train (semi-supervised)")
    assert train.build_config().predict.adapt_batch_norm is False
    assert "batch-norm" in train.adapt_bn_check.toolTip()
    train.adapt_bn_check.setChecked(True)
    assert train.build_config().predict.adapt_batch_norm is True


def test_the_masks_of_a_runs_images_follow_the_setting(tiles):
    """Trainer.predict_pair (the dock's masks of the opened images, ``train``'s final masks)
    adapts on the pair's own slices when the setting is on."""
    from napari_semicl.data import AnnotatedPair
    from napari_semicl.engine import Trainer
    from napari_semicl.engine.trainer import run_sync
    from napari_semicl.io import read_image, read_labels

    image = read_image(tiles["image"], kind="image").data
    dark = read_image(tiles["dark"], kind="image").data
    cfg = TrainConfig()
    cfg.iterations, cfg.data.patch_size, cfg.data.unpainted = 3, 32, "background"
    pairs = [AnnotatedPair(image, read_labels(tiles["labels"]).data), AnnotatedPair(dark, None)]
    trainer = Trainer(cfg, pairs, device=CPU)
    run_sync(trainer.run(previews=False))
    plain = trainer.predict_pair(1).labels
    trainer.config.predict.adapt_batch_norm = True
    adapted = trainer.predict_pair(1).labels
    model = trainer.method.inference_model()
    with precision_of(model, CPU).autocast():  # the adaptation pass runs in the network's precision (bf16 here)
        by_hand_net = adapt_batch_norm(model, [torch.from_numpy(trainer.dataset.images[1])])
    expected, _ = predict_slices(by_hand_net, trainer.dataset.images[1], device=CPU)
    assert np.array_equal(adapted, expected[0].astype(adapted.dtype)) and not np.array_equal(adapted, plain)


def test_a_later_layer_sees_the_earlier_layers_normalised_by_the_image():
    """Two BatchNorms in a row, one batch: the second's new statistics are those of its input
    when the first normalises by the batch's own statistics (AdaBN's layer-by-layer rule, as
    in train mode), computed here by hand with ``F.batch_norm(training=True)``."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.BatchNorm2d(2)).eval()
    x = torch.rand(4, 1, 16, 16) * 5 + 2
    adapted = adapt_batch_norm(net, [x])
    with torch.no_grad():
        a = net[0](x)
        b = net[3](torch.relu(F.batch_norm(a, None, None, net[1].weight, net[1].bias, training=True, eps=net[1].eps)))
    np.testing.assert_allclose(adapted[4].running_mean.numpy(), b.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(adapted[4].running_var.numpy(), b.var(dim=(0, 2, 3), unbiased=False).numpy(),
                               rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # normalised by the trained statistics instead, the second layer's input differs
        stale = net[3](torch.relu(net[1](a)))
    assert not np.allclose(stale.mean(dim=(0, 2, 3)).numpy(), b.mean(dim=(0, 2, 3)).numpy(), rtol=1e-2)
