"""The prepared store's format and reader: what `study.data.prepare` writes and a trial reads.

A store is a folder `<cache_dir>/prepared/<KEY>/` holding `index.json` (its records, settings
and plan) and one `.npz` per record (image uint8 (H, W, 3), mask uint8 (H, W) in {0, 1}); the
layout and the key are described in `study.data.prepare`, which builds stores. This module only
reads them, so the trial code (trainables) and the embedding cache can depend on it without
depending on the data pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foundation.errors import UserError

SPLITS = ("train", "val", "test")

#: Bumped whenever the store's layout or the preprocessing code changes what a store holds.
#: 2: image ids unique across split folders, every target slice of a test subject kept (min_area
#: and keep_empty filter train and val only), limit by whole test subjects, `slice_spacing`.
#: 3: `SliceRecord.image_sha256`, the content address of the embedding cache.
STORE_FORMAT = 3
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class SliceRecord:
    """One prepared 2D image: a slice (or 2D image) of one subject, in one view.

    `image_id` names the source slice as results do, unique across the store: `SUBJ:z077` for a
    volume slice (`y`/`x` for coronal/sagittal), a 2D image's file name, prefixed with its split
    folder where two split folders hold the same name (`train/case_001.png`); all views of a
    slice share it, so `(image_id, view)` names one record. `slice_index` is the slice's index
    along the slicing axis. `area` is the number of target pixels in this view's mask; `spacing`
    the (row, col) pixel size in mm, None when unknown; `slice_spacing` the distance between
    neighbouring slices along the slicing axis in mm (z for axial, y for coronal, x for
    sagittal), None for 2D images and when unknown; `file` is relative to the store.
    `image_sha256` is `image_digest` of the stored image (dtype, shape and bytes), computed once
    when the store is written: the embedding cache is keyed by it, so the same image in two
    stores (one per `data.target`: the images do not depend on the target) is encoded once.
    """

    image_id: str
    subject: str
    slice_index: int
    split: str
    view: int
    area: int
    spacing: tuple[float, float] | None
    height: int
    width: int
    file: str
    slice_spacing: float | None = None
    image_sha256: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> SliceRecord:
        spacing, between = data.get("spacing"), data.get("slice_spacing")
        return cls(**{**data, "spacing": None if spacing is None else tuple(float(s) for s in spacing),
                      "slice_spacing": None if between is None else float(between)})


@dataclass
class PreparedDataset:
    """A prepared store on disk: its records and how to read one.

    `reused` is True when the store was not written by the call that returned it: a second
    `prepare_dataset` with unchanged inputs (which reads no data at all), `open_prepared`, or a
    prepare that lost the race to a concurrent process writing the same key (its own copy is
    discarded and the winner's is returned).
    """

    key: str
    root: Path
    records: list[SliceRecord]
    settings: dict
    plan: dict
    reused: bool = False

    def records_for(self, split: str, views: bool = False) -> list[SliceRecord]:
        """The records of `split`; only the originals (view 0) unless `views` is True."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [r for r in self.records if r.split == split and (views or r.view == 0)]

    def load(self, record: SliceRecord) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3), mask bool (H, W)) of one record."""
        path = self.root / record.file
        try:
            with np.load(path) as data:
                return data["image"], data["mask"].astype(bool)
        except (OSError, KeyError, ValueError, EOFError) as error:
            raise UserError(
                f"The prepared slice {path} is missing or unreadable ({error}). The store {self.root} "
                f"was changed after it was written: delete that folder and run the study again to "
                f"prepare it anew."
            ) from None


def image_digest(image: np.ndarray) -> str:
    """SHA-256 of an image array's dtype, shape and bytes (C order): `SliceRecord.image_sha256`."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def open_prepared(path: str | Path) -> PreparedDataset:
    """Read the store at `path` (a folder holding index.json)."""
    path = Path(path)
    index = path / INDEX_FILE
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} is not a readable prepared store: cannot read {index} ({error}). Delete the "
            f"folder and run the study again to prepare the data anew."
        ) from None
    if data.get("format") != STORE_FORMAT:
        raise UserError(
            f"The prepared store {path} has format {data.get('format')!r}; this version reads format "
            f"{STORE_FORMAT}. Delete the folder and prepare the data again."
        )
    return PreparedDataset(
        key=data["key"],
        root=path,
        records=[SliceRecord.from_dict(r) for r in data["records"]],
        settings=data["settings"],
        plan=data["plan"],
        reused=True,
    )
