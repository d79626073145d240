"""Reading a finished study back: the study folder or its MLflow experiment, into tables.

`load_study(study_dir)` reads `resolved.yaml` and `results/{trials,per_image,history}.csv`;
`load_from_mlflow(uri, experiment)` reads the same facts from the trial runs of an MLflow
experiment (params, metric histories, the `per_image.csv` artifact). Both return a
`StudyResults`, whose derived tables the rest of the package works on:

- `evaluations`: one row per *evaluation*, the unit every number in the report is about. An
  evaluation is one trial (or zero-shot run) scored on the test images with one prompt. A trial
  evaluated with several prompts (`eval_prompt: [box, center_point]`) gives several evaluations;
  its `eval_prompt` column then holds the prompt of that evaluation, so `eval_prompt` can be a
  factor of the study like any other.
- `per_image`: the per-image rows, each tagged with the `evaluation` it belongs to.
- `scores(metric)`: image x evaluation matrix of one per-image metric; images pair up by
  `image_id`, which is identical across trials for the same test image.

This package reads what a study wrote and imports nothing of the training code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

# Factor names a study may have (study.config's `factors:` section), used only when a study
# folder has no resolved.yaml to say which columns of trials.csv are factors.
KNOWN_FACTORS = ("backbone", "optimizer", "loss", "prompt", "eval_prompt", "lr", "weight_decay", "momentum",
                 "epochs", "batch_size", "grad_accum", "schedule", "warmup_epochs", "swa", "multimask",
                 "train_prompt_encoder", "iou_loss_weight")
TRIAL_COLUMNS = ("trial_id", "stage", "status", "backbone")
PER_IMAGE_COLUMNS = ("trial_id", "image_id", "dice")
PER_IMAGE_METRICS = ("dice", "iou", "miou", "hd95")
TRIAL_METRICS = ("epochs_run", "val_dice", "test_dice", "test_iou", "test_miou", "test_hd95", "seconds")
HISTORY_METRICS = ("train_loss", "val_loss", "val_dice", "val_iou")
ZERO_SHOT, FINETUNE = "zero_shot", "finetune"


class ResultsError(Exception):
    """The study folder or experiment cannot be read: a one-paragraph message saying what to do."""


@dataclass
class StudyResults:
    """Everything the report needs from a finished study, as pandas tables.

    trials:     trials.csv (one row per trial and per zero-shot evaluation).
    per_image:  per_image.csv plus an `evaluation` column (see the module docstring).
    history:    history.csv (one row per trial and epoch); empty when none was written.
    factors:    every factor column of trials (what `resolved.yaml`'s `factors:` lists).
    name:       the study name.
    config:     resolved.yaml as a dict ({} when absent, e.g. read from MLflow alone).
    evaluations: one row per evaluation: trial columns, `evaluation`, `n_images`, `primary`,
                `label` (a short name for plots and tables).
    notes:      things found while reading that the report must state (rows left out, ...).
    """

    name: str
    trials: pd.DataFrame
    per_image: pd.DataFrame
    history: pd.DataFrame
    factors: list[str]
    config: dict = field(default_factory=dict)
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._scores: dict[str, pd.DataFrame] = {}
        if self.evaluations.empty and not self.per_image.empty:
            self.per_image, self.evaluations = _build_evaluations(self)
            self.evaluations["label"] = _labels(self)

    @property
    def searched_factors(self) -> list[str]:
        """Factors given as a continuous range (`{loguniform: [lo, hi]}`) in resolved.yaml."""
        ranges = search_ranges(self.config)
        return [name for name in self.factors if name in ranges]

    @property
    def grid_factors(self) -> list[str]:
        """Factors with more than one distinct value among the fine-tuned evaluations, ranges excluded.

        These are the axes of the ablation: each gets marginal means and paired tests.
        `eval_prompt` counts only where it differs from the training prompt somewhere (with
        `eval_prompt: same` it repeats `prompt`).
        """
        finetuned = self.evaluations[self.evaluations["stage"] == FINETUNE] if len(self.evaluations) else None
        if finetuned is None or finetuned.empty:
            return []
        searched = self.searched_factors
        grid = [name for name in self.factors if name not in searched and name in finetuned
                and finetuned[name].dropna().nunique() > 1]
        if "eval_prompt" in grid and "prompt" in finetuned and (finetuned["eval_prompt"] == finetuned["prompt"]).all():
            grid.remove("eval_prompt")
        return grid

    def scores(self, metric: str = "dice") -> pd.DataFrame:
        """Per-image `metric` as an image_id x evaluation table (NaN where an image was not scored)."""
        if metric not in self._scores:
            self._scores[metric] = self.per_image.pivot(index="image_id", columns="evaluation", values=metric)
        return self._scores[metric]

    def evaluation(self, key: str) -> pd.Series:
        """The evaluations row with `evaluation == key`."""
        return self.evaluations.set_index("evaluation").loc[key]


# --- the study folder ---------------------------------------------------------------------------


def read_resolved_config(study_dir: Path) -> dict:
    """resolved.yaml as a dict, {} when the study folder has none."""
    path = Path(study_dir) / "resolved.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ResultsError(f"{path} is not valid YAML ({err}). It is written by python -m study.run; run the "
                           f"study again to rewrite it, or remove it to report without it.") from None
    return data if isinstance(data, dict) else {}


def search_ranges(config: dict) -> dict[str, tuple[str, float, float]]:
    """Factors given as ranges in resolved.yaml: name -> (kind, low, high), kind loguniform|uniform."""
    ranges = {}
    for name, value in (config.get("factors") or {}).items():
        if isinstance(value, dict) and len(value) == 1:
            kind, bounds = next(iter(value.items()))
            if kind in ("loguniform", "uniform") and isinstance(bounds, (list, tuple)) and len(bounds) == 2:
                ranges[name] = (kind, float(bounds[0]), float(bounds[1]))
    return ranges


def read_tracking(study_dir: Path) -> dict | None:
    """tracking.json of the study folder ({tracking_uri, experiment_name, experiment_id,
    parent_run_id}), or None when absent or unreadable."""
    path = Path(study_dir) / "tracking.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_csv(path: Path, required: tuple[str, ...], study_dir: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"trial_id": str, "image_id": str})
    except pd.errors.EmptyDataError:
        table = pd.DataFrame(columns=list(required))
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} cannot be read as CSV ({err}). It is written by python -m study.run; "
                           f"run the study again (it resumes) to rewrite it.") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ResultsError(f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(map(str, table.columns))}). "
                           f"The report needs a results folder written by python -m study.run; if {study_dir} "
                           f"was written by an older version, run the study again to rewrite its results.")
    return table


def load_study(study_dir: str | Path) -> StudyResults:
    """Read a finished study folder (see the module docstring) into a `StudyResults`."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ResultsError(f"{study_dir} is not a folder. Pass the study folder, <study.out>/<study.name> "
                           f"of the grid.yaml you ran (e.g. runs/quickstart).")
    results_dir = study_dir / "results"
    trials_path = results_dir / "trials.csv"
    if not trials_path.is_file():
        raise ResultsError(f"{study_dir} has no results/trials.csv: the study has not finished any trial; run "
                           f"python -m study.run <grid.yaml> (it resumes where it stopped), then python -m "
                           f"analysis.report {study_dir}.")
    config = read_resolved_config(study_dir)
    trials = _read_csv(trials_path, TRIAL_COLUMNS, study_dir)
    per_image_path = results_dir / "per_image.csv"
    if not per_image_path.is_file():
        raise ResultsError(f"{study_dir} has results/trials.csv but no results/per_image.csv: no trial has "
                           f"finished its test evaluation yet; run python -m study.run <grid.yaml> to resume "
                           f"the study, then report again.")
    per_image = _read_csv(per_image_path, PER_IMAGE_COLUMNS, study_dir)
    history_path = results_dir / "history.csv"
    history = (_read_csv(history_path, ("trial_id", "epoch"), study_dir) if history_path.is_file()
               else pd.DataFrame(columns=["trial_id", "epoch", *HISTORY_METRICS, "seconds"]))
    notes = [] if history_path.is_file() else ["results/history.csv is absent: no learning curves."]
    if config:
        factors = [name for name in (config.get("factors") or {}) if name in trials.columns]
    else:
        factors = [name for name in KNOWN_FACTORS if name in trials.columns]
        notes.append(f"{study_dir} has no resolved.yaml: factors taken from the trials.csv columns "
                     f"({', '.join(factors)}).")
    name = str((config.get("study") or {}).get("name") or study_dir.name)
    return _assemble(name, trials, per_image, history, factors, config, notes, source=str(results_dir))


