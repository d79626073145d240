"""The prepared store: a dataset turned once into 2D training slices, reused by every study.

`prepare_dataset(config)` reads the dataset with its reader, then per subject: normalises each
modality over the whole volume (`study.data.intensity`), cuts slices along `data.slicing.axis`
(`study.data.slicing`), assigns the subject to one split (`study.data.splits`), keeps the
slices it needs, and composes three channels (`study.data.channels`). A train or val subject
keeps the slices with enough target (`min_area`, plus `keep_empty` empty ones); a test subject
keeps every slice with at least one target pixel and no empty slice, whatever min_area says, so
that its slices stacked again are its whole 3D target and per-subject metrics are 3D metrics.
Every kept slice is written as view 0; each training slice also gets `data.augment.views`
augmented views 1..K (`study.data.augment`). `data.limit` caps the slices per split: train and
val keep a seeded choice of `limit` slices; test keeps whole subjects, taken in a seeded order
while the total stays within `limit` (at least one subject, even one with more slices), so no
test subject loses part of its slices. `plan_dataset(config)` computes the same plan from the
label data alone, for the dry run, and writes nothing (except that the phantom reader generates
its data).

With several targets (`data.target: [whole_tumor, tumor_core, enhancing]`) each target has its
own store: `prepare_dataset(config, target=name)`, `plan_targets(config)` for the dry run. The
subject split does not depend on the target (it is seeded by subject names), so a subject is in
the same split in every store, and each store's test split keeps every slice with its target;
only `data.limit` may keep different test subjects per target (whole subjects are taken while
their slices, which differ per target, fit). The images of a slice are the same in every store,
and each record carries `image_sha256`, which the embedding cache is keyed by, so they are
encoded once for all targets.

Layout of a store, `<cache_dir>/prepared/<KEY>/`:

    index.json               {"format", "key", "settings", "plan", "records": [SliceRecord…]}
    train/00012_BRATS_001_z077_v0.npz   image uint8 (H, W, 3), mask uint8 (H, W) in {0, 1}
    val/…  test/…

Image ids (`SliceRecord.image_id`) are unique across the store: a volume slice is `SUBJ:z077`, a
2D image its file name, prefixed with its split folder where two split folders hold the same
name (`train/case_001.png`, `test/case_001.png`). `(image_id, view)` names one record.

KEY is `<reader>-<16 hex digits>`: a SHA-256 over every preprocessing setting that changes the
output (reader, root, target, channels, slicing, split, augment, limit, clip_percentiles, window,
study.seed, the store format) and over the input files' (path, size, mtime_ns). File metadata
rather than file content: datasets run to hundreds of GB, and hashing them on every run would
cost minutes to hours, while any copy, re-export or edit of a file changes its size or mtime.
A store is complete or absent: it is built in a temp sibling folder (`.KEY.tmp-PID-RANDOM`) and
published with one `os.rename`; an exception removes the temp folder, a killed process leaves a
stale temp folder that is never read (safe to delete). When two processes prepare the same KEY at
once, the second rename fails because the folder exists, and that process uses the winner's store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from study.config import StudyConfig
from study.data.channels import compose_image, resolve_channels
from study.data.intensity import normalise_channels
from study.data.slicing import reorient, reorient_mask, select_slices
from study.data.splits import split_subjects
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError
from foundation.prepared_store import (INDEX_FILE, SPLITS, STORE_FORMAT, PreparedDataset, SliceRecord,
                                       image_digest, open_prepared)

# --- what a prepare plans ----------------------------------------------------------------------


@dataclass
class DatasetPlan:
    """What a prepare makes of a dataset: the dry run prints it, the store keeps it in index.json.

    `subjects` counts per split the subjects that keep at least one slice, `subjects_assigned`
    every subject assigned to the split; `slices` counts the kept slices (view 0): in train and
    val those with area >= min_area plus keep_empty empty ones per subject, in test every slice
    with a target pixel, then limit (test by whole subjects); `images` the images written
    (slices times views: 1 + views in train, 1 in val and test) — the encode jobs per backbone.
    """

    reader: str
    root: str
    target: str
    targets: tuple[str, ...]
    strategy: str
    modalities: tuple[str, ...]
    axis: str
    min_area: int
    keep_empty: int
    views: int
    limit: int | None
    key: str
    store: str
    prepared: bool
    subjects_assigned: dict[str, int]
    subjects: dict[str, int]
    slices: dict[str, int]
    images: dict[str, int]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("prepared")
        return data

    @classmethod
    def from_dict(cls, data: dict, prepared: bool) -> DatasetPlan:
        tuples = {name: tuple(data[name]) for name in ("targets", "modalities", "warnings")}
        return cls(**{**data, **tuples, "prepared": prepared})

    def describe(self) -> str:
        """A few lines for the dry run: the data settings, a table per split, the store."""
        lines = [
            f"data: {self.reader} at {self.root}",
            f"  target {self.target}; channels {self.strategy} ({', '.join(self.modalities)}); "
            f"{self.views} augmented views per training slice",
            f"  train/val: {self.axis} slices with area >= {max(self.min_area, 1)} px plus up to "
            f"{self.keep_empty} empty per subject",
            f"  test: every {self.axis} slice with a target pixel, no empty one (whole subjects)",
            *([f"  limit: at most {self.limit} slices per split; test takes whole subjects in a seeded "
               f"order while within it (at least one)"] if self.limit else []),
            f"  {'split':<6} {'subjects':>9} {'slices':>8} {'images':>8}",
        ]
        for split in SPLITS:
            lines.append(f"  {split:<6} {self.subjects[split]:>9} {self.slices[split]:>8} {self.images[split]:>8}")
        state = "prepared, will be reused" if self.prepared else "not prepared yet"
        lines.append(f"  store {self.store} ({state})")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


# --- resolving a config into concrete settings ------------------------------------------------


@dataclass
class _Setup:
    """A config resolved against its dataset: the reader, its subjects and every concrete setting."""

    reader: Any
    root: Path
    entries: list[SubjectEntry]
    targets: tuple[str, ...]
    target: str
    strategy: str
    modalities: tuple[str, ...]
    split_of: dict[str, str]
    settings: dict
    key: str
    store: Path


@dataclass(frozen=True)
class _PlannedSlice:
    subject: str
    slice_index: int
    image_id: str
    split: str
    area: int


def build_reader(name: str):
    """The reader registered as `name` in `study.data.readers.READERS`."""
    from study.data.readers import READERS

    if name not in READERS:
        raise UserError(f"data.reader = {name!r} is not a known reader. Valid readers: {', '.join(READERS)}.")
    return READERS[name]()


def _data_root(config: StudyConfig, reader) -> Path:
    root = config.data.root
    if root is None:
        if reader.name == "phantom":
            root = config.cache_dir / "phantom"
        else:
            raise UserError(
                f"data.root is not set. The {reader.name} reader needs the folder that holds the "
                f"dataset: add `root: /path/to/data` under `data:` in grid.yaml."
            )
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if reader.name != "phantom" and not root.exists():
        raise UserError(
            f"The data root {root} (data.root) does not exist. Set data.root in grid.yaml to the "
            f"folder that holds the {reader.name} dataset."
        )
    return root


def _settings(config: StudyConfig, reader, root: Path, target: str, strategy: str, modalities) -> dict:
    """Every setting that changes what the store holds, as plain JSON values."""
    data = config.data
    augment = data.augment.model_dump(mode="json")
    if data.augment.views == 0:  # the other augmentation settings change nothing without views
        augment = {"views": 0}
    return {
        "format": STORE_FORMAT,
        "reader": reader.name,
        "root": str(root),
        "target": target,
        "channels": {"strategy": strategy, "modalities": list(modalities)},
        "slicing": data.slicing.model_dump(mode="json"),
        "split": data.split.model_dump(mode="json"),
        "augment": augment,
        "limit": data.limit,
        "clip_percentiles": list(data.clip_percentiles),
        "window": list(data.window),
        "seed": config.study.seed,
    }


def input_fingerprint(entries: list[SubjectEntry]) -> list[list]:
    """[subject, split, path, size, mtime_ns] of every input file: what the key hashes instead of content."""
    rows = []
    for entry in sorted(entries, key=lambda e: e.subject):
        for path in entry.files:
            try:
                stat = os.stat(path)
            except OSError as error:
                raise UserError(
                    f"Cannot read the input file {path} of subject {entry.subject} ({error.strerror}). "
                    f"Restore the file or remove the subject from the dataset."
                ) from None
            rows.append([entry.subject, entry.split, os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return rows


def store_key(reader_name: str, settings: dict, fingerprint: list[list]) -> str:
    """`<reader>-<16 hex>`: SHA-256 of the settings and the input files' (path, size, mtime_ns)."""
    canonical = json.dumps({"settings": settings, "files": fingerprint}, sort_keys=True, separators=(",", ":"))
    return f"{reader_name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _target_error(value: str, index: int | None, reader, root: Path, targets: tuple[str, ...]) -> UserError:
    where = "data.target" if index is None else f"data.target[{index}]"
    return UserError(f"{where} = {value!r} is not a target of the {reader.name} dataset at {root}. "
                     f"Valid targets: {', '.join(targets)}.")


