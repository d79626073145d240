"""The prepared store: records, reuse, atomic writes, limit, errors; and the phantom end to end."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import study.data.prepare as prepare_module
from study.config import StudyConfig
from study.data.intensity import percentile_clip
from foundation.prepared_store import SliceRecord, image_digest, open_prepared
from study.data.prepare import (plan_dataset, plan_targets, prepare_dataset,
                                publish_store)
from study.data.readers import READERS
from study.data.regions import MSD_BRAIN_LABELS
from study.data.splits import split_subjects
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

MODALITIES = ("flair", "t1", "t1gd", "t2w")
TARGET_LABELS = {"tumor": 1, "other": 2}
DEPTH, SIDE = 6, 16
# Target areas per slice of every fake subject, by construction (see `write_subject`).
TUMOR_AREAS = [0, 0, 4, 20, 36, 0]


class FakeReader:
    """A tiny reader over `SUBJECT.npz` files (images (4, Z, H, W), labels (Z, H, W)); split = folder."""

    name = "fake"
    kind = "mri"
    modalities = MODALITIES
    default_modalities = ("flair", "t1gd", "t2w")
    default_strategy = "stack"
    default_target = "tumor"
    loads = 0
    mask_loads = 0
    fail_on: str | None = None  # a subject whose images are "corrupt"

    def index(self, root):
        root = Path(root)
        return [SubjectEntry(p.stem, (p,), None if p.parent == root else p.parent.name)
                for p in sorted(root.rglob("*.npz"))]

    def targets(self, entries):
        return tuple(TARGET_LABELS)

    def load_mask(self, entry, target):
        type(self).mask_loads += 1
        labels = np.load(entry.files[0])["labels"]
        return labels == TARGET_LABELS[target], [f"{entry.subject}:z{z:03d}" for z in range(len(labels))]

    def load(self, entry, target):
        type(self).loads += 1
        if entry.subject == self.fail_on:
            raise ValueError("not a valid npz file")
        mask, ids = self.load_mask(entry, target)
        images = np.load(entry.files[0])["images"]
        return Volume(entry.subject, dict(zip(MODALITIES, images)), mask, ids, (3.0, 1.5, 2.0), "mri", True)


def write_subject(path: Path, seed: int, other: bool = True) -> None:
    """One fake subject: a noisy head on a zero background, tumour areas TUMOR_AREAS, label 2 on slice 0."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((DEPTH, SIDE, SIDE), np.uint8)
    labels[2, :2, :2] = 1  # 4 px
    labels[3, 2:6, 3:8] = 1  # 20 px
    labels[4, 5:11, 5:11] = 1  # 36 px
    if other:
        labels[0, 10:14, 10:14] = 2
    images = np.zeros((4, DEPTH, SIDE, SIDE), np.float32)
    images[:, :, 1:15, 1:15] = rng.gamma(3.0, 50.0, size=(4, DEPTH, 14, 14)) + 1
    images[:, labels == 1] += 400
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)


def make_dataset(root: Path, subjects: int = 6, folders: dict[str, str] | None = None, other=True) -> Path:
    for i in range(subjects):
        name = f"S{i:02d}"
        folder = root / folders[name] if folders and name in folders else root
        write_subject(folder / f"{name}.npz", i, other)
    return root


@pytest.fixture(autouse=True)
def fake_reader(monkeypatch):
    FakeReader.loads = FakeReader.mask_loads = 0
    FakeReader.fail_on = None
    monkeypatch.setitem(READERS, "fake", FakeReader)
    return FakeReader


