"""Preprocessing against hand computations: normalisation, channel strategies, slicing, splits, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from study.data.channels import (
    compose_image,
    grey_channels,
    pca_channels,
    repeat_channels,
    resolve_channels,
    stack_channels,
)
from study.data.intensity import hounsfield_window, normalise_channels, percentile_clip, rgb_passthrough
from study.data.slicing import reorient, reorient_mask, select_slices
from study.data.splits import split_counts, split_subjects
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

MRI = ("flair", "t1", "t1gd", "t2w")


# --- intensity ---------------------------------------------------------------------------------


def reference_percentile(values: np.ndarray, q: float) -> float:
    """The linear-interpolation percentile (numpy's default definition), written out by hand."""
    ordered = np.sort(values.ravel())
    rank = q / 100 * (len(ordered) - 1)
    below = int(np.floor(rank))
    above = min(below + 1, len(ordered) - 1)
    return float(ordered[below] + (rank - below) * (ordered[above] - ordered[below]))


def test_percentile_clip_uses_brain_voxels_and_keeps_background_zero():
    rng = np.random.default_rng(0)
    volume = np.zeros((4, 20, 20), np.float32)
    volume[:, 5:15, 5:15] = rng.gamma(2.0, 100.0, size=(4, 10, 10)) + 1  # the "brain", all > 0
    volume[0, 6, 6] = 1e6  # an outlier the 99.5th percentile clips
    out = percentile_clip(volume, (0.5, 99.5))

    brain = volume[volume != 0]
    low, high = reference_percentile(brain, 0.5), reference_percentile(brain, 99.5)
    expected = np.zeros(volume.shape)
    inside = volume != 0
    expected[inside] = np.round((np.clip(volume[inside], low, high) - low) / (high - low) * 255)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1  # rounding at exact .5 may differ
    assert (out[~inside] == 0).all()
    assert out[0, 6, 6] == 255 and out.max() == 255
    # Over all voxels instead, the 0.5th percentile would be the zero background: not what we do.
    assert low > 1 and reference_percentile(volume, 0.5) == 0


def test_percentile_clip_of_an_empty_modality_is_zero():
    assert (percentile_clip(np.zeros((2, 3, 3)), (0.5, 99.5)) == 0).all()


def test_hounsfield_window_maps_linearly_and_clips():
    hu = np.array([-1000.0, -100.0, 0.0, 100.0, 300.0, 3000.0])
    out = hounsfield_window(hu, (-100.0, 300.0))
    # (hu + 100) / 400 * 255: 0 -> 63.75 -> 64, 100 -> 127.5 -> 128 (round half to even)
    assert out.tolist() == [0, 0, 64, 128, 255, 255]


def test_rgb_passes_through_and_normalise_channels_picks_the_rule_by_kind():
    assert rgb_passthrough(np.array([-3.0, 12.4, 254.6, 300.0])).tolist() == [0, 12, 255, 255]
    channels = {"ct": np.array([[[-175.0, 250.0]]]), "other": np.array([[[1.0, 2.0]]])}
    out = normalise_channels(channels, "ct", names=("ct",), window=(-175.0, 250.0))
    assert list(out) == ["ct"] and out["ct"].tolist() == [[[0, 255]]]


# --- channel strategies --------------------------------------------------------------------------


def random_planes(count: int, seed: int = 0, shape=(12, 10)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=shape)
    # correlated modalities, like MRI contrasts of the same anatomy
    return [np.clip(base * rng.uniform(0.3, 1.0) + rng.integers(0, 60, size=shape), 0, 255).astype(np.uint8)
            for _ in range(count)]


def test_stack_repeat_grey_against_numpy():
    a, b, c = random_planes(3)
    stacked = stack_channels([a, b, c])
    assert stacked.shape == (12, 10, 3) and stacked.dtype == np.uint8
    assert (stacked[..., 0] == a).all() and (stacked[..., 1] == b).all() and (stacked[..., 2] == c).all()
    repeated = repeat_channels([b])
    assert all((repeated[..., i] == b).all() for i in range(3))
    grey = grey_channels([a, b, c])
    expected = np.round((a.astype(float) + b + c) / 3)
    assert all((grey[..., i] == expected).all() for i in range(3))
    assert (compose_image("grey", [a, b, c]) == grey).all()


def reference_pca(planes: list[np.ndarray]) -> np.ndarray:
    """PCA by SVD of the centred pixel matrix (a second implementation), same sign rule and scaling."""
    x = np.stack([p.ravel().astype(float) for p in planes], axis=1)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = []
    for axis in vt[:3]:
        if axis[np.argmax(np.abs(axis))] < 0:
            axis = -axis
        score = x @ axis
        out.append(np.round((score - score.min()) / (score.max() - score.min()) * 255))
    return np.stack(out, axis=-1).reshape(*planes[0].shape, 3)


@pytest.mark.parametrize("count", [3, 4])
def test_pca_against_an_svd_reference(count):
    planes = random_planes(count, seed=count)
    out = pca_channels(planes)
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    assert np.abs(out.astype(int) - reference_pca(planes)).max() <= 1
    for c in range(3):  # each component spans the whole range
        assert out[..., c].min() == 0 and out[..., c].max() == 255


def test_pca_sign_keeps_a_bright_square_bright_and_flat_slices_black():
    square = np.zeros((10, 10), np.uint8)
    square[3:7, 3:7] = 200
    planes = [square, (square * 0.8).astype(np.uint8), (square * 0.5).astype(np.uint8), square]
    out = pca_channels(planes)
    assert (out[3:7, 3:7, 0] == 255).all() and (out[0, 0, 0] == 0)
    # one direction of variance only: the second and third components are flat -> 0
    assert (out[..., 1:] == 0).all()
    assert (pca_channels([np.zeros((5, 5), np.uint8)] * 4) == 0).all()


def test_resolve_channels_defaults_and_errors():
    defaults = dict(available=MRI, default_strategy="stack", default_modalities=("flair", "t1gd", "t2w"),
                    dataset="msd_brain")
    assert resolve_channels(None, None, **defaults) == ("stack", ("flair", "t1gd", "t2w"))
    assert resolve_channels("repeat", None, **defaults) == ("repeat", ("t1gd",))
    assert resolve_channels("repeat", ["T2W", "flair"], **defaults) == ("repeat", ("t2w",))
    assert resolve_channels("pca", None, **defaults) == ("pca", MRI)
    assert resolve_channels("stack", ["t2w", "t1ce", "flair"], **defaults) == ("stack", ("t2w", "t1gd", "flair"))
    assert resolve_channels("grey", ["t1", "t2w"], **defaults) == ("grey", ("t1", "t2w"))
    with pytest.raises(UserError, match=r"'dwi'.*flair, t1, t1gd, t2w"):
        resolve_channels("stack", ["flair", "dwi", "t2w"], **defaults)
    with pytest.raises(UserError, match="exactly three"):
        resolve_channels("stack", ["flair", "t2w"], **defaults)
    with pytest.raises(UserError, match="at least three"):
        resolve_channels("pca", ["flair", "t2w"], **defaults)
    ct = dict(available=("ct",), default_strategy="grey", default_modalities=("ct",), dataset="btcv")
    assert resolve_channels(None, None, **ct) == ("grey", ("ct",))
    assert resolve_channels("repeat", None, **ct) == ("repeat", ("ct",))
    with pytest.raises(UserError, match="exactly three"):
        resolve_channels("stack", None, **ct)


# --- slicing ----------------------------------------------------------------------------------


def label_volume() -> np.ndarray:
    """8 axial slices of 12x12 whose target areas are, by construction, 0 3 10 0 25 0 9 100."""
    mask = np.zeros((8, 12, 12), bool)
    mask[1, 0, :3] = True  # 3
    mask[2, 2, :10] = True  # 10
    mask[4, :5, :5] = True  # 25
    mask[6, 4:7, 4:7] = True  # 9
    mask[7, :10, :10] = True  # 100
    return mask


def test_select_slices_by_min_area_and_keep_empty():
    areas = label_volume().sum(axis=(1, 2))
    assert areas.tolist() == [0, 3, 10, 0, 25, 0, 9, 100]
    rng = np.random.default_rng(0)
    assert select_slices(areas, 10, 0, rng) == [2, 4, 7]  # 3 and 9 are under 10: dropped
    assert select_slices(areas, 0, 0, rng) == [1, 2, 4, 6, 7]  # min_area 0 still needs 1 pixel
    assert select_slices(areas, 250, 0, rng) == []
    kept = select_slices(areas, 10, 2, np.random.default_rng(1))
    assert len(kept) == 5 and kept == sorted(kept)
    assert set(kept) - {2, 4, 7} <= {0, 3, 5} and len(set(kept) - {2, 4, 7}) == 2
    assert select_slices(areas, 10, 2, np.random.default_rng(1)) == kept  # seeded
    assert select_slices(areas, 10, 99, rng) == [0, 2, 3, 4, 5, 7]  # all empties, never 1 or 6


def make_volume(volumetric=True) -> Volume:
    mask = label_volume()
    flair = np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    return Volume("S1", {"flair": flair}, mask, [f"S1:z{z:03d}" for z in range(8)], (3.0, 1.0, 2.0), "mri",
                  volumetric)


def test_reorient_coronal_and_sagittal():
    volume = make_volume()
    coronal = reorient(volume, "coronal")
    assert coronal.mask.shape == (12, 8, 12) and coronal.slice_ids[5] == "S1:y005"
    assert (coronal.channels["flair"][5] == volume.channels["flair"][:, 5, :]).all()
    assert coronal.spacing == (1.0, 3.0, 2.0)
    sagittal = reorient(volume, "sagittal")
    assert sagittal.mask.shape == (12, 8, 12) and sagittal.slice_ids[7] == "S1:x007"
    assert (sagittal.mask[7] == volume.mask[:, :, 7]).all() and sagittal.spacing == (2.0, 3.0, 1.0)
    assert reorient(volume, "axial") is volume
    mask, ids = reorient_mask(volume.mask, volume.slice_ids, "S1", "sagittal", True)
    assert ids[0] == "S1:x000" and (mask == sagittal.mask).all()
    with pytest.raises(UserError, match="stack of 2D images"):
        reorient(make_volume(volumetric=False), "coronal")


# --- splits -----------------------------------------------------------------------------------


def entries(names, split=None):
    return [SubjectEntry(name, (), split) for name in names]


def test_split_counts_rounding():
    assert split_counts(8, 0.1, 0.2) == (1, 2)  # 0.8 -> 1, 1.6 -> 2
    assert split_counts(10, 0.25, 0.25) == (3, 3)  # 2.5 rounds half up
    assert split_counts(4, 0.1, 0.2) == (1, 1)  # a non-zero fraction gets at least one subject
    assert split_counts(2, 0.1, 0.2) == (0, 1)  # one must stay in train; val gives up on a tie
    assert split_counts(1, 0.1, 0.2) == (0, 0)
    assert split_counts(5, 0.0, 0.2) == (0, 1)


def test_split_subjects_seeded_and_by_subject():
    names = [f"P{i:02d}" for i in range(20)]
    split = split_subjects(entries(names), 0.1, 0.2, seed=3)
    assert sorted(split) == names
    counts = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 2, "test": 4}
    assert split_subjects(entries(reversed(names)), 0.1, 0.2, seed=3) == split  # order does not matter
    assert split_subjects(entries(names), 0.1, 0.2, seed=4) != split
    # several entries of one subject (e.g. one per file) still give the subject one split
    doubled = split_subjects(entries(names) + entries(names[:5]), 0.1, 0.2, seed=3)
    assert doubled == split