def _resolve(config: StudyConfig, target: str | None = None) -> _Setup:
    """The setup for one of the config's targets (`target`; None: the first, or the only one)."""
    reader = build_reader(config.data.reader)
    root = _data_root(config, reader)
    entries = sorted(reader.index(root), key=lambda e: e.subject)
    if not entries:
        raise UserError(f"The {reader.name} reader found no subjects under {root}. Check data.root.")
    repeated = [subject for subject, n in Counter(e.subject for e in entries).items() if n > 1]
    if repeated:  # a reader bug, not a user mistake: subjects name volumes uniquely
        raise ValueError(f"the {reader.name} reader listed subject {repeated[0]!r} more than once")
    targets = tuple(reader.targets(entries))
    if not targets:
        raise UserError(
            f"Empty label set: the {reader.name} dataset at {root} defines no targets (no label "
            f"categories or values). Check that its label files or annotations are present."
        )
    listed = config.data.targets()
    if config.data.multi_target:
        for index, name in enumerate(listed):
            if name not in targets:
                raise _target_error(name, index, reader, root, targets)
    if target is not None and target not in listed:
        raise ValueError(f"{target!r} is not one of the study's targets {listed}")
    target = target or listed[0] or reader.default_target
    if target not in targets:
        raise _target_error(target, None, reader, root, targets)
    strategy, modalities = resolve_channels(
        config.data.channels.strategy, config.data.channels.modalities, reader.modalities,
        reader.default_strategy, reader.default_modalities, reader.name,
    )
    split = config.data.split
    split_of = split_subjects(entries, split.val, split.test, config.study.seed)
    settings = _settings(config, reader, root, target, strategy, modalities)
    key = store_key(reader.name, settings, input_fingerprint(entries))
    store = config.cache_dir / "prepared" / key
    return _Setup(reader, root, entries, targets, target, strategy, modalities, split_of, settings, key, store)


