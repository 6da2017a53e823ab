"""Losses and the EMA update against hand computation."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from napari_semicl.data import IGNORE_INDEX
from napari_semicl.methods import ema_update
from napari_semicl.methods.losses import (
    consistency_loss,
    masked_cross_entropy,
    masked_dice_loss,
    sigmoid_rampup,
    supervised_loss,
)


def test_ema_update_matches_its_formula():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    for step, alpha in [(0, 0.99), (3, 0.99), (500, 0.99), (500, 0.9)]:
        teacher.load_state_dict({k: v for k, v in zip(["weight", "bias"], t0)})
        a = ema_update(teacher, student, step, alpha)
        expected_a = min(1 - 1 / (step + 1), alpha)
        assert a == expected_a
        for t, s, p in zip(t0, s0, teacher.parameters()):
            torch.testing.assert_close(p, expected_a * t + (1 - expected_a) * s)
    # step 0: a = 0, the teacher becomes the student
    teacher.load_state_dict({k: v for k, v in zip(["weight", "bias"], t0)})
    ema_update(teacher, student, 0, 0.99)
    for s, p in zip(s0, teacher.parameters()):
        torch.testing.assert_close(p, s)


def test_ignored_pixels_never_reach_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[:, :2] = IGNORE_INDEX
    losses = supervised_loss(logits, target)
    sum(losses.values()).backward()
    grad = logits.grad
    assert torch.all(grad[:, :, :2] == 0), "gradient reached ignored pixels"
    assert torch.any(grad[:, :, 2:] != 0)
    # changing the logits of ignored pixels changes nothing
    other = logits.detach().clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 4) * 10
    again = supervised_loss(other, target)
    for k in losses:
        torch.testing.assert_close(losses[k].detach(), again[k])


def test_masked_ce_and_dice_by_hand():
    # one image, 2 classes, 3 valid pixels of 4
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 5.0]], [[0.0, 1.0], [3.0, 5.0]]]])
    target = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])
    p = logits.softmax(1)[0]
    ce = -(math.log(p[0, 0, 0]) + math.log(p[1, 0, 1]) + math.log(p[1, 1, 0])) / 3
    assert abs(float(masked_cross_entropy(logits, target)) - ce) < 1e-6
    # dice per class over the 3 valid pixels
    p0 = [p[0, 0, 0], p[0, 0, 1], p[0, 1, 0]]
    p1 = [p[1, 0, 0], p[1, 0, 1], p[1, 1, 0]]
    d0 = (2 * p0[0] + 1e-5) / (sum(p0) + 1 + 1e-5)
    d1 = (2 * (p1[1] + p1[2]) + 1e-5) / (sum(p1) + 2 + 1e-5)
    expected = 1 - (d0 + d1) / 2
    assert abs(float(masked_dice_loss(logits, target)) - float(expected)) < 1e-6


def test_all_ignored_gives_zero_with_a_graph():
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    target = torch.full((1, 3, 3), IGNORE_INDEX)
    total = masked_cross_entropy(logits, target) + masked_dice_loss(logits, target)
    assert float(total) == 0.0
    total.backward()


def test_consistency_has_no_gradient_into_the_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = consistency_loss(s, t, "mse")
    expected = F.mse_loss(s.softmax(1), t.softmax(1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert t.grad is None and s.grad is not None
    kl = consistency_loss(s.detach(), s.detach(), "kl")
    assert abs(float(kl)) < 1e-6


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == np.float32(math.exp(-5))
    assert abs(sigmoid_rampup(50, 100) - math.exp(-5 * 0.25)) < 1e-6
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(10**6, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
