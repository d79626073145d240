"""Reader for BTCV abdominal CT (Synapse multi-organ segmentation, 13 organs).

Accepted layouts (`imagesTs` and other unlabelled folders are ignored):

    imagesTr/img0001.nii.gz    labelsTr/label0001.nii.gz     (MONAI / Decathlon style)
    img/img0001.nii.gz         label/label0001.nii.gz        (the challenge's RawData/Training)
    img0001.nii.gz             label0001.nii.gz              (side by side in root)

Images are raw Hounsfield units (`kind="ct"`; the intensity window is applied later). Targets:
an organ name from `study.data.regions.BTCV_ORGANS` or `all` (the union of the 13 organs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.readers import is_hidden, require_root, volume_slice_ids
from study.data.readers.nifti import (
    check_label_values,
    check_same_grid,
    nifti_stem,
    open_nifti,
    read_intensities,
    read_labels,
    spacing_zyx,
    to_zyx,
)
from study.data.regions import BTCV_LABELS, target_label_values, target_mask
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

LAYOUT = (
    "CT volumes imagesTr/imgNNNN.nii.gz with labels labelsTr/labelNNNN.nii.gz (or img/ and "
    "label/ folders, or both side by side in the root), labels 1-13 for the BTCV organs."
)

FOLDER_PAIRS = (("imagesTr", "labelsTr"), ("img", "label"), (".", "."))
BTCV_LABEL_VALUES = tuple(range(14))

_IMAGE_NAME = re.compile(r"^img(?P<key>.+)\.nii(\.gz)?$")
_LABEL_NAME = re.compile(r"^label(?P<key>.+)\.nii(\.gz)?$")


def _named(folder: Path, pattern: re.Pattern) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file() and not is_hidden(path):
            found[match.group("key")] = path
    return found


class BtcvReader:
    """BTCV abdominal CT with 13 organ labels."""

    name = "btcv"
    kind = "ct"
    modalities = ("ct",)
    default_modalities = ("ct",)
    default_strategy = "grey"
    default_target = "all"
    volumetric = True  # 3D volumes: any slicing axis works

    def index(self, root: Path) -> list[SubjectEntry]:
        """Pair `imgKEY` volumes with `labelKEY` volumes in the first layout that has images."""
        root = require_root(root, self.name, LAYOUT)
        for image_folder, label_folder in FOLDER_PAIRS:
            images = _named(root / image_folder, _IMAGE_NAME)
            if images:
                labels_dir = root / label_folder
                labels = _named(labels_dir, _LABEL_NAME)
                break
        else:
            raise UserError(
                f"The dataset at {root} is empty: no img*.nii.gz volumes in imagesTr/, img/ or the root. "
                f"The btcv reader expects {LAYOUT}"
            )
        if not labels:
            raise UserError(
                f"Empty label set: no label*.nii.gz files in {labels_dir} to go with the images in "
                f"{root / image_folder}. The btcv reader expects {LAYOUT}"
            )
        for key, label in labels.items():
            if key not in images:
                raise UserError(
                    f"The label {label} has no image: expected img{key}.nii.gz in {root / image_folder}. "
                    "Restore the image or remove the label."
                )
        entries = []
        for key, image in images.items():
            if key not in labels:
                raise UserError(
                    f"The image {image} has no label: expected label{key}.nii.gz in {labels_dir}. Restore "
                    "the label or remove the image."
                )
            entries.append(
                SubjectEntry(
                    subject=nifti_stem(image),
                    files=(image, labels[key]),
                    split=None,
                    extra={"image": image, "label": labels[key]},
                )
            )
        return entries

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        return tuple(BTCV_LABELS)

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """The (Z, H, W) organ mask from the label file (image header checked, not read)."""
        values = target_label_values(target, BTCV_LABELS, "BTCV")
        image_path, label_path = entry.extra["image"], entry.extra["label"]
        label = open_nifti(label_path)
        check_same_grid(image_path, open_nifti(image_path), label_path, label)
        labels = read_labels(label, label_path)
        check_label_values(labels, BTCV_LABEL_VALUES, label_path, "BTCV (organs 1-13)")
        mask = to_zyx(target_mask(labels, values))
        return mask, volume_slice_ids(entry.subject, mask.shape[0])

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        image_path = entry.extra["image"]
        image = open_nifti(image_path)
        if image.ndim != 3:
            raise UserError(f"The CT image {image_path} has shape {image.shape}; expected a 3D volume.")
        hounsfield = to_zyx(read_intensities(image, image_path))
        return Volume(entry.subject, {"ct": hounsfield}, mask, slice_ids, spacing_zyx(image), self.kind, True)