# --- planning: which slices of which subject go where ------------------------------------------


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator seeded from the study seed and names (stable across runs and machines)."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _read(action: Callable[[], Any], entry: SubjectEntry, what: str):
    """Run a reader call; a UserError passes through, any other failure names the subject's files."""
    try:
        return action()
    except (UserError, MemoryError):
        raise
    except Exception as error:
        files = ", ".join(str(f) for f in entry.files)
        raise UserError(
            f"Reading the {what} of subject {entry.subject} failed ({type(error).__name__}: {error}). "
            f"One of its files may be truncated or corrupt: {files}. Replace or remove it; nothing "
            f"was written to the prepared store."
        ) from error


def _empty_split(subjects: dict[str, int]) -> dict[str, int]:
    return {split: subjects.get(split, 0) for split in SPLITS}


def _plan(setup: _Setup, config: StudyConfig, progress: bool) -> tuple[DatasetPlan, list[_PlannedSlice]]:
    """Read every subject's target mask, select slices, apply limit; the plan and its slices.

    Train and val subjects keep the slices `select_slices` picks by min_area and keep_empty; a
    test subject keeps every slice with a target pixel (and no empty slice), so that its test
    slices are its whole 3D target.
    """
    data, seed, reader = config.data, config.study.seed, setup.reader
    axis = data.slicing.axis
    volumetric_default = None
    planned: list[_PlannedSlice] = []
    total_area, largest_slice = 0, 0  # largest_slice: over the train and val subjects
    for entry in tqdm(setup.entries, desc=f"scan {reader.name} labels", unit="subject", disable=not progress):
        mask, ids = _read(lambda: reader.load_mask(entry, setup.target), entry, "labels")
        volumetric = True
        if axis != "axial":
            volumetric = entry.extra.get("volumetric", getattr(reader, "volumetric", None))
            if volumetric is None:
                if volumetric_default is None:
                    first = _read(lambda: reader.load(entry, setup.target), entry, "images")
                    volumetric_default = first.volumetric
                volumetric = volumetric_default
        mask, ids = reorient_mask(np.asarray(mask, dtype=bool), ids, entry.subject, axis, volumetric)
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        total_area += int(areas.sum())
        split = setup.split_of[entry.subject]
        if split == "test":  # every slice with a target pixel, no empty one: the whole 3D target
            kept = select_slices(areas, 1, 0, None)
        else:
            largest_slice = max(largest_slice, int(areas.max(initial=0)))
            rng = _rng(seed, "keep_empty", entry.subject)
            kept = select_slices(areas, data.slicing.min_area, data.slicing.keep_empty, rng)
        for index in kept:
            planned.append(_PlannedSlice(entry.subject, index, ids[index], split, int(areas[index])))
    if total_area == 0:
        raise _absent_target(setup)
    if not any(p.split != "test" for p in planned):
        raise UserError(
            f"No training slices left after filtering: no {axis} slice of the {reader.name} dataset's "
            f"train and val subjects has a {setup.target} area of at least data.slicing.min_area = "
            f"{data.slicing.min_area} pixels (the largest has {largest_slice}). Lower "
            f"data.slicing.min_area (e.g. to {max(largest_slice // 2, 1)}) or set "
            f"data.slicing.keep_empty to keep empty slices."
        )
    repeated = [image_id for image_id, n in Counter(p.image_id for p in planned).items() if n > 1]
    if repeated:  # a reader bug: embeddings, prompts and results are keyed by the image id
        raise ValueError(f"the {reader.name} reader gave two slices the image id {repeated[0]!r}")
    if data.limit is not None:
        planned = _apply_limit(planned, data.limit, seed)

    slices = Counter(p.split for p in planned)
    views_per_split = {"train": 1 + data.augment.views, "val": 1, "test": 1}
    warnings = []
    fractions = {"train": 1.0, "val": data.split.val, "test": data.split.test}
    assigned = Counter(setup.split_of.values())
    for split in SPLITS:
        if slices[split] == 0 and (fractions[split] > 0 or assigned[split] > 0):
            least = "pixel" if split == "test" else f"slice of at least {max(data.slicing.min_area, 1)} px"
            warnings.append(
                f"the {split} split has no slices ({assigned[split]} subjects assigned, none with a "
                f"{setup.target} {least})"
            )
    plan = DatasetPlan(
        reader=reader.name,
        root=str(setup.root),
        target=setup.target,
        targets=setup.targets,
        strategy=setup.strategy,
        modalities=setup.modalities,
        axis=axis,
        min_area=data.slicing.min_area,
        keep_empty=data.slicing.keep_empty,
        views=data.augment.views,
        limit=data.limit,
        key=setup.key,
        store=str(setup.store),
        prepared=(setup.store / INDEX_FILE).is_file(),
        subjects_assigned=_empty_split(assigned),
        subjects=_empty_split(Counter(split for split, _ in {(p.split, p.subject) for p in planned})),
        slices=_empty_split(slices),
        images={split: slices[split] * views_per_split[split] for split in SPLITS},
        warnings=tuple(warnings),
    )
    return plan, planned


