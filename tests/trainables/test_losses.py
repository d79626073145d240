"""Losses: each registered loss against MONAI's class of the same definition and against a numpy
computation of its formula."""

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss

from foundation.errors import UserError
from trainables.losses import LOSSES, build_loss, iou_head_loss

# MONAI's Dice smoothing constants (DiceLoss defaults smooth_nr = smooth_dr = 1e-5).
SMOOTH = 1e-5


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_dice(logits, target, squared=False):
    """Per image: 1 - (2 Σ p g + 1e-5) / (Σ p + Σ g + 1e-5) (squares in the denominator), mean."""
    p = _sigmoid(logits).reshape(len(logits), -1)
    g = target.reshape(len(target), -1)
    denominator = (p**2).sum(1) + (g**2).sum(1) if squared else p.sum(1) + g.sum(1)
    return float(np.mean(1.0 - (2.0 * (p * g).sum(1) + SMOOTH) / (denominator + SMOOTH)))


def _numpy_bce(logits, target):
    p = _sigmoid(logits)
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def _numpy_focal(logits, target, gamma=2.0):
    """Mean over pixels of (1 - p_t)^gamma * (-log p_t), p_t = p where g=1, 1-p where g=0."""
    p = _sigmoid(logits)
    p_t = np.where(target > 0.5, p, 1 - p)
    return float(np.mean((1 - p_t) ** gamma * -np.log(p_t)))


NUMPY_FORMULAS = {
    "dice": lambda x, g: _numpy_dice(x, g),
    "dice_bce": lambda x, g: _numpy_dice(x, g, squared=True) + _numpy_bce(x, g),
    "focal": _numpy_focal,
    "dice_focal": lambda x, g: _numpy_dice(x, g) + _numpy_focal(x, g),
}

# A tiny batch: two 1x2x3 images with mixed logits and targets (image 1 has an empty target).
LOGITS = np.array(
    [[[[0.0, 2.0, -1.0], [3.0, -2.5, 0.5]]], [[[1.0, -2.0, 0.5], [-0.3, 0.0, -4.0]]]], dtype=np.float64
)
TARGET = np.array([[[[0, 1, 0], [1, 0, 1]]], [[[0, 0, 0], [0, 0, 0]]]], dtype=np.float64)


# The MONAI class each registered loss must equal (trainables/losses.py writes them out).
MONAI_LOSSES = {
    "dice": lambda: DiceLoss(sigmoid=True),
    "dice_bce": lambda: DiceCELoss(sigmoid=True, squared_pred=True),
    "focal": lambda: FocalLoss(use_softmax=False, gamma=2.0),
    "dice_focal": lambda: DiceFocalLoss(sigmoid=True, gamma=2.0),
}


@pytest.mark.parametrize("name", sorted(MONAI_LOSSES))
def test_loss_equals_monai_in_value_and_gradient(name):
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 1, 9, 11, generator=generator) * 4).requires_grad_()
    target = (torch.rand(3, 1, 9, 11, generator=generator) > 0.6).float()
    target[2] = 0  # one image with an empty target
    ours = build_loss(name)(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = MONAI_LOSSES[name]()(logits, target)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-8)


def test_registry_names():
    assert set(LOSSES) == {"dice", "dice_bce", "focal", "dice_focal"}


@pytest.mark.parametrize("name", sorted(NUMPY_FORMULAS))
def test_loss_matches_its_formula(name):
    loss = build_loss(name)
    value = loss(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGET, dtype=torch.float32))
    assert value.shape == ()
    assert float(value) == pytest.approx(NUMPY_FORMULAS[name](LOGITS, TARGET), rel=1e-5, abs=1e-6)


# All logits 0 -> p = 0.5 everywhere; target 2x2 with two ones. By hand:
#   dice = 1 - (2·1 + ε)/(2 + 2 + ε) ≈ 0.5          (Σpg = 1, Σp = 2, Σg = 2)
#   squared dice = 1 - (2 + ε)/(1 + 2 + ε) ≈ 1/3    (Σp² = 1, Σg² = 2); BCE = ln 2
#   focal = (1 - 0.5)² · ln 2 = ln 2 / 4
HALF_CASES = {
    "dice": 0.5,
    "dice_bce": 1 / 3 + math.log(2),
    "focal": math.log(2) / 4,
    "dice_focal": 0.5 + math.log(2) / 4,
}


@pytest.mark.parametrize("name", sorted(HALF_CASES))
def test_loss_at_even_odds_by_hand(name):
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert float(build_loss(name)(logits, target)) == pytest.approx(HALF_CASES[name], abs=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_prediction_gives_near_zero(name):
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:5, 3:6] = 1
    target[1, 0, 0:2, :] = 1
    logits = (target * 2 - 1) * 30.0  # p ≈ 1 on the mask, ≈ 0 elsewhere
    assert float(build_loss(name)(logits, target)) < 1e-4


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_to_the_logits(name):
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    build_loss(name)(logits, torch.tensor(TARGET, dtype=torch.float32)).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    # Raising a logit where the target is 1 must lower the loss: gradient negative there.
    assert logits.grad[0, 0, 0, 1] < 0
    assert logits.grad[0, 0, 0, 0] > 0  # and positive where the target is 0


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(UserError) as error:
        build_loss("dcie")
    message = str(error.value)
    assert "'dcie'" in message
    for name in LOSSES:
        assert name in message


def test_iou_head_loss_by_hand():
    # Image 0: predicted mask {(0,0), (0,1)} (logit > 0), truth {(0,1), (1,1)} -> IoU 1/3.
    # Image 1: nothing predicted, empty truth -> IoU 1 (the metrics convention).
    logits = torch.tensor([[[[2.0, 1.0], [-1.0, -3.0]]], [[[-1.0, -2.0], [-0.5, -4.0]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    pred_iou = torch.tensor([0.5, 0.5], requires_grad=True)
    loss = iou_head_loss(pred_iou, logits, target)
    assert float(loss.detach()) == pytest.approx(((0.5 - 1 / 3) ** 2 + (0.5 - 1.0) ** 2) / 2)
    loss.backward()
    # d/dq mean((q - a)²) = (q - a) for N = 2.
    assert pred_iou.grad.tolist() == pytest.approx([0.5 - 1 / 3, 0.5 - 1.0])
    assert logits.grad is None  # the achieved IoU is a target, not a path for gradients


def test_iou_head_loss_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        iou_head_loss(torch.zeros(3), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
