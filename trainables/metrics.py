"""Segmentation metrics for one predicted mask against its ground truth.

Every function takes boolean masks at the ground truth's ORIGINAL resolution: a prediction made
at a backbone's input size (256 or 1024) is resized back to the mask's own size before it gets
here, so backbones of different input sizes are scored on the same pixels.

Conventions for empty masks (written once here, followed by every function below):

===========================  ======  =====  =====  ========
case                          dice    iou    miou   hd95
===========================  ======  =====  =====  ========
both empty                    1.0     1.0    1.0    0.0
exactly one empty             0.0     0.0    *      NaN
===========================  ======  =====  =====  ========

(* mIoU is then the mean of a foreground IoU of 0 and the background IoU.)

HD95 is undefined when exactly one mask is empty (there is no boundary to measure to), so it is
NaN, not a made-up large number. Aggregations (means, CIs, tests) skip NaN values and report how
many were skipped next to the number they produce.

The definitions follow MONAI (`monai.metrics.compute_dice`, `compute_iou`,
`compute_hausdorff_distance`), and the tests check agreement with those functions; they are
re-implemented here on numpy/scipy because MONAI's versions are batched torch code that costs
milliseconds per image, and a study scores thousands of images per trial.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

# A 3x3 (or 3x3x3) cross: the structuring element scipy's binary_erosion uses by default, and
# therefore the one MONAI's `get_mask_edges` uses to find boundaries.
_CROSS_2D = ndimage.generate_binary_structure(2, 1)
_CROSS_3D = ndimage.generate_binary_structure(3, 1)


def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; resize the "
            "prediction to the mask's original resolution before scoring it"
        )
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two boolean masks (any number of dimensions).

    Both empty: 1.0 (the prediction is exactly right). Exactly one empty: 0.0.
    Same as MONAI's `compute_dice(..., ignore_empty=False)`.
    """
    pred, gt = _as_bool_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G| (Jaccard index) of two boolean masks.

    Both empty: 1.0. Exactly one empty: 0.0. Same as MONAI's `compute_iou(..., ignore_empty=False)`.
    """
    pred, gt = _as_bool_pair(pred, gt)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def miou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean IoU over the two classes of one image: (IoU(tumour) + IoU(background)) / 2.

    This is seed 000's definition ("the average IoU score of each class mask in each image"):
    the foreground IoU of `pred` vs `gt`, and the IoU of their complements. Each class uses the
    `iou` convention, so both masks empty gives (1 + 1) / 2 = 1.0, and a prediction that marks
    every pixel as tumour when the truth is empty gives (0 + 0) / 2 = 0.0.
    """
    pred, gt = _as_bool_pair(pred, gt)
    return 0.5 * (iou(pred, gt) + iou(~pred, ~gt))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask: the mask minus its erosion by a cross.

    Pixels outside the image count as background, so mask pixels on the image border are
    boundary pixels. This is MONAI's `get_mask_edges` rule (scipy binary_erosion XOR mask).
    """
    structure = _CROSS_2D if mask.ndim == 2 else _CROSS_3D
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hausdorff_percentile(
    pred: np.ndarray, gt: np.ndarray, percentile: float, spacing: Sequence[float] | None
) -> float:
    """Symmetric percentile Hausdorff distance between the boundaries of two masks.

    For each boundary pixel of one mask, the Euclidean distance (scaled by `spacing`) to the
    nearest boundary pixel of the other; the `percentile` of each directed set (linear
    interpolation, as numpy and torch.quantile); the larger of the two. Both empty: 0.0;
    exactly one empty: NaN.
    """
    pred, gt = _as_bool_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return math.nan

    # Boundaries are found on the full-size masks (image border = background), then cropped to
    # the union's bounding box: every boundary pixel lies inside it, and the Euclidean distance
    # between two pixels does not depend on the pixels around them, so the result is exact and
    # the distance transforms run on a small array.
    occupied = np.nonzero(pred | gt)
    crop = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in occupied)
    pred_edge = _boundary(pred)[crop]
    gt_edge = _boundary(gt)[crop]

    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    # distance_transform_edt gives, at each pixel, the distance to the nearest zero, so the
    # complement of a boundary yields the distance to that boundary.
    distance_to_gt_edge = ndimage.distance_transform_edt(~gt_edge, sampling=sampling)
    distance_to_pred_edge = ndimage.distance_transform_edt(~pred_edge, sampling=sampling)
    pred_to_gt = distance_to_gt_edge[pred_edge]
    gt_to_pred = distance_to_pred_edge[gt_edge]
    return float(max(np.percentile(pred_to_gt, percentile), np.percentile(gt_to_pred, percentile)))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two 2D masks.

    Boundary = mask pixels with a 4-neighbour outside the mask (image border counts as outside).
    For every boundary pixel of the prediction, the Euclidean distance to the nearest boundary
    pixel of the ground truth, and vice versa; the 95th percentile of each of the two sets; the
    larger of the two. This is MONAI's `compute_hausdorff_distance(percentile=95,
    directed=False)`.

    Units: pixels, or millimetres when `spacing` = (row spacing, column spacing) in mm is given.
    Both masks empty: 0.0. Exactly one empty: NaN (undefined; aggregations skip NaN and report
    how many images they skipped).
    """
    if spacing is not None and len(spacing) != 2:
        raise ValueError(f"2D spacing must be (row, col); got {tuple(spacing)}")
    return _hausdorff_percentile(pred, gt, 95.0, spacing)