def test_own_split_folders_win_and_val_is_carved_from_train():
    own = entries(["a", "b", "c"], "train") + entries(["d"], "valid") + entries(["e", "f"], "test")
    assert split_subjects(own, 0.5, 0.5, seed=0) == {"a": "train", "b": "train", "c": "train", "d": "val",
                                                     "e": "test", "f": "test"}
    train_test = entries([f"t{i}" for i in range(10)], "train") + entries(["x", "y"], "test")
    split = split_subjects(train_test, 0.2, 0.3, seed=0)
    assert split["x"] == split["y"] == "test"
    assert sum(v == "val" for v in split.values()) == 2  # 0.2 of the 10 training subjects
    assert sum(v == "test" for v in split.values()) == 2  # no test carved: the folder exists
    with pytest.raises(UserError, match="both the train and the test"):
        split_subjects(entries(["a"], "train") + entries(["a"], "test"), 0.1, 0.2, seed=0)


# --- augmentation -----------------------------------------------------------------------------


def bright_square(size=64):
    image = np.full((size, size, 3), 20, np.uint8)
    image[20:40, 24:44] = 220
    mask = np.zeros((size, size), bool)
    mask[20:40, 24:44] = True
    return image, mask


def test_augmented_views_differ_and_keep_image_and_mask_aligned():
    from study.data.augment import augment_view, view_seed

    image, mask = bright_square()
    seen = []
    for view in (1, 2, 3):
        out_image, out_mask = augment_view(image, mask, view_seed(0, "S1", 5, view), rotate_deg=20, elastic=True)
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape and out_mask.dtype == bool
        assert (out_image != image).any() and (out_mask != mask).any()
        bright = out_image[..., 0] > 120
        overlap = (bright & out_mask).sum() / (bright | out_mask).sum()
        assert overlap > 0.9, overlap
        assert abs(int(out_mask.sum()) - int(mask.sum())) < 0.25 * mask.sum()
        seen.append(out_image)
    assert not (seen[0] == seen[1]).all()
    again, again_mask = augment_view(image, mask, view_seed(0, "S1", 5, 1), rotate_deg=20, elastic=True)
    assert (again == seen[0]).all()


