"""Metrics: hand-computed cases, then agreement with MONAI on seeded random and empty masks."""

import math
import time
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from scipy import ndimage

from trainables.metrics import dice, hd95, image_metrics, iou, miou, subject_metrics, target_area


def _mask(shape, *pixels_or_slices):
    mask = np.zeros(shape, dtype=bool)
    for index in pixels_or_slices:
        mask[index] = True
    return mask


# Each case: pred, gt, and dice, iou, miou, hd95 worked out by hand.
HAND_CASES = {
    # pred: 2x2 block rows 0-1, cols 0-1 (4 px); gt: 2x3 block rows 0-1, cols 0-2 (6 px); 4x4 image.
    # |P∩G| = 4, |P∪G| = 6 -> dice 8/10, iou 4/6. Background: |~P∩~G| = 16-6 = 10,
    # |~P∪~G| = 16-4 = 12 -> bg iou 10/12; miou = (4/6 + 10/12)/2 = 0.75.
    # Boundaries: a 2-row block erodes to nothing, so every pixel is boundary. P->G distances all 0;
    # G->P: (0,2) and (1,2) are 1 away, the rest 0 -> sorted [0,0,0,0,1,1]; the 95th percentile
    # (linear) sits at index 0.95*5 = 4.75, between 1 and 1 -> 1. hd95 = max(0, 1) = 1.
    "overlapping_blocks": (
        _mask((4, 4), np.s_[0:2, 0:2]),
        _mask((4, 4), np.s_[0:2, 0:3]),
        0.8, 4 / 6, 0.75, 1.0,
    ),
    # Single pixels at (0,0) and (3,4) in 5x5: no overlap -> dice 0, iou 0. Background:
    # |~P∩~G| = 23, |~P∪~G| = 25 -> 0.92; miou = 0.46. Distance sqrt(3²+4²) = 5 both ways.
    "distant_pixels": (
        _mask((5, 5), (0, 0)),
        _mask((5, 5), (3, 4)),
        0.0, 0.0, 0.46, 5.0,
    ),
    # gt: row 0, cols 0-9 (10 px) in 8x10; pred: the same line plus an outlier pixel at (5,0).
    # |P|=11, |G|=10, |P∩G|=10 -> dice 20/21, iou 10/11; background |~P∩~G|=69, |~P∪~G|=70.
    # P->G distances: ten 0s and 5 (outlier to (0,0)); 95th percentile at index 0.95*10 = 9.5,
    # halfway between 0 and 5 -> 2.5. G->P all 0. hd95 = 2.5 while the plain Hausdorff is 5.
    "line_with_outlier": (
        _mask((8, 10), np.s_[0, 0:10], (5, 0)),
        _mask((8, 10), np.s_[0, 0:10]),
        20 / 21, 10 / 11, (10 / 11 + 69 / 70) / 2, 2.5,
    ),
    # Both empty: the prediction is right -> dice 1, iou 1, miou (1 + 1)/2 = 1, hd95 0.
    "both_empty": (_mask((4, 4)), _mask((4, 4)), 1.0, 1.0, 1.0, 0.0),
    # Empty prediction, 2x2 gt in 4x4: dice 0, iou 0; background ~P = 16 px, ~G = 12 px,
    # bg iou 12/16 -> miou 0.375; hd95 undefined -> NaN.
    "empty_prediction": (
        _mask((4, 4)),
        _mask((4, 4), np.s_[1:3, 1:3]),
        0.0, 0.0, 0.375, math.nan,
    ),
    # Prediction where the truth is empty: dice 0, iou 0; bg iou 12/16; hd95 NaN.
    "empty_truth": (
        _mask((4, 4), np.s_[1:3, 1:3]),
        _mask((4, 4)),
        0.0, 0.0, 0.375, math.nan,
    ),
    # Identical masks: all perfect, hd95 0.
    "identical": (
        _mask((6, 6), np.s_[1:5, 2:4]),
        _mask((6, 6), np.s_[1:5, 2:4]),
        1.0, 1.0, 1.0, 0.0,
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_computed_cases(name):
    pred, gt, want_dice, want_iou, want_miou, want_hd95 = HAND_CASES[name]
    assert dice(pred, gt) == pytest.approx(want_dice)
    assert iou(pred, gt) == pytest.approx(want_iou)
    assert miou(pred, gt) == pytest.approx(want_miou)
    if math.isnan(want_hd95):
        assert math.isnan(hd95(pred, gt))
    else:
        assert hd95(pred, gt) == pytest.approx(want_hd95)


def test_hd95_in_millimetres_scales_each_axis():
    pred, gt = HAND_CASES["overlapping_blocks"][:2]
    # The only non-zero distance is one column step: with column spacing 3 mm it is 3 mm.
    assert hd95(pred, gt, spacing=(2.0, 3.0)) == pytest.approx(3.0)
    pred, gt = HAND_CASES["distant_pixels"][:2]
    # Offset (3 rows, 4 cols) with spacing (2, 0.5) mm -> sqrt(6² + 2²) = sqrt(40).
    assert hd95(pred, gt, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(40))


def test_image_metrics_row():
    pred, gt = HAND_CASES["overlapping_blocks"][:2]
    row = image_metrics(pred, gt, spacing=(2.0, 3.0))
    assert row == pytest.approx({"dice": 0.8, "iou": 4 / 6, "miou": 0.75, "hd95": 1.0, "hd95_mm": 3.0, "area": 6})
    no_spacing = image_metrics(pred, gt)
    assert math.isnan(no_spacing["hd95_mm"]) and no_spacing["hd95"] == 1.0
    assert target_area(gt) == 6 and isinstance(row["area"], int)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="original resolution"):
        dice(np.zeros((4, 4), bool), np.zeros((8, 8), bool))


def test_subject_metrics_hand_computed():
    # gt: a 2x2 block on slices 0 and 1 (8 voxels); pred: the block on slice 0 only (4 voxels).
    # dice_3d = 2*4 / (4 + 8) = 2/3. Every voxel is on its 3D boundary (blocks 2 thick or less).
    # pred->gt all 0; gt->pred: the four slice-1 voxels are one slice away -> [0,0,0,0,1,1,1,1],
    # 95th percentile at index 6.65 -> 1 voxel; with slice spacing 3 mm -> 3 mm.
    gt = np.zeros((3, 4, 4), bool)
    gt[0:2, 1:3, 1:3] = True
    pred = np.zeros_like(gt)
    pred[0, 1:3, 1:3] = True
    row = subject_metrics(pred, gt, spacing_zyx=(3.0, 1.0, 1.0))
    assert row["dice_3d"] == pytest.approx(2 / 3)
    assert row["hd95_3d"] == pytest.approx(1.0)
    assert row["hd95_3d_mm"] == pytest.approx(3.0)
    assert row["volume"] == 8 and row["slices"] == 3
    assert math.isnan(subject_metrics(pred, gt)["hd95_3d_mm"])
    # Single voxels two slices apart: dice 0, hd95 2 voxels, 2 * 5 mm with slice spacing 5.
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, 0, 0] = b[2, 0, 0] = True
    row = subject_metrics(a, b, spacing_zyx=(5.0, 1.0, 1.0))
    assert (row["dice_3d"], row["hd95_3d"], row["hd95_3d_mm"]) == pytest.approx((0.0, 2.0, 10.0))


