"""Metrics: hand-computed cases, then agreement with MONAI on seeded random and empty masks."""

import math
import time
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice
from scipy import ndimage

from trainables.metrics import (
    dice,
    hd95,
    hd95_penalty,
    image_metrics,
    iou,
    miou,
    subject_metrics,
    surface_dice,
    target_area,
)


def _mask(shape, *pixels_or_slices):
    mask = np.zeros(shape, dtype=bool)
    for index in pixels_or_slices:
        mask[index] = True
    return mask


# Each case: pred, gt, and dice, iou, miou, hd95, NSD at a tolerance of 1 pixel worked out by hand.
HAND_CASES = {
    # pred: 2x2 block rows 0-1, cols 0-1 (4 px); gt: 2x3 block rows 0-1, cols 0-2 (6 px); 4x4 image.
    # |P∩G| = 4, |P∪G| = 6 -> dice 8/10, iou 4/6. Background: |~P∩~G| = 16-6 = 10,
    # |~P∪~G| = 16-4 = 12 -> bg iou 10/12; miou = (4/6 + 10/12)/2 = 0.75.
    # Boundaries: a 2-row block erodes to nothing, so every pixel is boundary. P->G distances all 0;
    # G->P: (0,2) and (1,2) are 1 away, the rest 0 -> sorted [0,0,0,0,1,1]; the 95th percentile
    # (linear) sits at index 0.95*5 = 4.75, between 1 and 1 -> 1. hd95 = max(0, 1) = 1.
    # NSD at 1 px: all 4 + 6 boundary pixels are within 1 of the other boundary -> 10/10.
    "overlapping_blocks": (
        _mask((4, 4), np.s_[0:2, 0:2]),
        _mask((4, 4), np.s_[0:2, 0:3]),
        0.8, 4 / 6, 0.75, 1.0, 1.0,
    ),
    # Single pixels at (0,0) and (3,4) in 5x5: no overlap -> dice 0, iou 0. Background:
    # |~P∩~G| = 23, |~P∪~G| = 25 -> 0.92; miou = 0.46. Distance sqrt(3²+4²) = 5 both ways,
    # so neither boundary pixel is within 1 px -> NSD 0/2.
    "distant_pixels": (
        _mask((5, 5), (0, 0)),
        _mask((5, 5), (3, 4)),
        0.0, 0.0, 0.46, 5.0, 0.0,
    ),
    # gt: row 0, cols 0-9 (10 px) in 8x10; pred: the same line plus an outlier pixel at (5,0).
    # |P|=11, |G|=10, |P∩G|=10 -> dice 20/21, iou 10/11; background |~P∩~G|=69, |~P∪~G|=70.
    # P->G distances: ten 0s and 5 (outlier to (0,0)); 95th percentile at index 0.95*10 = 9.5,
    # halfway between 0 and 5 -> 2.5. G->P all 0. hd95 = 2.5 while the plain Hausdorff is 5.
    # NSD at 1 px: 11 pred + 10 gt boundary pixels, all but the outlier within 1 -> 20/21.
    "line_with_outlier": (
        _mask((8, 10), np.s_[0, 0:10], (5, 0)),
        _mask((8, 10), np.s_[0, 0:10]),
        20 / 21, 10 / 11, (10 / 11 + 69 / 70) / 2, 2.5, 20 / 21,
    ),
    # Both empty: the prediction is right -> dice 1, iou 1, miou (1 + 1)/2 = 1, hd95 0, NSD 1.
    "both_empty": (_mask((4, 4)), _mask((4, 4)), 1.0, 1.0, 1.0, 0.0, 1.0),
    # Empty prediction, 2x2 gt in 4x4: dice 0, iou 0; background ~P = 16 px, ~G = 12 px,
    # bg iou 12/16 -> miou 0.375; hd95 is the penalty, the 4x4 diagonal sqrt(4² + 4²); NSD 0.
    "empty_prediction": (
        _mask((4, 4)),
        _mask((4, 4), np.s_[1:3, 1:3]),
        0.0, 0.0, 0.375, math.sqrt(32), 0.0,
    ),
    # Prediction where the truth is empty: dice 0, iou 0; bg iou 12/16; hd95 sqrt(32); NSD 0.
    "empty_truth": (
        _mask((4, 4), np.s_[1:3, 1:3]),
        _mask((4, 4)),
        0.0, 0.0, 0.375, math.sqrt(32), 0.0,
    ),
    # Identical masks: all perfect, hd95 0, NSD 1.
    "identical": (
        _mask((6, 6), np.s_[1:5, 2:4]),
        _mask((6, 6), np.s_[1:5, 2:4]),
        1.0, 1.0, 1.0, 0.0, 1.0,
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_computed_cases(name):
    pred, gt, want_dice, want_iou, want_miou, want_hd95, want_nsd = HAND_CASES[name]
    assert dice(pred, gt) == pytest.approx(want_dice)
    assert iou(pred, gt) == pytest.approx(want_iou)
    assert miou(pred, gt) == pytest.approx(want_miou)
    assert hd95(pred, gt) == pytest.approx(want_hd95)
    assert surface_dice(pred, gt, tolerance=1.0) == pytest.approx(want_nsd)


def test_hd95_in_millimetres_scales_each_axis():
    pred, gt = HAND_CASES["overlapping_blocks"][:2]
    # The only non-zero distance is one column step: with column spacing 3 mm it is 3 mm.
    assert hd95(pred, gt, spacing=(2.0, 3.0)) == pytest.approx(3.0)
    pred, gt = HAND_CASES["distant_pixels"][:2]
    # Offset (3 rows, 4 cols) with spacing (2, 0.5) mm -> sqrt(6² + 2²) = sqrt(40).
    assert hd95(pred, gt, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(40))


def test_image_metrics_row():
    pred, gt = HAND_CASES["overlapping_blocks"][:2]
    row = image_metrics(pred, gt, spacing=(2.0, 3.0), nsd_tolerance=2.0)
    assert set(row) == {"dice", "iou", "miou", "hd95", "hd95_mm", "hd95_penalised", "nsd", "area"}
    # NSD at 2 mm: the two gt pixels one column (3 mm) from the prediction fall outside -> 8/10.
    assert {k: v for k, v in row.items() if k != "hd95_penalised"} == pytest.approx(
        {"dice": 0.8, "iou": 4 / 6, "miou": 0.75, "hd95": 1.0, "hd95_mm": 3.0, "nsd": 0.8, "area": 6}
    )
    assert row["hd95_penalised"] is False
    # Without spacing the tolerance is 2 pixels, and every boundary pixel is within 1 pixel.
    no_spacing = image_metrics(pred, gt)
    assert math.isnan(no_spacing["hd95_mm"]) and no_spacing["hd95"] == 1.0 and no_spacing["nsd"] == 1.0
    assert target_area(gt) == 6 and isinstance(row["area"], int)


# Each case: shape, spacing (None = pixels) and the diagonal penalty worked out by hand.
PENALTY_CASES = {
    "2d_pixels": ((30, 40), None, 50.0),  # sqrt(30² + 40²)
    "2d_mm": ((6, 16), (0.5, 0.25), 5.0),  # sqrt((6*0.5)² + (16*0.25)²) = sqrt(3² + 4²)
    "3d_voxels": ((4, 10, 5), None, math.sqrt(141)),  # sqrt(16 + 100 + 25)
    "3d_mm": ((4, 10, 5), (2.5, 0.8, 1.2), math.sqrt(200)),  # sqrt(10² + 8² + 6²)
}


@pytest.mark.parametrize("name", sorted(PENALTY_CASES))
def test_hd95_penalty_is_the_diagonal(name):
    shape, spacing, want = PENALTY_CASES[name]
    assert hd95_penalty(shape, spacing) == pytest.approx(want)


def test_hd95_penalty_when_exactly_one_mask_is_empty():
    empty = _mask((6, 16))
    lesion = _mask((6, 16), np.s_[2:4, 5:9])
    for pred, gt in ((empty, lesion), (lesion, empty)):
        assert hd95(pred, gt) == pytest.approx(math.sqrt(6**2 + 16**2))
        assert hd95(pred, gt, spacing=(0.5, 0.25)) == pytest.approx(5.0)
        row = image_metrics(pred, gt, spacing=(0.5, 0.25))
        assert row["hd95_penalised"] is True
        assert (row["hd95"], row["hd95_mm"], row["nsd"]) == pytest.approx((math.sqrt(292), 5.0, 0.0))
        assert math.isnan(image_metrics(pred, gt)["hd95_mm"])
    # Both empty is a perfect prediction, not a penalty.
    row = image_metrics(empty, empty, spacing=(0.5, 0.25))
    assert row["hd95_penalised"] is False
    assert (row["hd95"], row["hd95_mm"], row["nsd"]) == (0.0, 0.0, 1.0)
    # The penalty exceeds any measured distance: single pixels in opposite corners.
    corners = image_metrics(_mask((6, 16), (0, 0)), _mask((6, 16), (5, 15)))
    assert corners["hd95"] == pytest.approx(math.sqrt(5**2 + 15**2)) and corners["hd95"] < math.sqrt(292)


# 3x3 squares in a 7x7 image; the truth at rows 1-3, cols 1-3. Each boundary is the 8-pixel ring
# (the centre is interior).
_SQUARE = _mask((7, 7), np.s_[1:4, 1:4])
# Each case: pred, spacing, tolerance, NSD counted by hand.
NSD_CASES = {
    # pred shifted one column right (cols 2-4): four ring pixels of each lie on the other ring
    # (distance 0), the other four are one column away (distance 1). 0 px: 8/16; 1 px: 16/16.
    "shift_col_tol0": (_mask((7, 7), np.s_[1:4, 2:5]), None, 0.0, 0.5),
    "shift_col_tol1": (_mask((7, 7), np.s_[1:4, 2:5]), None, 1.0, 1.0),
    # The same shift with 1.5 mm columns: of each ring's four off-ring pixels, one is a row step
    # (1 mm) from the other ring (pred (2,2) above truth (1,2); truth (2,3) below pred (1,3)), the
    # other three a column step (1.5 mm). 1 mm: (4 + 1) * 2 / 16; 1.5 mm: 16/16.
    "shift_col_mm_tol1": (_mask((7, 7), np.s_[1:4, 2:5]), (1.0, 1.5), 1.0, 0.625),
    "shift_col_mm_tol1.5": (_mask((7, 7), np.s_[1:4, 2:5]), (1.0, 1.5), 1.5, 1.0),
    # pred shifted one row and one column (rows 2-4, cols 2-4). pred ring -> truth ring:
    # (2,3), (3,2) on it: 0; (2,2), (2,4), (3,4), (4,2), (4,3): 1; (4,4) diagonal to (3,3): sqrt 2.
    # By symmetry the truth ring gives the same. So 4 zeros, 10 ones, 2 sqrt 2 of 16:
    # 0 px -> 4/16, 1 px -> 14/16, 1.5 px -> 16/16.
    "shift_diag_tol0": (_mask((7, 7), np.s_[2:5, 2:5]), None, 0.0, 0.25),
    "shift_diag_tol1": (_mask((7, 7), np.s_[2:5, 2:5]), None, 1.0, 0.875),
    "shift_diag_tol1.5": (_mask((7, 7), np.s_[2:5, 2:5]), None, 1.5, 1.0),
    # Single pixels three rows apart with 0.8 mm rows: 3 * 0.8 = 2.4000000000000004 in float64,
    # 2.4 in float32 as MONAI compares, so a 2.4 mm tolerance includes both -> 1.0.
    "float32_tie": (_mask((7, 7), (4, 1)), (0.8, 1.0), 2.4, 1.0),
}


@pytest.mark.parametrize("name", sorted(NSD_CASES))
def test_surface_dice_hand_computed(name):
    pred, spacing, tolerance, want = NSD_CASES[name]
    gt = _mask((7, 7), (1, 1)) if name == "float32_tie" else _SQUARE
    assert surface_dice(pred, gt, tolerance, spacing=spacing) == pytest.approx(want)
    assert surface_dice(gt, pred, tolerance, spacing=spacing) == pytest.approx(want)
    assert surface_dice(pred, gt, tolerance, spacing=spacing) == pytest.approx(
        _monai_nsd(pred, gt, tolerance, spacing), abs=1e-6
    )


def test_surface_dice_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(_SQUARE, _SQUARE, -1.0)
    with pytest.raises(ValueError, match="spacing"):
        surface_dice(_SQUARE, _SQUARE, 1.0, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="2D or 3D"):
        surface_dice(np.ones(5, bool), np.ones(5, bool), 1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="original resolution"):
        dice(np.zeros((4, 4), bool), np.zeros((8, 8), bool))


def test_subject_metrics_hand_computed():
    # gt: a 2x2 block on slices 0 and 1 (8 voxels); pred: the block on slice 0 only (4 voxels).
    # dice_3d = 2*4 / (4 + 8) = 2/3. Every voxel is on its 3D boundary (blocks 2 thick or less).
    # pred->gt all 0; gt->pred: the four slice-1 voxels are one slice away -> [0,0,0,0,1,1,1,1],
    # 95th percentile at index 6.65 -> 1 voxel; with slice spacing 3 mm -> 3 mm.
    # NSD at 2 mm: 4 pred + 4 gt voxels at 0, the 4 at 3 mm outside -> 8/12; at 2 voxels: 12/12.
    gt = np.zeros((3, 4, 4), bool)
    gt[0:2, 1:3, 1:3] = True
    pred = np.zeros_like(gt)
    pred[0, 1:3, 1:3] = True
    row = subject_metrics(pred, gt, spacing_zyx=(3.0, 1.0, 1.0), nsd_tolerance=2.0)
    assert set(row) == {"dice_3d", "hd95_3d", "hd95_3d_mm", "hd95_3d_penalised", "nsd_3d", "voxels", "slices"}
    assert row["dice_3d"] == pytest.approx(2 / 3)
    assert row["hd95_3d"] == pytest.approx(1.0)
    assert row["hd95_3d_mm"] == pytest.approx(3.0)
    assert row["nsd_3d"] == pytest.approx(8 / 12)
    assert row["hd95_3d_penalised"] is False
    assert row["voxels"] == 8 and row["slices"] == 3
    no_spacing = subject_metrics(pred, gt, nsd_tolerance=2.0)
    assert math.isnan(no_spacing["hd95_3d_mm"]) and no_spacing["nsd_3d"] == 1.0
    # Single voxels two slices apart: dice 0, hd95 2 voxels, 2 * 5 mm with slice spacing 5.
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, 0, 0] = b[2, 0, 0] = True
    row = subject_metrics(a, b, spacing_zyx=(5.0, 1.0, 1.0))
    assert (row["dice_3d"], row["hd95_3d"], row["hd95_3d_mm"]) == pytest.approx((0.0, 2.0, 10.0))


def test_subject_metrics_dice_over_a_stack_with_empty_slices():
    # A subject's test slices at their slice index in a (5, 6, 6) stack; slices 0, 2, 4 hold no
    # target and are empty in both. Slice 1: gt 3x3 = 9, pred 2x3 = 6, overlap 6 (slice Dice
    # 12/15 = 0.8). Slice 3: gt 2x2 = 4, pred one voxel inside it (slice Dice 2/5 = 0.4).
    # 3D Dice = 2 (6 + 1) / ((9 + 4) + (6 + 1)) = 14/20 = 0.7, not the slice mean 0.6.
    gt = np.zeros((5, 6, 6), bool)
    pred = np.zeros_like(gt)
    gt[1, 1:4, 1:4] = True
    pred[1, 1:3, 1:4] = True
    gt[3, 2:4, 2:4] = True
    pred[3, 2, 2] = True
    by_hand = 2 * (6 + 1) / ((9 + 4) + (6 + 1))
    assert by_hand == 0.7
    assert by_hand == pytest.approx(2 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum()))
    row = subject_metrics(pred, gt)
    assert row["dice_3d"] == pytest.approx(by_hand)
    assert (row["voxels"], row["slices"]) == (13, 5)
    assert row["hd95_3d_penalised"] is False