def test_pixels_moved_in_from_outside_take_the_background_colour():
    from study.data.augment import augment_view

    image, mask = bright_square()
    image[:] = (30, 120, 140)  # a pca-like coloured background
    image[20:40, 24:44] = (250, 10, 10)
    out, out_mask = augment_view(image, mask, 7, rotate_deg=30, elastic=True)
    outside = ~binary_dilation(out_mask, iterations=2)  # away from the square's interpolated edge
    assert (np.abs(out[outside].astype(int) - (30, 120, 140)) <= 1).all()  # no black corners


def test_flip_and_intensity_shift_touch_what_they_should():
    from study.data.augment import augment_view

    image, mask = bright_square()
    image[0, 0] = 200  # breaks the left-right symmetry
    flipped = [augment_view(image, mask, seed, rotate_deg=0, elastic=False, flip=True) for seed in range(8)]
    flips = [(img == image[:, ::-1]).all() and (m == mask[:, ::-1]).all() for img, m in flipped]
    sames = [(img == image).all() and (m == mask).all() for img, m in flipped]
    assert all(f or s for f, s in zip(flips, sames)) and any(flips) and any(sames)
    grey = np.full((16, 16, 3), 128, np.uint8)
    grey_mask = np.zeros((16, 16), bool)
    grey_mask[4:9, 4:9] = True
    shifted, shifted_mask = augment_view(grey, grey_mask, 1, rotate_deg=0, elastic=False, intensity=0.2)
    assert (shifted_mask == grey_mask).all()  # the intensity shift leaves the mask alone
    offset = shifted.astype(int) - 128
    assert offset.min() == offset.max() != 0 and abs(offset[0, 0, 0]) <= 51  # one offset within 0.2*255
