"""Augmented views of a training slice, made once at prepare time with MONAI dictionary transforms.

The image encoder is frozen and its outputs are cached, so augmentation cannot happen on the fly:
a study asks for K views of every training slice (`data.augment.views`), each encoded once.
View 0 is the original; views 1..K come from `augment_view`, which applies, in this order:

- `RandRotated`: a rotation by an angle drawn uniformly from [-rotate_deg, +rotate_deg] about the
  image centre (seed 001: ±20°), output the same size, zeros outside;
- `Rand2DElasticd` (when `elastic`): a smooth random deformation; control points every 1/6 of the
  image's longer side, offsets drawn from N(0, 1) times a magnitude drawn uniformly from 1 % to
  2 % of that side, upsampled bicubically to every pixel; zeros outside;
- `RandFlipd` (when `flip`): a left-right flip with probability 0.5 (anatomy is roughly
  symmetric left-right, not top-bottom, so no vertical flips);
- `RandShiftIntensityd` (when `intensity` > 0, image only): one offset added to every pixel,
  drawn uniformly from ±intensity × 255, then clipped to 0..255.

Pixels moved in from outside the image take the image's background colour: the per-channel
median of its border pixels (0 for skull-stripped MRI and windowed CT; for the `pca` strategy,
whose background is not black, the padding then matches the rest of the background). The
transforms pad with zeros, so the image is shifted by that colour before and back after; with
linear interpolation this equals padding with the colour.
The image is resampled bilinearly and rounded back to uint8; the mask with nearest neighbour,
so it stays binary and aligned with the image. Each view is seeded from (study seed, subject,
slice, view) by `view_seed`, so a view is the same on every run and on every machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, Rand2DElasticd, RandFlipd, RandRotated, RandShiftIntensityd

#: Elastic deformation: control-point spacing and offset magnitude, as fractions of the longer side.
ELASTIC_SPACING_FRACTION = 1 / 6
ELASTIC_MAGNITUDE_FRACTION = (0.01, 0.02)


def view_seed(seed: int, subject: str, slice_index: int, view: int) -> int:
    """A 32-bit seed for one augmented view, stable across runs, processes and machines."""
    digest = hashlib.sha256(f"{seed}|{subject}|{slice_index}|{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@contextmanager
def _small_image_mode() -> Iterator[None]:
    """One torch thread and plain tensors (no MONAI metadata) while a view is made; restored after.

    For slice-sized images the thread pool and MONAI's MetaTensor bookkeeping cost more than the
    arithmetic (measured here: 0.09 s per 128x128 view with two threads and metadata, 0.01 s without).
    """
    threads, track_meta = torch.get_num_threads(), get_track_meta()
    torch.set_num_threads(1)
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(track_meta)
        torch.set_num_threads(threads)


def augmentation_transform(
    height: int, width: int, rotate_deg: float, elastic: bool, flip: bool, intensity: float
) -> Compose:
    """The MONAI pipeline over {"image": (3, H, W) float, "mask": (1, H, W) float} (see module docstring)."""
    keys = ("image", "mask")
    side = max(height, width)
    steps = [
        RandRotated(keys=keys, range_x=math.radians(rotate_deg), prob=1.0, keep_size=True,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    if elastic:
        spacing = max(2.0, side * ELASTIC_SPACING_FRACTION)
        magnitude = (side * ELASTIC_MAGNITUDE_FRACTION[0], side * ELASTIC_MAGNITUDE_FRACTION[1])
        steps.append(Rand2DElasticd(keys=keys, spacing=(spacing, spacing), magnitude_range=magnitude,
                                    prob=1.0, mode=("bilinear", "nearest"), padding_mode="zeros"))
    if flip:
        steps.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=1))
    if intensity > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=intensity * 255.0, prob=1.0))
    return Compose(steps)


def augment_view(
    image: np.ndarray,
    mask: np.ndarray,
    seed: int,
    rotate_deg: float = 20.0,
    elastic: bool = True,
    flip: bool = False,
    intensity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented view of an (H, W, 3) uint8 image and its (H, W) mask: (uint8 image, bool mask).

    `seed` fixes every random draw (use `view_seed`); the same inputs and seed give the same view.
    """
    height, width = mask.shape
    transform = augmentation_transform(height, width, rotate_deg, elastic, flip, intensity)
    transform.set_random_state(seed=seed)
    background = background_colour(image)
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image - background, -1, 0), dtype=np.float32)),
        "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32)[None]),
    }
    with _small_image_mode():
        out = transform(sample)
    image_out = np.moveaxis(np.asarray(out["image"], dtype=np.float32), 0, -1) + background
    mask_out = np.asarray(out["mask"], dtype=np.float32)[0]
    return np.rint(np.clip(image_out, 0, 255)).astype(np.uint8), mask_out > 0.5


def background_colour(image: np.ndarray) -> np.ndarray:
    """The per-channel median of an (H, W, 3) image's border pixels, as float32 (3,)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0).astype(np.float32)
