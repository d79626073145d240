"""Intensity normalisation: a subject's raw intensities to display values 0..255 (uint8).

One rule per kind of image (`Volume.kind`), applied per modality over the subject's whole volume
(every slice), so all slices of one subject share one mapping:

- "mri": percentile clipping, as seed 001 did for the Decathlon brain volumes ("clipping the 0.5
  and 99.5 percentiles of intensity and then linearly mapping the intensities to [0, 255]").
  The percentiles are computed over the **non-zero voxels** of that modality (the brain; skull-
  stripped BraTS/MSD volumes are zero outside it), the usual BraTS choice: over all voxels the
  ~80 % zero background would pull the low percentile to 0. Voxels that were exactly 0 stay 0.
- "ct": the Hounsfield window (low, high) (`data.window`, default the abdominal -175..250 HU)
  mapped linearly to 0..255, values outside clipped.
- "rgb": already display values; clipped to 0..255 and passed through.

Linear maps round to the nearest integer (`np.rint`, ties to even). A flat input (high == low
after taking percentiles, or a modality that is all zero) maps to 0 everywhere.
"""

from __future__ import annotations

import numpy as np

from foundation.errors import UserError


def linear_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip `values` to [low, high], map low -> 0 and high -> 255 linearly, round; uint8.

    When high <= low (no range to map), every value maps to 0.
    """
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.clip(values.astype(np.float64), low, high) - low) * 255.0 / (high - low)
    return np.rint(scaled).astype(np.uint8)


def percentile_clip(volume: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """MRI: clip one modality of one subject to its (low, high) percentiles of non-zero voxels, 0..255.

    `percentiles` are in percent (0.5, 99.5 in seed 001). Computed over the voxels that are not
    exactly 0 (the zero background does not count and stays 0). All-zero input gives all zeros.
    """
    values = np.asarray(volume)
    foreground = values != 0
    if not foreground.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(values[foreground].astype(np.float64), percentiles)
    out = linear_to_uint8(values, float(low), float(high))
    out[~foreground] = 0
    return out


def hounsfield_window(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """CT: the window (low, high) in Hounsfield units to 0..255 (below low -> 0, above high -> 255)."""
    return linear_to_uint8(np.asarray(volume), float(window[0]), float(window[1]))


def rgb_passthrough(volume: np.ndarray) -> np.ndarray:
    """RGB/display images: already 0..255; clipped to that range and rounded to uint8."""
    values = np.asarray(volume)
    if values.dtype == np.uint8:
        return values.copy()
    return np.rint(np.clip(values.astype(np.float64), 0, 255)).astype(np.uint8)


def normalise_modality(
    volume: np.ndarray,
    kind: str,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    window: tuple[float, float] = (-175.0, 250.0),
) -> np.ndarray:
    """One modality of one subject (any shape, usually (Z, H, W)) to uint8 by its `kind`'s rule."""
    if kind == "mri":
        return percentile_clip(volume, clip_percentiles)
    if kind == "ct":
        return hounsfield_window(volume, window)
    if kind == "rgb":
        return rgb_passthrough(volume)
    raise UserError(f"Unknown image kind {kind!r} from a dataset reader; expected mri, ct or rgb.")


def normalise_channels(
    channels: dict[str, np.ndarray],
    kind: str,
    names: tuple[str, ...] | None = None,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    window: tuple[float, float] = (-175.0, 250.0),
) -> dict[str, np.ndarray]:
    """Normalise the modalities `names` (default: all) of a subject's `channels`; name -> uint8 array."""
    wanted = tuple(channels) if names is None else tuple(dict.fromkeys(names))
    return {name: normalise_modality(channels[name], kind, clip_percentiles, window) for name in wanted}
