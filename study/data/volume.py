"""What every dataset reader returns: subjects on disk, and one subject's images and target mask.

A reader turns a dataset's own layout into these two types, applying its own label convention
to produce a binary target mask, so everything after the reader (slicing, normalisation,
channel strategies, splits) is the same code for every dataset. 2D datasets are volumes too:
an LGG patient is a stack of its TIFF slices; a COCO image is a subject with one slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SubjectEntry:
    """One subject (patient, or a 2D image without patient information) as found on disk.

    `files` lists every input file the subject is read from, so the prepared store can hash
    them; `split` is the dataset's own split folder (train, val, test) or None.
    """

    subject: str
    files: tuple[Path, ...]
    split: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Volume:
    """One subject loaded: named modality stacks and the binary target mask, all (Z, H, W).

    `channels` maps normalised modality names (flair, t1, t1gd, t2w, ct, red, green, blue,
    grey) to float32 arrays of raw intensities; `mask` is bool; `slice_ids` names each slice
    as it appears in results, unique across the dataset (`SUBJECT:z077` for a volume slice; a
    2D image's file name, prefixed with its split folder where two folders share that name,
    see `study.data.readers.picture_id`; an LGG slice's file name, which carries the patient);
    `spacing` is the voxel size (z, row, column) in mm when known (z the spacing between axial
    slices); `kind` says how
    intensities are normalised: "mri" (percentile clipping), "ct" (HU window) or "rgb"
    (already display values, 0..255); `volumetric` is False for a stack of 2D images (COCO,
    LGG, folder of PNGs), which can only be sliced axially.
    """

    subject: str
    channels: dict[str, np.ndarray]
    mask: np.ndarray
    slice_ids: list[str]
    spacing: tuple[float, float, float] | None
    kind: str
    volumetric: bool = True
