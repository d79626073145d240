"""Cutting a subject's (Z, H, W) volume into 2D slices: the slicing axis and which slices to keep.

Readers return every array as (Z, H, W): Z the axial slice index, H the image rows and W the
columns, in the stored voxel order (no flips). `reorient` re-indexes a Volume so that its
first axis runs along the chosen slicing axis:

- axial: unchanged; slice ids are the reader's (`SUBJ:z077`, or a 2D image's file name);
- coronal: one slice per row y, each slice (Z, W); ids `SUBJ:y077`;
- sagittal: one slice per column x, each slice (Z, H); ids `SUBJ:x077`.

In a coronal or sagittal slice the rows run along z in storage order (not flipped to put the
head on top). A stack of 2D images (COCO, LGG, a folder of PNGs) has no third dimension to
cut across, so only axial slicing is allowed there.

`select_slices` keeps the slices whose target is large enough (seed 001 dropped slices whose
tumour covers fewer than 250 pixels: small targets turn segmentation into detection and make
Dice over-sensitive to single-pixel label noise) plus a few empty slices per subject. The
prepared store applies that to train and val subjects only; a test subject keeps every slice
with a target pixel (`select_slices(areas, 1, 0, None)`), so that the slices stacked again
are the subject's whole 3D target.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from study.data.volume import Volume
from foundation.errors import UserError

#: Slicing axis -> (transpose of the (Z, H, W) array, letter of the slice id).
AXES: dict[str, tuple[tuple[int, int, int], str]] = {
    "axial": ((0, 1, 2), "z"),
    "coronal": ((1, 0, 2), "y"),
    "sagittal": ((2, 0, 1), "x"),
}


def reorient_array(array: np.ndarray, axis: str) -> np.ndarray:
    """A (Z, H, W) array re-indexed so its first axis is `axis`'s slice index (a view, not a copy)."""
    order, _ = AXES[axis]
    return np.transpose(array, order)


def slice_ids(subject: str, count: int, axis: str) -> list[str]:
    """Ids of a subject's `count` slices along `axis`: `SUBJ:y000`, `SUBJ:y001`, ... (axial: `z`)."""
    _, letter = AXES[axis]
    return [f"{subject}:{letter}{index:03d}" for index in range(count)]


def check_axis(axis: str, volumetric: bool, subject: str) -> None:
    """UserError for an unknown axis, or a non-axial axis on a stack of 2D images."""
    if axis not in AXES:
        raise UserError(f"data.slicing.axis = {axis!r} is not a slicing axis. Valid axes: {', '.join(AXES)}.")
    if axis != "axial" and not volumetric:
        raise UserError(
            f"data.slicing.axis = {axis!r}, but subject {subject} is a stack of 2D images, not a "
            f"volume, so it can only be sliced axially. Set data.slicing.axis to axial."
        )


def reorient_mask(mask: np.ndarray, slice_ids_axial: list[str], subject: str, axis: str, volumetric: bool):
    """A (Z, H, W) mask and its axial slice ids, re-indexed for `axis`: (mask, slice ids)."""
    check_axis(axis, volumetric, subject)
    if axis == "axial":
        return mask, list(slice_ids_axial)
    mask = reorient_array(mask, axis)
    return mask, slice_ids(subject, mask.shape[0], axis)


def reorient(volume: Volume, axis: str) -> Volume:
    """The Volume with every array re-indexed for `axis`, its slice ids and its spacing to match.

    Spacing (z, row, col) becomes (y, z, x) for coronal and (x, z, y) for sagittal: the spacing
    between slices first, then the slice's row and column spacing (axial keeps (z, row, col)).
    """
    check_axis(axis, volume.volumetric, volume.subject)
    if axis == "axial":
        return volume
    order, _ = AXES[axis]
    channels = {name: reorient_array(array, axis) for name, array in volume.channels.items()}
    mask = reorient_array(volume.mask, axis)
    spacing = None if volume.spacing is None else tuple(volume.spacing[i] for i in order)
    return replace(
        volume, channels=channels, mask=mask, spacing=spacing,
        slice_ids=slice_ids(volume.subject, mask.shape[0], axis),
    )


def select_slices(areas: np.ndarray, min_area: int, keep_empty: int,
                  rng: np.random.Generator | None) -> list[int]:
    """Indices (sorted) of the slices to keep, from each slice's target area in pixels.

    Kept: every slice with area >= max(min_area, 1), plus up to `keep_empty` slices with area 0,
    drawn without replacement by `rng` (all of them when there are fewer). Slices with
    0 < area < min_area are dropped: they are neither a usable target nor a true negative.
    `rng` may be None when `keep_empty` is 0.
    """
    areas = np.asarray(areas)
    keep = np.flatnonzero(areas >= max(int(min_area), 1))
    empty = np.flatnonzero(areas == 0)
    if keep_empty > 0 and len(empty):
        chosen = rng.choice(empty, size=min(int(keep_empty), len(empty)), replace=False)
        keep = np.concatenate([keep, chosen])
    return sorted(int(i) for i in keep)