def _apply_limit(planned: list[_PlannedSlice], limit: int, seed: int) -> list[_PlannedSlice]:
    """At most `limit` slices per split (see `_limit_test_subjects` for test); survivors keep their order.

    Train and val: a seeded choice of `limit` slices. Test: whole subjects, never part of one.
    """
    by_split: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(planned):
        by_split[item.split].append(position)
    keep: set[int] = set()
    for split, positions in by_split.items():
        if len(positions) <= limit:
            keep.update(positions)
        elif split == "test":
            keep.update(_limit_test_subjects([(p, planned[p].subject) for p in positions], limit, seed))
        else:
            keep.update(int(p) for p in _rng(seed, "limit", split).choice(positions, size=limit, replace=False))
    return [item for position, item in enumerate(planned) if position in keep]


def _limit_test_subjects(positions: list[tuple[int, str]], limit: int, seed: int) -> list[int]:
    """The positions of whole test subjects: taken in a seeded order while the total stays within
    `limit`, stopping at the first subject that would pass it; at least one subject, even when
    that one alone has more than `limit` slices."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for position, subject in positions:
        by_subject[subject].append(position)
    order = sorted(by_subject)
    chosen: list[int] = []
    for index in _rng(seed, "limit", "test").permutation(len(order)):
        slices = by_subject[order[int(index)]]
        if chosen and len(chosen) + len(slices) > limit:
            break
        chosen.extend(slices)
    return chosen


def _absent_target(setup: _Setup) -> UserError:
    """The error for a target no subject has: which targets do have pixels (read on this path only)."""
    reader = setup.reader
    present = []
    for target in setup.targets:
        if target == setup.target:
            continue
        for entry in setup.entries:
            mask, _ = _read(lambda: reader.load_mask(entry, target), entry, "labels")
            if np.any(mask):
                present.append(target)
                break
    if not present:
        return UserError(
            f"Empty label set: no label of the {reader.name} dataset at {setup.root} marks any pixel "
            f"(target {setup.target!r} and every other target are empty in all {len(setup.entries)} "
            f"subjects). Check that the label files are the annotated ones."
        )
    return UserError(
        f"The target {setup.target!r} is absent from the {reader.name} dataset at {setup.root}: no "
        f"slice of any of its {len(setup.entries)} subjects has a {setup.target} pixel. Targets "
        f"present: {', '.join(present)}. Set data.target to one of them."
    )


def _record_keys(records) -> set[tuple[str, int]]:
    return {(r.image_id, r.view) for r in records}


def _plan_and_keys(config: StudyConfig, target: str | None, progress: bool) -> tuple[DatasetPlan, set]:
    """The plan of one target's store and the (image id, view) of every image it holds."""
    setup = _resolve(config, target)
    if (setup.store / INDEX_FILE).is_file():
        stored = open_prepared(setup.store)
        plan = DatasetPlan.from_dict({**stored.plan, "store": str(setup.store)}, prepared=True)
        return plan, _record_keys(stored.records)
    plan, planned = _plan(setup, config, progress)
    views = config.data.augment.views
    keys = {(p.image_id, view) for p in planned for view in range(1 + (views if p.split == "train" else 0))}
    return plan, keys