def test_one_slice_stack_gives_the_2d_values():
    # A 2D image that is its own subject: the 3D rule would make every pixel of the single slice a
    # boundary voxel; subject_metrics scores it as the 2D image instead.
    yy, xx = np.mgrid[:64, :64]
    gt = (yy - 30) ** 2 + (xx - 30) ** 2 < 15**2
    pred = (yy - 33) ** 2 + (xx - 30) ** 2 < 12**2
    for a, b in ((pred, gt), (np.zeros_like(gt), gt)):
        flat = image_metrics(a, b, spacing=(0.7, 0.9), nsd_tolerance=2.0)
        row = subject_metrics(a[None], b[None], spacing_zyx=(5.0, 0.7, 0.9), nsd_tolerance=2.0)
        assert (row["dice_3d"], row["hd95_3d"], row["hd95_3d_mm"], row["nsd_3d"]) == pytest.approx(
            (flat["dice"], flat["hd95"], flat["hd95_mm"], flat["nsd"])
        )
        assert row["hd95_3d_penalised"] == flat["hd95_penalised"]
        assert (row["voxels"], row["slices"]) == (flat["area"], 1)


def test_subject_metrics_penalty_when_one_stack_is_empty():
    gt = np.zeros((4, 10, 5), bool)
    gt[1:3, 4:6, 2:4] = True
    empty = np.zeros_like(gt)
    for pred, truth in ((empty, gt), (gt, empty)):
        row = subject_metrics(pred, truth, spacing_zyx=(2.5, 0.8, 1.2))
        assert row["hd95_3d_penalised"] is True
        # Volume diagonal: sqrt(4² + 10² + 5²) voxels, sqrt(10² + 8² + 6²) mm.
        assert (row["hd95_3d"], row["hd95_3d_mm"]) == pytest.approx((math.sqrt(141), math.sqrt(200)))
        assert (row["dice_3d"], row["nsd_3d"]) == (0.0, 0.0)
    both = subject_metrics(empty, empty, spacing_zyx=(2.5, 0.8, 1.2))
    assert (both["dice_3d"], both["hd95_3d"], both["hd95_3d_mm"], both["nsd_3d"]) == (1.0, 0.0, 0.0, 1.0)
    assert both["hd95_3d_penalised"] is False and both["voxels"] == 0


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


