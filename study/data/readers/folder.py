"""Reader for a generic folder of image/mask pairs, and the 2D image-file reading other readers share.

Layout (optionally inside split folders `train/`, `val/` or `valid/`, `test/` under `root`):

    images/case_001.png   masks/case_001.png      2D: PNG, TIFF, JPEG or BMP
    images/ct_07.nii.gz   masks/ct_07.nii.gz      3D: NIfTI (single-channel)

`labels/` may stand in for `masks/`. Pairs are matched by file stem; a mask stem may carry a
`_mask`, `_seg` or `_label` suffix (`case_001_mask.png`). A 2D pair is a subject with one slice
(`volumetric=False`), a NIfTI pair a volume. Subjects are named by the image stem, prefixed with
the split folder where two folders hold the same stem (`train/case_001`); a picture's image id is
that name plus its suffix (`case_001.png`, or `train/case_001.png` and `test/case_001.png`), a
volume's slices are `ct_07:z000`, …. Targets: `all` (every non-zero mask value) or
`label_N` (mask value N).

Each `Volume` says how to normalise it: 8-bit pictures come as `rgb` (display values), 16-bit
and float pictures and NIfTI volumes as `mri` (percentile clipping). Every 2D image provides
`grey` (ITU-R BT.601 luma for colour pictures) and `red`, `green`, `blue` (all equal for a
grey picture), so both the `grey` and the `stack` channel strategies apply.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.readers import is_hidden, picture_id, require_root, unique_subjects, volume_slice_ids
from study.data.readers.nifti import (
    check_same_grid,
    corrupt_file_error,
    is_nifti,
    nifti_stem,
    open_nifti,
    read_intensities,
    read_labels,
    spacing_zyx,
    to_zyx,
)
from study.data.regions import split_from_folder
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

PICTURE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_FOLDERS = ("masks", "labels")
MASK_STEM_SUFFIXES = ("_mask", "_seg", "_label")

LAYOUT = (
    "images/ with masks/ (or labels/) next to it, optionally inside train/, val/ (or valid/) "
    "and test/ folders, with image and mask files of the same stem: PNG, TIFF, JPEG or BMP "
    "pictures, or NIfTI volumes."
)

#: What PIL, tifffile and zlib raise for a truncated or corrupt picture.
_PICTURE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zlib.error)

#: BT.601 luma weights (what PIL's convert("L") uses) for a grey version of a colour picture.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def is_picture(path: Path) -> bool:
    return path.suffix.lower() in PICTURE_SUFFIXES


def read_picture(path: Path, *, as_mask: bool = False) -> np.ndarray:
    """A 2D picture as (H, W) or (H, W, 3) in its stored dtype; UserError naming a bad file.

    TIFF goes through tifffile, everything else through PIL. Colour pictures lose an alpha
    channel and palettes are expanded to RGB, except for masks (`as_mask`), whose palette
    indices are the label values.
    """
    if not path.is_file():
        raise UserError(f"The image file {path} does not exist. Check the dataset folder.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as picture:
                picture.load()
                if picture.mode == "P" and not as_mask:
                    picture = picture.convert("RGB")
                elif picture.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    picture = picture.convert("RGB")
                elif picture.mode in ("LA", "PA") and not as_mask:
                    picture = picture.convert("L")
                array = np.asarray(picture)
    except UserError:
        raise
    except _PICTURE_ERRORS as error:
        raise corrupt_file_error(path, error) from error
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = array[..., : array.shape[-1] - 1]  # drop alpha
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise UserError(
            f"The picture {path} has shape {array.shape}; expected one 2D image, grey (H, W) "
            "or colour (H, W, 3). Multi-page TIFF stacks are not read as 2D pictures."
        )
    return array


def mask_labels_2d(array: np.ndarray, path: Path) -> np.ndarray:
    """A 2D mask picture as (H, W) label values; a colour mask must be grey (equal channels)."""
    if array.ndim == 3:
        if not (
            np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
        ):
            raise UserError(
                f"The mask {path} is a colour picture with differing channels; a mask must hold "
                "one label value per pixel (save it as a grey or palette PNG)."
            )
        array = array[..., 0]
    return array


class FolderReader:
    """Generic `images/` + `masks/` pairs matched by stem: 2D pictures or NIfTI volumes."""

    name = "folder"
    kind = "rgb"  # 8-bit pictures; see the module docstring for the kind of other files
    modalities = ("grey", "red", "green", "blue")
    default_modalities = ("grey",)
    default_strategy = "grey"
    default_target = "all"
    # no `volumetric` attribute: each entry says, in extra["volumetric"] (NIfTI True, pictures False)

    def __init__(self) -> None:
        self._mask_values: dict[Path, tuple[int, ...]] = {}

    def index(self, root: Path) -> list[SubjectEntry]:
        """One entry per image, with its mask; UserError for a file without its partner."""
        root = require_root(root, self.name, LAYOUT)
        groups = []
        if (root / "images").is_dir():
            groups.append((root, None))
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            split = split_from_folder(child.name)
            if split is not None and (child / "images").is_dir():
                groups.append((child, split))
        if not groups:
            raise UserError(
                f"No images/ folder in {root} or in its train/val/test folders. The folder reader expects "
                f"{LAYOUT}"
            )
        entries: list[SubjectEntry] = []
        for folder, split in groups:
            entries.extend(self._pairs(folder, split))
        if not entries:
            raise UserError(
                f"The dataset at {root} is empty: its images/ folders hold no pictures or NIfTI files. The "
                f"folder reader expects {LAYOUT}"
            )
        return unique_subjects(entries, lambda e: e.extra['folder'])

    def _pairs(self, folder: Path, split: str | None) -> list[SubjectEntry]:
        images_dir = folder / "images"
        masks_dir = next((folder / name for name in MASK_FOLDERS if (folder / name).is_dir()), None)
        images = sorted(
            p
            for p in images_dir.iterdir()
            if p.is_file() and not is_hidden(p) and (is_picture(p) or is_nifti(p))
        )
        masks = []
        if masks_dir is not None:
            masks = sorted(
                p
                for p in masks_dir.iterdir()
                if p.is_file() and not is_hidden(p) and (is_picture(p) or is_nifti(p))
            )
        if images and not masks:
            raise UserError(
                f"Empty label set: {folder} has images/ but no masks/ or labels/ folder with mask "
                f"files. The folder reader expects {LAYOUT}"
            )
        masks_by_stem: dict[str, Path] = {}
        for mask in masks:
            stem = file_stem(mask)
            for suffix in MASK_STEM_SUFFIXES:
                if stem.endswith(suffix) and len(stem) > len(suffix):
                    stem = stem[: -len(suffix)]
                    break
            if stem in masks_by_stem:
                raise UserError(
                    f"Two masks in {masks_dir} match the image stem {stem!r}: {masks_by_stem[stem].name} "
                    f"and {mask.name}. Keep one."
                )
            masks_by_stem[stem] = mask
        image_stems = {file_stem(p) for p in images}
        for stem, mask in masks_by_stem.items():
            if stem not in image_stems:
                raise UserError(
                    f"The mask {mask} has no image: no file with the stem {stem!r} in {images_dir}. Restore "
                    "the image or remove the mask."
                )
        entries = []
        for image in images:
            stem = file_stem(image)
            if stem not in masks_by_stem:
                raise UserError(
                    f"The image {image} has no mask: no file with the stem {stem!r} in {masks_dir}. "
                    "Add its mask or remove the image."
                )
            mask = masks_by_stem[stem]
            if is_nifti(image) != is_nifti(mask):
                raise UserError(
                    f"The image {image} and its mask {mask} differ in format: pair NIfTI with NIfTI and "
                    "pictures with pictures."
                )
            entries.append(
                SubjectEntry(
                    subject=stem,
                    files=(image, mask),
                    split=split,
                    extra={
                        "image": image,
                        "mask": mask,
                        "volumetric": is_nifti(image),
                        "folder": folder.name,
                    },
                )
            )
        return entries

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        """`all` and `label_N` for every non-zero value N found in the masks (reads every mask)."""
        values: set[int] = set()
        for entry in entries:
            mask_path = entry.extra["mask"]
            if mask_path not in self._mask_values:
                labels = self._read_labels(entry)
                self._mask_values[mask_path] = tuple(int(v) for v in np.unique(labels) if v != 0)
            values.update(self._mask_values[mask_path])
        return ("all", *(f"label_{v}" for v in sorted(values)))

    def _read_labels(self, entry: SubjectEntry) -> np.ndarray:
        """The mask's label values, (Z, H, W) for NIfTI and (1, H, W) for a picture."""
        mask_path = entry.extra["mask"]
        if entry.extra["volumetric"]:
            image_path = entry.extra["image"]
            label = open_nifti(mask_path)
            check_same_grid(image_path, open_nifti(image_path), mask_path, label)
            return to_zyx(read_labels(label, mask_path))
        return mask_labels_2d(read_picture(mask_path, as_mask=True), mask_path)[None]

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """`all`: every non-zero mask value; `label_N`: mask value N."""
        match = re.fullmatch(r"label_(\d+)", target)
        if target != "all" and match is None:
            raise UserError(
                f"Unknown target {target!r} for the folder dataset. Valid targets: all (every "
                "non-zero mask value) or label_N for a mask value N (e.g. label_1)."
            )
        labels = self._read_labels(entry)
        mask = labels != 0 if target == "all" else labels == int(match.group(1))
        if entry.extra["volumetric"]:
            return mask, volume_slice_ids(entry.subject, mask.shape[0])
        return mask, [picture_id(entry, entry.extra["image"])]

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        image_path = entry.extra["image"]
        if entry.extra["volumetric"]:
            image = open_nifti(image_path)
            data = read_intensities(image, image_path)
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise UserError(
                    f"The NIfTI image {image_path} has shape {data.shape}; the folder reader reads "
                    "single-channel 3D volumes."
                )
            return Volume(
                entry.subject, {"grey": to_zyx(data)}, mask, slice_ids, spacing_zyx(image), "mri", True
            )
        picture = read_picture(image_path)
        if picture.shape[:2] != mask.shape[1:]:
            raise UserError(
                f"Shape mismatch: the image {image_path} is {picture.shape[:2]} pixels but its mask "
                f"{entry.extra['mask']} is {mask.shape[1:]}. Replace the mismatched file or remove the pair."
            )
        kind = "rgb" if picture.dtype == np.uint8 else "mri"
        channels = picture_channels(picture)
        return Volume(entry.subject, channels, mask, slice_ids, None, kind, False)


def picture_channels(picture: np.ndarray) -> dict[str, np.ndarray]:
    """grey, red, green, blue as float32 (1, H, W) arrays from an (H, W) or (H, W, 3) picture."""
    values = picture.astype(np.float32)
    if values.ndim == 2:
        return {name: values[None].copy() for name in ("grey", "red", "green", "blue")}
    red, green, blue = values[..., 0], values[..., 1], values[..., 2]
    grey = LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue
    return {"grey": grey[None], "red": red[None], "green": green[None], "blue": blue[None]}


def file_stem(path: Path) -> str:
    """The name without its extension (`.nii.gz` counts as one extension)."""
    return nifti_stem(path) if is_nifti(path) else path.stem
