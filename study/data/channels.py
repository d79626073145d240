"""Channel strategies: a slice's normalised modalities (each (H, W) uint8) to one (H, W, 3) uint8 image.

Segment-Anything models take three-channel images; seed 001 compared three ways of feeding
four MRI modalities into them, and this module offers those plus a grey fallback:

- `stack`: three named modalities as R, G, B (seed 001: FLAIR, T1-Gd, T2w in that order).
  Exactly three modalities are required.
- `repeat`: one modality in all three channels: the first one listed, or T1-Gd when none is
  listed and the dataset has it (seed 001 found T1-Gd the best single modality), else the
  first of the reader's default modalities.
- `pca`: PCA over the modalities (all the dataset's modalities unless some are listed; at least
  three), per slice. See `pca_channels` for the computation and its sign convention.
- `grey`: the mean of the listed modalities (the reader's defaults when none are listed),
  rounded, in all three channels.

`resolve_channels` turns the `data.channels` section (either key may be None: the reader's
default) into a concrete (strategy, modalities) pair, with a UserError for a modality the
dataset does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from study.data.regions import normalise_modality
from foundation.errors import UserError


def stack_channels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """Three planes as the R, G and B channels, in the order given."""
    if len(planes) != 3:
        raise ValueError(f"stack takes exactly three modalities, got {len(planes)}")
    return np.stack([np.asarray(p, dtype=np.uint8) for p in planes], axis=-1)


def repeat_channels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """The first plane in all three channels."""
    plane = np.asarray(planes[0], dtype=np.uint8)
    return np.stack([plane, plane, plane], axis=-1)


def grey_channels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """The per-pixel mean of the planes, rounded to the nearest integer (ties to even), three times."""
    mean = np.mean([np.asarray(p, dtype=np.float64) for p in planes], axis=0)
    grey = np.rint(mean).astype(np.uint8)
    return np.stack([grey, grey, grey], axis=-1)


def pca_channels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """PCA of the C >= 3 planes of one slice down to three channels, each scaled to 0..255.

    The slice's pixels are the samples and the modalities the features: the (H*W, C) matrix is
    centred per modality, its covariance's eigenvectors sorted by decreasing eigenvalue, and the
    pixels projected onto the top three (channel 0 = the first principal component). Each
    component is then min-max scaled over the slice to 0..255 and rounded; a constant component
    (e.g. an all-black slice, or fewer than three directions of variance) is 0.

    Sign convention (an eigenvector's sign is arbitrary): each axis is flipped so that its
    largest-magnitude loading is positive (the first such loading on ties), as scikit-learn's
    `svd_flip` does; so the result is deterministic and, for MRI, bright tissue stays bright
    on the first component.
    """
    if len(planes) < 3:
        raise ValueError(f"pca needs at least three modalities, got {len(planes)}")
    height, width = np.asarray(planes[0]).shape
    samples = np.stack([np.asarray(p, dtype=np.float64).reshape(-1) for p in planes], axis=1)
    centred = samples - samples.mean(axis=0)
    covariance = centred.T @ centred / max(len(centred) - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    axes = eigenvectors[:, np.argsort(eigenvalues)[::-1][:3]]  # (C, 3), largest variance first
    axes = axes * np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(3)])
    scores = centred @ axes  # (H*W, 3)
    out = np.zeros((height * width, 3), dtype=np.uint8)
    for c in range(3):
        low, high = scores[:, c].min(), scores[:, c].max()
        span = high - low
        # Components whose spread is round-off (a flat slice) stay 0 rather than amplifying noise.
        if span > 1e-9 * max(1.0, np.abs(samples).max()):
            out[:, c] = np.rint((scores[:, c] - low) * (255.0 / span)).astype(np.uint8)
    return out.reshape(height, width, 3)


#: Channel strategy name (data.channels.strategy) -> the function composing one slice's planes.
CHANNEL_STRATEGIES: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
    "stack": stack_channels,
    "repeat": repeat_channels,
    "pca": pca_channels,
    "grey": grey_channels,
}


def compose_image(strategy: str, planes: Sequence[np.ndarray]) -> np.ndarray:
    """One slice's (H, W) uint8 planes, in the resolved modality order, to an (H, W, 3) uint8 image."""
    return CHANNEL_STRATEGIES[strategy](planes)


def resolve_channels(
    strategy: str | None,
    modalities: Sequence[str] | None,
    available: Sequence[str],
    default_strategy: str,
    default_modalities: Sequence[str],
    dataset: str,
) -> tuple[str, tuple[str, ...]]:
    """The (strategy, modalities) a prepare uses, read in the order the strategy consumes them.

    `strategy` / `modalities` None take the reader's defaults (`default_strategy`,
    `default_modalities`; `pca` defaults to every modality the dataset has, `repeat` to T1-Gd
    when available). Names are case-insensitive and accept the usual aliases (t1ce -> t1gd).
    For `repeat` only the first listed modality is kept. Raises UserError for an unknown
    strategy, a modality the dataset `dataset` lacks (listing the ones it has), `stack`
    without exactly three modalities, or `pca` with fewer than three.
    """
    available = tuple(available)
    strategy = strategy or default_strategy
    if strategy not in CHANNEL_STRATEGIES:
        raise UserError(
            f"data.channels.strategy = {strategy!r} is not a channel strategy. Valid strategies: "
            f"{', '.join(CHANNEL_STRATEGIES)}."
        )
    listed = None if modalities is None else tuple(_known_modality(m, available, dataset) for m in modalities)
    if listed is not None and not listed:
        raise UserError(
            f"data.channels.modalities is an empty list. Name the modalities to use (the {dataset} "
            f"dataset has {', '.join(available)}), or leave the key out for the reader's default."
        )
    if strategy == "stack":
        chosen = listed if listed is not None else tuple(default_modalities)
        if len(chosen) != 3:
            raise UserError(
                f"data.channels: the stack strategy puts exactly three modalities into R, G and B, but "
                f"{len(chosen)} are given ({', '.join(chosen)}). List three of {', '.join(available)} "
                f"under data.channels.modalities, or use the repeat or grey strategy."
            )
        return strategy, chosen
    if strategy == "repeat":
        if listed is not None:
            return strategy, listed[:1]
        first = "t1gd" if "t1gd" in available else tuple(default_modalities)[0]
        return strategy, (first,)
    if strategy == "pca":
        chosen = listed if listed is not None else available
        if len(set(chosen)) < 3:
            raise UserError(
                f"data.channels: the pca strategy reduces several modalities to three channels and "
                f"needs at least three different ones, but gets {', '.join(chosen)} (the {dataset} "
                f"dataset has {', '.join(available)}). Use repeat or grey for fewer modalities."
            )
        return strategy, chosen
    return strategy, listed if listed is not None else tuple(default_modalities)


def _known_modality(name: str, available: tuple[str, ...], dataset: str) -> str:
    """`name` normalised (t1ce -> t1gd); UserError listing the dataset's modalities if it lacks it."""
    try:
        normalised = normalise_modality(str(name))
    except UserError:
        normalised = str(name)
    if normalised not in available:
        raise UserError(
            f"data.channels.modalities names {name!r}, which the {dataset} dataset does not have. "
            f"Its modalities are: {', '.join(available)}."
        )
    return normalised
