"""Reader for BraTS challenge data: one folder per case, one NIfTI file per modality.

Two naming generations are recognised per case (a root may even mix them):

    BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz        labels 1 NCR, 2 ED, 4 ET
    BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz  labels 1 NETC, 2 SNFH, 3 ET

Case folders may sit directly under `root` or deeper (e.g. under the challenge's own
`...TrainingData/` folder); a case folder inside a folder called train/val/test takes that split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.readers import require_root, volume_slice_ids
from study.data.readers.nifti import (
    check_label_values,
    check_same_grid,
    is_nifti,
    open_nifti,
    read_intensities,
    read_labels,
    spacing_zyx,
    to_zyx,
)
from study.data.regions import (
    BRAIN_REGIONS,
    BRATS2021_LABELS,
    BRATS2021_SUFFIXES,
    BRATS2023_LABELS,
    BRATS2023_SUFFIXES,
    MSD_MODALITY_ORDER,
    split_from_folder,
    target_label_values,
    target_mask,
)
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

LAYOUT = (
    "one folder per case with BraTS 2021 names (CASE_flair, CASE_t1, CASE_t1ce, CASE_t2, "
    "CASE_seg .nii.gz; labels 1 NCR, 2 ED, 4 ET) or BraTS 2023 names (CASE-t2f, CASE-t1n, "
    "CASE-t1c, CASE-t2w, CASE-seg .nii.gz; labels 1 NETC, 2 SNFH, 3 ET)."
)


class BratsConvention:
    """One BraTS naming generation: how files are named and what the label values mean."""

    def __init__(
        self, year: str, separator: str, suffixes: dict[str, str], labels: dict, values: tuple[int, ...]
    ):
        self.year = year
        self.suffixes = suffixes  # file suffix -> normalised modality
        self.labels = labels  # target -> label values
        self.values = values  # every label value the seg file may hold
        names = "|".join(sorted([*suffixes, "seg"], key=len, reverse=True))
        self.pattern = re.compile(rf"^(?P<case>.+){re.escape(separator)}(?P<kind>{names})\.nii(\.gz)?$")

    def classify(self, path: Path) -> str | None:
        """`seg`, a normalised modality name, or None when `path` is not named this way."""
        match = self.pattern.match(path.name)
        if match is None:
            return None
        kind = match.group("kind")
        return "seg" if kind == "seg" else self.suffixes[kind]


CONVENTIONS = {
    "2021": BratsConvention("2021", "_", BRATS2021_SUFFIXES, BRATS2021_LABELS, (0, 1, 2, 4)),
    "2023": BratsConvention("2023", "-", BRATS2023_SUFFIXES, BRATS2023_LABELS, (0, 1, 2, 3)),
}


class BratsReader:
    """BraTS 2021 / 2023 glioma cases; the label convention is detected per case from file names."""

    name = "brats"
    kind = "mri"
    modalities = MSD_MODALITY_ORDER
    default_modalities = ("flair", "t1gd", "t2w")
    default_strategy = "stack"
    default_target = "whole_tumor"
    volumetric = True  # 3D volumes: any slicing axis works

    def index(self, root: Path) -> list[SubjectEntry]:
        """One entry per case folder, with its four modality files and its seg file."""
        root = require_root(root, self.name, LAYOUT)
        folders: dict[Path, list[Path]] = {}
        for path in sorted(root.rglob("*.nii*")):
            relative_parts = path.relative_to(root).parts
            if is_nifti(path) and not any(part.startswith(".") for part in relative_parts):
                folders.setdefault(path.parent, []).append(path)
        entries = [self._case(folder, files, root) for folder, files in sorted(folders.items())]
        entries = [entry for entry in entries if entry is not None]
        if not entries:
            raise UserError(
                f"The dataset at {root} is empty: no BraTS case folders found. The brats reader expects "
                f"{LAYOUT}"
            )
        return entries

    def _case(self, folder: Path, files: list[Path], root: Path) -> SubjectEntry | None:
        found = {}
        for year, convention in CONVENTIONS.items():
            named = {convention.classify(path): path for path in files}
            named.pop(None, None)
            if named:
                found[year] = named
        if not found:
            return None
        if len(found) > 1:
            raise UserError(
                f"The case folder {folder} mixes BraTS 2021 names (CASE_t1ce.nii.gz) and BraTS "
                "2023 names (CASE-t1c.nii.gz); keep one naming per case."
            )
        ((year, named),) = found.items()
        missing = [m for m in MSD_MODALITY_ORDER if m not in named]
        if len(missing) == len(MSD_MODALITY_ORDER):
            raise UserError(
                f"The label {named['seg']} has no images: its case folder {folder} holds no "
                f"modality files. The brats reader expects {LAYOUT}"
            )
        if "seg" not in named:
            image = named[next(m for m in MSD_MODALITY_ORDER if m in named)]
            raise UserError(
                f"The image {image} has no label: its case folder {folder} holds no "
                f"{'_seg' if year == '2021' else '-seg'}.nii.gz file (BraTS validation and test "
                "cases come without labels). Use the labelled training cases, or remove the folder."
            )
        if missing:
            suffixes = {modality: suffix for suffix, modality in CONVENTIONS[year].suffixes.items()}
            raise UserError(
                f"The BraTS {year} case folder {folder} lacks the modality files for "
                f"{', '.join(suffixes[m] for m in missing)}; restore them or remove the case."
            )
        split = split_from_folder(folder.parent.name) if folder.parent != root else None
        images = {modality: named[modality] for modality in MSD_MODALITY_ORDER}
        return SubjectEntry(
            subject=folder.name,
            files=(*images.values(), named["seg"]),
            split=split,
            extra={"convention": year, "images": images, "label": named["seg"]},
        )

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        return BRAIN_REGIONS

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """The (Z, H, W) target mask from the seg file, in the case's own label convention."""
        convention = CONVENTIONS[entry.extra["convention"]]
        values = target_label_values(target, convention.labels, f"BraTS {convention.year}")
        label_path = entry.extra["label"]
        label = open_nifti(label_path)
        for image_path in entry.extra["images"].values():
            check_same_grid(image_path, open_nifti(image_path), label_path, label)
        labels = read_labels(label, label_path)
        check_label_values(labels, convention.values, label_path, f"BraTS {convention.year}")
        mask = to_zyx(target_mask(labels, values))
        return mask, volume_slice_ids(entry.subject, mask.shape[0])

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        channels, spacing = {}, None
        for modality, path in entry.extra["images"].items():
            image = open_nifti(path)
            if image.ndim != 3:
                raise UserError(
                    f"The BraTS image {path} has shape {image.shape}; expected one 3D volume per modality."
                )
            channels[modality] = to_zyx(read_intensities(image, path))
            spacing = spacing_zyx(image)
        return Volume(
            subject=entry.subject,
            channels=channels,
            mask=mask,
            slice_ids=slice_ids,
            spacing=spacing,
            kind=self.kind,
            volumetric=True,
        )
