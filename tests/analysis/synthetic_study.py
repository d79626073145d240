"""A synthetic study folder of any size, in the layout `python -m study.run` writes.

`write_synthetic_study(folder, subjects, slices)` writes the example grid of
examples/grid.example.yaml: 5 backbones x 3 optimizers x 3 losses x 4 prompts = 180 fine-tuning
trials (one seed each) plus a zero-shot evaluation per backbone and prompt (20), every one scored
on the same `subjects` x `slices` test slices: resolved.yaml, results/trials.csv, per_image.csv,
per_subject.csv, history.csv, and results/predictions/<trial_id>/ with the 4 best and 4 worst test
slices of every trial (what a real trial keeps for the report's overlays).

The numbers are drawn from a seeded additive model, so a test knows what the report must find:
per-image Dice = BASE + the effect of each factor level (LEVEL_EFFECTS) + a small effect of the
configuration + the subject's effect + the configuration's effect on that subject + image noise,
clipped to [0, 1]; a trial's validation Dice is its expected test Dice plus a little noise. The
backbone and prompt effects are large, the loss has none. tests/analysis/test_report_scale.py
uses it with a few slices per configuration, benchmarks/report_scale.py with 100 subjects x 20
slices, the size of a real study's test split.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.overlays import sanitise_image_id

#: The grid of examples/grid.example.yaml, in its order.
GRID = {
    "backbone": ["sam2_s", "sam2_bplus", "sam2_l", "microsam_b", "microsam_h"],
    "optimizer": ["adam", "adamw", "sgd"],
    "loss": ["dice", "dice_bce", "focal"],
    "prompt": ["center_point", "random_points", "box", "box_jitter"],
}
#: Each backbone's family and image-encoder parameter count (the README's backbone table).
BACKBONES = {"sam2_s": ("sam2", 34_300_000), "sam2_bplus": ("sam2", 69_100_000), "sam2_l": ("sam2", 212_700_000),
             "microsam_b": ("microsam", 89_700_000), "microsam_h": ("microsam", 637_000_000)}
BASE = 0.62
LEVEL_EFFECTS = {
    "backbone": {"sam2_s": 0.0, "sam2_bplus": 0.03, "sam2_l": 0.06, "microsam_b": 0.01, "microsam_h": 0.045},
    "optimizer": {"adam": 0.01, "adamw": 0.015, "sgd": -0.04},
    "loss": {"dice": 0.0, "dice_bce": 0.0, "focal": 0.0},
    "prompt": {"center_point": -0.12, "random_points": -0.05, "box": 0.10, "box_jitter": 0.07},
}
ZERO_SHOT_BASE = 0.45
EPOCHS = 5
SIZE = 48  # pixels of a saved prediction's side
KEPT_PREDICTIONS = 4  # best and worst test slices a trial keeps (trainables.evaluation.KEPT_PREDICTIONS)


def slice_table(subjects: int, slices: int) -> pd.DataFrame:
    """image_id, subject, slice and target area of every test slice, subject by subject."""
    rows = [(f"S{s:03d}:z{40 + k:03d}", f"S{s:03d}", 40 + k) for s in range(subjects) for k in range(slices)]
    table = pd.DataFrame(rows, columns=["image_id", "subject", "slice"])
    table["area"] = 80 + (np.arange(len(table)) * 37) % 900
    return table


def configurations() -> list[dict]:
    """Every trial's factors: the fine-tuning grid, then zero-shot per backbone and prompt."""
    trials = [{"trial_id": f"{b}-{o}-{lo}-{p}", "stage": "finetune", "backbone": b, "optimizer": o, "loss": lo,
               "prompt": p, "seed": 0} for b, o, lo, p in product(*GRID.values())]
    trials += [{"trial_id": f"zs-{b}-{p}", "stage": "zero_shot", "backbone": b, "optimizer": None, "loss": None,
                "prompt": p, "seed": None} for b, p in product(GRID["backbone"], GRID["prompt"])]
    return trials


def expected_dice(trial: dict) -> float:
    """The additive model's mean Dice of a trial (before its configuration's own effect)."""
    if trial["stage"] == "zero_shot":
        return ZERO_SHOT_BASE + LEVEL_EFFECTS["backbone"][trial["backbone"]] + LEVEL_EFFECTS["prompt"][trial["prompt"]]
    return BASE + sum(LEVEL_EFFECTS[f][trial[f]] for f in GRID)


def _resolved(name: str, out: Path) -> dict:
    return {"study": {"name": name, "out": str(out), "seed": 0},
            "data": {"reader": "msd_brain", "target": "whole_tumor"},
            "factors": {**GRID, "eval_prompt": "same", "lr": 1.0e-4, "weight_decay": 0.01, "epochs": EPOCHS},
            "baseline": {"zero_shot": True},
            "search": {"algorithm": "grid", "num_samples": 1, "seeds": 1, "metric": "val_dice", "mode": "max"},
            "evaluation": {"single_point_multimask": True, "nsd_tolerance_mm": 2.0, "hd95_penalty": "diagonal",
                           "clicks": 0, "click_rule": "center"},
            "report": {"enabled": True}}


def _overlap_dice(shift: np.ndarray, radius: float) -> np.ndarray:
    """Dice of two discs of `radius` whose centres lie `shift` apart (the lens-area formula)."""
    d = np.clip(shift, 0, 2 * radius)
    lens = 2 * radius ** 2 * np.arccos(d / (2 * radius)) - d / 2 * np.sqrt(4 * radius ** 2 - d ** 2)
    return lens / (np.pi * radius ** 2)