# --- MLflow ---------------------------------------------------------------------------------------


def _typed_params(rows: list[dict]) -> pd.DataFrame:
    """MLflow params are strings: give each column the type it would have in trials.csv."""
    table = pd.DataFrame(rows)
    for column in table.columns:
        values = table[column].replace({"None": np.nan, "": np.nan, "nan": np.nan})
        present = values.dropna()
        if len(present) and present.isin(["True", "False"]).all():
            table[column] = values.map({"True": True, "False": False})
            continue
        numbers = pd.to_numeric(present, errors="coerce")
        table[column] = pd.to_numeric(values) if len(present) and numbers.notna().all() else values
    return table


def load_from_mlflow(tracking_uri: str, experiment: str, config: dict | None = None) -> StudyResults:
    """Read a study from its MLflow experiment into a `StudyResults`.

    Trial runs are the runs tagged `sam_study.role=trial`; their tags give trial_id, stage and
    status, their params the factors plus family and image_encoder_params, their final metrics
    test_dice/test_iou/test_miou/test_hd95/epochs_run/seconds, their per-epoch metrics (step =
    epoch) the history, and their `per_image.csv` artifact the per-image rows. A trial's
    `val_dice` is the value at its logged `best_epoch` when there is one, else the maximum over
    epochs (the epoch the default selection, val_dice/max, restores), else the last logged value.
    Zero-shot runs have no epochs, so no history. `config` is the study's resolved.yaml as a dict
    when at hand (it says which factors were searched over a range); MLflow alone does not hold it.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the report's output

    try:
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
    except MlflowException as err:
        raise ResultsError(f"cannot open the MLflow tracking store {tracking_uri!r}: {err.message}. Pass the URI "
                           f"the study logged to (its tracking.json holds it).") from None
    if found is None:
        raise ResultsError(f"the MLflow store {tracking_uri!r} has no experiment named {experiment!r}. Pass the "
                           f"experiment the study logged to (tracking.experiment, by default the study name).")

    def runs_tagged(role: str):
        token, runs = None, []
        while True:
            page = client.search_runs([found.experiment_id], f"tags.`sam_study.role` = '{role}'",
                                      max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    trial_runs = runs_tagged("trial")
    if not trial_runs:
        raise ResultsError(f"MLflow experiment {experiment!r} at {tracking_uri!r} has no trial runs (tag "
                           f"sam_study.role=trial): the study has not finished any trial; run python -m study.run "
                           f"<grid.yaml> to resume it.")
    parents = runs_tagged("parent")
    trial_rows, per_image_tables, history_tables = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for run in sorted(trial_runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
            tags, metrics = run.data.tags, run.data.metrics
            trial_id = tags.get("sam_study.trial_id", run.info.run_id)
            epochs = None
            for key in HISTORY_METRICS if tags.get("sam_study.stage", FINETUNE) == FINETUNE else ():
                points = client.get_metric_history(run.info.run_id, key)
                if points:
                    series = pd.DataFrame({"epoch": [p.step for p in points], key: [p.value for p in points]})
                    series = series.drop_duplicates("epoch", keep="last")
                    epochs = series if epochs is None else epochs.merge(series, on="epoch", how="outer")
            row = {"trial_id": trial_id, "stage": tags.get("sam_study.stage", FINETUNE),
                   "status": tags.get("sam_study.status", "")}
            row.update(run.data.params)
            for key in TRIAL_METRICS:
                row[key] = metrics.get(key, math.nan)
            if epochs is not None and "val_dice" in epochs:
                epochs = epochs.sort_values("epoch")
                best = epochs[epochs["epoch"] == metrics.get("best_epoch")]
                row["val_dice"] = float(best["val_dice"].iloc[0] if len(best) else epochs["val_dice"].max())
                history_tables.append(epochs.assign(trial_id=trial_id))
            trial_rows.append(row)
            if any(a.path == "per_image.csv" for a in client.list_artifacts(run.info.run_id)):
                local = client.download_artifacts(run.info.run_id, "per_image.csv", scratch)
                per_image_tables.append(pd.read_csv(local, dtype={"trial_id": str, "image_id": str})
                                        .assign(trial_id=trial_id))
    trials = _typed_params(trial_rows)
    per_image = pd.concat(per_image_tables, ignore_index=True) if per_image_tables else pd.DataFrame(
        columns=list(PER_IMAGE_COLUMNS))
    history = (pd.concat(history_tables, ignore_index=True) if history_tables
               else pd.DataFrame(columns=["trial_id", "epoch", *HISTORY_METRICS]))
    history = history[["trial_id", "epoch"] + [c for c in history.columns if c not in ("trial_id", "epoch")]]
    # Parameter counts (image_encoder_params, mask_decoder_params, ...) describe a backbone; they are not factors.
    factors = [c for c in trials.columns if c not in (*TRIAL_COLUMNS[:3], *TRIAL_METRICS, "family")
               and not c.endswith("_params")]
    name = experiment
    if parents:
        name = parents[0].data.tags.get("mlflow.runName") or parents[0].info.run_name or experiment
    return _assemble(name, trials, per_image, history, factors, dict(config or {}), [],
                     source=f"MLflow experiment {experiment!r} at {tracking_uri}")


# --- evaluations ----------------------------------------------------------------------------------


def _assemble(name, trials, per_image, history, factors, config, notes, source) -> StudyResults:
    """Check the tables against each other and build a StudyResults."""
    trials = trials.copy()
    trials["trial_id"] = trials["trial_id"].astype(str)
    for column in ("family", "image_encoder_params", *TRIAL_METRICS):
        if column not in trials.columns:
            trials[column] = np.nan
    if trials["trial_id"].duplicated().any():
        repeated = sorted(trials.loc[trials["trial_id"].duplicated(), "trial_id"].unique())
        raise ResultsError(f"{source}: trials.csv lists trial(s) {', '.join(repeated[:5])} more than once. Each "
                           f"trial must be one row; the study runner wrote a duplicate, which is a bug to report.")
    per_image = per_image.copy()
    per_image["trial_id"] = per_image["trial_id"].astype(str)
    per_image["image_id"] = per_image["image_id"].astype(str)
    for column in PER_IMAGE_METRICS + ("area",):
        if column not in per_image.columns:
            per_image[column] = np.nan
    if "prompt" not in per_image.columns:  # one prompt per trial: the trial's evaluated prompt
        per_image["prompt"] = per_image["trial_id"].map(trials.set_index("trial_id")["prompt"])
    per_image["prompt"] = per_image["prompt"].astype(str)
    unknown = ~per_image["trial_id"].isin(trials["trial_id"])
    if unknown.any():
        ids = sorted(per_image.loc[unknown, "trial_id"].unique())
        notes.append(f"per-image rows of {len(ids)} trial(s) missing from trials.csv were left out "
                     f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}).")
        per_image = per_image[~unknown]
    key = ["trial_id", "prompt", "image_id"]
    exact = per_image.duplicated()
    if exact.any():
        notes.append(f"{int(exact.sum())} repeated per-image row(s) (identical values) were counted once.")
        per_image = per_image[~exact]
    if per_image.duplicated(key).any():
        bad = per_image.loc[per_image.duplicated(key), key].iloc[0]
        raise ResultsError(f"{source}: per_image.csv scores image {bad['image_id']} of trial {bad['trial_id']} "
                           f"(prompt {bad['prompt']}) twice with different values, so it is unclear which run "
                           f"of the trial to report. Remove the stale rows or re-run the trial.")
    if not history.empty:
        history = history.copy()
        history["trial_id"] = history["trial_id"].astype(str)
    results = StudyResults(name, trials.reset_index(drop=True), per_image.reset_index(drop=True), history,
                           list(factors), config, notes=notes)
    if results.evaluations.empty:
        raise ResultsError(f"{source} holds no per-image test results: no trial has finished its test "
                           f"evaluation yet; run python -m study.run <grid.yaml> to resume the study.")
    return results


def format_level(value) -> str:
    """A factor level as written in labels and tables: numbers in short form (1e-04, 5), else str."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        return f"{int(value)}" if float(value).is_integer() and abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def _primary_prompt(trial: pd.Series, prompts: list[str]) -> str:
    """The prompt a trial's summary numbers refer to: its eval_prompt when that is one of the
    prompts it was scored with, else its training prompt, else the first in sorted order."""
    for candidate in (trial.get("eval_prompt"), trial.get("prompt")):
        if isinstance(candidate, str) and candidate in prompts:
            return candidate
    return sorted(prompts)[0]


