"""A small finished study, written by hand: what `python -m study.run` leaves on disk.

Two backbones (sam_b, litemedsam) x two prompts (box, center_point), fine-tuned once each with
adamw / dice_bce, plus a failed trial and four zero-shot evaluations, each scored on the same
eight test images. The per-image values below are the ground truth the tests compute against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

IMAGES = ["S1:z010", "S1:z011", "S1:z012", "S1:z013", "S2:z020", "S2:z021", "S2:z022", "S2:z023"]
AREAS = [120, 300, 800, 1500, 2600, 4000, 6500, 9000]
BACKBONES = {"sam_b": ("sam", 89_670_912), "litemedsam": ("litemedsam", 5_659_216)}
NAN = np.nan

# trial_id -> (stage, backbone, prompt, per-image Dice, per-image HD95, val_dice)
EVALUATIONS = {
    "ft_sam_b_box": ("finetune", "sam_b", "box",
                     [0.62, 0.71, 0.80, 0.83, 0.85, 0.90, 0.91, 0.93], [9.0, 7.5, 5.0, 4.5, 4.0, 3.0, 2.5, 2.0], 0.86),
    "ft_sam_b_point": ("finetune", "sam_b", "center_point",
                       [0.41, 0.55, 0.70, 0.74, 0.78, 0.86, 0.84, 0.88], [14.0, NAN, 8.0, 7.0, 6.5, 4.0, 4.5, 3.5], 0.78),
    "ft_lite_box": ("finetune", "litemedsam", "box",
                    [0.58, 0.69, 0.74, 0.80, 0.83, 0.87, 0.90, 0.91], [10.0, 8.0, 6.0, 5.5, 4.5, 3.5, 3.0, 2.5], 0.82),
    "ft_lite_point": ("finetune", "litemedsam", "center_point",
                      [0.30, 0.52, 0.66, 0.70, 0.72, 0.80, 0.83, 0.85], [NAN, 12.0, 9.0, 8.0, 7.0, 5.0, 4.0, NAN], 0.74),
    "zs_sam_b_box": ("zero_shot", "sam_b", "box",
                     [0.40, 0.52, 0.61, 0.66, 0.70, 0.74, 0.77, 0.80], [20.0, 15.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0], 0.66),
    "zs_sam_b_point": ("zero_shot", "sam_b", "center_point",
                       [0.10, 0.25, 0.44, 0.47, 0.52, 0.60, 0.66, 0.71], [40.0, 30.0, NAN, 17.0, 15.0, 12.0, 10.0, 9.0], 0.47),
    "zs_lite_box": ("zero_shot", "litemedsam", "box",
                    [0.45, 0.58, 0.66, 0.69, 0.72, 0.79, 0.80, 0.84], [18.0, 13.0, 10.0, 9.0, 8.0, 6.0, 5.5, 5.0], 0.70),
    "zs_lite_point": ("zero_shot", "litemedsam", "center_point",
                      [0.15, 0.30, 0.50, 0.52, 0.55, 0.66, 0.70, 0.74], [35.0, 25.0, 18.0, 16.0, 14.0, 10.0, 9.0, 8.0], 0.52),
}
FAILED_TRIAL = "ft_lite_box_retry"


def iou_from_dice(dice):
    """IoU of a mask pair with the given Dice: J = D / (2 - D)."""
    dice = np.asarray(dice, float)
    return dice / (2 - dice)


def write_resolved(study_dir: Path, factors: dict, search: dict | None = None, name: str = "fixture-study"):
    config = {"study": {"name": name, "out": str(study_dir.parent), "seed": 0},
              "factors": factors,
              "search": search or {"algorithm": "grid", "num_samples": 1, "metric": "val_dice", "mode": "max"},
              "report": {"enabled": True}}
    (study_dir / "resolved.yaml").write_text("# resolved by study.config\n" + yaml.safe_dump(config, sort_keys=False))


def write_study(study_dir: Path, with_predictions: bool = True) -> Path:
    """Write the fixture study folder (resolved.yaml, results/*.csv, predictions) and return it."""
    results = study_dir / "results"
    results.mkdir(parents=True)
    write_resolved(study_dir, {
        "backbone": ["sam_b", "litemedsam"], "optimizer": ["adamw"], "loss": ["dice_bce"],
        "prompt": ["box", "center_point"], "eval_prompt": "same", "lr": [1e-4], "weight_decay": [0.01],
        "epochs": [3], "batch_size": [4], "grad_accum": [1]})
    trials, per_image, history = [], [], []
    for seconds, (trial_id, (stage, backbone, prompt, dice, hd95, val_dice)) in enumerate(EVALUATIONS.items(), 10):
        family, params = BACKBONES[backbone]
        finetune = stage == "finetune"
        iou = iou_from_dice(dice)
        trials.append({
            "trial_id": trial_id, "stage": stage, "status": "TERMINATED", "backbone": backbone, "family": family,
            "image_encoder_params": params, "optimizer": "adamw" if finetune else None,
            "loss": "dice_bce" if finetune else None, "prompt": prompt, "eval_prompt": prompt,
            "lr": 1e-4 if finetune else None, "weight_decay": 0.01 if finetune else None,
            "epochs": 3 if finetune else None, "batch_size": 4 if finetune else None,
            "grad_accum": 1 if finetune else None, "epochs_run": 3 if finetune else 0, "val_dice": val_dice,
            "test_dice": float(np.mean(dice)), "test_iou": float(np.mean(iou)), "test_miou": float(np.mean((iou + 0.98) / 2)),
            "test_hd95": float(np.nanmean(hd95)), "seconds": float(seconds)})
        for index, image_id in enumerate(IMAGES):
            per_image.append({"trial_id": trial_id, "stage": stage, "image_id": image_id,
                              "subject": image_id.split(":")[0], "slice": int(image_id[-3:]), "area": AREAS[index],
                              "prompt": prompt, "dice": dice[index], "iou": iou[index], "miou": (iou[index] + 0.98) / 2,
                              "hd95": hd95[index], "hd95_mm": hd95[index] * 0.9})
        if finetune:
            for epoch in (1, 2, 3):
                history.append({"trial_id": trial_id, "epoch": epoch, "train_loss": 0.6 / epoch, "val_loss": 0.5 / epoch,
                                "val_dice": val_dice - 0.1 * (3 - epoch), "val_iou": (val_dice - 0.1 * (3 - epoch)) * 0.8,
                                "seconds": 1.5})
    trials.append({**trials[2], "trial_id": FAILED_TRIAL, "status": "ERROR", "epochs_run": 1, "val_dice": None,
                   "test_dice": None, "test_iou": None, "test_miou": None, "test_hd95": None})
    pd.DataFrame(trials).to_csv(results / "trials.csv", index=False)
    pd.DataFrame(per_image).to_csv(results / "per_image.csv", index=False)
    pd.DataFrame(history).to_csv(results / "history.csv", index=False)
    if with_predictions:
        write_predictions(results / "predictions" / "ft_sam_b_box")
    return study_dir


def write_predictions(folder: Path):
    """A 32 x 32 image per test image with a disc as truth and a shifted disc as prediction."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    for index, image_id in enumerate(IMAGES):
        shift = len(IMAGES) - 1 - index  # the fixture's worst images (lowest Dice) come first
        truth = (yy - 16) ** 2 + (xx - 16) ** 2 < 64
        pred = (yy - 16) ** 2 + (xx - 16 - shift) ** 2 < 64
        image = np.stack([(xx * 8).astype(np.uint8)] * 3, axis=-1)
        np.savez(folder / f"{image_id.replace(':', '_')}.npz", image=image, mask=truth, pred=pred)


def write_searched_study(study_dir: Path) -> Path:
    """A random-search study: lr searched log-uniformly, optimizer a categorical axis, 8 trials."""
    results = study_dir / "results"
    results.mkdir(parents=True)
    write_resolved(study_dir, {
        "backbone": ["litemedsam"], "optimizer": ["adam", "adamw"], "loss": ["dice"], "prompt": ["box"],
        "eval_prompt": "same", "lr": {"loguniform": [1e-5, 1e-2]}, "epochs": [2]},
        search={"algorithm": "random", "num_samples": 4, "metric": "val_dice", "mode": "max"}, name="searched")
    rng = np.random.default_rng(3)
    trials, per_image = [], []
    for index in range(8):
        lr = float(10 ** rng.uniform(-5, -2))
        optimizer = ["adam", "adamw"][index % 2]
        quality = 0.9 - 0.08 * abs(np.log10(lr) + 3.5)  # lr matters, the optimizer hardly does
        dice = np.clip(quality + rng.normal(0, 0.02, len(IMAGES)), 0, 1)
        trial_id = f"rs_{index}"
        trials.append({"trial_id": trial_id, "stage": "finetune", "status": "TERMINATED", "backbone": "litemedsam",
                       "family": "litemedsam", "image_encoder_params": 5_659_216, "optimizer": optimizer,
                       "loss": "dice", "prompt": "box", "eval_prompt": "box", "lr": lr, "epochs": 2, "epochs_run": 2,
                       "val_dice": float(quality), "test_dice": float(dice.mean()), "test_iou": np.nan,
                       "test_miou": np.nan, "test_hd95": np.nan, "seconds": 5.0})
        per_image += [{"trial_id": trial_id, "stage": "finetune", "image_id": image_id, "area": AREAS[i], "prompt": "box",
                       "dice": dice[i], "iou": iou_from_dice(dice[i]), "miou": np.nan, "hd95": 3.0}
                      for i, image_id in enumerate(IMAGES)]
    pd.DataFrame(trials).to_csv(results / "trials.csv", index=False)
    pd.DataFrame(per_image).to_csv(results / "per_image.csv", index=False)
    return study_dir


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("fixture") / "fixture-study")


@pytest.fixture(scope="session")
def built_report(study_dir) -> Path:
    """The fixture study's report, built once by the command-line entry point; returns report/."""
    from analysis.report import main

    assert main([str(study_dir)]) == 0
    return study_dir / "report"


def reference_bootstrap(values, seed: int = 0, resamples: int = 2000, confidence: float = 0.95):
    """A second, loop-by-loop percentile bootstrap of the mean: one resample of the finite values
    at a time from np.random.default_rng(seed), then np.percentile of the resample means."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        sample = values[rng.integers(0, len(values), size=len(values))]
        means.append(sum(sample) / len(sample))
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
