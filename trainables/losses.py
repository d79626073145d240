"""Training losses for the mask decoder, by the names users write in grid.yaml.

Every loss takes the decoder's raw logits (N, 1, H, W) and a float target (N, 1, H, W) in {0, 1}
and returns a scalar: the mean over the batch (and, for the pixel-wise terms, over pixels).
All are MONAI's implementations with MONAI's defaults unless stated:

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
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss
from torch import nn

from foundation.errors import UserError


def dice_loss() -> nn.Module:
    """Sigmoid soft Dice loss (MONAI `DiceLoss(sigmoid=True)`), averaged over the batch."""
    return DiceLoss(sigmoid=True)


def dice_bce_loss() -> nn.Module:
    """Sigmoid soft Dice (squared denominator) + BCE-with-logits, weights 1 and 1.

    Seed 003's loss: MONAI Dice "with sigmoid and squared predictions, mean reduction" plus
    `BCEWithLogitsLoss`. MONAI's `DiceCELoss` uses BCE-with-logits for one-channel input, so
    this is `DiceCELoss(sigmoid=True, squared_pred=True)`.
    """
    return DiceCELoss(sigmoid=True, squared_pred=True)


def focal_loss() -> nn.Module:
    """Sigmoid focal loss, gamma 2, no alpha (MONAI `FocalLoss(use_softmax=False)`); seed 002."""
    return FocalLoss(use_softmax=False, gamma=2.0)


def dice_focal_loss() -> nn.Module:
    """Sigmoid soft Dice + sigmoid focal loss (gamma 2), weights 1 and 1 (MONAI `DiceFocalLoss`)."""
    return DiceFocalLoss(sigmoid=True, gamma=2.0)


LOSSES: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
    "focal": focal_loss,
    "dice_focal": dice_focal_loss,
}


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
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