def plan_targets(config: StudyConfig, progress: bool = True) -> tuple[list[DatasetPlan], int]:
    """The plan of every target's store (`data.target` in order) and the number of distinct images
    over all of them: what each backbone encodes. A slice's image, and each augmented view of it,
    does not depend on the target (the subject split is the same for every target, and a view is
    seeded by study seed, subject, slice and view), so a slice two targets keep is one image."""
    plans, keys = [], set()
    for target in config.data.targets():
        plan, held = _plan_and_keys(config, target, progress)
        plans.append(plan)
        keys |= held
    return plans, len(keys)


def plan_dataset(config: StudyConfig, progress: bool = True, target: str | None = None) -> DatasetPlan:
    """The dry run's view of the data: subjects, slices and images per split, channels, store key.

    Reads the dataset index and the label data (through the reader's `load_mask`), never the
    images, and writes nothing (the phantom reader may generate its data). When the store for
    these settings already exists, its recorded plan is returned without reading labels.
    `target` picks one of the config's targets (None: the first, or the only one).
    """
    setup = _resolve(config, target)
    if (setup.store / INDEX_FILE).is_file():
        stored = open_prepared(setup.store).plan
        return DatasetPlan.from_dict({**stored, "store": str(setup.store)}, prepared=True)
    plan, _ = _plan(setup, config, progress)
    return plan


# --- writing the store --------------------------------------------------------------------------