def _build_evaluations(results: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tag per-image rows with their evaluation and build the evaluations table (see StudyResults)."""
    per_image = results.per_image
    trials = results.trials.set_index("trial_id")
    prompts_of = per_image.groupby("trial_id")["prompt"].unique()
    rows = []
    for trial_id, prompts in prompts_of.items():
        prompts = sorted(prompts)
        trial = trials.loc[trial_id]
        primary = _primary_prompt(trial, prompts)
        for prompt in prompts:
            key = trial_id if len(prompts) == 1 else f"{trial_id}[{prompt}]"
            rows.append({"evaluation": key, "trial_id": trial_id, **trial.to_dict(), "eval_prompt": prompt,
                         "primary": prompt == primary})
    evaluations = pd.DataFrame(rows)
    keys = evaluations.set_index(["trial_id", "eval_prompt"])["evaluation"]
    per_image = per_image.assign(evaluation=[keys[(t, p)] for t, p in zip(per_image["trial_id"], per_image["prompt"])])
    evaluations["n_images"] = evaluations["evaluation"].map(per_image.groupby("evaluation").size())
    for column in ("image_encoder_params", *TRIAL_METRICS):
        evaluations[column] = pd.to_numeric(evaluations[column], errors="coerce")
    stage_order = evaluations["stage"].map({ZERO_SHOT: 0, FINETUNE: 1}).fillna(2)
    evaluations = (evaluations.assign(_order=stage_order).sort_values(["_order", "backbone", "evaluation"])
                   .drop(columns="_order").reset_index(drop=True))
    if "eval_prompt" not in results.factors:
        results.factors.append("eval_prompt")
    _check_trial_means(results, evaluations, per_image)
    return per_image, evaluations


def _labels(results: StudyResults) -> list[str]:
    """Short unique names: the backbone and every factor that varies, zero-shot marked as such."""
    evaluations = results.evaluations
    varying = [f for f in results.grid_factors + results.searched_factors if f != "backbone"]
    labels = []
    for _, row in evaluations.iterrows():
        if row["stage"] == ZERO_SHOT:
            labels.append(f"zero-shot · {row['backbone']} · {row['eval_prompt']}")
            continue
        parts = [str(row["backbone"])]
        for name in varying:
            value = row[name]
            if name == "eval_prompt":
                parts.append(f"eval {value}")
            elif isinstance(value, str):
                parts.append(value)
            else:
                parts.append(f"{name}={format_level(value)}")
        labels.append(" · ".join(parts))
    counts = pd.Series(labels).value_counts()
    return [f"{label} #{key}" if counts[label] > 1 else label
            for label, key in zip(labels, evaluations["trial_id"])]


def _check_trial_means(results: StudyResults, evaluations: pd.DataFrame, per_image: pd.DataFrame) -> None:
    """Note every trial whose test_dice in trials.csv differs from the mean of its per-image Dice."""
    means = per_image.groupby("evaluation")["dice"].mean()
    primary = evaluations[evaluations["primary"]]
    differ = [row["trial_id"] for _, row in primary.iterrows()
              if np.isfinite(row["test_dice"]) and abs(row["test_dice"] - means[row["evaluation"]]) > 1e-6]
    if differ:
        results.notes.append(f"test_dice in trials.csv differs from the mean of per-image Dice for "
                             f"{len(differ)} trial(s) ({', '.join(differ[:5])}); the report uses the per-image values.")
