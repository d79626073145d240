"""Segmentation metrics for one predicted mask against its ground truth.

Every function takes boolean masks at the ground truth's ORIGINAL resolution: a prediction made
at a backbone's input size (256 or 1024) is resized back to the mask's own size before it gets
here, so backbones of different input sizes are scored on the same pixels.

Conventions for empty masks (written once here, followed by every function below):

===========================  ======  =====  =====  ===============  =====
case                          dice    iou    miou   hd95             nsd
===========================  ======  =====  =====  ===============  =====
both empty                    1.0     1.0    1.0    0.0              1.0
exactly one empty             0.0     0.0    *      diagonal (†)     0.0
===========================  ======  =====  =====  ===============  =====

(* mIoU is then the mean of a foreground IoU of 0 and the background IoU.)

(† HD95 has no boundary to measure to when exactly one mask is empty. Following BraTS-style
evaluation, which assigns the maximal distance to such a case, it is then the penalty
`hd95_penalty`: the diagonal of the image, sqrt(H² + W²) in pixels, or sqrt((H·sr)² + (W·sc)²)
in mm with spacing (row sr, column sc); for a (Z, H, W) volume the volume diagonal likewise with
(z, row, col) spacing. The diagonal is larger than any distance two pixels of the image can
have, so a penalised HD95 is never better than a measured one. HD95 is therefore never NaN; the
`hd95_penalised` flags of `image_metrics` / `subject_metrics` say which values are the penalty.)

NSD is the normalised surface Dice (Nikolov et al. 2021) at a tolerance in mm (with spacing) or
pixels: the fraction of the two boundaries' pixels that lie within the tolerance of the other
boundary. Both empty is 1.0 here, consistent with Dice (MONAI returns NaN there).

The definitions follow MONAI (`monai.metrics.compute_dice`, `compute_iou`,
`compute_hausdorff_distance`, `compute_surface_dice` with `use_subvoxels=False`), and the tests
check agreement with those functions; they are re-implemented here on numpy/scipy because
MONAI's versions are batched torch code that costs milliseconds per image, and a study scores
thousands of images per trial. Where the empty-mask values differ from MONAI's (MONAI gives NaN
for HD95 with any empty mask and for NSD with both empty), the table above is what counts.
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


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        axes = "(row, col)" if ndim == 2 else "(z, row, col)" if ndim == 3 else f"{ndim} values"
        raise ValueError(f"{ndim}D spacing must be {axes}; got {spacing}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive; got {spacing}")
    return spacing


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

    Pixels outside the array count as background, so mask pixels on the image border are
    boundary pixels. This is MONAI's `get_mask_edges` rule (scipy binary_erosion XOR mask; MONAI
    first crops to the union's bounding box with a zero-padded margin of 1, which changes no
    edge).
    """
    structure = _CROSS_2D if mask.ndim == 2 else _CROSS_3D
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _edge_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-boundary distances of two NON-EMPTY masks: (pred edge -> gt edge, gt edge -> pred edge).

    For each boundary pixel of one mask, the Euclidean distance (scaled by `spacing`) to the
    nearest boundary pixel of the other, as MONAI's `get_edge_surface_distance(symmetric=True)`.

    Both masks are cropped to their union's bounding box before the boundaries are found. This is
    exact: every pixel just outside that box is background (outside the image or outside both
    masks), which is what `border_value=0` assumes, so the erosion sees the same neighbours as on
    the full image; every boundary pixel lies inside the box; and the Euclidean distance between
    two pixels does not depend on the pixels around them. The erosion and distance transforms
    then run on a small array.
    """
    occupied = np.nonzero(pred | gt)
    crop = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in occupied)
    pred_edge = _boundary(pred[crop])
    gt_edge = _boundary(gt[crop])
    # distance_transform_edt gives, at each pixel, the distance to the nearest zero, so the
    # complement of a boundary yields the distance to that boundary.
    distance_to_gt_edge = ndimage.distance_transform_edt(~gt_edge, sampling=spacing)
    distance_to_pred_edge = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)
    return distance_to_gt_edge[pred_edge], distance_to_pred_edge[gt_edge]


def _hd_from_distances(distances: tuple[np.ndarray, np.ndarray], percentile: float) -> float:
    pred_to_gt, gt_to_pred = distances
    return float(max(np.percentile(pred_to_gt, percentile), np.percentile(gt_to_pred, percentile)))


def _nsd_from_distances(distances: tuple[np.ndarray, np.ndarray], tolerance: float) -> float:
    # MONAI holds the distances as float32 and compares them with the tolerance in float32, so a
    # distance equal to the tolerance up to float64 rounding (3 x 0.8 mm vs 2.4 mm) counts as
    # within it; the same comparison here keeps the numbers identical.
    limit = np.float32(tolerance)
    pred_to_gt, gt_to_pred = distances
    within = sum(int((d.astype(np.float32) <= limit).sum()) for d in distances)
    return within / (pred_to_gt.size + gt_to_pred.size)


def hd95_penalty(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """HD95 assigned when exactly one mask is empty: the image (or volume) diagonal.

    sqrt(sum over axes of (size · spacing)²): for a 2D (H, W) image sqrt(H² + W²) pixels, or
    sqrt((H·sr)² + (W·sc)²) mm with `spacing` = (row sr, col sc) in mm; for a (Z, H, W) volume the
    same over (z, row, col). This is the maximal-distance penalty of BraTS-style evaluation; it
    exceeds every distance between two pixels of the image (at most sqrt((H-1)² + (W-1)²)).
    """
    shape = tuple(int(n) for n in shape)
    spacing = _check_spacing(spacing, len(shape)) or (1.0,) * len(shape)
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _hausdorff_percentile(
    pred: np.ndarray, gt: np.ndarray, percentile: float, spacing: Sequence[float] | None
) -> float:
    """Symmetric percentile Hausdorff distance between the boundaries of two masks.

    For each boundary pixel of one mask, the Euclidean distance (scaled by `spacing`) to the
    nearest boundary pixel of the other; the `percentile` of each directed set (linear
    interpolation, as numpy and torch.quantile); the larger of the two. Both empty: 0.0;
    exactly one empty: `hd95_penalty` (the diagonal).
    """
    pred, gt = _as_bool_pair(pred, gt)
    spacing = _check_spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return hd95_penalty(pred.shape, spacing)
    return _hd_from_distances(_edge_distances(pred, gt, spacing), percentile)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two 2D masks.

    Boundary = mask pixels with a 4-neighbour outside the mask (image border counts as outside).
    For every boundary pixel of the prediction, the Euclidean distance to the nearest boundary
    pixel of the ground truth, and vice versa; the 95th percentile of each of the two sets; the
    larger of the two. This is MONAI's `compute_hausdorff_distance(percentile=95,
    directed=False)`.

    Units: pixels, or millimetres when `spacing` = (row spacing, column spacing) in mm is given.
    Both masks empty: 0.0. Exactly one empty: the penalty `hd95_penalty(shape, spacing)`, the
    image diagonal in the same unit (BraTS-style maximal distance; MONAI returns NaN).
    """
    if spacing is not None and len(spacing) != 2:
        raise ValueError(f"2D spacing must be (row, col); got {tuple(spacing)}")
    return _hausdorff_percentile(pred, gt, 95.0, spacing)


