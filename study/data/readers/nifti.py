"""NIfTI reading shared by the volume readers, with errors that name the file.

nibabel gives arrays in the file's (X, Y, Z[, C]) index order; the harness works in (Z, H, W)
with axial slices along Z, so arrays are transposed to (Z, Y, X): rows are Y, columns are X.
No reorientation is applied: image and label share one grid (checked here), which is all the
slicing needs. A truncated or corrupt file, a missing partner, a shape or affine mismatch and an
unexpected label value are `UserError`s naming the file and what to do.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from foundation.errors import UserError

#: Largest per-element difference (mm) between an image's and its label's affine still taken as equal.
AFFINE_TOLERANCE_MM = 1e-3

#: What nibabel, gzip and zlib raise for a truncated or corrupt file.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


def is_nifti(path: Path) -> bool:
    """True for `.nii` and `.nii.gz` files."""
    return path.name.endswith((".nii", ".nii.gz"))


def nifti_stem(path: Path) -> str:
    """The file name without `.nii` / `.nii.gz`: `BRATS_001.nii.gz` -> `BRATS_001`."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def corrupt_file_error(path: Path, error: BaseException) -> UserError:
    """The UserError for a file that exists but cannot be decoded (NIfTI, PNG, TIFF…)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"Cannot read {path}: {reason}. The file looks truncated or corrupt (an interrupted "
        "download or copy). Download it again, or remove it together with its image/label "
        "partner from the dataset folder."
    )


def open_nifti(path: Path) -> nib.Nifti1Image:
    """The image with its header read and its data left on disk (cheap: no voxels are decoded)."""
    if not path.is_file():
        raise UserError(f"The NIfTI file {path} does not exist. Check the dataset folder.")
    try:
        return nib.load(path)
    except _READ_ERRORS as error:
        raise corrupt_file_error(path, error) from error


def read_intensities(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """All voxels as float32 in file order (X, Y, Z[, C]), with the header's scaling applied."""
    try:
        return image.get_fdata(dtype=np.float32)
    except _READ_ERRORS as error:
        raise corrupt_file_error(path, error) from error


def read_labels(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The label volume (X, Y, Z) as integers; a float label file must hold whole numbers."""
    try:
        labels = np.asanyarray(image.dataobj)
    except _READ_ERRORS as error:
        raise corrupt_file_error(path, error) from error
    while labels.ndim > 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.dtype.kind == "f":
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise UserError(
                f"The label file {path} holds non-integer values (e.g. "
                f"{labels[rounded != labels].flat[0]}). A label volume must hold whole label "
                "numbers; is this an image rather than a segmentation?"
            )
        labels = rounded.astype(np.int16)
    return labels


def to_zyx(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, Y, X) and (X, Y, Z, C) -> (C, Z, Y, X), contiguous."""
    if array.ndim == 3:
        return np.ascontiguousarray(array.transpose(2, 1, 0))
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 1, 0))
    raise ValueError(f"expected a 3D or 4D array, got shape {array.shape}")


def spacing_zyx(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size (z, y, x) in mm from the header zooms, matching the (Z, Y, X) arrays."""
    zooms = image.header.get_zooms()
    return (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def check_same_grid(
    image_path: Path, image: nib.Nifti1Image, label_path: Path, label: nib.Nifti1Image
) -> None:
    """UserError unless image and label have the same (X, Y, Z) shape and affine (headers only)."""
    image_shape = tuple(image.shape[:3])
    label_shape = tuple(label.shape[:3])
    if image_shape != label_shape:
        raise UserError(
            f"Shape mismatch: the image {image_path} is {image_shape} voxels but its label "
            f"{label_path} is {label_shape}. Each label must be drawn on its image's grid; "
            "replace the mismatched file or remove the pair."
        )
    if not np.allclose(image.affine, label.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(image.affine - label.affine).max())
        raise UserError(
            f"Affine mismatch: the label {label_path} does not lie on the grid of its image "
            f"{image_path} (affines differ by up to {worst:.4g} mm, tolerance "
            f"{AFFINE_TOLERANCE_MM} mm). Resample the label onto the image (e.g. nearest-"
            "neighbour with SimpleITK or nibabel.processing) or remove the pair."
        )


def check_label_values(labels: np.ndarray, allowed: tuple[int, ...], path: Path, convention: str) -> None:
    """UserError naming the file and the values when `labels` holds a value outside `allowed`."""
    unexpected = ~np.isin(labels, allowed)
    if unexpected.any():
        values = np.unique(labels[unexpected])[:10].tolist()
        raise UserError(
            f"The label file {path} holds label values {values} that the {convention} "
            f"convention does not use (expected {list(allowed)}). Is the file from another "
            "dataset or challenge year? Check the layout and the reader named in data.reader."
        )