def prepare_dataset(config: StudyConfig, progress: bool = True, target: str | None = None) -> PreparedDataset:
    """The prepared store for `config`: reused when it exists, else written (atomically) and opened.

    `target` picks one of the config's targets (None: the first, or the only one); each target
    has its own store (the key hashes the target).
    """
    setup = _resolve(config, target)
    if (setup.store / INDEX_FILE).is_file():
        return open_prepared(setup.store)
    if setup.store.exists():
        raise UserError(
            f"{setup.store} exists but holds no {INDEX_FILE}; it is not a store this harness wrote. "
            f"Delete the folder and run again."
        )
    plan, planned = _plan(setup, config, progress)
    setup.store.parent.mkdir(parents=True, exist_ok=True)
    temp = setup.store.parent / f".{setup.key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temp.mkdir()
        records = _write_slices(setup, config, planned, temp, progress)
        index = {"format": STORE_FORMAT, "key": setup.key, "settings": setup.settings,
                 "plan": plan.to_dict(), "records": [asdict(r) for r in records]}
        (temp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    won = publish_store(temp, setup.store)
    return replace(open_prepared(setup.store), reused=False) if won else open_prepared(setup.store)


def publish_store(temp: Path, final: Path) -> bool:
    """Rename the finished `temp` folder to `final`; False (temp removed) if another process won."""
    try:
        os.rename(temp, final)
        return True
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if (final / INDEX_FILE).is_file():
            return False
        raise


def _file_name(split: str, number: int, image_id: str, view: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_")[:80]
    return f"{split}/{number:05d}_{safe}_v{view}.npz"


def _check_volume(volume: Volume, entry: SubjectEntry, modalities: tuple[str, ...]) -> None:
    missing = [m for m in modalities if m not in volume.channels]
    if missing:
        raise UserError(
            f"Subject {entry.subject} ({', '.join(map(str, entry.files))}) has no {', '.join(missing)} "
            f"image; it has {', '.join(volume.channels)}. Choose data.channels.modalities it has."
        )
    for name in modalities:
        if volume.channels[name].shape != volume.mask.shape:
            raise UserError(
                f"Subject {entry.subject}: the {name} image has shape {volume.channels[name].shape} but "
                f"the target mask {volume.mask.shape} ({', '.join(map(str, entry.files))}). Image and "
                f"label must cover the same voxels; replace the mismatched file."
            )


def _write_slices(setup: _Setup, config: StudyConfig, planned: list[_PlannedSlice], folder: Path,
                  progress: bool) -> list[SliceRecord]:
    """Load each subject once, write its planned slices (and training views) into `folder`."""
    data, seed = config.data, config.study.seed
    augment = data.augment
    if augment.views:
        # MONAI and torch take seconds to import; only a prepare with augmented views needs them.
        from study.data.augment import augment_view, view_seed
    by_subject: dict[str, list[_PlannedSlice]] = defaultdict(list)
    for item in planned:
        by_subject[item.subject].append(item)
    for split in SPLITS:
        (folder / split).mkdir()
    records: list[SliceRecord] = []
    number = 0
    entries = [e for e in setup.entries if e.subject in by_subject]
    for entry in tqdm(entries, desc=f"prepare {setup.reader.name}", unit="subject", disable=not progress):
        volume = _read(lambda: setup.reader.load(entry, setup.target), entry, "images")
        _check_volume(volume, entry, setup.modalities)
        volume = reorient(volume, data.slicing.axis)
        planes = normalise_channels(volume.channels, volume.kind, setup.modalities,
                                    data.clip_percentiles, data.window)
        # after `reorient`, spacing is (between slices, row, col) for every axis
        spacing = None if volume.spacing is None else (float(volume.spacing[1]), float(volume.spacing[2]))
        slice_spacing = None if volume.spacing is None or not volume.volumetric else float(volume.spacing[0])
        for item in by_subject[entry.subject]:
            index = item.slice_index
            image = compose_image(setup.strategy, [planes[m][index] for m in setup.modalities])
            mask = np.asarray(volume.mask[index], dtype=bool)
            image_id = volume.slice_ids[index]
            views = [(image, mask)]
            if item.split == "train":
                for view in range(1, augment.views + 1):
                    views.append(augment_view(
                        image, mask, view_seed(seed, entry.subject, index, view), augment.rotate_deg,
                        augment.elastic, augment.flip, augment.intensity,
                    ))
            for view, (view_image, view_mask) in enumerate(views):
                file = _file_name(item.split, number, image_id, view)
                np.savez_compressed(folder / file, image=view_image, mask=view_mask.astype(np.uint8))
                records.append(SliceRecord(
                    image_id=image_id, subject=entry.subject, slice_index=index, split=item.split,
                    view=view, area=int(view_mask.sum()), spacing=spacing,
                    height=int(mask.shape[0]), width=int(mask.shape[1]), file=file,
                    slice_spacing=slice_spacing, image_sha256=image_digest(view_image),
                ))
            number += 1
    return records