def surface_dice(
    pred: np.ndarray, gt: np.ndarray, tolerance: float, spacing: Sequence[float] | None = None
) -> float:
    """Normalised surface Dice (NSD, Nikolov et al. 2021) of two 2D or 3D masks.

    (|{pred boundary pixels within `tolerance` of the gt boundary}| + |{gt boundary pixels within
    `tolerance` of the pred boundary}|) / (|pred boundary| + |gt boundary|), with the boundary and
    distance rules of `hd95` (4- or 6-neighbour boundary, Euclidean distance, `<=` tolerance).
    `tolerance` is in mm when `spacing` ((row, col) or (z, row, col) in mm) is given, else in
    pixels. Same as MONAI's `compute_surface_dice(class_thresholds=[tolerance],
    use_subvoxels=False, distance_metric="euclidean")`, which counts boundary pixels (not the
    DeepMind surface-element areas).

    Both empty: 1.0 (consistent with Dice; MONAI returns NaN). Exactly one empty: 0.0 (as MONAI).
    """
    pred, gt = _as_bool_pair(pred, gt)
    if pred.ndim not in (2, 3):
        raise ValueError(f"surface_dice expects 2D or 3D masks; got shape {pred.shape}")
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be finite and >= 0; got {tolerance}")
    spacing = _check_spacing(spacing, pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 1.0
    if has_pred != has_gt:
        return 0.0
    return _nsd_from_distances(_edge_distances(pred, gt, spacing), tolerance)


def target_area(gt: np.ndarray) -> int:
    """Number of ground-truth (foreground) pixels at the mask's original resolution."""
    return int(np.count_nonzero(gt))


def _distance_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None, nsd_tolerance: float
) -> dict:
    """HD95 in pixels (and mm), NSD and the penalty flag, computing each distance set once."""
    spacing = _check_spacing(spacing, pred.ndim)
    tolerance = float(nsd_tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be finite and >= 0; got {tolerance}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return {"hd95": 0.0, "hd95_mm": math.nan if spacing is None else 0.0, "nsd": 1.0, "penalised": False}
    if has_pred != has_gt:
        return {
            "hd95": hd95_penalty(pred.shape),
            "hd95_mm": math.nan if spacing is None else hd95_penalty(pred.shape, spacing),
            "nsd": 0.0,
            "penalised": True,
        }
    in_pixels = _edge_distances(pred, gt, None)
    in_mm = None if spacing is None else _edge_distances(pred, gt, spacing)
    return {
        "hd95": _hd_from_distances(in_pixels, 95.0),
        "hd95_mm": math.nan if in_mm is None else _hd_from_distances(in_mm, 95.0),
        "nsd": _nsd_from_distances(in_pixels if in_mm is None else in_mm, tolerance),
        "penalised": False,
    }


def image_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, nsd_tolerance: float = 2.0
) -> dict:
    """All per-image metrics of one 2D prediction, as one row of the per-image table.

    Keys: `dice`, `iou`, `miou`, `hd95` (pixels), `hd95_mm` (millimetres when `spacing` =
    (row, col) in mm is known, else NaN), `hd95_penalised` (True when exactly one mask is empty,
    so both HD95 values are the image-diagonal penalty), `nsd` (normalised surface Dice at
    `nsd_tolerance`: mm with `spacing`, else pixels), `area` (ground-truth pixels). Empty-mask
    conventions as in this module's docstring.
    """
    pred, gt = _as_bool_pair(pred, gt)
    if pred.ndim != 2:
        raise ValueError(f"image_metrics expects 2D masks; got shape {pred.shape}")
    distances = _distance_metrics(pred, gt, spacing, nsd_tolerance)
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "miou": miou(pred, gt),
        "hd95": distances["hd95"],
        "hd95_mm": distances["hd95_mm"],
        "hd95_penalised": distances["penalised"],
        "nsd": distances["nsd"],
        "area": target_area(gt),
    }


