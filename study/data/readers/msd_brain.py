"""Reader for the Medical Segmentation Decathlon brain-tumour task (Task01_BrainTumour).

Layout (the `imagesTs` test images have no labels and are ignored, as are macOS `._*` files):

    Task01_BrainTumour/
      dataset.json              modality order and label names
      imagesTr/BRATS_001.nii.gz 4D (X, Y, Z, 4): FLAIR, T1w, T1gd, T2w
      labelsTr/BRATS_001.nii.gz 3D (X, Y, Z): 0 background, 1 edema, 2 non-enhancing, 3 enhancing

`root` may be the task folder itself or a folder holding `Task01_BrainTumour/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.readers import is_hidden, require_root, volume_slice_ids
from study.data.readers.nifti import (
    check_label_values,
    check_same_grid,
    is_nifti,
    nifti_stem,
    open_nifti,
    read_intensities,
    read_labels,
    spacing_zyx,
    to_zyx,
)
from study.data.regions import (
    BRAIN_REGIONS,
    MSD_BRAIN_LABELS,
    MSD_MODALITY_ORDER,
    normalise_modality,
    target_label_values,
    target_mask,
)
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

TASK_FOLDER = "Task01_BrainTumour"

LAYOUT = (
    "the Decathlon Task01_BrainTumour layout: dataset.json, imagesTr/NAME.nii.gz (4D, modalities "
    "FLAIR, T1w, T1gd, T2w) and labelsTr/NAME.nii.gz (1 edema, 2 non-enhancing tumour, "
    "3 enhancing tumour)."
)

#: Label values an MSD Task01 label file may hold.
MSD_LABEL_VALUES = (0, 1, 2, 3)


class MsdBrainReader:
    """Decathlon Task01 brain tumour: 4D multi-modal MRI volumes with MSD labels."""

    name = "msd_brain"
    kind = "mri"
    modalities = MSD_MODALITY_ORDER
    default_modalities = ("flair", "t1gd", "t2w")
    default_strategy = "stack"
    default_target = "whole_tumor"
    volumetric = True  # 3D volumes: any slicing axis works

    def index(self, root: Path) -> list[SubjectEntry]:
        """Pair every `imagesTr` volume with its `labelsTr` file (no voxels are read)."""
        task = self.task_folder(require_root(root, self.name, LAYOUT))
        modality_order = read_modality_order(task)
        images_dir, labels_dir = task / "imagesTr", task / "labelsTr"
        images = sorted(p for p in images_dir.iterdir() if is_nifti(p) and not is_hidden(p))
        if not images:
            raise UserError(
                f"The dataset at {task} is empty: {images_dir} holds no .nii.gz volumes. "
                f"The msd_brain reader expects {LAYOUT}"
            )
        labels = {}
        if labels_dir.is_dir():
            labels = {nifti_stem(p): p for p in labels_dir.iterdir() if is_nifti(p) and not is_hidden(p)}
        if not labels:
            raise UserError(
                f"Empty label set: {labels_dir} holds no label volumes, so there is nothing to "
                "train or evaluate on (the Decathlon's imagesTs has no labels either). Point "
                "data.root at a Task01_BrainTumour folder with its labelsTr."
            )
        image_stems = {nifti_stem(p) for p in images}
        for stem, label in labels.items():
            if stem not in image_stems:
                raise UserError(
                    f"The label {label} has no image: expected {images_dir / (stem + '.nii.gz')}. "
                    "Restore the image or remove the label."
                )
        entries = []
        for image in images:
            subject = nifti_stem(image)
            if subject not in labels:
                raise UserError(
                    f"The image {image} has no label: expected {labels_dir / (subject + '.nii.gz')}. "
                    "Restore the label or remove the image from imagesTr."
                )
            entries.append(
                SubjectEntry(
                    subject=subject,
                    files=(image, labels[subject]),
                    split=None,
                    extra={"image": image, "label": labels[subject], "modalities": modality_order},
                )
            )
        return entries

    @staticmethod
    def task_folder(root: Path) -> Path:
        """`root` if it holds `imagesTr`, else `root/Task01_BrainTumour`; UserError otherwise."""
        for candidate in (root, root / TASK_FOLDER):
            if (candidate / "imagesTr").is_dir():
                return candidate
        raise UserError(
            f"No imagesTr folder in {root} or {root / TASK_FOLDER}. The msd_brain reader expects {LAYOUT}"
        )

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        return BRAIN_REGIONS

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """The (Z, H, W) target mask from the label file; image headers are checked, not read."""
        values = target_label_values(target, MSD_BRAIN_LABELS, "MSD Task01 brain tumour")
        image_path, label_path = entry.extra["image"], entry.extra["label"]
        image, label = open_nifti(image_path), open_nifti(label_path)
        modality_count = len(entry.extra["modalities"])
        if image.ndim != 4 or image.shape[3] != modality_count:
            raise UserError(
                f"The image {image_path} has shape {image.shape}; an MSD Task01 image is 4D "
                f"(X, Y, Z, {modality_count}) with the modalities {', '.join(entry.extra['modalities'])}."
            )
        check_same_grid(image_path, image, label_path, label)
        labels = read_labels(label, label_path)
        check_label_values(
            labels, MSD_LABEL_VALUES, label_path, "MSD Task01 (1 edema, 2 non-enhancing, 3 enhancing)"
        )
        mask = to_zyx(target_mask(labels, values))
        return mask, volume_slice_ids(entry.subject, mask.shape[0])

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        image_path = entry.extra["image"]
        image = open_nifti(image_path)
        stacked = to_zyx(read_intensities(image, image_path))  # (C, Z, Y, X)
        channels = {name: stacked[c] for c, name in enumerate(entry.extra["modalities"])}
        return Volume(
            subject=entry.subject,
            channels=channels,
            mask=mask,
            slice_ids=slice_ids,
            spacing=spacing_zyx(image),
            kind=self.kind,
            volumetric=True,
        )


def read_modality_order(task: Path) -> tuple[str, ...]:
    """Normalised modality names in channel order, from dataset.json (the MSD order when absent)."""
    path = task / "dataset.json"
    if not path.is_file():
        return MSD_MODALITY_ORDER
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"Cannot read {path}: {error}. Restore the Decathlon's dataset.json or delete it "
            "(the standard modality order FLAIR, T1w, T1gd, T2w is then assumed)."
        ) from error
    modality = description.get("modality") if isinstance(description, dict) else None
    if not isinstance(modality, dict) or not modality:
        return MSD_MODALITY_ORDER
    try:
        order = tuple(normalise_modality(str(modality[key])) for key in sorted(modality, key=int))
    except (ValueError, UserError) as error:
        raise UserError(
            f"The 'modality' entry of {path} ({modality}) is not a channel-index -> modality-name "
            f"map with known names: {error}"
        ) from error
    if len(set(order)) != len(order):
        raise UserError(f"The 'modality' entry of {path} names a modality twice: {modality}.")
    return order
