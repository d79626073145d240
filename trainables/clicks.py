"""Corrective clicks: where a simulated user clicks next, given the current mask and the truth.

Interactive segmentation is evaluated (and SAM 2 and micro-sam are trained) by adding one click
at a time where the prediction is wrong, each new click joining all the earlier ones and the
previous low-resolution logits going back in as the decoder's mask input. Two rules:

- `center` (RITM's rule, and the CVPR 2025 interactive challenge's "centre of the largest
  error"): the false-negative mask (truth and not prediction) and the false-positive mask each
  get their Euclidean distance transform, with the image border counting as boundary (a pixel
  on the edge of the image is one pixel from the outside); the click goes where the larger of
  the two maxima lies: a positive click in a false negative, a negative click in a false
  positive; a tie goes to the false negative. Within the chosen region, tied pixels go to the
  one nearest the region's centroid, then the first in row-major order (the rule
  `trainables.prompts.center_point_prompt` uses), so the click is deterministic.
- `random` (SAM 2's and micro-sam's training rule): a pixel drawn uniformly from the whole error
  region (false negatives and false positives together) with the given generator; positive
  where it is a false negative.

Clicks are in the mask's own pixels, (x, y) = (column, row), like every prompt of
`trainables.prompts`; the backbone maps them into its input frame. A perfect prediction gets no
click (None): the interaction is over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from foundation.errors import UserError

CLICK_RULES = ("center", "random")


@dataclass(frozen=True)
class Click:
    """One click in original pixels; label 1 adds foreground (a missed part), 0 removes background."""

    x: float
    y: float
    label: int


def corrective_click(prediction: np.ndarray, truth: np.ndarray, rule: str = "center",
                     rng: np.random.Generator | None = None) -> Click | None:
    """The next click on `prediction` (H, W, bool) against `truth` (H, W), or None when they agree."""
    if rule not in CLICK_RULES:
        raise UserError(f"Unknown click rule {rule!r} (evaluation.click_rule in grid.yaml). Valid rules: "
                        f"{', '.join(CLICK_RULES)}.")
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    missed, extra = truth & ~prediction, prediction & ~truth
    if not (missed.any() or extra.any()):
        return None
    if rule == "random":
        if rng is None:
            raise ValueError("the random click rule needs a seeded generator (rng)")
        rows, cols = np.nonzero(missed | extra)
        pick = int(rng.integers(len(rows)))
        return Click(float(cols[pick]), float(rows[pick]), int(missed[rows[pick], cols[pick]]))
    missed_depth, extra_depth = interior_distance(missed), interior_distance(extra)
    if missed_depth.max() >= extra_depth.max():
        region, depth, label = missed, missed_depth, 1
    else:
        region, depth, label = extra, extra_depth, 0
    tied = np.argwhere(depth == depth.max())  # (row, col), row-major order
    centroid = np.argwhere(region).mean(axis=0)
    row, col = tied[np.argmin(((tied - centroid) ** 2).sum(axis=1))]
    return Click(float(col), float(row), label)


def interior_distance(mask: np.ndarray) -> np.ndarray:
    """Each pixel's Euclidean distance to the nearest pixel outside `mask`, the image border
    counting as outside (0 outside the mask; all zeros for an empty mask)."""
    if not mask.any():
        return np.zeros(mask.shape)
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