def target_area(gt: np.ndarray) -> int:
    """Number of ground-truth (foreground) pixels at the mask's original resolution."""
    return int(np.count_nonzero(gt))


def image_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
    """All per-image metrics of one prediction, as one row of the per-image table.

    Keys: `dice`, `iou`, `miou`, `hd95` (pixels), `hd95_mm` (millimetres when `spacing` =
    (row, col) in mm is known, else NaN), `area` (ground-truth pixels). Empty-mask conventions
    as in this module's docstring.
    """
    pred, gt = _as_bool_pair(pred, gt)
    if pred.ndim != 2:
        raise ValueError(f"image_metrics expects 2D masks; got shape {pred.shape}")
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "miou": miou(pred, gt),
        "hd95": hd95(pred, gt),
        "hd95_mm": math.nan if spacing is None else hd95(pred, gt, spacing=spacing),
        "area": target_area(gt),
    }


def subject_metrics(
    pred_stack: np.ndarray, gt_stack: np.ndarray, spacing_zyx: Sequence[float] | None = None
) -> dict:
    """Per-subject 3D Dice and HD95 from a subject's slices stacked in slice order, shape (Z, H, W).

    3D Dice counts voxels over the whole stack (so large slices weigh more than small ones, as in
    volume benchmarks like BraTS). HD95 is measured between the 3D boundaries (6-neighbour rule)
    in voxels, and in mm when `spacing_zyx` = (slice, row, col) spacing in mm is given.
    Only the slices that were scored are stacked: when a reader dropped slices (min_area), this
    is the volume of the kept slices, not the whole scan.

    Keys: `dice_3d`, `hd95_3d` (voxels), `hd95_3d_mm` (NaN without spacing), `volume` (ground-
    truth voxels), `slices`. Empty-mask conventions as in this module's docstring.
    """
    pred_stack, gt_stack = _as_bool_pair(pred_stack, gt_stack)
    if pred_stack.ndim != 3:
        raise ValueError(f"subject_metrics expects stacks of shape (Z, H, W); got {pred_stack.shape}")
    if spacing_zyx is not None and len(spacing_zyx) != 3:
        raise ValueError(f"3D spacing must be (z, row, col); got {tuple(spacing_zyx)}")
    return {
        "dice_3d": dice(pred_stack, gt_stack),
        "hd95_3d": _hausdorff_percentile(pred_stack, gt_stack, 95.0, None),
        "hd95_3d_mm": math.nan
        if spacing_zyx is None
        else _hausdorff_percentile(pred_stack, gt_stack, 95.0, spacing_zyx),
        "volume": target_area(gt_stack),
        "slices": int(gt_stack.shape[0]),
    }
