"""Small finished studies, written by hand: what `python -m study.run` leaves on disk.

`write_study`: an older-format 2D study. Two backbones (sam_b, litemedsam) x two prompts (box,
center_point), fine-tuned once each (one seed) with adamw / dice_bce, plus a failed trial and
four zero-shot evaluations, each scored on the same eight 2D test images (each its own subject,
so the unit of analysis is the image). Its per_image.csv predates the nsd, hd95_penalised and
seed columns and it has no per_subject.csv. The per-image values below are the ground truth the
tests compute against.

`write_seeded_study`: the current format. The same 2 x 2 grid trained with `search.seeds: 2`
on volumes: eight test subjects with 2 to 4 test slices each, per_image.csv with seed, nsd and
hd95_penalised, and per_subject.csv. The backbone effect (0.08 Dice) is far beyond the seed
noise (seed SD about 0.03); the prompt effect (0.005) is within it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.overlays import sanitise_image_id

IMAGES = [f"case_{i:02d}.png" for i in range(1, 9)]  # 2D images, each its own subject
AREAS = [120, 300, 800, 1500, 2600, 4000, 6500, 9000]
BACKBONES = {"sam_b": ("sam", 89_670_912), "litemedsam": ("litemedsam", 5_659_216)}
#: Parameters a fine-tuning trial trains (its decoder and prompt encoder); zero-shot trials train none.
TRAINED_PARAMS = {"sam_b": 4_064_116, "litemedsam": 4_058_340}
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


def write_resolved(study_dir: Path, factors: dict, search: dict | None = None, name: str = "fixture-study",
                   evaluation: dict | None = None):
    config = {"study": {"name": name, "out": str(study_dir.parent), "seed": 0},
              "factors": factors,
              "search": search or {"algorithm": "grid", "num_samples": 1, "metric": "val_dice", "mode": "max"},
              "report": {"enabled": True}}
    if evaluation is not None:
        config["evaluation"] = evaluation
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
            "test_hd95": float(np.nanmean(hd95)), "seconds": float(seconds),
            "trainable_params": TRAINED_PARAMS[backbone] if finetune else 0})
        for index, image_id in enumerate(IMAGES):
            per_image.append({"trial_id": trial_id, "stage": stage, "image_id": image_id,
                              "subject": image_id.split(".")[0], "slice": 0, "area": AREAS[index],
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
        np.savez(folder / f"{sanitise_image_id(image_id)}.npz", image=image, mask=truth, pred=pred)


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


# --- the current format: volumes, two seeds, per_subject.csv -------------------------------------------

SUBJECT_SLICES = {"V01": 2, "V02": 3, "V03": 4, "V04": 2, "V05": 3, "V06": 4, "V07": 3, "V08": 2}
SUBJECT_EFFECT = {"V01": -0.06, "V02": 0.03, "V03": 0.05, "V04": -0.02, "V05": 0.01, "V06": 0.04, "V07": -0.04,
                  "V08": 0.0}
SEEDS = (0, 1)
DIAGONAL = float(np.hypot(64, 64))  # the HD95 penalty of a 64 x 64 slice, in pixels
SPACING_MM = 0.8
# (backbone, prompt) -> (fine-tuned base Dice, seed offset d: seed 0 gets +d, seed 1 -d, zero-shot base Dice)
SEEDED_CONFIGURATIONS = {
    ("sam_b", "box"): (0.84, 0.020, 0.70),
    ("sam_b", "center_point"): (0.835, 0.015, 0.55),
    ("litemedsam", "box"): (0.76, 0.025, 0.68),
    ("litemedsam", "center_point"): (0.755, 0.020, 0.50),
}
PENALISED = {("zs", "sam_b", "center_point"): "V03:z010", ("zs", "litemedsam", "center_point"): "V03:z010",
             ("ft", "litemedsam", "center_point", 1): "V05:z011"}


def seeded_images() -> list[tuple[str, str, int]]:
    """(image_id, subject, slice) of every test slice, subject by subject."""
    return [(f"{subject}:z{10 + k:03d}", subject, 10 + k) for subject, count in SUBJECT_SLICES.items()
            for k in range(count)]


def _evaluation_rows(rng, trial_id, stage, seed, prompt, base, penalised_image):
    rows = []
    for index, (image_id, subject, slice_index) in enumerate(seeded_images()):
        dice = float(np.clip(base + SUBJECT_EFFECT[subject] + rng.normal(0, 0.015), 0, 1))
        hd95, penalised, nsd = 3.0 + 20.0 * (1 - dice), 0, float(np.clip(dice + 0.05, 0, 1))
        if image_id == penalised_image:  # an empty prediction: Dice 0, HD95 the penalty
            dice, hd95, penalised, nsd = 0.0, DIAGONAL, 1, 0.0
        iou = float(iou_from_dice(dice))
        rows.append({"trial_id": trial_id, "stage": stage, "seed": seed, "image_id": image_id, "subject": subject,
                     "slice": slice_index, "area": 150 + 40 * index, "prompt": prompt, "dice": dice, "iou": iou,
                     "miou": (iou + 0.98) / 2, "hd95": hd95, "hd95_mm": hd95 * SPACING_MM,
                     "hd95_penalised": penalised, "nsd": nsd})
    return rows


def _subject_rows(rows: list[dict]) -> list[dict]:
    """per_subject.csv rows of one evaluation: made-up but deterministic 3D values per subject."""
    table = pd.DataFrame(rows)
    out = []
    for subject, group in table.groupby("subject", sort=False):
        first = group.iloc[0]
        hd95_3d = float(group["hd95"].max() * 0.9)
        out.append({"trial_id": first["trial_id"], "stage": first["stage"], "seed": first["seed"], "subject": subject,
                    "prompt": first["prompt"], "dice_3d": float(np.average(group["dice"], weights=group["area"])),
                    "hd95_3d": hd95_3d, "hd95_3d_mm": hd95_3d * SPACING_MM, "hd95_3d_penalised": 0,
                    "nsd_3d": float(group["nsd"].mean()), "slices": len(group), "voxels": int(group["area"].sum())})
    return out


def write_seeded_study(study_dir: Path) -> Path:
    """Write the two-seed volume study (see the module docstring) and return its folder."""
    results = study_dir / "results"
    results.mkdir(parents=True)
    write_resolved(study_dir, {
        "backbone": ["sam_b", "litemedsam"], "optimizer": ["adamw"], "loss": ["dice_bce"],
        "prompt": ["box", "center_point"], "eval_prompt": "same", "lr": [1e-4], "epochs": [3]},
        search={"algorithm": "grid", "num_samples": 1, "seeds": len(SEEDS), "metric": "val_dice", "mode": "max"},
        name="seeded-study",
        evaluation={"single_point_multimask": True, "nsd_tolerance_mm": 2.0, "hd95_penalty": "diagonal"})
    rng = np.random.default_rng(42)
    trials, per_image, per_subject, history = [], [], [], []
    for (backbone, prompt), (base, offset, zero_shot_base) in SEEDED_CONFIGURATIONS.items():
        family, params = BACKBONES[backbone]
        runs = [("finetune", f"ft_{backbone}_{prompt}_s{seed}", seed, base + (offset if seed == 0 else -offset))
                for seed in SEEDS]
        runs.append(("zero_shot", f"zs-{backbone}-{prompt}", None, zero_shot_base))
        for stage, trial_id, seed, mean in runs:
            finetune = stage == "finetune"
            key = ("ft", backbone, prompt, seed) if finetune else ("zs", backbone, prompt)
            rows = _evaluation_rows(rng, trial_id, stage, seed, prompt, mean, PENALISED.get(key))
            per_image += rows
            per_subject += _subject_rows(rows)
            table = pd.DataFrame(rows)
            val_dice = mean + 0.02 if finetune else mean - 0.02
            trials.append({
                "trial_id": trial_id, "stage": stage, "status": "TERMINATED", "backbone": backbone, "family": family,
                "image_encoder_params": params, "optimizer": "adamw" if finetune else None,
                "loss": "dice_bce" if finetune else None, "prompt": prompt, "eval_prompt": prompt,
                "lr": 1e-4 if finetune else None, "epochs": 3 if finetune else None, "seed": seed,
                "epochs_run": 3 if finetune else 0, "val_dice": val_dice, "test_dice": table["dice"].mean(),
                "test_iou": table["iou"].mean(), "test_miou": table["miou"].mean(), "test_hd95": table["hd95"].mean(),
                "test_nsd": table["nsd"].mean(), "test_hd95_penalised": int(table["hd95_penalised"].sum()),
                "test_subjects": table["subject"].nunique(), "seconds": 12.0})
            if finetune:
                history += [{"trial_id": trial_id, "epoch": epoch, "train_loss": 0.6 / epoch, "val_loss": 0.5 / epoch,
                             "val_dice": val_dice - 0.05 * (3 - epoch), "val_iou": val_dice - 0.1, "seconds": 4.0}
                            for epoch in (1, 2, 3)]
    pd.DataFrame(trials).to_csv(results / "trials.csv", index=False)
    pd.DataFrame(per_image).to_csv(results / "per_image.csv", index=False)
    pd.DataFrame(per_subject).to_csv(results / "per_subject.csv", index=False)
    pd.DataFrame(history).to_csv(results / "history.csv", index=False)
    return study_dir


# --- the fixture study with its baselines: U-Net arms and corrective clicks ------------------------------

CLICKS = 3
GAIN = {"sam_b": 0.5, "litemedsam": 0.2}  # the share of the remaining error each click removes
UNET_DICE = {"unet": [0.50, 0.61, 0.66, 0.72, 0.74, 0.83, 0.86, 0.90],
             "unet_box": [0.55, 0.66, 0.75, 0.79, 0.82, 0.86, 0.90, 0.92]}
UNET_PARAMS = 20_611_713


def click_curve(start: float, backbone: str) -> list[float]:
    """Dice after 0..CLICKS clicks: each click removes GAIN[backbone] of the remaining error."""
    values = [start]
    for _ in range(CLICKS):
        values.append(values[-1] + (1 - values[-1]) * GAIN[backbone])
    return values


def add_unet_arms(study: Path) -> None:
    """Add the U-Net baseline's two arms (stage unet: unet and unet_box, one seed) to a write_study folder."""
    results = study / "results"
    trials = pd.read_csv(results / "trials.csv")
    per_image = pd.read_csv(results / "per_image.csv")
    new_trials, new_rows = [], []
    for backbone, dice in UNET_DICE.items():
        trial_id = f"{backbone}-0"
        new_trials.append({"trial_id": trial_id, "stage": "unet", "status": "TERMINATED", "backbone": backbone,
                           "family": "unet", "image_encoder_params": UNET_PARAMS, "optimizer": "adamw",
                           "loss": "dice_bce", "lr": 1e-3, "epochs": 50, "batch_size": 8, "epochs_run": 50,
                           "val_dice": 0.8, "test_dice": float(np.mean(dice)), "seconds": 100.0})
        prompt = "box" if backbone == "unet_box" else "none"
        for index, (image_id, value) in enumerate(zip(IMAGES, dice)):
            new_rows.append({"trial_id": trial_id, "stage": "unet", "image_id": image_id,
                             "subject": image_id.split(".")[0], "slice": 0, "area": 100 * (index + 1), "prompt": prompt,
                             "dice": value, "iou": float(iou_from_dice(value)), "miou": 0.9, "hd95": 5.0,
                             "hd95_mm": 4.5})
    pd.concat([trials, pd.DataFrame(new_trials)]).to_csv(results / "trials.csv", index=False)
    pd.concat([per_image, pd.DataFrame(new_rows)]).to_csv(results / "per_image.csv", index=False)