def _write_predictions(folder: Path, chosen: pd.DataFrame, rng: np.random.Generator) -> None:
    """One .npz per chosen slice: a textured image, a disc as truth and a shifted disc as prediction,
    shifted so that their Dice is the slice's Dice (to a pixel's precision)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = SIZE / 5
    shifts = np.linspace(0, 2 * radius, 200)
    for image_id, dice in zip(chosen["image_id"], chosen["dice"]):
        shift = float(np.interp(dice, _overlap_dice(shifts, radius)[::-1], shifts[::-1]))
        truth = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < radius ** 2
        pred = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2 - shift) ** 2 < radius ** 2
        texture = rng.normal(90, 18, (SIZE, SIZE)) + 60 * truth
        image = np.repeat(np.clip(texture, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        np.savez_compressed(folder / f"{sanitise_image_id(image_id)}.npz", image=image, mask=truth, pred=pred)


def write_synthetic_study(study_dir: Path, subjects: int = 100, slices: int = 20, seed: int = 0,
                          predictions: bool = True) -> Path:
    """Write the synthetic study (see the module docstring) into `study_dir`; returns it."""
    study_dir = Path(study_dir)
    results = study_dir / "results"
    results.mkdir(parents=True)
    (study_dir / "resolved.yaml").write_text("# resolved by study.config (synthetic)\n" + yaml.safe_dump(
        _resolved(study_dir.name, study_dir.parent), sort_keys=False))
    rng = np.random.default_rng(seed)
    images = slice_table(subjects, slices)
    subject_effect = rng.normal(0, 0.06, subjects)
    subject_index = np.repeat(np.arange(subjects), slices)
    base_of_image = subject_effect[subject_index]
    trials, per_image, history = [], [], []
    for trial in configurations():
        finetune = trial["stage"] == "finetune"
        mean = expected_dice(trial) + (rng.normal(0, 0.008) if finetune else 0.0)
        on_subject = rng.normal(0, 0.03, subjects)[subject_index]
        dice = np.clip(mean + base_of_image + on_subject + rng.normal(0, 0.05, len(images)), 0, 1)
        empty = dice < 0.02  # an empty prediction: Dice 0, HD95 the image diagonal
        dice[empty] = 0.0
        iou = dice / (2 - dice)
        hd95 = np.where(empty, np.hypot(240, 240), 2.0 + 30.0 * (1 - dice))
        rows = images.assign(trial_id=trial["trial_id"], stage=trial["stage"], seed=trial["seed"],
                             prompt=trial["prompt"], dice=dice, iou=iou, miou=(iou + 0.99) / 2, hd95=hd95,
                             hd95_mm=hd95 * 0.9, hd95_penalised=empty.astype(int), nsd=np.clip(dice + 0.04, 0, 1))
        per_image.append(rows)
        val_dice = float(np.clip(mean + rng.normal(0, 0.004), 0, 1))
        family, params = BACKBONES[trial["backbone"]]
        trials.append({**trial, "status": "TERMINATED", "family": family, "image_encoder_params": params,
                       "lr": 1e-4 if finetune else None, "weight_decay": 0.01 if finetune else None,
                       "epochs": EPOCHS if finetune else None, "eval_prompt": None if finetune else trial["prompt"],
                       "epochs_run": EPOCHS if finetune else 0, "val_dice": val_dice, "test_dice": float(dice.mean()),
                       "test_iou": float(iou.mean()), "test_miou": float(((iou + 0.99) / 2).mean()),
                       "test_hd95": float(hd95.mean()), "test_hd95_penalised": int(empty.sum()),
                       "test_nsd": float(rows["nsd"].mean()), "test_subjects": subjects,
                       "seconds": float(rng.uniform(200, 900) if finetune else rng.uniform(20, 60))})
        if finetune:
            history += [{"trial_id": trial["trial_id"], "epoch": epoch, "train_loss": 0.8 / epoch,
                         "val_loss": 0.7 / epoch, "val_dice": val_dice - 0.03 * (EPOCHS - epoch),
                         "val_iou": (val_dice - 0.03 * (EPOCHS - epoch)) * 0.85, "seconds": 60.0}
                        for epoch in range(1, EPOCHS + 1)]
        if predictions:
            ranked = rows.sort_values("dice", kind="stable")  # as trainables.evaluation ranks them
            chosen = pd.concat([ranked.head(KEPT_PREDICTIONS), ranked.tail(KEPT_PREDICTIONS)])
            _write_predictions(results / "predictions" / trial["trial_id"], chosen, rng)
    per_image = pd.concat(per_image, ignore_index=True)
    per_subject = per_image.groupby(["trial_id", "subject"], sort=False).agg(
        stage=("stage", "first"), seed=("seed", "first"), prompt=("prompt", "first"), dice_3d=("dice", "mean"),
        hd95_3d=("hd95", "max"), nsd_3d=("nsd", "mean"), slices=("image_id", "size"), voxels=("area", "sum"),
        hd95_3d_penalised=("hd95_penalised", "max")).reset_index()
    per_subject["hd95_3d_mm"] = per_subject["hd95_3d"] * 0.9
    columns = ["trial_id", "stage", "seed", "image_id", "subject", "slice", "area", "prompt", "dice", "iou", "miou",
               "hd95", "hd95_mm", "hd95_penalised", "nsd"]
    pd.DataFrame(trials).to_csv(results / "trials.csv", index=False)
    per_image[columns].to_csv(results / "per_image.csv", index=False)
    per_subject[["trial_id", "stage", "seed", "subject", "prompt", "dice_3d", "hd95_3d", "hd95_3d_mm",
                 "hd95_3d_penalised", "nsd_3d", "slices", "voxels"]].to_csv(results / "per_subject.csv", index=False)
    pd.DataFrame(history).to_csv(results / "history.csv", index=False)
    return study_dir