def _monai_nsd_at(pred, gt, tolerances, spacing=None):
    """MONAI's NSD of one mask pair at several tolerances in one call (one channel per tolerance)."""
    channels = len(tolerances)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            torch.from_numpy(np.repeat(pred[None, None], channels, axis=1).astype(np.float32)),
            torch.from_numpy(np.repeat(gt[None, None], channels, axis=1).astype(np.float32)),
            class_thresholds=list(tolerances),
            include_background=True,
            spacing=spacing,
            use_subvoxels=False,
        )
    return [float(v) for v in value.reshape(-1)]


def _monai_nsd(pred, gt, tolerance, spacing=None):
    return _monai_nsd_at(pred, gt, [tolerance], spacing)[0]


NSD_TOLERANCES = (0.0, 0.8, 1.0, 1.5, 2.0, 2.4, 3.0, 5.0)


def test_surface_dice_agrees_with_monai_on_random_2d_masks():
    preds = _random_masks(6, (48, 40), 16)
    gts = _random_masks(7, (48, 40), 16)
    for pred, gt in zip(preds, gts):
        assert pred.any() and gt.any()
        for spacing in (None, (0.8, 1.2), (2.5, 0.8)):
            ours = [surface_dice(pred, gt, tolerance, spacing=spacing) for tolerance in NSD_TOLERANCES]
            assert ours == pytest.approx(_monai_nsd_at(pred, gt, NSD_TOLERANCES, spacing), abs=1e-6)
        row = image_metrics(pred, gt, spacing=(0.8, 1.2), nsd_tolerance=2.0)
        assert row["nsd"] == pytest.approx(_monai_nsd(pred, gt, 2.0, (0.8, 1.2)), abs=1e-6)


