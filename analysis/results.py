"""Reading a finished study back: the study folder or its MLflow experiment, into tables.

`load_study(study_dir)` reads `resolved.yaml` and `results/{trials,per_image,history}.csv`
(and `results/per_subject.csv` when the study wrote one, older study folders lack it;
`results/per_click.csv` when it evaluated corrective clicks, whose curves become per-image
columns `dice_click_k` and `click_auc`, see analysis.clicks);
`load_from_mlflow(uri, experiment)` reads the same facts from the trial runs of one study's
parent run in an MLflow experiment (params, metric histories, the `per_image.csv` and
`per_subject.csv` artifacts); an experiment may hold several studies.
Both return a `StudyResults`, whose derived tables the rest of the package works on:

- `evaluations`: one row per *evaluation*: one trial (or zero-shot run) scored on the test
  images with one prompt. A trial evaluated with several prompts (`eval_prompt: [box,
  center_point]`) gives several evaluations; its `eval_prompt` column then holds the prompt of
  that evaluation, so `eval_prompt` can be a factor of the study like any other.
- `configurations`: one row per *configuration*: every factor but the training `seed` (stage,
  backbone, the factors, the evaluated prompt). With `search.seeds: N` a configuration has N
  evaluations, its replicates, which differ only in the seed; the report's tables are per
  configuration, their numbers means over the replicates.
- `per_image`: the per-image rows, each tagged with its `evaluation`, `configuration` and `unit`.
- `per_subject`: the per-subject 3D rows (per_subject.csv), tagged the same way; empty when absent.
- `unit`: the unit of analysis, `subject` when some test subject has several test images (the
  slices of a volume) in one evaluation, else `image`. `unit_scores(metric)` is the unit x
  evaluation matrix: a subject's value is the mean of the metric over its test images within
  that evaluation; with `image` as the unit it is the image's own value.
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

from analysis.clicks import KEY as CLICK_KEY, per_image_click_columns

# Factor names a study may have (study.config's `factors:` section, and `target` when `data.target`
# is a list), used only when a study folder has no resolved.yaml to say which columns of trials.csv
# are factors.
KNOWN_FACTORS = ("target", "backbone", "optimizer", "loss", "prompt", "eval_prompt", "lr", "weight_decay", "momentum",
                 "epochs", "batch_size", "grad_accum", "schedule", "warmup_epochs", "swa", "multimask",
                 "train_prompt_encoder", "iou_loss_weight", "train_clicks")
TRIAL_COLUMNS = ("trial_id", "stage", "status", "backbone")
PER_IMAGE_COLUMNS = ("trial_id", "image_id", "dice")
PER_IMAGE_METRICS = ("dice", "iou", "miou", "hd95", "hd95_mm", "hd95_penalised", "nsd")
PER_SUBJECT_COLUMNS = ("trial_id", "subject")
PER_CLICK_COLUMNS = ("trial_id", "prompt", "image_id", "click", "dice")
PER_SUBJECT_METRICS = ("dice_3d", "hd95_3d", "hd95_3d_mm", "hd95_3d_penalised", "nsd_3d", "slices", "voxels")
TRIAL_METRICS = ("epochs_run", "val_dice", "test_dice", "test_iou", "test_miou", "test_hd95", "test_nsd",
                 "test_hd95_penalised", "test_subjects", "seconds", "trainable_params")
# Trial columns that are not factors: the replicate index a configuration is trained with (search.seeds).
NOT_FACTORS = ("seed",)
HISTORY_METRICS = ("train_loss", "val_loss", "val_dice", "val_iou")
ZERO_SHOT, FINETUNE, UNET = "zero_shot", "finetune", "unet"  # stages; unet: the U-Net baseline (backbone unet, unet_box)


class ResultsError(Exception):
    """The study folder or experiment cannot be read: a one-paragraph message saying what to do."""


@dataclass
class StudyResults:
    """Everything the report needs from a finished study, as pandas tables.

    trials:     trials.csv (one row per trial and per zero-shot evaluation).
    per_image:  per_image.csv plus `evaluation`, `configuration` and `unit` columns.
    history:    history.csv (one row per trial and epoch); empty when none was written.
    factors:    every factor column of trials (what `resolved.yaml`'s `factors:` lists); never `seed`.
    name:       the study name.
    config:     resolved.yaml as a dict ({} when absent, e.g. read from MLflow alone).
    evaluations: one row per evaluation: trial columns, `evaluation`, `n_images`, `primary`, `seed`,
                `configuration`, `label` (a short name for plots and tables).
    notes:      things found while reading that the report must state (rows left out, ...).
    per_subject: per_subject.csv plus `evaluation` and `configuration`; empty when the study wrote none.
    configurations: one row per configuration (see the module docstring): its factors, `seeds` (the
                number of replicate evaluations), `evaluations` and `trial_ids` (lists), `val_dice`,
                `epochs_run` and `seconds` (means over the replicates), `status` (their statuses).
    unit:       `subject` or `image`, the unit of analysis (see the module docstring).
    """

    name: str
    trials: pd.DataFrame
    per_image: pd.DataFrame
    history: pd.DataFrame
    factors: list[str]
    config: dict = field(default_factory=dict)
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)
    per_subject: pd.DataFrame = field(default_factory=pd.DataFrame)
    configurations: pd.DataFrame = field(default_factory=pd.DataFrame)
    unit: str = "image"

    def __post_init__(self):
        self._scores: dict[tuple, object] = {}  # tables computed once (scores, replicate tables, indexes)
        self.factors = [name for name in self.factors if name not in NOT_FACTORS]
        if self.evaluations.empty and not self.per_image.empty:
            self.per_image, self.evaluations = _build_evaluations(self)
            _group_configurations(self)
            self.per_image, self.unit = _tag_units(self.per_image)
            self.per_subject = _tag_per_subject(self)

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
        if ("image", metric) not in self._scores:
            self._scores[("image", metric)] = self.per_image.pivot(index="image_id", columns="evaluation",
                                                                   values=metric).astype(float)
        return self._scores[("image", metric)]

    def unit_scores(self, metric: str = "dice") -> pd.DataFrame:
        """`metric` per unit of analysis as a unit x evaluation table.

        A unit's value in an evaluation is the mean of the per-image `metric` over that unit's test
        images in that evaluation (NaN values skipped; NaN when none is finite or the unit was not
        scored). With `image` as the unit this is `scores(metric)` (rows named by image_id).
        """
        if ("unit", metric) not in self._scores:
            values = self.per_image.assign(_value=pd.to_numeric(self.per_image[metric], errors="coerce"))
            table = values.groupby(["unit", "evaluation"])["_value"].mean().unstack("evaluation")
            self._scores[("unit", metric)] = table.reindex(columns=list(self.evaluations["evaluation"])).astype(float)
        return self._scores[("unit", metric)]

    def subject_scores_3d(self, metric: str = "dice_3d") -> pd.DataFrame:
        """A per_subject.csv metric as a subject x evaluation table (empty without per_subject.csv)."""
        if self.per_subject.empty or metric not in self.per_subject:
            return pd.DataFrame()
        if ("3d", metric) not in self._scores:
            table = self.per_subject.pivot(index="subject", columns="evaluation", values=metric)
            self._scores[("3d", metric)] = table.apply(pd.to_numeric, errors="coerce").astype(float)
        return self._scores[("3d", metric)]

    def replicate_scores(self, key: str, metric: str = "dice", source: str = "unit") -> pd.DataFrame:
        """Configuration `key`'s units x replicates table of `metric`: the columns of its evaluations,
        in seed order, of `unit_scores(metric)` (source `unit`) or `subject_scores_3d(metric)` (`3d`);
        an evaluation missing from that table has no column. Computed once per (key, metric,
        source): read it, do not modify it."""
        cached = ("replicates", source, metric, key)
        if cached not in self._scores:
            table = self.unit_scores(metric) if source == "unit" else self.subject_scores_3d(metric)
            layout = ("layout", source, metric)
            if layout not in self._scores:
                self._scores[layout] = ({e: i for i, e in enumerate(table.columns)}, table.to_numpy(float))
            positions, values = self._scores[layout]
            columns = [e for e in self.replicates(key) if e in positions]
            self._scores[cached] = pd.DataFrame(values[:, [positions[e] for e in columns]], index=table.index,
                                                columns=pd.Index(columns, name=table.columns.name))
        return self._scores[cached]

    @property
    def units(self) -> int:
        """The number of distinct units of analysis (subjects or images) among the test results."""
        return int(self.per_image["unit"].nunique())

    @property
    def unit_description(self) -> str:
        """What the unit is and how many there are, in words (for the report)."""
        images = self.per_image["image_id"].nunique()
        if self.unit == "subject":
            sizes = self.per_image.groupby(["evaluation", "unit"])["image_id"].nunique().groupby("unit").max()
            return (f"{self.units} test subjects with {int(sizes.min())} to {int(sizes.max())} test images each "
                    f"({images} test images); a subject's value of a per-image metric is the mean of that metric "
                    f"over the subject's test images within one evaluation")
        why = ("each test subject has one test image" if "subject" in self.per_image
               and self.per_image["subject"].notna().any() else "per_image.csv records no subject")
        return f"{self.units} test images, each its own unit ({why})"

    @property
    def seeds(self) -> int:
        """The most replicates any fine-tuned configuration has (search.seeds where all finished)."""
        finetuned = self.configurations[self.configurations["stage"] == FINETUNE] if len(self.configurations) else None
        return int(finetuned["seeds"].max()) if finetuned is not None and len(finetuned) else 0

    def evaluation(self, key: str) -> pd.Series:
        """The evaluations row with `evaluation == key`."""
        return self.evaluations.set_index("evaluation").loc[key]

    def configuration(self, key: str) -> pd.Series:
        """The configurations row with `configuration == key`."""
        indexed = self._scores.get(("configurations", id(self.configurations)))
        if indexed is None:
            indexed = self.configurations.set_index("configuration")
            self._scores[("configurations", id(self.configurations))] = indexed
        return indexed.loc[key]

    def replicates(self, key: str) -> list[str]:
        """The evaluations (one per seed, in seed order) of configuration `key`."""
        return list(self.configuration(key)["evaluations"])


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
        table = pd.read_csv(path, dtype={"trial_id": str, "image_id": str, "subject": str})
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
    per_subject_path = results_dir / "per_subject.csv"  # optional: written since the 3D metrics
    per_subject = (_read_csv(per_subject_path, PER_SUBJECT_COLUMNS, study_dir) if per_subject_path.is_file()
                   else pd.DataFrame())
    per_click_path = results_dir / "per_click.csv"  # optional: written with evaluation.clicks
    per_click = (_read_csv(per_click_path, PER_CLICK_COLUMNS, study_dir) if per_click_path.is_file()
                 else pd.DataFrame())
    if config:
        factors = [name for name in (config.get("factors") or {}) if name in trials.columns]
        if isinstance((config.get("data") or {}).get("target"), list) and "target" in trials.columns:
            factors.insert(0, "target")  # data.target as a list: a grid axis, kept under data: not factors:
    else:
        factors = [name for name in KNOWN_FACTORS if name in trials.columns]
        notes.append(f"{study_dir} has no resolved.yaml: factors taken from the trials.csv columns "
                     f"({', '.join(factors)}).")
    name = str((config.get("study") or {}).get("name") or study_dir.name)
    return _assemble(name, trials, per_image, history, factors, config, notes, source=str(results_dir),
                     per_subject=per_subject, per_click=per_click)


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


def _choose_parent(parents: list, parent_run_id: str | None, study_name: str | None, where: str,
                   notes: list[str]):
    """The parent run whose trial runs make the study (see load_from_mlflow), or None for none."""
    if parent_run_id:
        for run in parents:
            if run.info.run_id == parent_run_id:
                return run
        raise ResultsError(f"{where} has no active parent run {parent_run_id!r} (tag sam_study.role=parent); its "
                           f"parent runs are {', '.join(r.info.run_id for r in parents) or 'none'}. Pass the "
                           f"parent_run_id of the study's tracking.json, or run the study again to log it.")
    if not parents:
        return None
    named = [run for run in parents
             if study_name and run.data.tags.get("sam_study.study", run.info.run_name) == study_name]
    candidates = named or parents
    newest = max(candidates, key=lambda run: (run.info.start_time or 0, run.info.run_id))
    if len(candidates) > 1:
        of = f"parent runs of study {study_name!r}" if named else "parent runs"
        notes.append(f"{where} holds {len(candidates)} {of}; read the trial runs of the newest, "
                     f"{newest.info.run_id} ({newest.info.run_name}).")
    return newest


def load_from_mlflow(tracking_uri: str, experiment: str, config: dict | None = None,
                     parent_run_id: str | None = None) -> StudyResults:
    """Read a study from its MLflow experiment into a `StudyResults`.

    A study is one parent run (tag `sam_study.role=parent`) and the trial runs nested under it
    (tag `mlflow.parentRunId`): an experiment may hold several studies, or one study's earlier
    configurations. The parent is `parent_run_id` when given (the `parent_run_id` of the study
    folder's tracking.json), else the newest parent of the study `config` names (its
    `study.name` against the parent's `sam_study.study` tag, or its run name), else the newest
    parent; the study's name is that parent's run name. An experiment without parent runs
    (written by hand) is read whole.

    Trial runs are the runs tagged `sam_study.role=trial`; their tags give trial_id, stage and
    status, their params the factors plus family, image_encoder_params and the replicate `seed`
    (not a factor), their final metrics TRIAL_METRICS, their per-epoch metrics (step = epoch)
    the history, their `per_image.csv` artifact the per-image rows and their `per_subject.csv`
    artifact (when logged) the per-subject 3D rows. A trial's
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

    def runs_tagged(role: str, parent_id: str | None = None):
        query = f"tags.`sam_study.role` = '{role}'"
        if parent_id is not None:
            if "'" in parent_id:
                raise ResultsError(f"{parent_id!r} is not an MLflow run id; pass the parent_run_id of tracking.json.")
            query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
        token, runs = None, []
        while True:
            page = client.search_runs([found.experiment_id], query, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    where = f"MLflow experiment {experiment!r} at {tracking_uri!r}"
    notes: list[str] = []
    study = (config or {}).get("study")
    study_name = study.get("name") if isinstance(study, dict) else None
    parent = _choose_parent(runs_tagged("parent"), parent_run_id, study_name, where, notes)
    trial_runs = runs_tagged("trial", None if parent is None else parent.info.run_id)
    if not trial_runs:
        under = "" if parent is None else f" under parent run {parent.info.run_id}"
        raise ResultsError(f"{where} has no trial runs (tag sam_study.role=trial){under}: the study has not "
                           f"finished any trial; run python -m study.run <grid.yaml> to resume it.")
    trial_rows, per_image_tables, per_subject_tables, history_tables, per_click_tables = [], [], [], [], []
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
            if "image_encoder_params" not in row and "model_params" in metrics:  # a U-Net: its whole network
                row["image_encoder_params"] = metrics["model_params"]
            if epochs is not None and "val_dice" in epochs:
                epochs = epochs.sort_values("epoch")
                best = epochs[epochs["epoch"] == metrics.get("best_epoch")]
                row["val_dice"] = float(best["val_dice"].iloc[0] if len(best) else epochs["val_dice"].max())
                history_tables.append(epochs.assign(trial_id=trial_id))
            trial_rows.append(row)
            logged = {a.path for a in client.list_artifacts(run.info.run_id)}
            for artifact, tables in (("per_image.csv", per_image_tables), ("per_subject.csv", per_subject_tables),
                                     ("per_click.csv", per_click_tables)):
                if artifact in logged:
                    local = client.download_artifacts(run.info.run_id, artifact, scratch)
                    tables.append(pd.read_csv(local, dtype={"trial_id": str, "image_id": str, "subject": str})
                                  .assign(trial_id=trial_id))
    trials = _typed_params(trial_rows)
    per_image = pd.concat(per_image_tables, ignore_index=True) if per_image_tables else pd.DataFrame(
        columns=list(PER_IMAGE_COLUMNS))
    history = (pd.concat(history_tables, ignore_index=True) if history_tables
               else pd.DataFrame(columns=["trial_id", "epoch", *HISTORY_METRICS]))
    history = history[["trial_id", "epoch"] + [c for c in history.columns if c not in ("trial_id", "epoch")]]
    per_subject = pd.concat(per_subject_tables, ignore_index=True) if per_subject_tables else pd.DataFrame()
    per_click = pd.concat(per_click_tables, ignore_index=True) if per_click_tables else pd.DataFrame()
    # Parameter counts (image_encoder_params, mask_decoder_params, ...) describe a backbone; they are not factors.
    factors = [c for c in trials.columns if c not in (*TRIAL_COLUMNS[:3], *TRIAL_METRICS, *NOT_FACTORS, "family")
               and not c.endswith("_params")]
    name = experiment
    if parent is not None:
        name = parent.data.tags.get("mlflow.runName") or parent.info.run_name or experiment
    return _assemble(name, trials, per_image, history, factors, dict(config or {}), notes,
                     source=f"MLflow experiment {experiment!r} at {tracking_uri}", per_subject=per_subject,
                     per_click=per_click)


# --- evaluations ----------------------------------------------------------------------------------


def _assemble(name, trials, per_image, history, factors, config, notes, source,
              per_subject: pd.DataFrame | None = None, per_click: pd.DataFrame | None = None) -> StudyResults:
    """Check the tables against each other and build a StudyResults."""
    trials = trials.copy()
    trials["trial_id"] = trials["trial_id"].astype(str)
    for column in ("family", "image_encoder_params", *TRIAL_METRICS):
        if column not in trials.columns:
            trials[column] = np.nan
    if "seed" not in trials.columns:  # older folders: no replicate seed; per_image.csv may still say it
        seeds = (per_image.dropna(subset=["seed"]).groupby(per_image["trial_id"].astype(str))["seed"].first()
                 if "seed" in per_image.columns else pd.Series(dtype=float))
        trials["seed"] = trials["trial_id"].map(seeds)
    trials["seed"] = pd.to_numeric(trials["seed"], errors="coerce")
    trials.loc[trials["stage"] == ZERO_SHOT, "seed"] = np.nan  # a zero-shot run is trained by no seed
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
    if per_click is not None and not per_click.empty:
        per_image = _with_click_columns(per_image, per_click, notes, source)
    if not history.empty:
        history = history.copy()
        history["trial_id"] = history["trial_id"].astype(str)
    per_subject = _check_per_subject(per_subject, trials, notes, source)
    results = StudyResults(name, trials.reset_index(drop=True), per_image.reset_index(drop=True), history,
                           list(factors), config, notes=notes, per_subject=per_subject)
    if results.evaluations.empty:
        raise ResultsError(f"{source} holds no per-image test results: no trial has finished its test "
                           f"evaluation yet; run python -m study.run <grid.yaml> to resume the study.")
    return results


def _with_click_columns(per_image: pd.DataFrame, per_click: pd.DataFrame, notes: list[str],
                        source: str) -> pd.DataFrame:
    """per_image with the click columns of per_click.csv (analysis.clicks) joined on (trial, prompt,
    image); a note when an image's click-0 Dice differs from its per-image Dice (it must not: both
    are the same prediction)."""
    per_click = per_click.astype({"trial_id": str, "image_id": str, "prompt": str})
    per_click = per_click[~per_click.duplicated()]
    if per_click.duplicated(CLICK_KEY + ["click"]).any():
        bad = per_click.loc[per_click.duplicated(CLICK_KEY + ["click"])].iloc[0]
        raise ResultsError(f"{source}: per_click.csv scores click {bad['click']} of image {bad['image_id']} of trial "
                           f"{bad['trial_id']} (prompt {bad['prompt']}) twice with different values. Remove the "
                           f"stale rows or re-run the trial.")
    merged = per_image.merge(per_image_click_columns(per_click), on=CLICK_KEY, how="left")
    differ = merged["click0"].notna() & ((merged["click0"] - merged["dice"]).abs() > 1e-9)
    if differ.any():
        notes.append(f"{int(differ.sum())} per-image Dice value(s) differ from the click-0 Dice of per_click.csv "
                     f"(trials {', '.join(sorted(merged.loc[differ, 'trial_id'].unique())[:5])}); the click curves "
                     f"use per_click.csv's values from click 1 on.")
    return merged.drop(columns="click0")


def _check_per_subject(per_subject: pd.DataFrame | None, trials: pd.DataFrame, notes: list[str],
                       source: str) -> pd.DataFrame:
    """per_subject.csv rows of known trials, with a `prompt` (the trial's when absent); empty when none."""
    if per_subject is None or per_subject.empty:
        return pd.DataFrame()
    per_subject = per_subject.copy()
    per_subject["trial_id"] = per_subject["trial_id"].astype(str)
    per_subject["subject"] = per_subject["subject"].astype(str)
    for column in PER_SUBJECT_METRICS:
        if column not in per_subject.columns:
            per_subject[column] = np.nan
    if "prompt" not in per_subject.columns:
        per_subject["prompt"] = per_subject["trial_id"].map(trials.set_index("trial_id")["prompt"])
    per_subject["prompt"] = per_subject["prompt"].astype(str)
    unknown = ~per_subject["trial_id"].isin(trials["trial_id"])
    if unknown.any():
        notes.append(f"per-subject rows of {per_subject.loc[unknown, 'trial_id'].nunique()} trial(s) missing from "
                     f"trials.csv were left out.")
        per_subject = per_subject[~unknown]
    per_subject = per_subject[~per_subject.duplicated()]
    key = ["trial_id", "prompt", "subject"]
    if per_subject.duplicated(key).any():
        bad = per_subject.loc[per_subject.duplicated(key), key].iloc[0]
        raise ResultsError(f"{source}: per_subject.csv scores subject {bad['subject']} of trial {bad['trial_id']} "
                           f"(prompt {bad['prompt']}) twice with different values. Remove the stale rows or re-run "
                           f"the trial.")
    return per_subject.reset_index(drop=True)


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
    per_image = per_image.assign(evaluation=_evaluation_of(evaluations, per_image))
    evaluations["n_images"] = evaluations["evaluation"].map(per_image.groupby("evaluation").size())
    for column in ("image_encoder_params", *TRIAL_METRICS):
        evaluations[column] = pd.to_numeric(evaluations[column], errors="coerce")
    stage_order = evaluations["stage"].map({ZERO_SHOT: 0, UNET: 1, FINETUNE: 2}).fillna(3)
    evaluations = (evaluations.assign(_order=stage_order).sort_values(["_order", "backbone", "evaluation"])
                   .drop(columns="_order").reset_index(drop=True))
    if "eval_prompt" not in results.factors:
        results.factors.append("eval_prompt")
    _check_trial_means(results, evaluations, per_image)
    return per_image, evaluations


def _evaluation_of(evaluations: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """The evaluation of each row of a per-image or per-subject table: the one with its (trial_id,
    prompt) as (trial_id, eval_prompt); None where no evaluation has that pair."""
    keys = pd.MultiIndex.from_frame(evaluations[["trial_id", "eval_prompt"]].astype(str))
    positions = keys.get_indexer(pd.MultiIndex.from_arrays([rows["trial_id"].astype(str), rows["prompt"].astype(str)]))
    names = np.append(evaluations["evaluation"].to_numpy(object), None)
    return names[positions]  # position -1 (not found) picks the appended None


def _level_key(value):
    """A factor value as a hashable grouping key, NaN (a factor left at its default) as one level."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<none>"
    if isinstance(value, np.generic):
        return value.item()
    return value


def _configuration_label(row: pd.Series, varying: list[str]) -> str:
    """The short name of a configuration: the backbone and every factor that varies."""
    target = row.get("target")
    region = f" · {target}" if isinstance(target, str) and "target" in varying else ""
    if row["stage"] == ZERO_SHOT:
        return f"zero-shot · {row['backbone']} · {row['eval_prompt']}{region}"
    if row["stage"] == UNET:
        return ("U-Net + box channel" if row["backbone"] == "unet_box" else "U-Net") + region
    parts = [str(row["backbone"])]
    for name in varying:
        value = row[name]
        if name == "eval_prompt":
            parts.append(f"eval {value}")
        elif isinstance(value, str):
            parts.append(value)
        else:
            parts.append(f"{name}={format_level(value)}")
    return " · ".join(parts)


def _group_configurations(results: StudyResults) -> None:
    """Group the evaluations into configurations (every factor but the seed) and label both.

    Sets evaluations' `configuration` and `label` columns (a replicate's label is its
    configuration's plus `seed k`) and builds results.configurations (see StudyResults).
    """
    evaluations = results.evaluations
    if "seed" not in evaluations:
        evaluations["seed"] = np.nan
    axes = [a for a in dict.fromkeys(["stage", "backbone", *results.factors, "eval_prompt"]) if a in evaluations]
    keys = [tuple(_level_key(v) for v in values) for values in evaluations[axes].itertuples(index=False)]
    groups: dict[tuple, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    varying = [f for f in results.grid_factors + results.searched_factors if f != "backbone"]
    labels = {key: _configuration_label(evaluations.iloc[members[0]], varying) for key, members in groups.items()}
    counts = pd.Series(list(labels.values())).value_counts()
    configuration_of, label_of, rows = [None] * len(evaluations), [None] * len(evaluations), []
    for key, members in groups.items():
        members = sorted(members, key=lambda i: (np.nan_to_num(evaluations.iloc[i]["seed"], nan=-1.0),
                                                 evaluations.iloc[i]["evaluation"]))
        first = evaluations.iloc[members[0]]
        name = labels[key] if counts[labels[key]] == 1 else f"{labels[key]} #{first['trial_id']}"
        for i in members:
            configuration_of[i] = name
            seed = evaluations.iloc[i]["seed"]
            replicate = f"seed {format_level(seed)}" if pd.notna(seed) else f"#{evaluations.iloc[i]['trial_id']}"
            label_of[i] = name if len(members) == 1 else f"{name} · {replicate}"
        chosen = evaluations.iloc[members]
        row = first.drop(labels=["evaluation", "trial_id", "label"], errors="ignore").to_dict()
        statuses = [str(v) for v in pd.unique(chosen["status"].fillna(""))]
        row.update(configuration=name, label=name, seeds=len(members), evaluations=list(chosen["evaluation"]),
                   trial_ids=list(chosen["trial_id"]), seed_values=list(chosen["seed"]), status=", ".join(statuses),
                   n_images=int(chosen["n_images"].max()))
        for column in ("val_dice", "epochs_run", "seconds", "trainable_params"):
            values = pd.to_numeric(chosen[column], errors="coerce")
            row[column] = float(values.mean()) if values.notna().any() else math.nan
        rows.append(row)
    evaluations["configuration"] = configuration_of
    evaluations["label"] = label_of
    results.configurations = pd.DataFrame(rows)
    results.per_image = results.per_image.assign(
        configuration=results.per_image["evaluation"].map(evaluations.set_index("evaluation")["configuration"]))


def _tag_units(per_image: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Add the `unit` column: the subject when some subject has several test images in one
    evaluation (volume slices), else the image_id (a 2D image, or no subject recorded)."""
    if "subject" in per_image.columns and per_image["subject"].notna().any():
        subject = per_image["subject"].where(per_image["subject"].notna(), per_image["image_id"]).astype(str)
        sizes = per_image.assign(_subject=subject).groupby(["evaluation", "_subject"])["image_id"].nunique()
        if (sizes > 1).any():
            return per_image.assign(unit=subject), "subject"
    return per_image.assign(unit=per_image["image_id"].astype(str)), "image"


def _tag_per_subject(results: StudyResults) -> pd.DataFrame:
    """per_subject rows tagged with their evaluation and configuration (rows of no evaluation dropped)."""
    per_subject = results.per_subject
    if per_subject is None or per_subject.empty:
        return pd.DataFrame()
    per_subject = per_subject.assign(evaluation=_evaluation_of(results.evaluations, per_subject)).dropna(
        subset=["evaluation"])
    configuration = results.evaluations.set_index("evaluation")["configuration"]
    return per_subject.assign(configuration=per_subject["evaluation"].map(configuration)).reset_index(drop=True)


def _check_trial_means(results: StudyResults, evaluations: pd.DataFrame, per_image: pd.DataFrame) -> None:
    """Note every trial whose test_dice in trials.csv differs from the mean of its per-image Dice."""
    means = per_image.groupby("evaluation")["dice"].mean()
    primary = evaluations[evaluations["primary"]]
    differ = [row["trial_id"] for _, row in primary.iterrows()
              if np.isfinite(row["test_dice"]) and abs(row["test_dice"] - means[row["evaluation"]]) > 1e-6]
    if differ:
        results.notes.append(f"test_dice in trials.csv differs from the mean of per-image Dice for "
                             f"{len(differ)} trial(s) ({', '.join(differ[:5])}); the report uses the per-image values.")
