"""MLflow wiring of a study: one experiment, one parent run, exactly one nested run per trial.

Only the study driver process talks to MLflow (a SQLite store takes one writer at a time; Ray
workers report to the driver, never to MLflow). `StudyTracker` writes the layout that
`analysis.results.load_from_mlflow` reads back:

- one experiment (`tracking.experiment`, by default the study name; several studies may share
  one), tagged `mlflow.experimentKind=custom_model_development` (MLflow 3's "Machine learning"
  kind, whose page is the table of training runs rather than GenAI traces). MLflow 3.17's UI
  picks the view from the URL instead, so `experiment_url()` names it: the runs table
  (`workflowType=machine_learning`), sorted by test Dice so the trial runs are rows of their own;
- one parent run per study, run name = study name, tags `sam_study.role=parent`,
  `sam_study.study` (the study name) and `sam_study.config_hash`; its description
  (`mlflow.note.content`) holds the plan while the study runs and the one-screen summary once it
  ends (`describe_parent`); the resolved config flattened to params where a value is short, and
  the artifacts `resolved.yaml` and `plan.txt` (the report is added later under `report/`);
- one nested run per trial or zero-shot evaluation (tag `mlflow.parentRunId` = the parent),
  named after its configuration (`run_name`, e.g. `litemedsam · adamw · dice · box · s0`, or
  `zero-shot · litemedsam · box`; the trial id when the driver passes no name), tags
  `sam_study.role=trial`, `sam_study.stage` (zero_shot | finetune), `sam_study.trial_id`,
  `sam_study.status` (and `sam_study.failure_reason` when a trial fails); params = what the
  driver passes (every factor, `family`, `image_encoder_params`); per-epoch metrics with
  step = epoch; final metrics (test_dice, test_iou, test_miou, test_hd95, epochs_run, seconds,
  best_epoch) at step = epochs run; the artifact `per_image.csv` at the run's artifact root and
  optional files (best decoder checkpoint, overlay PNGs) under sub-folders.

A study's runs are its parent (found by `sam_study.study` and `sam_study.config_hash`) and the
runs nested under it: `--fresh` deletes only those, and `load_from_mlflow` reads only those.

Resume and crash safety: nothing is kept only in memory. A parent is found again by its tags, a
trial's run by its `sam_study.trial_id` tag under that parent, and the steps a run already has
are read from its metric history the first time this process touches it, so re-running the same
study after a SIGKILL neither opens a second run for a trial nor logs an epoch twice, and a trial
finished again with the same outcome does not upload its artifacts again. `close()`
ends the parent and marks every nested run still RUNNING as KILLED, so no run stays RUNNING once
a study ends or fails.

The embedded default (no `tracking.uri`) is a SQLite store `<study_dir>/mlflow.db` with artifacts
in `<study_dir>/mlartifacts`. `<study_dir>/tracking.json` records where the runs went
({tracking_uri, experiment_name, experiment_id, parent_run_id}); the report reads it.

A tracking server that is down, or refuses the credentials, is a `UserError` naming the URI and
the fix; HTTP retries and timeouts are set small (unless already set in the environment) so a
dead server fails within seconds.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shlex
import shutil
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator, Mapping, Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from foundation.errors import UserError
from foundation.files import write_atomic

log = logging.getLogger(__name__)

ROLE_TAG = "sam_study.role"
STAGE_TAG = "sam_study.stage"
TRIAL_ID_TAG = "sam_study.trial_id"
STATUS_TAG = "sam_study.status"
REASON_TAG = "sam_study.failure_reason"
CONFIG_HASH_TAG = "sam_study.config_hash"
STUDY_TAG = "sam_study.study"  # the parent's study name: which parent runs are this study's
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
# MLflow 3's experiment kind: "custom_model_development" is the UI's "Machine learning" kind (the
# other is "genai_development"), whose experiment page opens on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

STAGES = ("zero_shot", "finetune", "unet")  # unet: the U-Net baseline's trials
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The `sam_study.status` tag holds the trial status in the vocabulary of results/trials.csv (Ray
# Tune's): analysis reads it as the `status` column and keeps TERMINATED trials for fANOVA.
TRIAL_STATUS_OF_RUN_STATUS = {"FINISHED": "TERMINATED", "FAILED": "ERROR", "KILLED": "KILLED"}
RUNNING_TRIAL_STATUS = "RUNNING"

# HTTP behaviour towards a tracking server, unless the user set these already: 2 retries with a
# 1 s backoff and a 20 s per-request timeout make a dead server fail in a few seconds, not minutes.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
SHORT_PARAM_CHARS = 250  # parent params longer than this stay in resolved.yaml only
MAX_REASON_CHARS = 5000
MAX_NOTE_CHARS = 8000  # MLflow's limit on a tag value
MAX_RUN_NAME_CHARS = 250
NAME_FACTORS = ("target", "backbone", "optimizer", "loss", "prompt")  # in a run name, in this order
NAME_SEPARATOR = " · "
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
METRICS_PER_BATCH = 1000
UI_PORT = 5000
# The query of experiment_url: MLflow 3's "Model training" view (the runs table), best test Dice first.
RUNS_VIEW_QUERY = urllib.parse.urlencode({"workflowType": "machine_learning", "orderByKey": "metrics.`test_dice`",
                                          "orderByAsc": "false"})


def set_http_defaults() -> None:
    """Small MLflow HTTP retry/timeout settings, leaving any the user set in the environment."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def flatten_params(values: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested dict as dotted keys -> string values (lists and dicts below a key as JSON).

    `{"factors": {"lr": 1e-4, "loss": ["dice", "focal"]}}` gives
    `{"factors.lr": "0.0001", "factors.loss": '["dice", "focal"]'}`.
    """
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def _short_number(value: float) -> str:
    """`value` with 2 significant digits, as a person writes it: 1e-4, 3.2e-5, 0.05, 0.3, 12."""
    value = float(value)
    if value != 0 and math.isfinite(value) and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.2g}"


def run_name(params: Mapping, stage: str, varying: Collection[str] = ()) -> str:
    """The MLflow run name of a trial: its configuration, readable in the UI's runs table.

    A fine-tune trial: the values of target, backbone, optimizer, loss and prompt (those present,
    in this order), then every float-valued param (a learning rate, a searched range) as
    `lr=1e-4` with 2 significant digits and every other param named in `varying` (the study's
    grid factors with several levels: `train_clicks=2`, `swa=True`), in key order, then
    `s{seed}` when `seed` is a param, joined with " · ":
    `litemedsam · adamw · dice · box · lr=1e-4 · s0`. A zero-shot evaluation:
    `zero-shot · {backbone} · {prompt}` (`eval_prompt` when there is no `prompt`), then
    ` · {target}` when present. At most 250 characters (MLflow's limit).
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if stage == "zero_shot":
        prompt = params.get("prompt", params.get("eval_prompt"))
        parts = ["zero-shot", *(str(value) for value in (params.get("backbone"), prompt, params.get("target"))
                                if value is not None)]
    else:
        parts = [str(params[key]) for key in NAME_FACTORS if params.get(key) is not None]
        for key, value in sorted(params.items(), key=lambda kv: str(kv[0])):
            if key in NAME_FACTORS or key == "seed":
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
                parts.append(f"{key}={_short_number(value)}")
            elif key in varying:
                parts.append(f"{key}={value}")
        if params.get("seed") is not None:
            parts.append(f"s{params['seed']}")
    return NAME_SEPARATOR.join(parts)[:MAX_RUN_NAME_CHARS]


def _quoted(value: str, what: str) -> str:
    """`value` quoted for an MLflow search filter (which has no escape for quote characters)."""
    if "'" in value:
        raise ValueError(f"{what} {value!r} contains a single quote, which an MLflow search cannot match; "
                         f"use identifiers without quotes.")
    return f"'{value}'"


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


class StudyTracker:
    """The study's MLflow experiment, its parent run and one nested run per trial.

    Used only by the study driver process. Typical use::

        with StudyTracker(config.tracking.uri, config.experiment_name, config.study_dir) as tracker:
            tracker.start_parent(name, config_hash, study_dir / "resolved.yaml", plan_text, resolved)
            tracker.trial_run(trial_id, "finetune", {**factors, "family": ..., "image_encoder_params": ...})
            tracker.log_epoch(trial_id, {"val_dice": 0.8, "train_loss": 0.3}, step=epoch)
            tracker.finish_trial(trial_id, "FINISHED", {"test_dice": 0.81, "epochs_run": 3},
                                 {"per_image.csv": path, "checkpoint/best_decoder.pt": ckpt})
        # leaving the block closes: FINISHED, FAILED on an exception, KILLED on Ctrl-C

    Attributes: `tracking_uri`, `experiment_name`, `experiment_id`, `parent_run_id`,
    `artifact_root` (the folder of the embedded store's artifacts; None for a server),
    `name_factors` (the study's grid factors with several levels, which trial run names spell
    out: `run_name`'s `varying`).
    """

    def __init__(self, tracking_uri: str | None, experiment: str, study_dir: Path,
                 name_factors: Collection[str] = ()):
        self.name_factors = tuple(name_factors)
        self.study_dir = Path(study_dir).expanduser().resolve()
        self.study_dir.mkdir(parents=True, exist_ok=True)
        self.embedded = tracking_uri is None
        self.tracking_uri = tracking_uri or f"sqlite:///{(self.study_dir / 'mlflow.db').as_posix()}"
        self.remote = _is_remote(self.tracking_uri)
        # A local store gets its artifacts beside the study; a server decides where they go.
        self.artifact_root = None if self.remote else self.study_dir / "mlartifacts"
        self.experiment_name = experiment
        self.parent_run_id: str | None = None
        self._run_of_trial: dict[str, str] = {}  # a cache of what MLflow holds, never the only record
        self._steps_of_run: dict[str, dict[str, set[int]]] = {}
        self._closed = False
        set_http_defaults()
        with self._store_errors("opening the experiment"):
            self._client = MlflowClient(self.tracking_uri)
            self.experiment_id = self._open_experiment()
        self._write_tracking_json(keep_parent=True)

    # --- the experiment and the parent run ---------------------------------------------------

    def _open_experiment(self) -> str:
        """The experiment's id, created when there is none, tagged with MLflow 3's experiment kind.

        An experiment of another kind (someone chose one in the UI) keeps it; one without the tag
        (older MLflow, or created by hand) gets `mlflow.experimentKind=custom_model_development`.
        """
        found = self._client.get_experiment_by_name(self.experiment_name)
        if found is None:
            location = self.artifact_root.as_uri() if self.artifact_root else None
            try:
                return self._client.create_experiment(self.experiment_name, artifact_location=location,
                                                      tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self._client.get_experiment_by_name(self.experiment_name)
                if found is None:  # it exists but is deleted
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"The MLflow experiment {self.experiment_name!r} (id {found.experiment_id}) at {self.tracking_uri} "
                f"was deleted, so the study cannot log to it. Restore it with `MLFLOW_TRACKING_URI="
                f"{shlex.quote(self.tracking_uri)} mlflow experiments restore --experiment-id {found.experiment_id}`, "
                f"or set tracking.experiment in the study file to a new name.")
        if self.artifact_root and found.artifact_location != self.artifact_root.as_uri():
            log.warning("MLflow experiment %r keeps its artifacts in %s, not in %s (was the study folder moved?); "
                        "new artifacts go to the former.", self.experiment_name, found.artifact_location,
                        self.artifact_root.as_uri())
        if not found.tags.get(EXPERIMENT_KIND_TAG):
            self._client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    def start_parent(self, study_name: str, config_hash: str, resolved_yaml_path: Path, plan_text: str,
                     params: Mapping, fresh: bool = False) -> str:
        """Open (or, on a resume, reopen) the study's parent run and return its run id.

        The parent is the active run of this experiment tagged `sam_study.role=parent`,
        `sam_study.study=study_name` and `sam_study.config_hash=config_hash`; when there is none,
        one is created with run name `study_name`. Either way it is marked RUNNING, `params` (the
        resolved config; nested dicts are flattened to dotted keys) are logged where their value
        is at most 250 characters and not yet logged, `plan_text` becomes the run's description
        (until `describe_parent` replaces it), and `resolved_yaml_path` and `plan_text` are logged
        as the artifacts `resolved.yaml` and `plan.txt`.

        `fresh=True` (the `--fresh` command-line flag) first deletes this study's runs: its parent
        runs (tag `sam_study.study=study_name`, whatever their config hash) and every run nested
        under them (MLflow's soft delete: `mlflow runs restore` brings one back), so the study
        starts over with a new parent. Other studies' runs in the same experiment are left alone.
        Without `fresh`, parents of this study with another config hash stay, and a warning
        names them (`load_from_mlflow` reads one parent's trial runs at a time).
        """
        with self._store_errors("opening the study's parent run"):
            if fresh:
                self._delete_study_runs(study_name)
            parents = self._study_parents(study_name)
            same = [run for run in parents if run.data.tags.get(CONFIG_HASH_TAG) == config_hash]
            others = [run for run in parents if run.data.tags.get(CONFIG_HASH_TAG) != config_hash]
            if others:
                log.warning("MLflow experiment %r also holds parent run(s) %s of study %r with another configuration "
                            "(config hash %s); their trial runs stay in the experiment.", self.experiment_name,
                            ", ".join(run.info.run_id for run in others), study_name,
                            ", ".join(sorted({str(run.data.tags.get(CONFIG_HASH_TAG)) for run in others})))
            if same:
                run = same[0]  # oldest first
                self.parent_run_id = run.info.run_id
                if run.info.status != "RUNNING":
                    self._client.update_run(self.parent_run_id, status="RUNNING")
                existing = run.data.params
            else:
                run = self._client.create_run(self.experiment_id, run_name=study_name, tags={
                    ROLE_TAG: "parent", CONFIG_HASH_TAG: config_hash, STUDY_TAG: study_name})
                self.parent_run_id = run.info.run_id
                existing = {}
            self._closed = False
            short = {key: value for key, value in flatten_params(params).items()
                     if len(value) <= SHORT_PARAM_CHARS and len(key) <= 250}
            changed = sorted(key for key, value in short.items() if key in existing and existing[key] != value)
            if changed:
                log.warning("parent run %s keeps its first value of param(s) %s (MLflow params cannot change); "
                            "resolved.yaml holds the current ones.", self.parent_run_id, ", ".join(changed[:10]))
            self._log_params(self.parent_run_id, {k: v for k, v in short.items() if k not in existing})
            self._client.set_tag(self.parent_run_id, NOTE_TAG, plan_text[:MAX_NOTE_CHARS])
            self._log_artifact_at(self.parent_run_id, "resolved.yaml", Path(resolved_yaml_path))
            self._log_file_as(self.parent_run_id, "plan.txt", text=plan_text)
        self._write_tracking_json()
        return self.parent_run_id

    def _study_parents(self, study_name: str) -> list:
        """The active parent runs of `study_name` in the experiment, oldest first.

        Matched in Python rather than in the search filter, which cannot hold every name.
        """
        return [run for run in self._search(f"tags.`{ROLE_TAG}` = 'parent'")
                if run.data.tags.get(STUDY_TAG) == study_name]

    def _delete_study_runs(self, study_name: str) -> None:
        """Soft-delete the parent runs of `study_name` and every run nested under them."""
        for parent in self._study_parents(study_name):
            parent_id = parent.info.run_id
            for run in self._search(f"tags.`{PARENT_TAG}` = {_quoted(parent_id, 'run id')}"):
                self._client.delete_run(run.info.run_id)
            self._client.delete_run(parent_id)
        self._run_of_trial.clear()
        self._steps_of_run.clear()

    def describe_parent(self, text: str) -> None:
        """Make `text` (the study's one-screen summary) the parent run's description in the MLflow UI.

        The description is the tag `mlflow.note.content`, at most 8000 characters (MLflow's limit
        on a tag value); start_parent sets it to the plan, the driver replaces it once the study ends.
        """
        self._require_parent()
        with self._store_errors("describing the study's parent run"):
            self._client.set_tag(self.parent_run_id, NOTE_TAG, str(text)[:MAX_NOTE_CHARS])

    def log_parent_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Log every file under `folder` on the parent run, under `artifact_path` (e.g. "report"); a
        report's leaderboard is marked as an MLflow table (analysis.report.register_mlflow_tables)."""
        from analysis.report import register_mlflow_tables  # here: the driver imports the report only to write one

        self._require_parent()
        with self._store_errors(f"logging {folder} on the parent run"):
            self._client.log_artifacts(self.parent_run_id, str(folder), artifact_path)
            register_mlflow_tables(self._client, self.parent_run_id, folder, artifact_path)

    # --- trial runs -----------------------------------------------------------------------------

    def trial_run(self, trial_id: str, stage: str, params: Mapping, tags: Mapping | None = None,
                  run_name: str | None = None) -> str:
        """The run of `trial_id` under the parent: found by its tag, created when there is none.

        Call it when a trial starts or resumes work: the run is (re)marked RUNNING with
        `sam_study.status=RUNNING`. `params` (every factor, `family`, `image_encoder_params`; values
        are logged as `str(value)`) are logged where not yet present; a param already logged with
        another value raises ValueError (a trial's configuration never changes). `tags` are set on
        the run (e.g. the prompt jitter actually used). `run_name` (e.g. the module's
        `run_name(params, stage)`) names the run, the trial id when None; a run found under
        another name is renamed, one found without `run_name` keeps its name. Returns the run id.
        """
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        self._require_parent()
        with self._store_errors(f"opening the run of trial {trial_id}"):
            run = self._find_trial_run(trial_id)
            if run is None:
                run = self._client.create_run(self.experiment_id, run_name=run_name or trial_id, tags={
                    PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", STAGE_TAG: stage, TRIAL_ID_TAG: trial_id,
                    STATUS_TAG: RUNNING_TRIAL_STATUS})
                existing_params, existing_tags = {}, {}
            else:
                existing_params, existing_tags = run.data.params, run.data.tags
                renamed = run_name if run_name and run_name != run.info.run_name else None
                if run.info.status != "RUNNING" or renamed:
                    self._client.update_run(run.info.run_id, status="RUNNING", name=renamed)
            run_id = run.info.run_id
            self._run_of_trial[trial_id] = run_id
            wanted = {str(key): str(value) for key, value in params.items()}
            changed = {key: (existing_params[key], value) for key, value in wanted.items()
                       if key in existing_params and existing_params[key] != value}
            if changed:
                raise ValueError(f"trial {trial_id} (MLflow run {run_id}) was logged with other param values "
                                 f"before: {changed} (logged, now); a trial id must always name the same "
                                 f"configuration.")
            self._log_params(run_id, {key: value for key, value in wanted.items() if key not in existing_params})
            new_tags = {STATUS_TAG: RUNNING_TRIAL_STATUS, STAGE_TAG: stage,
                        **{str(key): str(value) for key, value in (tags or {}).items()}}
            new_tags = {key: value for key, value in new_tags.items() if existing_tags.get(key) != value}
            if new_tags:
                self._client.log_batch(run_id, tags=[RunTag(key, value) for key, value in new_tags.items()])
            self._load_steps(run_id, run.data.metrics)
        return run_id

    def log_epoch(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log one epoch's metrics (val_dice, val_iou, train_loss, val_loss, ...) at `step` = epoch.

        A (metric, step) pair the run already holds is skipped, so an epoch reported again after
        a resume is not logged twice; None values are skipped, NaN and inf are logged as such.
        """
        run_id = self._trial_run_id(trial_id)
        with self._store_errors(f"logging epoch {step} of trial {trial_id}"):
            self._log_metrics(run_id, metrics, int(step))

    def log_curve(self, trial_id: str, name: str, values: Sequence[float]) -> None:
        """Log `values[k]` as metric `name` at step k (e.g. Dice per corrective click, step = click);
        steps the run already holds are skipped, as in log_epoch."""
        run_id = self._trial_run_id(trial_id)
        with self._store_errors(f"logging {name} of trial {trial_id}"):
            for step, value in enumerate(values):
                self._log_metrics(run_id, {name: value}, step)

    def finish_trial(self, trial_id: str, status: str, final_metrics: Mapping[str, float],
                     artifacts: Mapping[str, Path] | None = None, reason: str | None = None,
                     trial_status: str | None = None) -> None:
        """Log a trial's final metrics and artifacts, tag its outcome and end its run.

        final_metrics: test_dice, test_iou, test_miou, test_hd95, epochs_run, seconds, best_epoch
            (and val_dice for a zero-shot evaluation), logged at step = final_metrics["epochs_run"]
            (0 when absent); a (metric, step) pair already logged is skipped.
        artifacts: destination path in the run's artifacts -> local file or folder, e.g.
            {"per_image.csv": p, "checkpoint/best_decoder.pt": c, "overlays": folder}. A file is
            logged under the destination's name; a folder's files go under the destination folder.
        status: the MLflow run status, FINISHED | FAILED | KILLED.
        reason: why the trial failed or was stopped (a NaN loss, an exception), as the tag
            `sam_study.failure_reason`.
        trial_status: the tag `sam_study.status`, the trial's status as results/trials.csv writes
            it; by default TERMINATED, ERROR or KILLED for FINISHED, FAILED or KILLED.

        Finishing a run again with the same outcome (a resume reporting a finished trial once
        more: the run already ended with `status` and the same `sam_study.status`) uploads only
        the artifacts the run does not hold yet and leaves its end time alone; a run that is
        RUNNING again, or ended otherwise, gets every artifact anew.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        run_id = self._trial_run_id(trial_id)
        step = int(final_metrics.get("epochs_run") or 0)
        tags = {STATUS_TAG: trial_status or TRIAL_STATUS_OF_RUN_STATUS[status]}
        if reason:
            tags[REASON_TAG] = str(reason)[:MAX_REASON_CHARS]
        with self._store_errors(f"finishing the run of trial {trial_id}"):
            run = self._client.get_run(run_id)
            already = run.info.status == status and run.data.tags.get(STATUS_TAG) == tags[STATUS_TAG]
            self._log_metrics(run_id, final_metrics, step)
            listings: dict[str, set[str]] = {}  # artifact folder -> the paths in it, listed once
            for destination, local in (artifacts or {}).items():
                if not (already and self._has_artifact(run_id, destination, listings)):
                    self._log_artifact_at(run_id, destination, Path(local))
            new_tags = [RunTag(key, value) for key, value in tags.items() if run.data.tags.get(key) != value]
            if new_tags:
                self._client.log_batch(run_id, tags=new_tags)
            if not already:
                self._client.set_terminated(run_id, status)

    def trial_status(self, trial_id: str) -> str | None:
        """The `sam_study.status` tag of the trial's run (None when the trial has no run)."""
        self._require_parent()
        with self._store_errors(f"reading the run of trial {trial_id}"):
            run = self._find_trial_run(trial_id)
        return None if run is None else run.data.tags.get(STATUS_TAG)

    # --- closing ----------------------------------------------------------------------------------

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run with `status` and mark every nested run still RUNNING as KILLED.

        Idempotent: a second call does nothing. Called by the context manager with FINISHED, FAILED
        (an exception) or KILLED (KeyboardInterrupt).
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self._closed or self.parent_run_id is None:
            self._closed = True
            return
        with self._store_errors("closing the study's runs"):
            left_running = self._search(f"tags.`{PARENT_TAG}` = {_quoted(self.parent_run_id, 'run id')} "
                                        f"and attributes.status = 'RUNNING'")
            for run in left_running:
                self._client.log_batch(run.info.run_id, tags=[
                    RunTag(STATUS_TAG, TRIAL_STATUS_OF_RUN_STATUS["KILLED"]),
                    RunTag(REASON_TAG, f"the study stopped ({status}) while this trial was still running")])
                self._client.set_terminated(run.info.run_id, "KILLED")
            self._client.set_terminated(self.parent_run_id, status)
        self._closed = True

    def __enter__(self) -> "StudyTracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self.close("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.close(status)
        except Exception as err:  # never hide the error that ended the study behind this one
            log.warning("could not close the MLflow runs of the study (%s): %s", status, err)
        return False

    # --- what to tell the user -------------------------------------------------------------------

    def mlflow_ui_command(self) -> str:
        """How to open this study in the MLflow UI: an `mlflow ui` command for a local store (then
        open `experiment_url()`), the experiment's URL (`experiment_url`) for a tracking server."""
        if self.remote:
            return self.experiment_url(self.tracking_uri)
        parts = ["mlflow", "ui", "--backend-store-uri", shlex.quote(self.tracking_uri)]
        if self.artifact_root:
            parts += ["--default-artifact-root", shlex.quote(self.artifact_root.as_uri())]
        return " ".join(parts + ["--port", str(UI_PORT)])

    def experiment_url(self, base: str = f"http://127.0.0.1:{UI_PORT}") -> str:
        """The experiment's runs table in an MLflow UI served at `base`, trial runs listed flat.

        MLflow 3.17's UI takes the experiment's view from the URL's `workflowType` (else from
        the browser's last choice, GenAI by default), not from the experiment kind tag, so the
        URL names the "Model training" view. Sorted by test Dice, best first, the trial runs are
        rows of their own; the default sort (start time) folds them under the parent run.
        """
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?{RUNS_VIEW_QUERY}"

    # --- internals ----------------------------------------------------------------------------------

    def _require_parent(self) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("StudyTracker.start_parent must be called before trial runs are logged")

    def _search(self, filter_string: str) -> list:
        """Every active run of the experiment matching `filter_string`, oldest first (all pages)."""
        runs, token = [], None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string, max_results=1000,
                                            order_by=["attributes.start_time ASC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _find_trial_run(self, trial_id: str):
        """The oldest active run tagged with `trial_id` under the parent, or None."""
        found = self._search(f"tags.`{TRIAL_ID_TAG}` = {_quoted(str(trial_id), 'trial id')} and "
                             f"tags.`{PARENT_TAG}` = {_quoted(self.parent_run_id, 'run id')}")
        if len(found) > 1:
            log.warning("trial %s has %d MLflow runs under parent %s; logging to the oldest, %s.", trial_id,
                        len(found), self.parent_run_id, found[0].info.run_id)
        return found[0] if found else None

    def _trial_run_id(self, trial_id: str) -> str:
        self._require_parent()
        if trial_id not in self._run_of_trial:
            with self._store_errors(f"finding the run of trial {trial_id}"):
                run = self._find_trial_run(trial_id)
                if run is None:
                    raise ValueError(f"trial {trial_id} has no MLflow run yet: call trial_run first")
                self._run_of_trial[trial_id] = run.info.run_id
                self._load_steps(run.info.run_id, run.data.metrics)
        return self._run_of_trial[trial_id]

    def _load_steps(self, run_id: str, latest_metrics: Mapping) -> None:
        """Read, once per process, which steps of each metric the run already holds."""
        if run_id in self._steps_of_run:
            return
        self._steps_of_run[run_id] = {key: {point.step for point in self._client.get_metric_history(run_id, key)}
                                      for key in latest_metrics}

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        steps = self._steps_of_run.setdefault(run_id, {})
        now = int(time.time() * 1000)
        new = [Metric(str(key), float(value), now, step) for key, value in metrics.items()
               if value is not None and step not in steps.get(str(key), ())]
        for start in range(0, len(new), METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=new[start:start + METRICS_PER_BATCH])
        for metric in new:
            steps.setdefault(metric.key, set()).add(step)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])

    def _has_artifact(self, run_id: str, destination: str, listings: dict[str, set[str]]) -> bool:
        """Whether the run's artifacts hold `destination` (a file or a folder), as finish_trial names it."""
        destination = destination.strip("/")
        folder = destination.rpartition("/")[0]
        if folder not in listings:
            listings[folder] = {info.path for info in self._client.list_artifacts(run_id, folder or None)}
        return destination in listings[folder]

    def _log_artifact_at(self, run_id: str, destination: str, local: Path) -> None:
        """Log `local` at `destination` within the run's artifacts (see finish_trial)."""
        destination = destination.strip("/")
        if local.is_dir():
            self._client.log_artifacts(run_id, str(local), destination or None)
        elif local.is_file():
            folder, _, name = destination.rpartition("/")
            if name in ("", local.name):
                self._client.log_artifact(run_id, str(local), folder or None)
            else:
                self._log_file_as(run_id, destination, source=local)
        else:
            raise FileNotFoundError(f"artifact {destination!r} of run {run_id}: {local} does not exist")

    def _log_file_as(self, run_id: str, destination: str, source: Path | None = None, text: str | None = None):
        """Log a file (or `text`) under another name: `destination` = "folder/name" or "name"."""
        folder, _, name = destination.strip("/").rpartition("/")
        with tempfile.TemporaryDirectory(prefix="sam-study-artifact-") as scratch:
            staged = Path(scratch) / name
            if text is not None:
                staged.write_text(text, encoding="utf-8")
            else:
                try:
                    staged.symlink_to(Path(source).resolve())
                except OSError:
                    shutil.copy2(source, staged)
            self._client.log_artifact(run_id, str(staged), folder or None)

    def _write_tracking_json(self, keep_parent: bool = False) -> None:
        """Write tracking.json atomically (`foundation.files.write_atomic`).

        `keep_parent`: keep the parent run id an earlier driver recorded for this same store and
        experiment (until start_parent confirms or replaces it), so the report still finds it.
        """
        target = self.study_dir / "tracking.json"
        parent = self.parent_run_id
        if keep_parent and parent is None and target.is_file():
            try:
                before = json.loads(target.read_text())
            except (OSError, ValueError):
                before = {}
            if isinstance(before, dict) and (before.get("tracking_uri"), before.get("experiment_id")) == (
                    self.tracking_uri, self.experiment_id):
                parent = before.get("parent_run_id")
        data = {"tracking_uri": self.tracking_uri, "experiment_name": self.experiment_name,
                "experiment_id": self.experiment_id, "parent_run_id": parent}
        write_atomic(target, json.dumps(data, indent=2) + "\n")

    @contextmanager
    def _store_errors(self, action: str) -> Iterator[None]:
        """Turn an unreachable server, refused credentials or a locked SQLite store into a UserError."""
        try:
            yield
        except MlflowException as err:
            problem = self._describe_store_error(err, action)
            if problem is None:
                raise
            raise UserError(problem) from None

    def _describe_store_error(self, err: MlflowException, action: str) -> str | None:
        """A one-paragraph UserError message for a store problem the user can fix, else None."""
        message = str(err.message if hasattr(err, "message") else err)
        short = message if len(message) < 400 else message[:400] + " ..."
        try:
            http_status = err.get_http_status_code()
        except Exception:  # an error code MLflow has no status for
            http_status = None
        if self.remote and (http_status in (401, 403) or err.error_code in (
                "UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED")
                or " 401 " in message or " 403 " in message):
            return (f"The MLflow tracking server at {self.tracking_uri} refused the study's request while "
                    f"{action} ({short}). The server requires authentication: set MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment of the study driver "
                    f"to an account of that server that may create experiments and runs, or check "
                    f"tracking.uri in the study file names the right server.")
        unreachable = ("failed with exception" in message or "Max retries exceeded" in message
                       or "Connection refused" in message or "timed out" in message.lower()
                       or http_status in (502, 503, 504))
        if self.remote and unreachable:
            return (f"Cannot reach the MLflow tracking server at {self.tracking_uri} while {action} ({short}). "
                    f"Start it, e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
                    f"sqlite:///mlflow.db --artifacts-destination ./mlartifacts` on the machine that holds the "
                    f"study's runs (bind it to 127.0.0.1, or put it behind authentication before using another "
                    f"address), and check that tracking.uri in the study file names its host and port as seen "
                    f"from the study driver; or set tracking.uri: null to log to a SQLite store inside the study "
                    f"folder. The same command resumes the study.")
        if not self.remote and "database is locked" in message:
            return (f"The MLflow SQLite store {self.tracking_uri} is locked by another process while {action}: "
                    f"SQLite takes one writer at a time, and only one study driver may log to it. Stop the other "
                    f"`python -m study.run` (or `mlflow ui`) writing to it and run the same command again, or "
                    f"use an MLflow tracking server (tracking.uri) when several processes must log.")
        if not self.remote and "unable to open database file" in message:
            return (f"Cannot open the MLflow SQLite store {self.tracking_uri} while {action} ({short}). Check that "
                    f"the folder exists and is writable, or set tracking.uri in the study file to another store.")
        return None