# ---------------------------------------------------------------------------------------------
# Agreement with MONAI


def _random_masks(seed, shape, count):
    """Blob-like masks (thresholded smoothed noise) plus a few speckle masks, seeded."""
    rng = np.random.default_rng(seed)
    masks = []
    for index in range(count):
        noise = rng.standard_normal(shape)
        if index % 4 == 3:
            masks.append(noise > 1.5)  # speckle: many tiny components
        else:
            smooth = ndimage.gaussian_filter(noise, sigma=rng.uniform(1.5, 4.0))
            masks.append(smooth > rng.uniform(0.0, 0.15))
    return masks


def _monai(function, pred, gt, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = function(
            torch.from_numpy(pred[None, None].astype(np.float32)),
            torch.from_numpy(gt[None, None].astype(np.float32)),
            include_background=True,
            **kwargs,
        )
    return float(value.reshape(-1)[0])


def test_agrees_with_monai_on_random_2d_masks():
    preds = _random_masks(1, (48, 40), 24)
    gts = _random_masks(2, (48, 40), 24)
    for pred, gt in zip(preds, gts):
        assert pred.any() and gt.any()
        assert dice(pred, gt) == pytest.approx(_monai(compute_dice, pred, gt, ignore_empty=False), abs=1e-6)
        assert iou(pred, gt) == pytest.approx(_monai(compute_iou, pred, gt, ignore_empty=False), abs=1e-6)
        assert hd95(pred, gt) == pytest.approx(_monai(compute_hausdorff_distance, pred, gt, percentile=95), rel=1e-5)
        assert hd95(pred, gt, spacing=(1.5, 0.7)) == pytest.approx(
            _monai(compute_hausdorff_distance, pred, gt, percentile=95, spacing=(1.5, 0.7)), rel=1e-5
        )
        # mIoU = MONAI's per-class IoU over the one-hot (background, tumour) pair, averaged.
        two_class_pred = np.stack([~pred, pred])[None].astype(np.float32)
        two_class_gt = np.stack([~gt, gt])[None].astype(np.float32)
        monai_miou = compute_iou(torch.from_numpy(two_class_pred), torch.from_numpy(two_class_gt), include_background=True).mean()
        assert miou(pred, gt) == pytest.approx(float(monai_miou), abs=1e-6)


def test_agrees_with_monai_on_masks_touching_the_border_and_nested():
    # Masks on the image border (border pixels are boundary) and one mask inside the other.
    gt = np.zeros((20, 20), bool)
    gt[0:12, 0:20] = True
    pred = np.zeros((20, 20), bool)
    pred[3:6, 4:9] = True
    for a, b in ((pred, gt), (gt, pred)):
        assert hd95(a, b) == pytest.approx(_monai(compute_hausdorff_distance, a, b, percentile=95), rel=1e-5)


def test_agrees_with_monai_on_empty_masks():
    empty = np.zeros((16, 16), bool)
    full = _random_masks(3, (16, 16), 1)[0]
    assert full.any()
    for pred, gt in ((empty, empty), (empty, full), (full, empty)):
        assert dice(pred, gt) == _monai(compute_dice, pred, gt, ignore_empty=False)
        assert iou(pred, gt) == _monai(compute_iou, pred, gt, ignore_empty=False)
    # One side empty: both call the distance undefined (NaN).
    for pred, gt in ((empty, full), (full, empty)):
        assert math.isnan(hd95(pred, gt))
        assert math.isnan(_monai(compute_hausdorff_distance, pred, gt, percentile=95))
    # Both empty: MONAI returns NaN too; our written convention is 0 (a perfect empty prediction).
    assert hd95(empty, empty) == 0.0


def test_subject_metrics_agree_with_monai_in_3d():
    rng = np.random.default_rng(4)
    gt = ndimage.gaussian_filter(rng.standard_normal((8, 24, 24)), 2.0) > 0.05
    pred = ndimage.gaussian_filter(rng.standard_normal((8, 24, 24)), 2.0) > 0.05
    spacing = (4.0, 0.9, 0.9)
    row = subject_metrics(pred, gt, spacing_zyx=spacing)
    assert row["dice_3d"] == pytest.approx(_monai(compute_dice, pred, gt, ignore_empty=False), abs=1e-6)
    assert row["hd95_3d"] == pytest.approx(_monai(compute_hausdorff_distance, pred, gt, percentile=95), rel=1e-5)
    assert row["hd95_3d_mm"] == pytest.approx(
        _monai(compute_hausdorff_distance, pred, gt, percentile=95, spacing=spacing), rel=1e-5
    )


def test_fast_enough_for_thousands_of_images():
    # 200 realistic 256x256 pairs (a lesion and a shifted, dilated prediction).
    yy, xx = np.mgrid[:256, :256]
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(200):
        cy, cx, r = rng.integers(60, 200), rng.integers(60, 200), rng.integers(8, 40)
        gt = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        pred = (yy - cy - rng.integers(-5, 6)) ** 2 + (xx - cx) ** 2 < (r + rng.integers(-4, 5)) ** 2
        pairs.append((pred, gt))
    start = time.perf_counter()
    for pred, gt in pairs:
        image_metrics(pred, gt, spacing=(1.0, 1.0))
    per_image = (time.perf_counter() - start) / len(pairs)
    # Measured ~3 ms per image (with the mm pass) on the 2-core dev machine (MONAI's batched torch
    # path: ~10 ms). 20 ms leaves room for a busy CI machine and still catches a regression to
    # per-pixel Python loops or full-image distance work done many times over.
    assert per_image < 0.020