def add_click_curves(study: Path) -> pd.DataFrame:
    """Write results/per_click.csv for the SAM evaluations of a write_study folder (a U-Net takes no
    clicks): click_curve from each image's Dice; returns its rows."""
    rows = []
    for trial_id, (stage, backbone, prompt, dice, _, _) in EVALUATIONS.items():
        for image_id, start in zip(IMAGES, dice):
            for k, value in enumerate(click_curve(start, backbone)):
                rows.append({"trial_id": trial_id, "stage": stage, "seed": 0 if stage == "finetune" else None,
                             "image_id": image_id, "subject": image_id.split(".")[0], "prompt": prompt, "click": k,
                             "dice": value, "iou": value / (2 - value), "click_x": None if k == 0 else 3.0,
                             "click_y": None if k == 0 else 4.0, "click_label": None if k == 0 else 1})
    pd.DataFrame(rows).to_csv(study / "results" / "per_click.csv", index=False)
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def baselines_study(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The fixture study (no saved predictions) with the U-Net arms and corrective clicks
    (evaluation.clicks: CLICKS); returns the folder and the per_click.csv rows."""
    study = write_study(tmp_path_factory.mktemp("baselines") / "baselines-study", with_predictions=False)
    add_unet_arms(study)
    return study, add_click_curves(study)


@pytest.fixture(scope="session")
def baselines_report(baselines_study, tmp_path_factory) -> Path:
    """The baselines study's report, built once by the command-line entry point into a folder of its own."""
    from analysis.report import main

    out = tmp_path_factory.mktemp("baselines-report") / "report"
    assert main([str(baselines_study[0]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def seeded_study_dir(tmp_path_factory) -> Path:
    return write_seeded_study(tmp_path_factory.mktemp("seeded") / "seeded-study")


@pytest.fixture(scope="session")
def seeded_report(seeded_study_dir) -> Path:
    """The seeded study's report, built once by the command-line entry point; returns report/."""
    from analysis.report import main

    assert main([str(seeded_study_dir)]) == 0
    return seeded_study_dir / "report"


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session, its schema created once (that takes seconds); each
    test logs to an experiment of its own."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


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


def log_to_mlflow(study_dir, tracking_uri, artifacts, experiment: str = "fixture-study"):
    """Log a fixture study the way the study runner does: one parent run, one nested run per trial
    (params incl. the replicate `seed`, metrics, per_image.csv and, when present, per_subject.csv and
    per_click.csv)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment_id, tags={"sam_study.role": "parent"}, run_name=experiment)
    trials = pd.read_csv(study_dir / "results" / "trials.csv")
    per_image = pd.read_csv(study_dir / "results" / "per_image.csv")
    history = pd.read_csv(study_dir / "results" / "history.csv")
    per_subject_path = study_dir / "results" / "per_subject.csv"
    per_subject = pd.read_csv(per_subject_path) if per_subject_path.is_file() else None
    per_click_path = study_dir / "results" / "per_click.csv"
    per_click = pd.read_csv(per_click_path) if per_click_path.is_file() else None
    scratch = artifacts.parent / "scratch"
    for _, trial in trials.iterrows():
        run = client.create_run(experiment_id, tags={
            "mlflow.parentRunId": parent.info.run_id, "sam_study.role": "trial", "sam_study.stage": trial["stage"],
            "sam_study.trial_id": trial["trial_id"], "sam_study.status": trial["status"]})
        run_id = run.info.run_id
        params = [Param(name, str(trial[name])) for name in (
            "backbone", "optimizer", "loss", "prompt", "eval_prompt", "lr", "weight_decay", "epochs", "batch_size",
            "grad_accum", "family", "image_encoder_params", "seed") if name in trial and pd.notna(trial[name])]
        metrics = [Metric(name, epoch[name], 0, int(epoch["epoch"]))
                   for _, epoch in history[history["trial_id"] == trial["trial_id"]].iterrows()
                   for name in ("val_dice", "val_iou", "train_loss", "val_loss")]
        metrics += [Metric(name, trial[name], 0, 0) for name in
                    ("test_dice", "test_iou", "test_miou", "test_hd95", "epochs_run", "seconds", "trainable_params")
                    if name in trial and pd.notna(trial[name])]
        params = [Param(p.key, str(int(float(p.value)))) if p.key == "seed" else p for p in params]
        if trial["stage"] == "zero_shot":
            metrics.append(Metric("val_dice", trial["val_dice"], 0, 0))
        client.log_batch(run_id, metrics=metrics, params=params)
        rows = per_image[per_image["trial_id"] == trial["trial_id"]]
        if len(rows):
            folder = scratch / trial["trial_id"]
            folder.mkdir(parents=True)
            rows.to_csv(folder / "per_image.csv", index=False)
            client.log_artifact(run_id, str(folder / "per_image.csv"))
            if per_subject is not None:
                per_subject[per_subject["trial_id"] == trial["trial_id"]].to_csv(folder / "per_subject.csv", index=False)
                client.log_artifact(run_id, str(folder / "per_subject.csv"))
            if per_click is not None:
                per_click[per_click["trial_id"] == trial["trial_id"]].to_csv(folder / "per_click.csv", index=False)
                client.log_artifact(run_id, str(folder / "per_click.csv"))
        client.set_terminated(run_id)
    return client, experiment_id, parent.info.run_id


# (target, backbone) -> (fine-tuned base Dice, val Dice, zero-shot base Dice); the best backbone differs by target
REGION_CONFIGURATIONS = {
    ("whole_tumor", "sam_b"): (0.86, 0.88, 0.70), ("whole_tumor", "litemedsam"): (0.80, 0.82, 0.66),
    ("tumor_core", "sam_b"): (0.70, 0.71, 0.50), ("tumor_core", "litemedsam"): (0.74, 0.76, 0.55),
}


def write_region_study(study_dir: Path) -> Path:
    """A study of two targets (`data.target: [whole_tumor, tumor_core]`): backbone x target, one seed,
    box prompt, volumes with per_subject.csv, and a zero-shot evaluation per backbone and target."""
    results = study_dir / "results"
    results.mkdir(parents=True)
    write_resolved(study_dir, {"backbone": ["sam_b", "litemedsam"], "optimizer": ["adamw"], "prompt": ["box"],
                               "eval_prompt": "same", "lr": [1e-4], "epochs": [3]}, name="region-study")
    resolved = yaml.safe_load((study_dir / "resolved.yaml").read_text())
    resolved["data"] = {"reader": "msd_brain", "target": ["whole_tumor", "tumor_core"]}
    (study_dir / "resolved.yaml").write_text("# resolved by study.config\n" + yaml.safe_dump(resolved, sort_keys=False))
    rng = np.random.default_rng(7)
    trials, per_image, per_subject = [], [], []
    for (target, backbone), (base, val_dice, zero_shot_base) in REGION_CONFIGURATIONS.items():
        family, params = BACKBONES[backbone]
        for stage, trial_id, mean in (("finetune", f"{backbone}-{target}-ft", base),
                                      ("zero_shot", f"zs-{backbone}-box-{target}", zero_shot_base)):
            finetune = stage == "finetune"
            rows = _evaluation_rows(rng, trial_id, stage, 0 if finetune else None, "box", mean, None)
            per_image += rows
            per_subject += _subject_rows(rows)
            table = pd.DataFrame(rows)
            trials.append({
                "trial_id": trial_id, "stage": stage, "status": "TERMINATED", "family": family,
                "image_encoder_params": params, "target": target, "backbone": backbone,
                "optimizer": "adamw" if finetune else None, "prompt": "box", "lr": 1e-4 if finetune else None,
                "epochs": 3 if finetune else None, "seed": 0 if finetune else None,
                "eval_prompt": None if finetune else "box", "epochs_run": 3 if finetune else 0,
                "val_dice": val_dice if finetune else mean, "test_dice": table["dice"].mean(),
                "test_iou": table["iou"].mean(), "test_miou": table["miou"].mean(), "test_hd95": table["hd95"].mean(),
                "test_nsd": table["nsd"].mean(), "test_hd95_penalised": 0,
                "test_subjects": table["subject"].nunique(), "seconds": 10.0})
    pd.DataFrame(trials).to_csv(results / "trials.csv", index=False)
    pd.DataFrame(per_image).to_csv(results / "per_image.csv", index=False)
    pd.DataFrame(per_subject).to_csv(results / "per_subject.csv", index=False)
    return study_dir
