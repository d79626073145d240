"""Overlays of a prediction on its image, in the colour convention of the source reports.

Seed report 001 (Figs 5-8) colours a segmentation so errors are read at a glance: true
positives green, false positives yellow, false negatives pink, and the ground truth's border
red. `overlay` does exactly that; `overlay_examples` reads chosen test images of one trial from
`results/predictions/<trial_id>/<sanitised image_id>.npz` (arrays `image` H x W x 3 uint8,
`mask` and `pred` H x W bool: a trial keeps those of its best and worst test images, see
trainables.evaluation.KEPT_PREDICTIONS), and `prediction_examples` picks the best- and
worst-scored ones of an evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

TRUE_POSITIVE = (0, 255, 0)      # green
FALSE_POSITIVE = (255, 255, 0)   # yellow
FALSE_NEGATIVE = (255, 105, 180)  # pink
TRUTH_BORDER = (255, 0, 0)       # red
REGION_ALPHA = 0.5


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = REGION_ALPHA) -> np.ndarray:
    """The image (H x W x 3 uint8, or H x W greyscale) with the prediction's errors coloured in.

    Pixels in both truth and prediction are blended towards green, prediction only towards
    yellow, truth only towards pink, each as `(1 - alpha) * pixel + alpha * colour`; then the
    truth's border (truth pixels with a 4-connected neighbour outside the truth, or on the image
    edge) is painted pure red on top. Returns a new H x W x 3 uint8 array.
    """
    truth, pred = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    picture = np.asarray(image)
    if picture.ndim == 2:
        picture = np.stack([picture] * 3, axis=-1)
    if picture.dtype != np.uint8:
        low, high = float(np.min(picture)), float(np.max(picture))
        picture = ((picture - low) / (high - low) * 255 if high > low else np.zeros_like(picture, float)).astype(np.uint8)
    if picture.shape[:2] != truth.shape or truth.shape != pred.shape or picture.shape[-1] != 3:
        raise ValueError(f"overlay needs an H x W x 3 image and H x W masks of the same size; got image "
                         f"{picture.shape}, truth {truth.shape}, prediction {pred.shape}")
    out = picture.astype(float)
    for region, colour in ((truth & pred, TRUE_POSITIVE), (pred & ~truth, FALSE_POSITIVE),
                           (truth & ~pred, FALSE_NEGATIVE)):
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(colour, float)
    inner = ndimage.binary_erosion(truth, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    out[truth & ~inner] = TRUTH_BORDER
    return np.round(out).astype(np.uint8)


def sanitise_image_id(image_id: str) -> str:
    """The file stem a study uses for an image's saved prediction: every character other than a
    letter, digit, '.', '_' or '-' becomes '_' (so `BRATS_001:z077` -> `BRATS_001_z077`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id))


def prediction_path(study_dir: Path, trial_id: str, image_id: str) -> Path:
    return Path(study_dir) / "results" / "predictions" / str(trial_id) / f"{sanitise_image_id(image_id)}.npz"


@dataclass
class PredictionExample:
    """One test image of an evaluation with its overlay: `rank` is 'best' or 'worst'."""

    image_id: str
    dice: float
    rank: str
    picture: np.ndarray


def overlay_examples(study_dir: Path, trial_id: str,
                     chosen: list[tuple[str, float, str]]) -> tuple[list[PredictionExample], int]:
    """Overlays of the `chosen` test images (rank label, Dice, image_id) of one trial, in that order,
    from its saved predictions; returns them and how many of the chosen have no saved prediction."""
    examples, absent = [], 0
    for rank, dice, image_id in chosen:
        path = prediction_path(study_dir, trial_id, image_id)
        if not path.is_file():
            absent += 1
            continue
        with np.load(path) as arrays:
            if not {"image", "mask", "pred"} <= set(arrays.files):
                absent += 1
                continue
            picture = overlay(arrays["image"], arrays["mask"], arrays["pred"])
        examples.append(PredictionExample(image_id, dice, rank, picture))
    return examples, absent


def saved_images(study_dir: Path, trial_id: str) -> set[str]:
    """The sanitised image ids whose prediction trial `trial_id` kept (empty when it kept none)."""
    folder = Path(study_dir) / "results" / "predictions" / str(trial_id)
    return {path.stem for path in folder.glob("*.npz")} if folder.is_dir() else set()


def ranked_by_dice(dice_by_image) -> list[tuple[float, str]]:
    """(Dice, image_id) of every image with a finite Dice, highest first."""
    return sorted(((float(d), str(i)) for i, d in dict(dice_by_image).items() if np.isfinite(d)), reverse=True)


def prediction_examples(study_dir: Path, trial_id: str, dice_by_image,
                        count: int = 3) -> tuple[list[PredictionExample], str]:
    """Overlays of the `count` best- and `count` worst-Dice images of one trial.

    `dice_by_image` maps image_id -> Dice of that trial's evaluation. Returns the examples found
    on disk and a sentence for the report saying what was shown or why nothing was.
    """
    folder = Path(study_dir) / "results" / "predictions" / str(trial_id)
    if not folder.is_dir():
        return [], (f"No overlays: the study saved no predictions for trial {trial_id} "
                    f"(results/predictions/{trial_id}/ is absent).")
    ranked = ranked_by_dice(dice_by_image)
    best = ranked[:count]
    worst = [item for item in ranked[::-1][:count] if item not in best]
    examples, absent = overlay_examples(study_dir, trial_id, [("best", d, i) for d, i in best] +
                                        [("worst", d, i) for d, i in worst])
    message = (f"Overlays of the {len(best)} best and {len(worst)} worst test images (by Dice) of trial {trial_id}: "
               f"green true positive, yellow false positive, pink false negative, red ground-truth border.")
    if absent:
        message += f" {absent} of these images have no saved prediction and are not shown."
    if not examples:
        message = f"No overlays: none of the chosen images of trial {trial_id} has a saved prediction in {folder}."
    return examples, message
