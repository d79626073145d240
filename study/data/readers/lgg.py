"""Reader for the LGG segmentation dataset (Buda et al., kaggle_3m TCGA layout).

Layout (`root` may be `kaggle_3m/` or a folder holding it):

    kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1.tif        RGB slice
    kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1_mask.tif   0/255 FLAIR abnormality

A subject is one TCGA patient folder, its slices ordered by N numerically (1, 2, …, 10, not
1, 10, 2). The slice's three channels are pre-contrast, FLAIR and post-contrast, normalised to
`t1`, `flair`, `t1gd`. The mask is the FLAIR abnormality, so `whole_tumor` and `all` are the
same target. Slices are independent 2D images (`volumetric=False`) without a known spacing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.readers import is_hidden, require_root
from study.data.readers.folder import mask_labels_2d, read_picture
from study.data.regions import LGG_CHANNELS
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

LAYOUT = (
    "the kaggle_3m layout: one TCGA_* folder per patient holding TCGA_..._N.tif slices (3 "
    "channels: pre-contrast, FLAIR, post-contrast) and TCGA_..._N_mask.tif masks (0/255)."
)

TARGETS = ("whole_tumor", "all")

_IMAGE_NAME = re.compile(r"^(?P<case>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
_MASK_NAME = re.compile(r"^(?P<case>.+)_(?P<n>\d+)_mask\.tiff?$", re.IGNORECASE)


class LggReader:
    """kaggle_3m LGG: RGB TIFF slices per TCGA patient with binary FLAIR-abnormality masks."""

    name = "lgg"
    kind = "mri"
    modalities = LGG_CHANNELS
    default_modalities = ("t1", "flair", "t1gd")
    default_strategy = "stack"
    default_target = "whole_tumor"
    volumetric = False  # stacks of 2D images: axial slicing only

    def index(self, root: Path) -> list[SubjectEntry]:
        """One entry per TCGA folder, its slices paired with their masks and sorted by N."""
        root = require_root(root, self.name, LAYOUT)
        patients: list[Path] = []
        for candidate in (root, root / "kaggle_3m", root / "lgg-mri-segmentation" / "kaggle_3m"):
            if candidate.is_dir():
                patients = sorted(p for p in candidate.iterdir() if p.is_dir() and p.name.startswith("TCGA_"))
            if patients:
                break
        if not patients:
            raise UserError(
                f"The dataset at {root} is empty: no TCGA_* patient folders found (also looked in "
                f"kaggle_3m/). The lgg reader expects {LAYOUT}"
            )
        return [self._patient(folder) for folder in patients]

    def _patient(self, folder: Path) -> SubjectEntry:
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for path in folder.iterdir():
            if is_hidden(path) or not path.is_file():
                continue
            if match := _MASK_NAME.match(path.name):
                masks[int(match.group("n"))] = path
            elif match := _IMAGE_NAME.match(path.name):
                images[int(match.group("n"))] = path
        if not images and not masks:
            raise UserError(
                f"The patient folder {folder} holds no TCGA_..._N.tif slices. The lgg reader expects {LAYOUT}"
            )
        for n, mask in sorted(masks.items()):
            if n not in images:
                raise UserError(
                    f"The mask {mask} has no image: expected {mask.name.replace('_mask', '')} beside it. "
                    "Restore the slice or remove the mask."
                )
        for n, image in sorted(images.items()):
            if n not in masks:
                raise UserError(
                    f"The image {image} has no mask: expected "
                    f"{image.with_name(image.stem + '_mask' + image.suffix).name} beside it. Restore the "
                    "mask or remove the slice."
                )
        numbers = sorted(images)
        image_paths = tuple(images[n] for n in numbers)
        mask_paths = tuple(masks[n] for n in numbers)
        return SubjectEntry(
            subject=folder.name,
            files=image_paths + mask_paths,
            split=None,
            extra={"images": image_paths, "masks": mask_paths},
        )

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        return TARGETS

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """(Z, H, W) mask: every non-zero mask pixel (the masks hold 0 and 255)."""
        if target not in TARGETS:
            raise UserError(
                f"Unknown target {target!r} for the LGG dataset. Valid targets: {', '.join(TARGETS)} "
                "(both are its FLAIR-abnormality mask)."
            )
        slices = []
        for path in entry.extra["masks"]:
            mask = mask_labels_2d(read_picture(path, as_mask=True), path) != 0
            if slices and mask.shape != slices[0].shape:
                raise UserError(
                    f"The mask {path} is {mask.shape} pixels but the patient's first mask "
                    f"{entry.extra['masks'][0].name} is {slices[0].shape}; all slices of a patient must "
                    "share one size."
                )
            slices.append(mask)
        return np.stack(slices), [path.name for path in entry.extra["images"]]

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        pictures = []
        for path, mask_path in zip(entry.extra["images"], entry.extra["masks"], strict=True):
            picture = read_picture(path)
            if picture.ndim != 3:
                raise UserError(
                    f"The slice {path} has shape {picture.shape}; an LGG slice has three channels "
                    "(pre-contrast, FLAIR, post-contrast)."
                )
            if picture.shape[:2] != mask.shape[1:]:
                raise UserError(
                    f"Shape mismatch: the slice {path} is {picture.shape[:2]} pixels but its mask "
                    f"{mask_path} is {mask.shape[1:]}. Replace the mismatched file or remove the pair."
                )
            pictures.append(picture)
        stacked = np.stack(pictures).astype(np.float32)  # (Z, H, W, 3)
        channels = {name: np.ascontiguousarray(stacked[..., c]) for c, name in enumerate(LGG_CHANNELS)}
        return Volume(entry.subject, channels, mask, slice_ids, None, self.kind, volumetric=False)
