"""Dataset readers on tiny layouts built by hand, with voxel counts and pixels known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as coco_mask

from study.data.readers import READERS
from study.data.regions import BRAIN_REGIONS, BTCV_ORGANS, normalise_modality
from foundation.errors import UserError

# ---------------------------------------------------------------- builders

SHAPE_XYZ = (6, 5, 4)
ZOOMS = (0.9, 0.8, 2.5)  # x, y, z in mm


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*ZOOMS, 1.0]) if affine is None else affine), path)
    return path


def labels_with_counts(counts: dict[int, int], marker: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """An (X, Y, Z) uint8 label volume holding `counts[value]` voxels of each value.

    `marker` (x, y, z, value) puts one more voxel of `value` at a known place (counted too).
    """
    labels = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    flat = labels.reshape(-1)
    start = 0
    for value, count in counts.items():
        flat[start : start + count] = value
        start += count + 1
    if marker is not None:
        x, y, z, value = marker
        assert labels[x, y, z] == 0
        labels[x, y, z] = value
    return labels


def coded_image(channel: int) -> np.ndarray:
    """(X, Y, Z) float32 whose voxel (x, y, z) holds 1000 c + 100 x + 10 y + z."""
    x, y, z = np.indices(SHAPE_XYZ)
    return (1000 * channel + 100 * x + 10 * y + z).astype(np.float32)


def build_msd(root: Path, subjects=("BRATS_001", "BRATS_002"), counts=None, marker=None) -> Path:
    counts = counts or {1: 7, 2: 5, 3: 3}
    for subject in subjects:
        image = np.stack([coded_image(c) for c in range(4)], axis=-1)
        write_nifti(root / "imagesTr" / f"{subject}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{subject}.nii.gz", labels_with_counts(counts, marker))
    (root / "dataset.json").write_text(
        json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}})
    )
    return root


def build_brats_case(root: Path, case: str, year: str, counts: dict[int, int]) -> Path:
    folder = root / case
    names = {"2021": ("_", ("flair", "t1", "t1ce", "t2")), "2023": ("-", ("t2f", "t1n", "t1c", "t2w"))}[year]
    separator, suffixes = names
    for value, suffix in enumerate(suffixes, start=1):  # flair 1, t1 2, t1gd 3, t2w 4
        write_nifti(folder / f"{case}{separator}{suffix}.nii.gz", np.full(SHAPE_XYZ, value, dtype=np.int16))
    write_nifti(folder / f"{case}{separator}seg.nii.gz", labels_with_counts(counts))
    return folder


def write_picture(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def user_error(call, *fragments: str) -> str:
    """Run `call`, expecting a one-paragraph UserError that contains every fragment."""
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- registry and conventions


def test_registry_names_and_contract():
    assert set(READERS) == {"coco", "msd_brain", "brats", "lgg", "btcv", "folder", "phantom"}
    defaults = {
        "msd_brain": ("mri", ("flair", "t1gd", "t2w"), "stack"),
        "brats": ("mri", ("flair", "t1gd", "t2w"), "stack"),
        "phantom": ("mri", ("flair", "t1gd", "t2w"), "stack"),
        "lgg": ("mri", ("t1", "flair", "t1gd"), "stack"),
        "coco": ("rgb", ("red", "green", "blue"), "stack"),
        "btcv": ("ct", ("ct",), "grey"),
    }
    for name, build in READERS.items():
        reader = build()
        assert reader.name == name
        assert set(reader.default_modalities) <= set(reader.modalities)
        if name in defaults:
            assert (reader.kind, reader.default_modalities, reader.default_strategy) == defaults[name]


def test_modality_names_normalise():
    assert [normalise_modality(n) for n in ("FLAIR", "T1w", "t1gd", "T2w")] == ["flair", "t1", "t1gd", "t2w"]
    assert [normalise_modality(n) for n in ("flair", "t1", "t1ce", "t2")] == ["flair", "t1", "t1gd", "t2w"]
    assert [normalise_modality(n) for n in ("t2f", "t1n", "t1c", "t2w")] == ["flair", "t1", "t1gd", "t2w"]
    user_error(lambda: normalise_modality("dwi"), "'dwi'", "t1ce")


@pytest.mark.parametrize("name", ["coco", "msd_brain", "brats", "lgg", "btcv", "folder"])
def test_missing_root_names_it_and_the_layout(name, tmp_path):
    missing = tmp_path / "nowhere"
    message = user_error(lambda: READERS[name]().index(missing), missing, "expects")
    assert "does not exist" in message


# ---------------------------------------------------------------- MSD


def test_msd_region_mapping_orientation_and_channels(tmp_path):
    root = build_msd(tmp_path / "Task01_BrainTumour", marker=(4, 1, 2, 3))
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    write_nifti(root / "imagesTs" / "BRATS_900.nii.gz", np.zeros((*SHAPE_XYZ, 4), np.float32))
    reader = READERS["msd_brain"]()
    entries = reader.index(tmp_path)  # the parent of the task folder works too
    assert [e.subject for e in entries] == ["BRATS_001", "BRATS_002"]
    assert reader.targets(entries) == BRAIN_REGIONS
    # labels: 7 edema, 5 non-enhancing, 3 + 1 (the marker) enhancing
    expected = {"whole_tumor": 16, "tumor_core": 9, "enhancing": 4, "edema": 7, "non_enhancing": 5}
    for region, count in expected.items():
        mask, slice_ids = reader.load_mask(entries[0], region)
        assert mask.dtype == bool and mask.shape == (4, 5, 6)  # (Z, Y, X)
        assert int(mask.sum()) == count, region
    mask, slice_ids = reader.load_mask(entries[0], "enhancing")
    assert mask[2, 1, 4]  # the marker at x=4, y=1, z=2
    assert slice_ids == ["BRATS_001:z000", "BRATS_001:z001", "BRATS_001:z002", "BRATS_001:z003"]
    volume = reader.load(entries[1], "whole_tumor")
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.9))
    assert volume.kind == "mri" and volume.volumetric
    for channel, modality in enumerate(("flair", "t1", "t1gd", "t2w")):
        image = volume.channels[modality]
        assert image.dtype == np.float32 and image.shape == (4, 5, 6)
        assert image[3, 2, 5] == 1000 * channel + 100 * 5 + 10 * 2 + 3  # z=3, y=2, x=5


def test_msd_channel_order_follows_dataset_json(tmp_path):
    root = build_msd(tmp_path, subjects=("BRATS_001",))
    order = {"0": "T1w", "1": "FLAIR", "2": "T2w", "3": "T1gd"}
    (root / "dataset.json").write_text(json.dumps({"modality": order}))
    reader = READERS["msd_brain"]()
    (entry,) = reader.index(root)
    volume = reader.load(entry, "edema")
    assert [float(volume.channels[m][0, 0, 0]) for m in ("t1", "flair", "t2w", "t1gd")] == [0, 1000, 2000, 3000]
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "DWI"}}))
    user_error(lambda: reader.index(root), root / "dataset.json", "DWI")


def test_float_labels_must_be_whole_numbers(tmp_path):
    root = build_msd(tmp_path, subjects=("BRATS_001",))
    reader = READERS["msd_brain"]()
    (entry,) = reader.index(root)
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", labels_with_counts({1: 3}).astype(np.float32))
    assert int(reader.load_mask(entry, "edema")[0].sum()) == 3  # float but whole: fine
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", labels_with_counts({1: 3}) * np.float32(0.5))
    user_error(lambda: reader.load_mask(entry, "edema"), root / "labelsTr" / "BRATS_001.nii.gz", "non-integer")


def test_msd_errors(tmp_path):
    reader = READERS["msd_brain"]()
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    user_error(lambda: reader.index(empty), "empty", empty / "imagesTr")

    no_labels = build_msd(tmp_path / "no_labels")
    for label in (no_labels / "labelsTr").iterdir():
        label.unlink()
    user_error(lambda: reader.index(no_labels), "Empty label set", no_labels / "labelsTr")

    unpaired = build_msd(tmp_path / "unpaired")
    (unpaired / "labelsTr" / "BRATS_002.nii.gz").unlink()
    user_error(lambda: reader.index(unpaired), unpaired / "imagesTr" / "BRATS_002.nii.gz", "no label")
    orphan = build_msd(tmp_path / "orphan")
    (orphan / "imagesTr" / "BRATS_001.nii.gz").unlink()
    user_error(lambda: reader.index(orphan), orphan / "labelsTr" / "BRATS_001.nii.gz", "no image")

    root = build_msd(tmp_path / "bad")
    entry = {e.subject: e for e in reader.index(root)}
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", np.zeros((6, 5, 3), np.uint8))
    user_error(
        lambda: reader.load_mask(entry["BRATS_001"], "edema"),
        "Shape mismatch",
        root / "labelsTr" / "BRATS_001.nii.gz",
        "(6, 5, 3)",
    )
    shifted = np.diag([*ZOOMS, 1.0])
    shifted[0, 3] = 1.0
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", np.zeros(SHAPE_XYZ, np.uint8), shifted)
    user_error(
        lambda: reader.load_mask(entry["BRATS_001"], "edema"),
        "Affine mismatch",
        root / "labelsTr" / "BRATS_001.nii.gz",
    )
    nearly = np.diag([*ZOOMS, 1.0])
    nearly[0, 3] = 1e-5  # within the tolerance
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", np.zeros(SHAPE_XYZ, np.uint8), nearly)
    assert not reader.load_mask(entry["BRATS_001"], "edema")[0].any()
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", labels_with_counts({1: 2, 5: 1}))
    user_error(
        lambda: reader.load_mask(entry["BRATS_001"], "edema"), root / "labelsTr" / "BRATS_001.nii.gz", "[5]"
    )

    truncate(root / "imagesTr" / "BRATS_002.nii.gz")
    user_error(
        lambda: reader.load(entry["BRATS_002"], "edema"),
        root / "imagesTr" / "BRATS_002.nii.gz",
        "Download it again",
    )
    (root / "labelsTr" / "BRATS_002.nii.gz").write_bytes(b"\x00garbage" * 50)
    user_error(
        lambda: reader.load_mask(entry["BRATS_002"], "edema"),
        root / "labelsTr" / "BRATS_002.nii.gz",
        "corrupt",
    )
    truncated_label = build_msd(tmp_path / "truncated_label", subjects=("BRATS_003",))
    (entry3,) = reader.index(truncated_label)
    truncate(truncated_label / "labelsTr" / "BRATS_003.nii.gz")
    user_error(
        lambda: reader.load_mask(entry3, "edema"),
        truncated_label / "labelsTr" / "BRATS_003.nii.gz",
        "truncated",
    )

    message = user_error(lambda: reader.load_mask(entry3, "whole_tumour"), "'whole_tumour'")
    assert all(region in message for region in BRAIN_REGIONS)


# ---------------------------------------------------------------- BraTS


BRATS2021_COUNTS = {1: 4, 2: 6, 4: 2}  # NCR 4, ED 6, ET 2
BRATS2023_COUNTS = {1: 4, 2: 6, 3: 2}  # NETC 4, SNFH 6, ET 2
BRATS_EXPECTED = {"whole_tumor": 12, "tumor_core": 6, "enhancing": 2, "edema": 6, "non_enhancing": 4}


def test_brats_2021_and_2023_region_mapping(tmp_path):
    build_brats_case(tmp_path / "train", "BraTS2021_00000", "2021", BRATS2021_COUNTS)
    build_brats_case(tmp_path / "train", "BraTS-GLI-00002-000", "2023", BRATS2023_COUNTS)
    reader = READERS["brats"]()
    entries = {entry.subject: entry for entry in reader.index(tmp_path)}
    assert set(entries) == {"BraTS2021_00000", "BraTS-GLI-00002-000"}
    assert entries["BraTS2021_00000"].extra["convention"] == "2021"
    assert entries["BraTS-GLI-00002-000"].extra["convention"] == "2023"
    assert {entry.split for entry in entries.values()} == {"train"}
    for entry in entries.values():
        for region, count in BRATS_EXPECTED.items():
            assert int(reader.load_mask(entry, region)[0].sum()) == count, (entry.subject, region)
        volume = reader.load(entry, "whole_tumor")
        assert {m: float(volume.channels[m].mean()) for m in ("flair", "t1", "t1gd", "t2w")} == {
            "flair": 1,
            "t1": 2,
            "t1gd": 3,
            "t2w": 4,
        }
        assert volume.slice_ids[1] == f"{entry.subject}:z001" and volume.spacing == pytest.approx(
            (2.5, 0.8, 0.9)
        )


def test_brats_errors(tmp_path):
    reader = READERS["brats"]()
    root = tmp_path / "no_seg"
    folder = build_brats_case(root, "BraTS2021_00001", "2021", BRATS2021_COUNTS)
    (folder / "BraTS2021_00001_seg.nii.gz").unlink()
    user_error(lambda: reader.index(root), folder / "BraTS2021_00001_flair.nii.gz", "no label")

    root = tmp_path / "partial"
    folder = build_brats_case(root, "BraTS-GLI-00001-000", "2023", BRATS2023_COUNTS)
    (folder / "BraTS-GLI-00001-000-t1c.nii.gz").unlink()
    user_error(lambda: reader.index(root), folder, "t1c")

    root = tmp_path / "wrong_year"  # BraTS 2021 names with a 2023 label 3 inside
    build_brats_case(root, "BraTS2021_00002", "2021", BRATS2023_COUNTS)
    (entry,) = reader.index(root)
    user_error(
        lambda: reader.load_mask(entry, "enhancing"),
        root / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz",
        "[3]",
        "2021",
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(lambda: reader.index(empty), "empty", empty)


# ---------------------------------------------------------------- BTCV


def test_btcv_organs_and_hounsfield_units(tmp_path):
    labels = labels_with_counts({6: 5, 1: 2, 11: 1})  # liver 5, spleen 2, pancreas 1
    hounsfield = np.linspace(-1000, 500, num=np.prod(SHAPE_XYZ), dtype=np.float32).reshape(SHAPE_XYZ)
    split = tmp_path / "split"
    write_nifti(split / "imagesTr" / "img0001.nii.gz", hounsfield)
    write_nifti(split / "labelsTr" / "label0001.nii.gz", labels)
    side = tmp_path / "side"
    write_nifti(side / "img0002.nii.gz", hounsfield)
    write_nifti(side / "label0002.nii.gz", labels)
    reader = READERS["btcv"]()
    for root, subject in ((split, "img0001"), (side, "img0002")):
        (entry,) = reader.index(root)
        assert entry.subject == subject
        counts = {
            target: int(reader.load_mask(entry, target)[0].sum())
            for target in ("liver", "spleen", "pancreas", "aorta", "all")
        }
        assert counts == {"liver": 5, "spleen": 2, "pancreas": 1, "aorta": 0, "all": 8}
    targets = reader.targets([entry])
    assert targets[0] == "all" and set(targets[1:]) == set(BTCV_ORGANS) and len(BTCV_ORGANS) == 13
    volume = reader.load(entry, "liver")
    assert volume.kind == "ct" and list(volume.channels) == ["ct"]
    assert volume.channels["ct"].min() == -1000 and volume.channels["ct"].max() == 500
    assert volume.channels["ct"][3, 4, 5] == hounsfield[5, 4, 3]
    user_error(lambda: reader.load_mask(entry, "kidney"), "'kidney'", "left_kidney", "liver")
    write_nifti(side / "img0003.nii.gz", hounsfield)
    user_error(lambda: reader.index(side), side / "img0003.nii.gz", "no label")
    (side / "label0002.nii.gz").unlink()
    user_error(lambda: reader.index(side), "Empty label set", side)


# ---------------------------------------------------------------- LGG


def build_lgg_patient(root: Path, patient: str, numbers=(1, 2, 10)) -> Path:
    folder = root / "kaggle_3m" / patient
    for n in numbers:
        image = np.zeros((8, 9, 3), dtype=np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = n, n + 100, n + 200
        mask = np.zeros((8, 9), dtype=np.uint8)
        mask.reshape(-1)[:n] = 255  # n tumour pixels on slice n
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"{patient}_{n}.tif", image)
        tifffile.imwrite(folder / f"{patient}_{n}_mask.tif", mask)
    return folder


def test_lgg_slices_in_numeric_order_with_named_channels(tmp_path):
    build_lgg_patient(tmp_path, "TCGA_CS_4941_19960909")
    build_lgg_patient(tmp_path, "TCGA_DU_5851_19950428", numbers=(3,))
    reader = READERS["lgg"]()
    entries = reader.index(tmp_path)
    assert [e.subject for e in entries] == ["TCGA_CS_4941_19960909", "TCGA_DU_5851_19950428"]
    for target in ("whole_tumor", "all"):
        mask, slice_ids = reader.load_mask(entries[0], target)
        assert slice_ids == [f"TCGA_CS_4941_19960909_{n}.tif" for n in (1, 2, 10)]
        assert mask.sum(axis=(1, 2)).tolist() == [1, 2, 10]
    volume = reader.load(entries[0], "whole_tumor")
    assert not volume.volumetric and volume.spacing is None
    assert volume.channels["t1"][:, 0, 0].tolist() == [1, 2, 10]  # pre-contrast
    assert volume.channels["flair"][:, 0, 0].tolist() == [101, 102, 110]
    assert volume.channels["t1gd"][:, 0, 0].tolist() == [201, 202, 210]  # post-contrast
    user_error(lambda: reader.load_mask(entries[0], "edema"), "'edema'", "whole_tumor")


def test_lgg_errors(tmp_path):
    reader = READERS["lgg"]()
    folder = build_lgg_patient(tmp_path / "unpaired", "TCGA_AA_0001_20000101")
    (folder / "TCGA_AA_0001_20000101_2_mask.tif").unlink()
    user_error(lambda: reader.index(tmp_path / "unpaired"), folder / "TCGA_AA_0001_20000101_2.tif", "no mask")
    folder = build_lgg_patient(tmp_path / "broken", "TCGA_AA_0002_20000101")
    (entry,) = reader.index(tmp_path / "broken")
    truncate(folder / "TCGA_AA_0002_20000101_10.tif")
    user_error(
        lambda: reader.load(entry, "all"), folder / "TCGA_AA_0002_20000101_10.tif", "Download it again"
    )


# ---------------------------------------------------------------- COCO


def build_coco(root: Path) -> dict:
    """train: a.png (RGB) with a polygon and an uncompressed RLE, b.png (grey) with a compressed
    RLE; valid: c.png without annotations."""
    height, width = 10, 12
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    write_picture(root / "train" / "a.png", rgb)
    write_picture(root / "train" / "b.png", np.full((height, width), 77, dtype=np.uint8))
    write_picture(root / "valid" / "c.png", rgb)
    b_mask = np.zeros((height, width), dtype=np.uint8, order="F")
    b_mask[6:9, 7:11] = 1
    b_rle = coco_mask.encode(np.asfortranarray(b_mask))
    b_rle["counts"] = b_rle["counts"].decode("ascii")
    categories = [
        {"id": 0, "name": "tumors", "supercategory": "none"},
        {"id": 1, "name": "tumor", "supercategory": "tumors"},
        {"id": 2, "name": "cyst", "supercategory": "tumors"},
    ]
    train = {
        "categories": categories,
        "images": [
            {"id": 0, "file_name": "a.png", "height": height, "width": width},
            {"id": 1, "file_name": "b.png", "height": height, "width": width},
        ],
        "annotations": [
            # rectangle with corners (2, 1) and (6, 4): pixel centres x 2.5..5.5, y 1.5..3.5
            {
                "id": 0,
                "image_id": 0,
                "category_id": 1,
                "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]],
                "iscrowd": 0,
            },
            # column-major runs: 23 off, 3 on (x = 2, y = 3..5), 94 off
            {
                "id": 1,
                "image_id": 0,
                "category_id": 2,
                "segmentation": {"size": [height, width], "counts": [23, 3, 94]},
                "iscrowd": 1,
            },
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": b_rle, "iscrowd": 1},
        ],
    }
    valid = {
        "categories": categories,
        "images": [{"id": 5, "file_name": "c.png", "height": height, "width": width}],
        "annotations": [],
    }
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(train))
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(valid))
    return {"b_mask": b_mask.astype(bool)}


def test_coco_polygons_rle_categories_and_splits(tmp_path):
    built = build_coco(tmp_path)
    reader = READERS["coco"]()
    entries = {entry.subject: entry for entry in reader.index(tmp_path)}
    assert {s: e.split for s, e in entries.items()} == {"a": "train", "b": "train", "c": "val"}
    assert reader.targets(list(entries.values())) == ("all", "tumors", "tumor", "cyst")
    polygon = np.zeros((10, 12), dtype=bool)
    polygon[1:4, 2:6] = True
    run = np.zeros((10, 12), dtype=bool)
    run[3:6, 2] = True
    mask, slice_ids = reader.load_mask(entries["a"], "tumor")
    assert slice_ids == ["a.png"] and mask.shape == (1, 10, 12)
    assert np.array_equal(mask[0], polygon)
    assert np.array_equal(reader.load_mask(entries["a"], "cyst")[0][0], run)
    assert np.array_equal(reader.load_mask(entries["a"], "all")[0][0], polygon | run)
    assert np.array_equal(reader.load_mask(entries["a"], "tumors")[0][0], polygon | run)  # the supercategory
    assert np.array_equal(reader.load_mask(entries["a"], "Tumor")[0][0], polygon)  # case-insensitive
    assert np.array_equal(reader.load_mask(entries["b"], "all")[0][0], built["b_mask"])
    assert not reader.load_mask(entries["c"], "all")[0].any()  # no annotations: empty mask
    grey = reader.load(entries["b"], "all")
    assert grey.kind == "rgb" and not grey.volumetric
    assert [float(grey.channels[c].mean()) for c in ("red", "green", "blue")] == [77.0, 77.0, 77.0]
    colour = reader.load(entries["a"], "all")
    assert [float(colour.channels[c].mean()) for c in ("red", "green", "blue")] == [10.0, 20.0, 30.0]
    user_error(lambda: reader.load_mask(entries["a"], "edema"), "'edema'", "all, tumors, tumor, cyst")


def test_coco_errors(tmp_path):
    reader = READERS["coco"]()
    build_coco(tmp_path / "extra")
    write_picture(tmp_path / "extra" / "train" / "stray.png", np.zeros((4, 4), np.uint8))
    user_error(
        lambda: reader.index(tmp_path / "extra"), tmp_path / "extra" / "train" / "stray.png", "no label"
    )

    build_coco(tmp_path / "missing")
    (tmp_path / "missing" / "valid" / "c.png").unlink()
    user_error(lambda: reader.index(tmp_path / "missing"), "c.png", tmp_path / "missing" / "valid")

    build_coco(tmp_path / "nocat")
    path = tmp_path / "nocat" / "valid" / "_annotations.coco.json"
    path.write_text(json.dumps({"categories": [], "images": [], "annotations": []}))
    user_error(lambda: READERS["coco"]().index(tmp_path / "nocat"), "Empty label set", path)

    build_coco(tmp_path / "broken")
    path = tmp_path / "broken" / "train" / "_annotations.coco.json"
    truncate(path)
    user_error(lambda: READERS["coco"]().index(tmp_path / "broken"), path)

    build_coco(tmp_path / "truncated")
    reader = READERS["coco"]()
    entries = {entry.subject: entry for entry in reader.index(tmp_path / "truncated")}
    truncate(tmp_path / "truncated" / "train" / "a.png")
    user_error(
        lambda: reader.load(entries["a"], "all"),
        tmp_path / "truncated" / "train" / "a.png",
        "Download it again",
    )


# ---------------------------------------------------------------- folder


def test_folder_pictures_and_label_targets(tmp_path):
    image = np.arange(5 * 6, dtype=np.uint8).reshape(5, 6)
    labels = np.zeros((5, 6), dtype=np.uint8)
    labels[0, :3], labels[4, 4] = 1, 2
    write_picture(tmp_path / "train" / "images" / "a.png", image)
    write_picture(tmp_path / "train" / "masks" / "a_mask.png", labels)
    write_picture(tmp_path / "test" / "images" / "b.tif", np.stack([image] * 3, axis=-1))
    write_picture(tmp_path / "test" / "labels" / "b.tif", labels)
    reader = READERS["folder"]()
    entries = {entry.subject: entry for entry in reader.index(tmp_path)}
    assert {s: e.split for s, e in entries.items()} == {"a": "train", "b": "test"}
    assert reader.targets(list(entries.values())) == ("all", "label_1", "label_2")
    mask, slice_ids = reader.load_mask(entries["a"], "label_1")
    assert slice_ids == ["a.png"] and mask[0].tolist() == (labels == 1).tolist()
    assert int(reader.load_mask(entries["b"], "all")[0].sum()) == 4
    volume = reader.load(entries["a"], "all")
    assert volume.kind == "rgb" and not volume.volumetric
    assert np.array_equal(volume.channels["grey"][0], image) and np.array_equal(
        volume.channels["red"][0], image
    )
    user_error(lambda: reader.load_mask(entries["a"], "tumour"), "'tumour'", "label_N")


def test_folder_nifti_pairs(tmp_path):
    write_nifti(tmp_path / "images" / "ct_07.nii.gz", coded_image(0))
    write_nifti(tmp_path / "masks" / "ct_07.nii.gz", labels_with_counts({1: 3, 2: 4}))
    reader = READERS["folder"]()
    (entry,) = reader.index(tmp_path)
    assert reader.targets([entry]) == ("all", "label_1", "label_2")
    mask, slice_ids = reader.load_mask(entry, "label_2")
    assert int(mask.sum()) == 4 and slice_ids[0] == "ct_07:z000"
    volume = reader.load(entry, "all")
    assert volume.volumetric and volume.kind == "mri" and volume.channels["grey"][1, 2, 3] == 321


def test_folder_errors(tmp_path):
    reader = READERS["folder"]()
    write_picture(tmp_path / "one" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "one" / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "one" / "masks" / "z.png", np.zeros((4, 4), np.uint8))
    user_error(lambda: reader.index(tmp_path / "one"), tmp_path / "one" / "masks" / "z.png", "no image")
    write_picture(tmp_path / "two" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "two" / "images" / "b.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "two" / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    user_error(lambda: reader.index(tmp_path / "two"), tmp_path / "two" / "images" / "b.png", "no mask")
    write_picture(tmp_path / "three" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "three" / "masks" / "a.png", np.zeros((4, 5), np.uint8))
    (entry,) = reader.index(tmp_path / "three")
    user_error(lambda: reader.load(entry, "all"), "Shape mismatch", tmp_path / "three" / "images" / "a.png")
    (tmp_path / "three" / "masks" / "a.png").write_bytes(b"not a png")
    user_error(lambda: reader.load_mask(entry, "all"), tmp_path / "three" / "masks" / "a.png", "corrupt")


def test_image_ids_carry_the_split_folder_where_two_folders_share_a_name(tmp_path):
    """One rule for every 2D reader: the (unique) subject name plus the file suffix."""
    for split in ("train", "test"):
        write_picture(tmp_path / "pictures" / split / "images" / "case_001.png", np.zeros((4, 4), np.uint8))
        write_picture(tmp_path / "pictures" / split / "masks" / "case_001.png", np.ones((4, 4), np.uint8))
        write_nifti(tmp_path / "volumes" / split / "images" / "ct_07.nii.gz", coded_image(0))
        write_nifti(tmp_path / "volumes" / split / "masks" / "ct_07.nii.gz", labels_with_counts({1: 3}))
    write_picture(tmp_path / "pictures" / "test" / "images" / "case_002.png", np.zeros((4, 4), np.uint8))
    write_picture(tmp_path / "pictures" / "test" / "masks" / "case_002.png", np.ones((4, 4), np.uint8))
    reader = READERS["folder"]()
    ids = {e.subject: reader.load_mask(e, "all")[1] for e in reader.index(tmp_path / "pictures")}
    assert ids == {"train/case_001": ["train/case_001.png"], "test/case_001": ["test/case_001.png"],
                   "case_002": ["case_002.png"]}
    ids = {e.subject: reader.load_mask(e, "all")[1][0] for e in reader.index(tmp_path / "volumes")}
    assert ids == {"train/ct_07": "train/ct_07:z000", "test/ct_07": "test/ct_07:z000"}

    for split in ("train", "valid"):
        write_picture(tmp_path / "coco" / split / "a.png", np.zeros((10, 12), np.uint8))
        (tmp_path / "coco" / split / "_annotations.coco.json").write_text(json.dumps({
            "categories": [{"id": 1, "name": "tumor"}], "annotations": [],
            "images": [{"id": 0, "file_name": "a.png", "height": 10, "width": 12}],
        }))
    coco = READERS["coco"]()
    assert sorted(coco.load_mask(e, "all")[1][0] for e in coco.index(tmp_path / "coco")) == [
        "train/a.png", "valid/a.png"]