def subject_metrics(
    pred_stack: np.ndarray,
    gt_stack: np.ndarray,
    spacing_zyx: Sequence[float] | None = None,
    nsd_tolerance: float = 2.0,
) -> dict:
    """Per-subject 3D metrics of a subject's (Z, H, W) stack of test slices.

    The stack holds the subject's test slices placed at their slice index; slices without target
    are empty in both truth and prediction. 3D Dice counts voxels over the whole stack (so large
    slices weigh more than small ones, as in volume benchmarks like BraTS). HD95 and NSD are
    measured between the 3D boundaries (6-neighbour rule) in voxels, and in mm when
    `spacing_zyx` = (slice, row, col) spacing in mm is given.

    A one-slice stack (a 2D image that is its own subject, or a subject with one test slice) is
    scored as that 2D image: with the 3D rule every pixel of a single slice would be a boundary
    voxel (both z-neighbours lie outside the stack), so HD95 and NSD would not match the image's
    2D values; the penalty is then the image diagonal, and the slice spacing is not used.

    Keys: `dice_3d`, `hd95_3d` (voxels), `hd95_3d_mm` (NaN without spacing), `hd95_3d_penalised`
    (True when exactly one stack is empty: the HD95 values are then the volume diagonal),
    `nsd_3d` (at `nsd_tolerance`: mm with spacing, voxels without), `voxels` (ground-truth
    voxels), `slices`. Empty-mask conventions as in this module's docstring.
    """
    pred_stack, gt_stack = _as_bool_pair(pred_stack, gt_stack)
    if pred_stack.ndim != 3:
        raise ValueError(f"subject_metrics expects stacks of shape (Z, H, W); got {pred_stack.shape}")
    if spacing_zyx is not None and len(spacing_zyx) != 3:
        raise ValueError(f"3D spacing must be (z, row, col); got {tuple(spacing_zyx)}")
    if pred_stack.shape[0] == 1:
        spacing = None if spacing_zyx is None else tuple(spacing_zyx)[1:]
        distances = _distance_metrics(pred_stack[0], gt_stack[0], spacing, nsd_tolerance)
    else:
        distances = _distance_metrics(pred_stack, gt_stack, spacing_zyx, nsd_tolerance)
    return {
        "dice_3d": dice(pred_stack, gt_stack),
        "hd95_3d": distances["hd95"],
        "hd95_3d_mm": distances["hd95_mm"],
        "hd95_3d_penalised": distances["penalised"],
        "nsd_3d": distances["nsd"],
        "voxels": target_area(gt_stack),
        "slices": int(gt_stack.shape[0]),
    }