def test_surface_dice_agrees_with_monai_in_3d_with_anisotropic_spacing():
    rng = np.random.default_rng(8)
    spacing = (2.5, 0.8, 1.2)
    for index in range(6):
        shape = (7, 20, 18)
        gt = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.5, 3.0)) > 0.05
        pred = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.5, 3.0)) > 0.05
        if index == 5:
            pred = rng.standard_normal(shape) > 1.5  # speckle
        assert pred.any() and gt.any()
        for sampling in (spacing, None):
            ours = [surface_dice(pred, gt, tolerance, spacing=sampling) for tolerance in NSD_TOLERANCES]
            assert ours == pytest.approx(_monai_nsd_at(pred, gt, NSD_TOLERANCES, sampling), abs=1e-6)
        row = subject_metrics(pred, gt, spacing_zyx=spacing, nsd_tolerance=2.0)
        assert row["nsd_3d"] == pytest.approx(_monai_nsd(pred, gt, 2.0, spacing), abs=1e-6)


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
    # One side empty: MONAI calls the distance undefined (NaN); our written convention is the
    # image-diagonal penalty. NSD is 0 in both.
    for pred, gt in ((empty, full), (full, empty)):
        assert math.isnan(_monai(compute_hausdorff_distance, pred, gt, percentile=95))
        assert hd95(pred, gt) == pytest.approx(hd95_penalty((16, 16))) == pytest.approx(math.sqrt(512))
        assert surface_dice(pred, gt, 2.0) == _monai_nsd(pred, gt, 2.0) == 0.0
    # Both empty: MONAI returns NaN for both; our conventions are HD95 0 and NSD 1 (a perfect
    # empty prediction, as Dice says).
    assert hd95(empty, empty) == 0.0
    assert surface_dice(empty, empty, 2.0) == 1.0
    assert math.isnan(_monai_nsd(empty, empty, 2.0))


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
    # Measured ~3 ms per image (with the mm pass and NSD) on the 2-core dev machine (MONAI's
    # batched torch path: ~10 ms). 20 ms leaves room for a busy CI machine and still catches a regression to
    # per-pixel Python loops or full-image distance work done many times over.
    assert per_image < 0.020
