"""Precision and memory format (issue 26): the choice by device and CPU flags, the losses of
every method under bf16 autocast against fp32, channels_last against contiguous, inference
outputs in float32, the scaled gradient step, and the thread counts."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.engine import TrainConfig, Trainer, describe_device
from napari_semicl.engine import device as device_mod
from napari_semicl.engine import precision as precision_mod
from napari_semicl.engine.config import set_option
from napari_semicl.engine.inference import predict_slices
from napari_semicl.engine.precision import (
    MixedPrecision,
    Precision,
    make_optimizer,
    precision_of,
    prepare_model,
    resolve_precision,
)
from napari_semicl.errors import ConfigError
from napari_semicl.methods import available_methods
from napari_semicl.models.ops import in_float32
from napari_semicl.models.unet import UNet2D, UNet3D

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
MPS = torch.device("mps")


# --- the choice ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "avx512_bf16"}, "bf16"),
    ({"fpu", "amx_bf16", "amx_tile"}, "bf16"),
    ({"fpu", "avx2", "avx512f"}, "fp32"),
    (set(), "fp32"),
])
def test_auto_on_cpu_follows_the_bf16_flags(flags, expected):
    assert resolve_precision("auto", CPU, flags=flags).name == expected
    assert resolve_precision("fp32", CPU, flags=flags).name == "fp32"


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"sse2", "amx_bf16"}))
    assert resolve_precision("auto", CPU).name == "bf16"
    assert describe_device(CPU, 2) == "CPU (2 threads, bf16 autocast)"
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"sse2"}))
    assert resolve_precision("auto", CPU).name == "fp32"
    assert describe_device(CPU, 1) == "CPU (1 thread, fp32)"


def test_forced_bf16_on_a_cpu_without_it_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="napari_semicl.engine.precision"):
        chosen = resolve_precision("bf16", CPU, flags={"avx2"})
    assert chosen.name == "bf16"
    assert "emulated" in caplog.text


def test_cuda_amp_and_mps():
    assert resolve_precision("auto", CUDA, cuda_bf16=True) == Precision("bf16", "cuda", True, False)
    fp16 = resolve_precision("auto", CUDA, cuda_bf16=False)
    assert (fp16.name, fp16.scaled, fp16.describe()) == ("fp16", True, "fp16 AMP")
    with pytest.raises(ConfigError, match="no bf16"):
        resolve_precision("bf16", CUDA, cuda_bf16=False)
    assert resolve_precision("auto", MPS).name == "fp32"
    with pytest.raises(ConfigError, match="not supported on mps"):
        resolve_precision("bf16", MPS)
    with pytest.raises(ConfigError, match="model.precision must be one of"):
        resolve_precision("fp8", CPU)


def test_auto_keeps_the_3d_network_in_fp32_on_the_cpu():
    assert resolve_precision("auto", CPU, spatial_dims=3, flags={"avx512_bf16"}).name == "fp32"
    assert resolve_precision("bf16", CPU, spatial_dims=3, flags={"avx512_bf16"}).name == "bf16"
    assert resolve_precision("auto", CUDA, spatial_dims=3, cuda_bf16=True).name == "bf16"


def test_channels_last_for_2d_only():
    assert resolve_precision("fp32", CPU, spatial_dims=2).channels_last
    assert not resolve_precision("fp32", CPU, spatial_dims=3).channels_last
    assert not resolve_precision("auto", MPS, spatial_dims=2).channels_last


def test_config_setting_is_checked_and_round_trips():
    cfg = TrainConfig()
    assert cfg.model.precision == "auto"
    set_option(cfg, "model.precision", "fp32")
    assert TrainConfig.from_json(cfg.to_json()).model.precision == "fp32"
    cfg.model.precision = "half"
    with pytest.raises(ConfigError, match="model.precision"):
        cfg.validate()


# --- numerics ---------------------------------------------------------------------------------
def test_channels_last_output_equals_contiguous():
    torch.manual_seed(0)
    net = UNet2D(1, 3, base_channels=8, depth=3).eval()
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        expected = net(x)
        net.to(memory_format=torch.channels_last)
        assert net.head.weight.is_contiguous(memory_format=torch.channels_last)
        got = net(x)
        got_cl_input = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_cl_input, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net, x", [
    (UNet2D(1, 2, base_channels=8, depth=2), torch.randn(2, 1, 32, 32)),
    (UNet3D(1, 2, base_channels=4), torch.randn(1, 1, 32, 32, 32)),
])
def test_networks_hand_out_float32_under_autocast(net, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = net(x, return_features=True)
        inner = net.head(features) if isinstance(net, UNet2D) else net.final_conv(features)
    assert logits.dtype == features.dtype == torch.float32
    assert inner.dtype == torch.bfloat16  # the layers themselves run in bf16


def test_in_float32_switches_autocast_off_and_keeps_gradients():
    @in_float32
    def similarity(a, b, *, scale):
        return a @ b.T / scale

    a = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a.T).dtype == torch.bfloat16
        out = similarity(a, a.detach().bfloat16(), scale=0.1)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert similarity(a.double(), a.double(), scale=1.0).dtype == torch.float64  # no autocast: untouched


def _volume():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(10, 64, 64)).astype(np.float32)
    lab = np.zeros((10, 64, 64), np.uint8)
    lab[:, 18:42, 20:46] = 1
    img[lab == 1] += 2.0
    painted = lab.copy()
    painted[[1, 2, 3, 5, 6, 7, 8]] = 0
    return img, painted


def _trainer(method: str, precision: str) -> Trainer:
    cfg = TrainConfig(method=method, iterations=2, seed=0)
    cfg.data.patch_size, cfg.data.batch_labelled, cfg.data.batch_unlabelled = 32, 2, 2
    cfg.data.unpainted = "background"
    cfg.model.precision = precision
    section = getattr(cfg, method, None)
    if section is not None and hasattr(section, "warmup_steps"):
        section.warmup_steps = 0  # the contrastive terms from the first step
    img, painted = _volume()
    return Trainer(cfg, [AnnotatedPair(img, painted)], device=CPU)


@pytest.mark.parametrize("method", available_methods())
def test_bf16_train_step_matches_fp32(method):
    """Same seed, same crops: every loss term finite and within 1% (relative, or 0.005
    absolute) of fp32 at the first step, the total within 3% at the second (after one update
    from slightly different gradients, the contrastive samplers may pick other pixels); the
    network is channels_last and its weights stay float32."""
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = _trainer(method, precision)
        assert trainer.amp.precision.name == precision
        runs[precision] = [trainer.train_step() for _ in range(2)]
        assert trainer.model.head.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    (first32, second32), (first16, second16) = runs["fp32"], runs["bf16"]
    assert first32.keys() == first16.keys() and second32.keys() == second16.keys()
    assert all(np.isfinite(v) for v in [*first16.values(), *second16.values()]), (first16, second16)
    for name, value in first16.items():
        assert value == pytest.approx(first32[name], rel=1e-2, abs=5e-3), (method, name)
    assert second16["total"] == pytest.approx(second32["total"], rel=3e-2), method


def test_inference_runs_in_the_models_precision_and_returns_float32():
    img, _ = _volume()
    torch.manual_seed(0)
    net = UNet2D(1, 2, base_channels=8, depth=2)
    with torch.no_grad():
        net.head.weight.mul_(2000.0)  # decisive logits (an untrained net is near a tie everywhere)
    x = img[:3, None]
    labels32, ent32 = predict_slices(prepare_model(copy.deepcopy(net), resolve_precision("fp32", CPU), "fp32"), x,
                                     device=CPU, with_entropy=True)
    bf16 = prepare_model(copy.deepcopy(net), resolve_precision("bf16", CPU), "bf16")
    assert precision_of(bf16, CPU).name == "bf16"
    assert precision_of(net, CPU).name == "fp32"  # a network no trainer prepared runs as it always did
    calls = []
    bf16.head.register_forward_hook(lambda mod, inp, out: calls.append(out.dtype))
    labels, ent = predict_slices(bf16, x, device=CPU, with_entropy=True)
    assert calls and set(calls) == {torch.bfloat16}
    assert labels.dtype == np.int64 and ent.dtype == np.float32 and labels.shape == labels32.shape
    assert np.abs(ent - ent32).mean() < 0.02
    clear = ent32 < 0.5  # where fp32 is not near a tie, bf16 gives the same class
    assert clear.mean() > 0.5 and (labels == labels32)[clear].mean() > 0.99


def test_trainer_describes_its_precision_and_records_it_on_the_network():
    trainer = _trainer("supervised", "fp32")
    assert getattr(trainer.model, precision_mod.MODEL_ATTRIBUTE) == "fp32"
    assert precision_of(trainer.method.inference_model(), CPU).name == "fp32"
    started = next(trainer.run(previews=False))
    assert started.device.endswith(", fp32)")


def test_scaled_step_equals_the_plain_step():
    """The fp16 path's GradScaler unscales before the step: the same update as without."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    plain = MixedPrecision("fp32", CPU)
    scaled = MixedPrecision("fp32", CPU)
    scaled.precision = Precision("fp16", "cpu", scaled=True)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for mp, model in ((plain, net), (scaled, twin)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mp.step(((model(x) - y) ** 2).mean(), opt)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


# --- the optimiser ------------------------------------------------------------------------------
def _adamw_run(fused, steps: int = 5, state=None):
    torch.manual_seed(0)
    net = UNet2D(1, 2, base_channels=4)
    opt = make_optimizer(net.parameters(), TrainConfig().optim, CPU, fused=fused)
    if state is not None:
        opt.load_state_dict(state)
    x = torch.randn(2, 1, 32, 32)
    y = torch.randint(0, 2, (2, 32, 32))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


def test_the_trainer_steps_the_fused_adamw_on_the_cpu_and_it_updates_as_the_loop_does():
    trainer = _trainer("supervised", "fp32")
    assert trainer.optimizer.defaults["fused"] is True
    assert make_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig().optim, MPS).defaults["fused"] is None
    (loop, loop_opt), (fused, fused_opt) = _adamw_run(False), _adamw_run(True)
    assert loop_opt.defaults["fused"] is None and fused_opt.defaults["fused"] is True
    torch.manual_seed(0)
    start = UNet2D(1, 2, base_channels=4)  # the weights both runs started from
    with torch.no_grad():
        assert max(float((a - b).abs().max()) for a, b in zip(loop.parameters(), start.parameters())) > 1e-3
    for a, b in zip(loop.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_loops_moments_load_into_the_fused_adamw():
    """A checkpoint written before the fused optimiser resumes into it (and back)."""
    _, loop_opt = _adamw_run(False, steps=2)
    _, fused_opt = _adamw_run(True, steps=1, state=loop_opt.state_dict())
    assert all(int(s["step"]) == 3 for s in fused_opt.state.values())
    _, back = _adamw_run(False, steps=1, state=fused_opt.state_dict())
    assert all(int(s["step"]) == 4 for s in back.state.values())


# --- threads ----------------------------------------------------------------------------------
def test_thread_counts(monkeypatch):
    assert device_mod.idle_cores(2, 0.1) == 2
    assert device_mod.idle_cores(2, 1.0) == 1  # one busy core: one thread
    assert device_mod.idle_cores(2, 14.0) == 1
    assert device_mod.idle_cores(16, 3.4) == 13
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device_mod.default_cpu_threads() == 3
    monkeypatch.setenv("NAPARI_SEMICL_GUI_THREADS", "2")
    assert device_mod.gui_thread_count() == 2
    monkeypatch.setenv("NAPARI_SEMICL_GUI_THREADS", "none")
    monkeypatch.setattr(device_mod.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert device_mod.gui_thread_count() == device_mod.cpu_thread_count()  # an idle machine: every core
    monkeypatch.setattr(device_mod.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert device_mod.gui_thread_count() == 1
