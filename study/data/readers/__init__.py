"""Dataset readers: the registry users pick from with `data.reader` in grid.yaml, and their contract.

Each reader turns one on-disk layout into `SubjectEntry` items (a cheap scan, no pixel data) and
loads one subject as a `Volume` whose binary mask is the chosen target in that dataset's own
label convention (see `study.data.regions`). `READERS` maps each name to a builder; the reader
modules are imported only when built, so importing this package stays cheap.

    reader = READERS["msd_brain"]()
    entries = reader.index(Path("/data/Task01_BrainTumour"))
    mask, slice_ids = reader.load_mask(entries[0], "whole_tumor")   # label data only
    volume = reader.load(entries[0], "whole_tumor")                 # images and mask
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError


class Reader(Protocol):
    """What every dataset reader offers (see the module docstring for the call order)."""

    name: str
    kind: str  # "mri" | "ct" | "rgb"
    modalities: tuple[str, ...]
    default_modalities: tuple[str, ...]
    default_strategy: str  # "stack" | "grey"
    default_target: str
    # Readers whose subjects are all alike also have `volumetric: bool`; the folder reader puts
    # it in each entry's extra["volumetric"] instead.

    def index(self, root: Path) -> list[SubjectEntry]: ...

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]: ...

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]: ...

    def load(self, entry: SubjectEntry, target: str) -> Volume: ...


def require_root(root: Path | str, reader: str, layout: str) -> Path:
    """`root` as an absolute Path; UserError naming it and the expected `layout` if it is no folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(
            f"The data root {path} for the {reader!r} reader {what}. Set data.root in grid.yaml "
            f"to the folder that holds the dataset; the {reader} reader expects {layout}"
        )
    return path.resolve()


def is_hidden(path: Path) -> bool:
    """True for dot files, including the `._NAME` resource forks macOS leaves on shared drives."""
    return path.name.startswith(".")


def volume_slice_ids(subject: str, depth: int) -> list[str]:
    """Slice ids of a volume's axial slices as results name them: `SUBJECT:z000`, `SUBJECT:z001`…"""
    return [f"{subject}:z{z:03d}" for z in range(depth)]


def picture_id(entry: SubjectEntry, path: Path | str) -> str:
    """The image id of a 2D picture that is its own subject: the subject name plus the file suffix.

    The subject name is already unique across split folders (`unique_subjects`), so the id is
    too: `case_001.png` where only one folder holds that file, `train/case_001.png` and
    `test/case_001.png` where two split folders share it. Embedding caches, prompt files and
    results key images by this id, so two different pictures never share one.
    """
    return f"{entry.subject}{Path(path).suffix}"


def _coco() -> Reader:
    from study.data.readers.coco import CocoReader

    return CocoReader()


def _msd_brain() -> Reader:
    from study.data.readers.msd_brain import MsdBrainReader

    return MsdBrainReader()


def _brats() -> Reader:
    from study.data.readers.brats import BratsReader

    return BratsReader()


def _lgg() -> Reader:
    from study.data.readers.lgg import LggReader

    return LggReader()


def _btcv() -> Reader:
    from study.data.readers.btcv import BtcvReader

    return BtcvReader()


def _folder() -> Reader:
    from study.data.readers.folder import FolderReader

    return FolderReader()


def _phantom() -> Reader:
    from study.data.readers.phantom import PhantomReader

    return PhantomReader()


#: Reader name as written in grid.yaml -> a builder of that reader.
READERS: dict[str, Callable[[], Reader]] = {
    "coco": _coco,
    "msd_brain": _msd_brain,
    "brats": _brats,
    "lgg": _lgg,
    "btcv": _btcv,
    "folder": _folder,
    "phantom": _phantom,
}


def unique_subjects(entries: list[SubjectEntry], folder_of) -> list[SubjectEntry]:
    """Prefix a subject name with its split folder (`folder_of(entry)`) where two folders share it.

    The one place names are made unique: volume slice ids (`volume_slice_ids`) and 2D image ids
    (`picture_id`) are built from the subject name, so they are unique across folders too.
    """
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.subject] = counts.get(entry.subject, 0) + 1
    return [SubjectEntry(f"{folder_of(e)}/{e.subject}", e.files, e.split, e.extra) if counts[e.subject] > 1 else e
            for e in entries]

