"""The synthetic phantom: its CLI, determinism, anatomy and contrasts, and its three layouts read back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from study.data.phantom import file_hashes, generate_phantom, synthesize_subject
from study.data.readers import READERS
from study.data.readers.phantom import PhantomReader
from study.data.regions import BRAIN_REGIONS
from foundation.errors import UserError


def test_cli_writes_the_three_layouts(phantom_cli):
    out, process = phantom_cli
    assert "8 subjects" in process.stdout and "Task01_BrainTumour" in process.stdout
    manifest = json.loads((out / "phantom.json").read_text())
    assert manifest["subjects"] == 8 and manifest["seed"] == 0
    task = out / "Task01_BrainTumour"
    assert json.loads((task / "dataset.json").read_text())["numTraining"] == 8
    assert len(list((task / "imagesTr").glob("*.nii.gz"))) == 8
    assert len(list((task / "labelsTr").glob("*.nii.gz"))) == 8
    cases = sorted(p.name for p in (out / "BraTS2023").iterdir())
    assert cases[0] == "BraTS-GLI-00000-000" and len(cases) == 8
    assert sorted(p.name for p in (out / "BraTS2023" / cases[0]).iterdir()) == [
        f"{cases[0]}-{suffix}.nii.gz" for suffix in ("seg", "t1c", "t1n", "t2f", "t2w")
    ]
    for split in ("train", "valid", "test"):
        assert (out / "coco" / split / "_annotations.coco.json").is_file()
    # no temporary build folder is left beside the output
    assert [p.name for p in out.parent.iterdir()] == ["phantom"]


def test_same_seed_same_bytes_and_subjects_independent_of_count(phantom_cli, small_phantom, tmp_path):
    out, _ = phantom_cli
    generate_phantom(tmp_path / "again", subjects=8, seed=0)
    first, second = file_hashes(out), file_hashes(tmp_path / "again")
    assert len(first) > 8 * 7 and first == second
    # subject i depends on (seed, i) only: the 3-subject phantom's volumes are the 8-subject ones
    small = file_hashes(small_phantom)
    for name in ("BRATS_001", "BRATS_002", "BRATS_003"):
        for folder in ("imagesTr", "labelsTr"):
            key = f"Task01_BrainTumour/{folder}/{name}.nii.gz"
            assert small[key] == first[key]


def test_another_seed_gives_other_data():
    zero, one = synthesize_subject(0, seed=0), synthesize_subject(0, seed=1)
    assert zero.labels.shape != one.labels.shape or not np.array_equal(zero.labels, one.labels)
    again = synthesize_subject(0, seed=0)
    assert np.array_equal(zero.labels, again.labels)
    assert all(np.array_equal(zero.images[m], again.images[m]) for m in zero.images)


def test_generate_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt|other files") as error:
        generate_phantom(tmp_path, subjects=1, seed=0)
    assert str(tmp_path) in str(error.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_anatomy_contrasts_and_lesions(phantom_cli):
    """Each subject has all three MSD labels with the contrasts the docstring promises."""
    out, _ = phantom_cli
    reader = READERS["msd_brain"]()
    entries = reader.index(out)
    manifest = json.loads((out / "phantom.json").read_text())
    sizes = []
    for entry, lesions in zip(entries, manifest["lesions_per_subject"], strict=True):
        volume = reader.load(entry, "whole_tumor")
        assert volume.spacing == (3.0, 1.5, 1.5)
        assert 40 <= volume.mask.shape[0] <= 48 and volume.mask.shape[1:] == (128, 128)
        masks = {
            region: reader.load_mask(entry, region)[0]
            for region in ("edema", "enhancing", "tumor_core", "non_enhancing")
        }
        assert all(mask.any() for mask in masks.values()), entry.subject
        whole = volume.mask
        ring = ndimage.binary_dilation(whole, iterations=2) & ~whole  # tissue around the tumour
        channels = volume.channels

        ratios = {
            (modality, region): channels[modality][masks[region]].mean() / np.median(channels[modality][ring])
            for modality, region in (
                ("t1gd", "enhancing"),
                ("flair", "edema"),
                ("t2w", "edema"),
                ("t1", "tumor_core"),
            )
        }
        assert ratios["t1gd", "enhancing"] > 1.4  # bright enhancing rim
        assert ratios["flair", "edema"] > 1.3  # bright edema on FLAIR
        assert ratios["t2w", "edema"] > 1.15  # and on T2
        assert ratios["t1", "tumor_core"] < 0.9  # darker tumour on T1
        assert channels["t1"][:, :4, :4].std() > 0  # noise in the background
        sizes.append(int(whole.sum()))
        if lesions == 2:  # two separate lesions on some axial slice
            two = False
            for z in range(whole.shape[0]):
                labelled, count = ndimage.label(whole[z], structure=np.ones((3, 3)))
                areas = np.bincount(labelled.ravel())[1:]
                two |= int((areas >= 30).sum()) >= 2
            assert two, entry.subject
    assert manifest["lesions_per_subject"].count(2) >= 2
    assert np.std(sizes) / np.mean(sizes) > 0.2  # lesion sizes vary


def test_readers_read_the_layouts_back(phantom_cli):
    """MSD and BraTS 2023 give identical masks for every region; COCO polygons match the slices."""
    out, _ = phantom_cli
    msd, brats, coco = READERS["msd_brain"](), READERS["brats"](), READERS["coco"]()
    msd_entries = msd.index(out / "Task01_BrainTumour")
    brats_entries = brats.index(out / "BraTS2023")
    assert len(msd_entries) == len(brats_entries) == 8
    assert {entry.extra["convention"] for entry in brats_entries} == {"2023"}
    for msd_entry, brats_entry in zip(msd_entries, brats_entries, strict=True):
        for region in BRAIN_REGIONS:
            msd_mask, msd_ids = msd.load_mask(msd_entry, region)
            brats_mask, _ = brats.load_mask(brats_entry, region)
            assert np.array_equal(msd_mask, brats_mask), (msd_entry.subject, region)
        assert msd_ids[7] == f"{msd_entry.subject}:z007"
    msd_volume, brats_volume = (
        msd.load(msd_entries[0], "enhancing"),
        brats.load(brats_entries[0], "enhancing"),
    )
    for modality in ("flair", "t1", "t1gd", "t2w"):
        assert np.array_equal(msd_volume.channels[modality], brats_volume.channels[modality])

    coco_entries = coco.index(out / "coco")
    manifest = json.loads((out / "phantom.json").read_text())
    counts = {
        split: sum(entry.split == split for entry in coco_entries) for split in ("train", "val", "test")
    }
    assert counts == {
        "train": manifest["coco_images"]["train"],
        "val": manifest["coco_images"]["valid"],
        "test": manifest["coco_images"]["test"],
    }
    subjects_by_split = {}
    for entry in coco_entries:
        subjects_by_split.setdefault(entry.subject.split("_z")[0], set()).add(entry.split)
    assert all(len(splits) == 1 for splits in subjects_by_split.values())  # split by subject
    assert coco.targets(coco_entries) == ("all", "tumors", "tumor")
    whole = {entry.subject: msd.load_mask(entry, "whole_tumor")[0] for entry in msd_entries}
    dices, empty = [], 0
    for entry in coco_entries:
        mask, slice_ids = coco.load_mask(entry, "all")
        assert slice_ids == [f"{entry.subject}.png"]
        subject, z = entry.subject.split("_z")
        reference = whole[subject][int(z)]
        if not reference.any():
            empty += 1
            assert not mask.any()
            continue
        dices.append(2 * (mask[0] & reference).sum() / (mask[0].sum() + reference.sum()))
    assert empty == 2 * 8
    assert min(dices) > 0.95 and np.mean(dices) > 0.99
    volume = coco.load(coco_entries[0], "tumor")
    assert volume.kind == "rgb" and volume.channels["red"].shape == (1, 128, 128)
    subject, z = coco_entries[0].subject.split("_z")
    mri = msd.load(next(e for e in msd_entries if e.subject == subject), "whole_tumor")
    for channel, modality in zip(("red", "green", "blue"), ("flair", "t1gd", "t2w"), strict=True):
        low, high = np.percentile(mri.channels[modality], [0.5, 99.5])  # over the whole volume
        expected = np.rint(np.clip((mri.channels[modality][int(z)] - low) / (high - low), 0, 1) * 255)
        assert np.array_equal(volume.channels[channel][0], expected)


def test_phantom_reader_reuses_an_existing_phantom(phantom_cli):
    out, _ = phantom_cli
    manifest_time = os.stat(out / "phantom.json").st_mtime_ns
    reader = READERS["phantom"]()
    entries = reader.index(out)
    assert len(entries) == 8 and os.stat(out / "phantom.json").st_mtime_ns == manifest_time
    assert reader.targets(entries) == BRAIN_REGIONS
    mask, slice_ids = reader.load_mask(entries[0], "whole_tumor")
    assert mask.any() and len(slice_ids) == mask.shape[0]


def test_phantom_reader_generates_into_a_new_folder_atomically(tmp_path):
    root = tmp_path / "data" / "phantom"
    reader = PhantomReader(subjects=2, seed=0)
    entries = reader.index(root)
    assert [entry.subject for entry in entries] == ["BRATS_001", "BRATS_002"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["phantom"]  # the temp sibling is gone
    hashes = file_hashes(root)
    reader.index(root)  # a second call reads what is there
    assert file_hashes(root) == hashes
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(PhantomReader(subjects=1).index(empty)) == 1  # an empty folder is filled in place
    volume = reader.load(entries[1], "tumor_core")
    assert volume.kind == "mri" and set(volume.channels) == {"flair", "t1", "t1gd", "t2w"}


def test_phantom_reader_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"not mine")
    with pytest.raises(UserError) as error:
        PhantomReader(subjects=1).index(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_cli_reports_a_bad_output_folder_without_traceback(tmp_path, capsys):
    from study.data.phantom import main

    (tmp_path / "mine.txt").write_text("keep")
    assert main([str(tmp_path), "--subjects", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(tmp_path) in error and "Traceback" not in error
