"""Training losses for the mask decoder, by the names users write in grid.yaml.

Every loss takes the decoder's raw logits (N, 1, H, W) and a float target (N, 1, H, W) in {0, 1}
and returns a scalar: the mean over the batch (and, for the pixel-wise terms, over pixels).
Each is MONAI's loss of the same definition with MONAI's defaults, written out here in a few
lines of torch: importing MONAI costs every trial worker about 7 s on a 2-core machine (it imports
all of its submodules), more than a short trial's epoch. `tests/trainables/test_losses.py`
checks every one against MONAI's class (values and gradients) and against the formula in numpy.

- Dice terms use MONAI's smoothing constants smooth_nr = smooth_dr = 1e-5, per image and channel:
  1 - (2 Σ p g + 1e-5) / (Σ p + Σ g + 1e-5), with p = sigmoid(logit) (`squared_pred=True`
  squares p and g in the denominator), then averaged over the batch.
- Focal terms use MONAI's sigmoid focal loss with gamma = 2 and no alpha weighting:
  mean over pixels of (1 - p_t)^2 · BCE, with p_t = p where g = 1 and 1 - p where g = 0.

`iou_head_loss` is SAM's auxiliary objective for its IoU-prediction head (optional in training).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from foundation.errors import UserError

#: MONAI's DiceLoss defaults (smooth_nr, smooth_dr).
SMOOTH = 1e-5
FOCAL_GAMMA = 2.0

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_dice(logits: torch.Tensor, target: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """MONAI `DiceLoss(sigmoid=True[, squared_pred=True])`: per image and channel, then the mean."""
    p = torch.sigmoid(logits).flatten(2)
    g = target.flatten(2)
    intersection = (p * g).sum(-1)
    denominator = (p * p).sum(-1) + (g * g).sum(-1) if squared else p.sum(-1) + g.sum(-1)
    return (1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)).mean()


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """MONAI `FocalLoss(use_softmax=False, gamma)`: (1 - p_t)^gamma · BCE-with-logits, mean over pixels.
    (1 - p_t)^gamma is computed as exp(gamma · logsigmoid(-x · (2g - 1))), MONAI's stable form."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (torch.exp(gamma * F.logsigmoid(-logits * (2 * target - 1))) * bce).mean()


def dice_loss() -> Loss:
    """Sigmoid soft Dice loss (MONAI `DiceLoss(sigmoid=True)`), averaged over the batch."""
    return soft_dice


def dice_bce_loss() -> Loss:
    """Sigmoid soft Dice (squared denominator) + BCE-with-logits, weights 1 and 1.

    Seed 003's loss: MONAI Dice "with sigmoid and squared predictions, mean reduction" plus
    `BCEWithLogitsLoss`; MONAI's `DiceCELoss(sigmoid=True, squared_pred=True)`, which uses
    BCE-with-logits for one-channel input.
    """
    return lambda logits, target: soft_dice(logits, target, squared=True) + F.binary_cross_entropy_with_logits(
        logits, target)


def focal_loss() -> Loss:
    """Sigmoid focal loss, gamma 2, no alpha (MONAI `FocalLoss(use_softmax=False)`); seed 002."""
    return sigmoid_focal


def dice_focal_loss() -> Loss:
    """Sigmoid soft Dice + sigmoid focal loss (gamma 2), weights 1 and 1 (MONAI `DiceFocalLoss`)."""
    return lambda logits, target: soft_dice(logits, target) + sigmoid_focal(logits, target)


LOSSES: dict[str, Callable[[], Loss]] = {
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
    "focal": focal_loss,
    "dice_focal": dice_focal_loss,
}


def build_loss(name: str) -> Loss:
    """The loss registered as `name`: a callable (logits, target) -> scalar tensor."""
    if name not in LOSSES:
        raise UserError(
            f"Unknown loss {name!r} (factors.loss in grid.yaml). Valid losses: "
            f"{', '.join(sorted(LOSSES))}."
        )
    return LOSSES[name]()


def iou_head_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the decoder's predicted IoU and the IoU it actually achieved.

    SAM trains its IoU-prediction head this way (Kirillov et al. 2023, §3 and appendix A): the
    target is the IoU between the thresholded prediction (logit > 0, i.e. probability > 0.5) and
    the ground truth, computed without gradient, so only `pred_iou` is pushed. An image whose
    prediction and ground truth are both empty has IoU 1 (as `trainables.metrics.iou`).

    pred_iou: (N,) predicted IoU for each image's chosen mask; logits, target: (N, 1, H, W).
    """
    if pred_iou.dim() != 1 or pred_iou.shape[0] != logits.shape[0]:
        raise ValueError(f"pred_iou must have shape (N,) = ({logits.shape[0]},); got {tuple(pred_iou.shape)}")
    with torch.no_grad():
        predicted = (logits > 0).flatten(1)
        truth = target.flatten(1) > 0.5
        intersection = (predicted & truth).sum(dim=1).float()
        union = (predicted | truth).sum(dim=1).float()
        actual_iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return torch.mean((pred_iou - actual_iou.to(pred_iou.dtype)) ** 2)