def config(tmp_path: Path, root: Path | None, **data) -> StudyConfig:
    defaults = {"reader": "fake", "slicing": {"min_area": 10}, "split": {"val": 0.2, "test": 0.2},
                "augment": {"views": 0}}
    if root is not None:
        defaults["root"] = str(root)
    return StudyConfig.model_validate({
        "study": {"seed": 0, "out": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
        "data": {**defaults, **data},
    })


def prepared_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "prepared"


# --- what the store holds --------------------------------------------------------------------------


def test_records_match_the_data(tmp_path):
    root = make_dataset(tmp_path / "data")
    dataset = prepare_dataset(config(tmp_path, root, augment={"views": 2}), progress=False)
    assert not dataset.reused and dataset.root == prepared_dir(tmp_path) / dataset.key
    assert dataset.key.startswith("fake-")

    # 6 subjects, val 0.2 and test 0.2 -> 1 val, 1 test, 4 train; train and val keep slices 3 and 4
    # (areas 20, 36 >= min_area 10), the test subject every slice with a target pixel: 2, 3 and 4
    entries = FakeReader().index(root)
    expected_split = split_subjects(entries, 0.2, 0.2, seed=0)
    assert sorted(expected_split.values()).count("train") == 4
    view0 = {split: dataset.records_for(split) for split in ("train", "val", "test")}
    assert {s: len(r) for s, r in view0.items()} == {"train": 8, "val": 2, "test": 3}
    assert len(dataset.records_for("train", views=True)) == 8 * 3
    assert len(dataset.records) == 8 * 3 + 2 + 3

    subject_splits: dict[str, set] = {}
    for record in dataset.records:
        subject_splits.setdefault(record.subject, set()).add(record.split)
        assert record.split == expected_split[record.subject]
        assert record.slice_index in ((2, 3, 4) if record.split == "test" else (3, 4))
        assert record.image_id == f"{record.subject}:z{record.slice_index:03d}"
        assert record.spacing == (1.5, 2.0) and (record.height, record.width) == (SIDE, SIDE)
        assert record.slice_spacing == 3.0  # the volume's z spacing
        assert (dataset.root / record.file).is_file()
        assert record.view in ((0, 1, 2) if record.split == "train" else (0,))
        image, mask = dataset.load(record)
        assert image.dtype == np.uint8 and image.shape == (SIDE, SIDE, 3) and mask.dtype == bool
        assert record.area == int(mask.sum())
        assert record.image_sha256 == image_digest(image)  # the embedding cache's content address
        if record.view == 0:
            data = np.load(root / f"{record.subject}.npz")
            assert (mask == (data["labels"][record.slice_index] == 1)).all()
            assert record.area == TUMOR_AREAS[record.slice_index]
            # default channels: stack of flair, t1gd, t2w, each clipped over the subject's volume
            for channel, modality in enumerate((0, 2, 3)):
                expected = percentile_clip(data["images"][modality], (0.5, 99.5))[record.slice_index]
                assert (image[..., channel] == expected).all()
        else:
            original, _ = dataset.load(next(r for r in dataset.records if r.image_id == record.image_id
                                            and r.view == 0))
            assert (image != original).any()
    assert all(len(splits) == 1 for splits in subject_splits.values())  # no subject in two splits

    index = json.loads((dataset.root / "index.json").read_text())
    assert index["key"] == dataset.key and index["settings"]["augment"]["views"] == 2
    assert index["plan"]["slices"] == {"train": 8, "val": 2, "test": 3}
    assert index["format"] == prepare_module.STORE_FORMAT == 3
    assert all(r["slice_spacing"] == 3.0 for r in index["records"])  # stored, and read back above
    reopened = open_prepared(dataset.root)
    assert reopened.records == dataset.records and reopened.reused
    assert isinstance(reopened.records[0], SliceRecord)


def test_second_prepare_is_reused_without_reading_anything(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    first = prepare_dataset(config(tmp_path, root), progress=False)
    assert FakeReader.loads == 6

    def forbidden(*args, **kwargs):
        raise AssertionError("a reused store must not read any data")

    monkeypatch.setattr(FakeReader, "load", forbidden)
    monkeypatch.setattr(FakeReader, "load_mask", forbidden)
    second = prepare_dataset(config(tmp_path, root), progress=False)
    assert second.reused and second.key == first.key and second.records == first.records
    plan = plan_dataset(config(tmp_path, root), progress=False)
    assert plan.prepared and plan.key == first.key and plan.slices == {"train": 8, "val": 2, "test": 3}


def test_key_follows_settings_and_input_files(tmp_path):
    root = make_dataset(tmp_path / "data")
    key = plan_dataset(config(tmp_path, root), progress=False).key
    assert plan_dataset(config(tmp_path, root), progress=False).key == key
    assert plan_dataset(config(tmp_path, root, target="tumor"), progress=False).key == key  # the default
    for changed in ({"slicing": {"min_area": 5}}, {"clip_percentiles": [1, 99]}, {"limit": 3},
                    {"channels": {"strategy": "repeat"}}, {"augment": {"views": 1}}):
        assert plan_dataset(config(tmp_path, root, **changed), progress=False).key != key, changed
    # without views, the other augmentation settings change nothing and keep the key
    assert plan_dataset(config(tmp_path, root, augment={"views": 0, "rotate_deg": 5}), progress=False).key == key
    path = root / "S03.npz"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert plan_dataset(config(tmp_path, root), progress=False).key != key


def test_plan_counts_match_the_store_and_plan_writes_nothing(tmp_path):
    root = make_dataset(tmp_path / "data")
    cfg = config(tmp_path, root, slicing={"min_area": 10, "keep_empty": 1}, augment={"views": 1})
    plan = plan_dataset(cfg, progress=False)
    assert not (tmp_path / "cache").exists()
    assert FakeReader.loads == 0 and FakeReader.mask_loads == 6
    # per train/val subject: slices 3 and 4, plus one of the tumour-free slices 0, 1, 5 (slice 0
    # holds only label 2, which is not the target); slice 2 has 4 px < min_area: neither empty nor
    # large enough. The test subject: every slice with a target pixel (2, 3, 4), no empty one.
    assert plan.slices == {"train": 12, "val": 3, "test": 3}
    assert plan.images == {"train": 24, "val": 3, "test": 3}
    assert plan.subjects == {"train": 4, "val": 1, "test": 1}
    assert "train" in plan.describe() and plan.key in plan.store
    dataset = prepare_dataset(cfg, progress=False)
    assert dataset.key == plan.key
    for split in ("train", "val", "test"):
        assert len(dataset.records_for(split)) == plan.slices[split]
        assert len(dataset.records_for(split, views=True)) == plan.images[split]
    assert {r.slice_index for r in dataset.records if r.area == 0} <= {0, 1, 5}
    assert [(r.slice_index, r.area) for r in dataset.records_for("test")] == [(2, 4), (3, 20), (4, 36)]
    description = plan.describe()
    assert "train/val: axial slices with area >= 10 px plus up to 1 empty" in description
    assert "test: every axial slice with a target pixel, no empty one" in description
    assert "  limit:" not in description


def test_limit_caps_slices_per_split(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=10)
    dataset = prepare_dataset(config(tmp_path, root, limit=3, augment={"views": 1}), progress=False)
    counts = {split: len(dataset.records_for(split)) for split in ("train", "val", "test")}
    # 12, 4 and 6 slices before the limit; test keeps whole subjects: one of its two (3 slices each)
    assert counts == {"train": 3, "val": 3, "test": 3}
    test = dataset.records_for("test")
    assert len({r.subject for r in test}) == 1 and [r.slice_index for r in test] == [2, 3, 4]
    assert len(dataset.records_for("train", views=True)) == 6
    again = prepare_dataset(config(tmp_path, root, limit=3, augment={"views": 1}), progress=False)
    assert again.reused and again.records == dataset.records


def test_own_split_folders_win(tmp_path):
    folders = {f"S{i:02d}": "train" for i in range(5)} | {"S05": "test"}
    root = make_dataset(tmp_path / "data", folders=folders)
    dataset = prepare_dataset(config(tmp_path, root), progress=False)
    splits = {r.subject: r.split for r in dataset.records}
    assert splits["S05"] == "test" and list(splits.values()).count("test") == 1
    assert sum(1 for s in set(splits) if splits[s] == "val") == 1  # 0.2 of 5 training subjects


def test_coronal_slices(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=2)
    dataset = prepare_dataset(config(tmp_path, root, slicing={"axis": "coronal", "min_area": 1},
                                     split={"val": 0, "test": 0}), progress=False)
    record = dataset.records[0]
    assert record.image_id.startswith(f"{record.subject}:y") and (record.height, record.width) == (DEPTH, SIDE)
    assert record.spacing == (3.0, 2.0) and record.slice_spacing == 1.5  # (z, x) in the slice, y between
    labels = np.load(root / f"{record.subject}.npz")["labels"]
    _, mask = dataset.load(record)
    assert (mask == (labels[:, record.slice_index, :] == 1)).all()


def test_limit_keeps_whole_test_subjects(tmp_path):
    """Test subjects are taken whole, in a seeded order, while the total stays within the limit."""
    root = make_dataset(tmp_path / "data", subjects=10)  # 2 test subjects, slices 2, 3, 4 each
    for limit, subjects in ((5, 1), (6, 2), (2, 1)):  # 2: one subject, although it has 3 slices
        test = prepare_dataset(config(tmp_path, root, limit=limit), progress=False).records_for("test")
        by_subject = Counter(r.subject for r in test)
        assert len(by_subject) == subjects and set(by_subject.values()) == {3}, (limit, by_subject)
    train = prepare_dataset(config(tmp_path, root, limit=5), progress=False).records_for("train")
    assert len(train) == 5  # train still keeps a choice of single slices
    plan = plan_dataset(config(tmp_path, root, limit=5), progress=False)
    assert "limit: at most 5 slices per split; test takes whole subjects" in plan.describe()


def _write_shared_name_folder(root: Path) -> None:
    """train/ holds case_001..003, test/ case_001 (other content, other mask) and case_004."""
    rng = np.random.default_rng(0)
    for split, names in (("train", ("case_001", "case_002", "case_003")), ("test", ("case_001", "case_004"))):
        for n, name in enumerate(names):
            picture = rng.integers(0, 255, size=(12, 12), dtype=np.uint8)
            mask = np.zeros((12, 12), np.uint8)
            mask[2:6 + n + (split == "test"), 3:9] = 1
            for folder, array in (("images", picture), ("masks", mask)):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / folder / f"{name}.png")


def _write_shared_name_coco(root: Path) -> None:
    """The same file names as `_write_shared_name_folder`, as a COCO export with polygons."""
    rng = np.random.default_rng(1)
    categories = [{"id": 1, "name": "tumor", "supercategory": "none"}]
    for split, names in (("train", ("case_001", "case_002", "case_003")), ("test", ("case_001", "case_004"))):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for n, name in enumerate(names):
            Image.fromarray(rng.integers(0, 255, size=(12, 12, 3), dtype=np.uint8)).save(root / split / f"{name}.png")
            images.append({"id": n, "file_name": f"{name}.png", "height": 12, "width": 12})
            side = 4 + n + (split == "test")
            annotations.append({"id": n, "image_id": n, "category_id": 1, "iscrowd": 0,
                                "segmentation": [[2, 2, 2 + side, 2, 2 + side, 2 + side, 2, 2 + side]]})
        (root / split / "_annotations.coco.json").write_text(
            json.dumps({"categories": categories, "images": images, "annotations": annotations}))


@pytest.mark.parametrize("reader, write", [("folder", _write_shared_name_folder), ("coco", _write_shared_name_coco)])
def test_image_ids_are_unique_across_split_folders(tmp_path, reader, write):
    """train/case_001.png and test/case_001.png are two images: two ids, two records, two embeddings."""
    root = tmp_path / "data"
    write(root)
    dataset = prepare_dataset(config(tmp_path, root, reader=reader, slicing={"min_area": 0},
                                     split={"val": 0.34, "test": 0.2}, augment={"views": 1}), progress=False)
    ids = {r.image_id: r for r in dataset.records if r.view == 0}
    assert set(ids) == {"train/case_001.png", "test/case_001.png", "case_002.png", "case_003.png",
                        "case_004.png"}
    assert ids["train/case_001.png"].split != "test" and ids["test/case_001.png"].split == "test"
    assert ids["train/case_001.png"].subject == "train/case_001"
    train_image, train_mask = dataset.load(ids["train/case_001.png"])
    test_image, test_mask = dataset.load(ids["test/case_001.png"])
    assert (train_image != test_image).any() and train_mask.sum() != test_mask.sum()
    keys = [(r.image_id, r.view) for r in dataset.records]
    assert len(keys) == len(set(keys)) == 5 + sum(1 for r in dataset.records_for("train"))
    assert all(r.slice_spacing is None and r.spacing is None for r in dataset.records)  # 2D pictures


def test_a_reader_giving_two_slices_one_id_is_a_bug(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", subjects=3)
    real = FakeReader.load_mask
    monkeypatch.setattr(FakeReader, "load_mask", lambda self, entry, target: (
        real(self, entry, target)[0], [f"z{z:03d}" for z in range(DEPTH)]))  # ids without the subject
    with pytest.raises(ValueError, match="two slices the image id 'z003'"):
        plan_dataset(config(tmp_path, root), progress=False)


# --- atomic writes -------------------------------------------------------------------------------


def test_a_failed_prepare_leaves_no_store_and_no_temp_folder(tmp_path):
    root = make_dataset(tmp_path / "data")
    earlier = prepare_dataset(config(tmp_path, root), progress=False)
    FakeReader.fail_on = "S04"
    with pytest.raises(UserError, match="S04.npz") as error:
        prepare_dataset(config(tmp_path, root, slicing={"min_area": 5}), progress=False)
    assert "not a valid npz file" in str(error.value)
    assert FakeReader.loads > 6  # it got past the first subjects before failing
    assert [p.name for p in prepared_dir(tmp_path).iterdir()] == [earlier.key]
    reopened = open_prepared(earlier.root)  # the earlier store is untouched
    assert reopened.records == earlier.records and reopened.load(reopened.records[-1])[0].shape == (SIDE, SIDE, 3)


def test_an_interrupted_prepare_cleans_up_too(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "compose_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config(tmp_path, root), progress=False)
    assert list(prepared_dir(tmp_path).iterdir()) == []


def test_stale_temp_folders_are_ignored(tmp_path):
    root = make_dataset(tmp_path / "data")
    key = plan_dataset(config(tmp_path, root), progress=False).key
    stale = prepared_dir(tmp_path) / f".{key}.tmp-99999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "junk.npz").write_bytes(b"half a file")
    dataset = prepare_dataset(config(tmp_path, root), progress=False)
    assert dataset.key == key and not dataset.reused and len(dataset.records) == 13
    assert stale.is_dir()  # left alone: a killed process's leftovers are never read


def test_losing_a_concurrent_prepare_uses_the_winners_store(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    real_publish = prepare_module.publish_store
    winner_marker = []

    def another_process_wins(temp, final):
        shutil.copytree(temp, final)  # the other process renames its identical store first
        (final / "winner").write_text("x")
        winner_marker.append(final)
        return real_publish(temp, final)

    monkeypatch.setattr(prepare_module, "publish_store", another_process_wins)
    dataset = prepare_dataset(config(tmp_path, root), progress=False)
    assert (dataset.root / "winner").is_file() and dataset.reused  # this call's store was discarded
    assert [p.name for p in prepared_dir(tmp_path).iterdir()] == [dataset.key]
    assert len(dataset.records) == 13


def _prepare_in_child(cfg, results):
    dataset = prepare_dataset(cfg, progress=False)
    results.put((os.getpid(), FakeReader.loads, dataset.reused, dataset.key, len(dataset.records)))


def test_two_processes_preparing_the_same_key_at_once(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    slow_load = FakeReader.load

    def load_slowly(self, entry, target):
        time.sleep(0.1)  # both processes are still building when the first one publishes
        return slow_load(self, entry, target)

    monkeypatch.setattr(FakeReader, "load", load_slowly)
    context = multiprocessing.get_context("fork")  # the children inherit the registered fake reader
    results = context.Queue()
    children = [context.Process(target=_prepare_in_child, args=(config(tmp_path, root), results)) for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert all(loads == 6 for _, loads, _, _, _ in outcomes)  # both built a store...
    assert sorted(reused for _, _, reused, _, _ in outcomes) == [False, True]  # ...one of them published it
    assert len({(key, count) for _, _, _, key, count in outcomes}) == 1
    assert [p.name for p in prepared_dir(tmp_path).iterdir()] == [outcomes[0][3]]  # no temp folder left


def test_open_prepared_rejects_a_folder_without_index(tmp_path):
    with pytest.raises(UserError, match="not a readable prepared store"):
        open_prepared(tmp_path)


def test_publish_store_reports_a_lost_race(tmp_path):
    final = tmp_path / "store"
    final.mkdir()
    (final / "index.json").write_text("{}")
    temp = tmp_path / ".store.tmp"
    temp.mkdir()
    (temp / "index.json").write_text("{}")
    assert publish_store(temp, final) is False and not temp.exists()


# --- errors ----------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.*does not exist"):
        plan_dataset(config(tmp_path, tmp_path / "nowhere"), progress=False)


def test_unknown_target_lists_the_valid_ones(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=2)
    with pytest.raises(UserError, match=r"'liver'.*Valid targets: tumor, other"):
        plan_dataset(config(tmp_path, root, target="liver"), progress=False)


def test_absent_target_says_which_targets_are_present(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=3, other=False)
    with pytest.raises(UserError, match=r"'other' is absent.*Targets present: tumor"):
        plan_dataset(config(tmp_path, root, target="other"), progress=False)


def test_empty_label_set(tmp_path):
    root = tmp_path / "data"
    for i in range(2):
        write_subject(root / f"S{i}.npz", i, other=False)
        data = dict(np.load(root / f"S{i}.npz"))
        np.savez(root / f"S{i}.npz", images=data["images"], labels=np.zeros_like(data["labels"]))
    with pytest.raises(UserError, match="Empty label set"):
        plan_dataset(config(tmp_path, root), progress=False)


def test_no_slices_left_suggests_lowering_min_area(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=2)
    with pytest.raises(UserError, match=r"min_area = 250.*largest has 36.*Lower data.slicing.min_area"):
        plan_dataset(config(tmp_path, root, slicing={"min_area": 250}), progress=False)


def test_unavailable_modality(tmp_path):
    root = make_dataset(tmp_path / "data", subjects=2)
    with pytest.raises(UserError, match=r"'adc'.*flair, t1, t1gd, t2w"):
        plan_dataset(config(tmp_path, root, channels={"strategy": "stack", "modalities": ["flair", "adc", "t2w"]}),
                     progress=False)


# --- the phantom, end to end -----------------------------------------------------------------------


def test_phantom_end_to_end(tmp_path, small_phantom):
    """The real phantom reader (MSD layout, NIfTI) through plan and prepare, with pca channels."""
    cfg = config(tmp_path, small_phantom, reader="phantom", target=None, slicing={"min_area": 50},
                 split={"val": 0.34, "test": 0.34}, channels={"strategy": "pca"}, augment={"views": 1})
    plan = plan_dataset(cfg, progress=False)
    assert plan.reader == "phantom" and plan.target == "whole_tumor" and plan.modalities == MODALITIES
    assert plan.subjects == {"train": 1, "val": 1, "test": 1}
    dataset = prepare_dataset(cfg, progress=False)
    assert dataset.key == plan.key
    for split in ("train", "val", "test"):
        assert len(dataset.records_for(split)) == plan.slices[split] > 0
    record = dataset.records_for("test")[0]
    assert record.image_id.startswith("BRATS_") and ":z" in record.image_id
    assert record.spacing == (1.5, 1.5) and record.slice_spacing == 3.0 and record.area > 0
    assert all(r.area >= 50 for r in dataset.records_for("train") + dataset.records_for("val"))
    image, mask = dataset.load(record)
    assert image.shape == (record.height, record.width, 3) and mask.sum() == record.area
    assert all(image[..., c].max() == 255 for c in range(3))  # pca components are min-max scaled
    assert len({r.split for r in dataset.records if r.subject == record.subject}) == 1
    assert prepare_dataset(cfg, progress=False).reused


def test_phantom_is_generated_into_the_default_root(tmp_path, small_phantom, monkeypatch):
    """With no data.root, the phantom reader generates into <cache_dir>/phantom (here: a 3-subject copy)."""
    generated = []

    def ensure(root, subjects, seed):
        generated.append(root)
        if not root.exists():
            shutil.copytree(small_phantom, root)

    monkeypatch.setattr("study.data.readers.phantom.ensure_phantom", ensure)
    plan = plan_dataset(config(tmp_path, None, reader="phantom", target=None), progress=False)
    assert generated == [tmp_path / "cache" / "phantom"] and plan.root == str(tmp_path / "cache" / "phantom")
    assert sum(plan.subjects_assigned.values()) == 3


def _target_slices(label_path: Path, region: str) -> list[int]:
    """The axial slice indices (z of the NIfTI's (X, Y, Z)) holding a voxel of `region`."""
    labels = np.asarray(nib.load(label_path).dataobj)
    target = np.isin(labels, MSD_BRAIN_LABELS[region])
    return [int(z) for z in np.flatnonzero(target.any(axis=(0, 1)))]


def test_every_target_slice_of_a_test_subject_is_kept(phantom_dataset):
    """Test subjects keep every slice with a target voxel (min_area filters train and val only),
    whole subjects even under data.limit; the records carry the NIfTI header's slice spacing."""
    config, dataset = phantom_dataset
    entries = {e.subject: e for e in READERS["phantom"]().index(config.data.root)}
    split_of = split_subjects(list(entries.values()), config.data.split.val, config.data.split.test,
                              config.study.seed)
    test = dataset.records_for("test")
    assert test and {r.subject for r in test} <= {s for s, split in split_of.items() if split == "test"}
    for subject in {r.subject for r in test}:
        expected = _target_slices(entries[subject].extra["label"], config.data.target)
        kept = sorted(r.slice_index for r in test if r.subject == subject)
        assert kept == expected, subject  # every target slice, none empty: some are under min_area
    assert min(r.area for r in test) > 0
    assert min(r.area for r in test) < config.data.slicing.min_area  # the phantom has such slices
    # data.limit (8) takes whole test subjects: the first one has more than 8 target slices
    assert len(test) > config.data.limit and len({r.subject for r in test}) == 1
    for split in ("train", "val"):
        records = dataset.records_for(split)
        assert records and all(r.area >= config.data.slicing.min_area for r in records)
        assert len(records) == config.data.limit
    for record in dataset.records:
        zooms = nib.load(entries[record.subject].extra["label"]).header.get_zooms()
        assert record.slice_spacing == pytest.approx(float(zooms[2])) == 3.0
        assert record.spacing == pytest.approx((float(zooms[1]), float(zooms[0])))


def test_without_a_limit_every_test_subject_keeps_all_its_target_slices(phantom_dataset):
    """The plan (label data only) of the fixture's phantom without data.limit: both test subjects whole."""
    config, _ = phantom_dataset
    unlimited = config.model_copy(update={"data": config.data.model_copy(update={"limit": None})})
    plan = plan_dataset(unlimited, progress=False)
    entries = READERS["phantom"]().index(config.data.root)
    split_of = split_subjects(entries, config.data.split.val, config.data.split.test, config.study.seed)
    test = [e for e in entries if split_of[e.subject] == "test"]
    assert plan.subjects["test"] == len(test) == 2
    assert plan.slices["test"] == sum(len(_target_slices(e.extra["label"], config.data.target)) for e in test)


def test_two_targets_have_their_own_stores_the_same_split_and_the_same_images(two_target_datasets, phantom_dataset):
    """One store per target; every subject in the same split in both; a slice (and each augmented
    view of it) both stores keep is the same image, with the same content hash."""
    config, stores = two_target_datasets
    whole, core = stores["whole_tumor"], stores["tumor_core"]
    assert whole.key == phantom_dataset[1].key and core.key != whole.key
    assert (whole.settings["target"], core.settings["target"]) == ("whole_tumor", "tumor_core")
    entries = {e.subject: e for e in READERS["phantom"]().index(config.data.root)}
    split_of = split_subjects(list(entries.values()), config.data.split.val, config.data.split.test, config.study.seed)
    for target, store in stores.items():
        assert all(r.split == split_of[r.subject] for r in store.records)
        test = store.records_for("test")
        for subject in {r.subject for r in test}:  # every slice with this target, whole subjects
            kept = sorted(r.slice_index for r in test if r.subject == subject)
            assert kept == _target_slices(entries[subject].extra["label"], target), (target, subject)
    by_key = {(r.image_id, r.view): r for r in whole.records}
    shared = [(r, by_key[(r.image_id, r.view)]) for r in core.records if (r.image_id, r.view) in by_key]
    assert any(r.view > 0 for r, _ in shared) and any(r.split == "test" for r, _ in shared)
    for mine, theirs in shared:
        assert mine.image_sha256 == theirs.image_sha256
        assert np.array_equal(core.load(mine)[0], whole.load(theirs)[0])
    assert any(mine.area != theirs.area for mine, theirs in shared)  # the masks differ by target, not the images
    plans, unique = plan_targets(config, progress=False)
    assert [p.target for p in plans] == ["whole_tumor", "tumor_core"] and all(p.prepared for p in plans)
    assert unique == len({r.image_sha256 for r in whole.records + core.records})
