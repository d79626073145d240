"""study.tracking: exactly one MLflow run per trial, across a driver crash and a resume; runs named
after their configuration; one study's runs apart from another's in a shared experiment.

The stores are real: SQLite stores written through `StudyTracker`, and one real `mlflow server`
process on 127.0.0.1 read back through its REST API. What the tracker writes is read back with
`analysis.results.load_from_mlflow`, the reader the report uses, so the two sides must agree.
Creating a SQLite store costs a few seconds (MLflow migrates the schema), so the stores are
shared by module-scoped fixtures.
"""

from __future__ import annotations

import http.server
import json
import math
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from foundation.errors import UserError
from study.tracking import StudyTracker, flatten_params, run_name
from tests.local_processes import free_port, serve_mlflow

FACTORS = {"backbone": "litemedsam", "optimizer": "adamw", "loss": "dice", "prompt": "box", "eval_prompt": "box",
           "lr": 1e-4, "epochs": 3, "batch_size": 8}
BACKBONE = {"family": "litemedsam", "image_encoder_params": 5_659_216}
RESOLVED = {"study": {"name": "resume-study", "seed": 0}, "factors": {"backbone": ["litemedsam"], "lr": [1e-4]},
            "data": {"root": "/data/" + "x" * 300}}  # the long root stays out of the params
VAL_DICE = {1: 0.50, 2: 0.60, 3: 0.70}  # the epochs the first driver logs first


def per_image_table(trial_id: str, stage: str, dice: list[float]) -> pd.DataFrame:
    """A per_image.csv as the trainable writes it (columns of examples/grid.example.yaml)."""
    ids = [f"P{index // 2}:z{index:03d}" for index in range(len(dice))]
    return pd.DataFrame({"trial_id": trial_id, "stage": stage, "image_id": ids, "subject": [i.split(":")[0] for i in ids],
                         "slice": range(len(dice)), "area": [100 * (i + 1) for i in range(len(dice))], "prompt": "box",
                         "dice": dice, "iou": [d / (2 - d) for d in dice], "miou": dice, "hd95": [3.0] * len(dice)})


def epoch_metrics(epoch: int) -> dict:
    return {"val_dice": VAL_DICE[epoch], "val_iou": VAL_DICE[epoch] * 0.8, "train_loss": 1.0 / epoch,
            "val_loss": 0.9 / epoch}


def runs_of(client: MlflowClient, experiment_id: str) -> list:
    return list(client.search_runs([experiment_id], max_results=1000))


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((point.step, point.value) for point in client.get_metric_history(run_id, key))


# --- a study with a crashed driver and a resume (one embedded SQLite store) ----------------------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Driver 1 logs t1's epochs 1-2 and t3's epoch 1, then dies (the tracker is dropped unclosed).
    Driver 2 reopens the same study folder, logs t1's epochs 2-3 (epoch 2 again, as a restored
    Ray trial reports it), finishes t1 and a zero-shot evaluation, never touches t3, and closes."""
    study_dir = tmp_path_factory.mktemp("resume") / "resume-study"
    files = study_dir.parent / "files"
    files.mkdir()
    resolved = files / "resolved.yaml"
    resolved.write_text("study: {name: resume-study}\n")
    first = StudyTracker(None, "resume-study", study_dir)
    first_parent = first.start_parent("resume-study", "hash-1", resolved, "plan: 3 trials", RESOLVED)
    first.trial_run("t1", "finetune", {**FACTORS, **BACKBONE})
    for epoch in (1, 2):
        first.log_epoch("t1", epoch_metrics(epoch), step=epoch)
    first.trial_run("t3", "finetune", {**FACTORS, "loss": "focal", **BACKBONE})
    first.log_epoch("t3", epoch_metrics(1), step=1)
    running_after_crash = {run.info.run_name: run.info.status for run in runs_of(first._client, first.experiment_id)}
    del first  # SIGKILL: nothing is closed

    second = StudyTracker(None, "resume-study", study_dir)
    recorded_before_start = json.loads((study_dir / "tracking.json").read_text())["parent_run_id"]
    second_parent = second.start_parent("resume-study", "hash-1", resolved, "plan: 3 trials", RESOLVED)
    second.trial_run("t1", "finetune", {**FACTORS, **BACKBONE})  # the same params again: no error
    for epoch in (2, 3):
        second.log_epoch("t1", {**epoch_metrics(epoch), "val_dice": VAL_DICE[epoch] + 0.05}, step=epoch)
    t1_dice = [0.9, 0.8, 0.7, 0.6]
    per_image_t1 = files / "t1.csv"
    per_image_table("t1", "finetune", t1_dice).to_csv(per_image_t1, index=False)
    checkpoint = files / "decoder_epoch3.pt"
    checkpoint.write_bytes(b"weights")
    overlays = files / "overlays"
    overlays.mkdir()
    for name in ("P0_z000.png", "P1_z002.png"):
        (overlays / name).write_bytes(b"\x89PNG")
    second.finish_trial("t1", "FINISHED", {"test_dice": sum(t1_dice) / 4, "test_iou": 0.6, "test_miou": 0.7,
                                           "test_hd95": 3.0, "epochs_run": 3, "seconds": 12.5, "best_epoch": 2},
                        {"per_image.csv": per_image_t1, "checkpoint/best_decoder.pt": checkpoint,
                         "overlays": overlays})
    zs_dice = [0.5, 0.4, 0.3, 0.2]
    per_image_zs = files / "zs" / "per_image.csv"
    per_image_zs.parent.mkdir()
    per_image_table("zs_litemedsam_box", "zero_shot", zs_dice).to_csv(per_image_zs, index=False)
    second.trial_run("zs_litemedsam_box", "zero_shot", {"backbone": "litemedsam", "prompt": "box",
                                                        "eval_prompt": "box", **BACKBONE})
    second.finish_trial("zs_litemedsam_box", "FINISHED", {"test_dice": sum(zs_dice) / 4, "val_dice": 0.45,
                                                          "epochs_run": 0, "seconds": 2.0},
                        {"per_image.csv": per_image_zs})
    second.close("FINISHED")
    parent_end = second._client.get_run(second_parent).info.end_time
    second.close("FAILED")  # idempotent: changes nothing
    return {"tracker": second, "client": second._client, "study_dir": study_dir, "parents": (first_parent, second_parent),
            "running_after_crash": running_after_crash,
            "recorded_before_start": recorded_before_start, "parent_end": parent_end, "per_image_t1": per_image_t1,
            "per_image_zs": per_image_zs, "resolved": resolved}


def test_a_resumed_study_has_exactly_one_run_per_trial_and_one_parent(resumed):
    tracker, client = resumed["tracker"], resumed["client"]
    assert resumed["running_after_crash"] == {"resume-study": "RUNNING", "t1": "RUNNING", "t3": "RUNNING"}
    first_parent, second_parent = resumed["parents"]
    assert first_parent == second_parent == resumed["recorded_before_start"]  # tracking.json kept it meanwhile
    runs = runs_of(client, tracker.experiment_id)
    names = sorted(run.info.run_name for run in runs)
    assert names == ["resume-study", "t1", "t3", "zs_litemedsam_box"]
    trials = [run for run in runs if run.data.tags.get("sam_study.role") == "trial"]
    assert sorted(run.data.tags["sam_study.trial_id"] for run in trials) == ["t1", "t3", "zs_litemedsam_box"]
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {second_parent}
    assert {run.data.tags["sam_study.stage"] for run in trials} == {"finetune", "zero_shot"}


def test_epochs_logged_again_after_a_resume_are_not_duplicated(resumed):
    client, tracker = resumed["client"], resumed["tracker"]
    t1 = next(run for run in runs_of(client, tracker.experiment_id) if run.info.run_name == "t1")
    # epoch 2 keeps the value the first driver logged; the second driver's repeat is skipped
    steps, values = zip(*metric_steps(client, t1.info.run_id, "val_dice"))
    assert steps == (1, 2, 3) and values == pytest.approx([0.50, 0.60, 0.75])
    for key in ("val_iou", "train_loss", "val_loss"):
        assert [step for step, _ in metric_steps(client, t1.info.run_id, key)] == [1, 2, 3]
    [(step, value)] = metric_steps(client, t1.info.run_id, "test_dice")  # final metrics at step = epochs run
    assert step == 3 and value == pytest.approx(0.75)
    assert t1.data.metrics["best_epoch"] == 2 and t1.data.metrics["epochs_run"] == 3


def test_no_run_is_left_running_and_leftovers_are_killed(resumed):
    client, tracker = resumed["client"], resumed["tracker"]
    status = {run.info.run_name: (run.info.status, run.data.tags.get("sam_study.status"))
              for run in runs_of(client, tracker.experiment_id)}
    assert status == {"resume-study": ("FINISHED", None), "t1": ("FINISHED", "TERMINATED"),
                      "zs_litemedsam_box": ("FINISHED", "TERMINATED"), "t3": ("KILLED", "KILLED")}
    t3 = next(run for run in runs_of(client, tracker.experiment_id) if run.info.run_name == "t3")
    assert "still running" in t3.data.tags["sam_study.failure_reason"]
    assert client.get_run(resumed["parents"][1]).info.end_time == resumed["parent_end"]  # second close did nothing


def test_params_artifacts_and_tracking_json(resumed):
    client, tracker, study_dir = resumed["client"], resumed["tracker"], resumed["study_dir"]
    runs = {run.info.run_name: run for run in runs_of(client, tracker.experiment_id)}
    assert runs["t1"].data.params == {**{k: str(v) for k, v in FACTORS.items()}, "family": "litemedsam",
                                      "image_encoder_params": "5659216"}
    parent = runs["resume-study"]
    assert parent.data.params == {"study.name": "resume-study", "study.seed": "0", "factors.backbone": '["litemedsam"]',
                                  "factors.lr": "[0.0001]"}
    assert parent.data.tags["sam_study.role"] == "parent" and parent.data.tags["sam_study.config_hash"] == "hash-1"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"resolved.yaml", "plan.txt"}
    t1 = runs["t1"].info.run_id
    assert {a.path for a in client.list_artifacts(t1)} == {"per_image.csv", "checkpoint", "overlays"}
    assert [a.path for a in client.list_artifacts(t1, "checkpoint")] == ["checkpoint/best_decoder.pt"]
    assert sorted(a.path for a in client.list_artifacts(t1, "overlays")) == ["overlays/P0_z000.png", "overlays/P1_z002.png"]
    stored = Path(client.download_artifacts(t1, "checkpoint/best_decoder.pt", str(study_dir.parent / "dl")))
    assert stored.read_bytes() == b"weights"
    # the embedded store lives in the study folder, artifacts included
    assert (study_dir / "mlflow.db").is_file()
    assert runs["t1"].info.artifact_uri.startswith((study_dir / "mlartifacts").as_uri())
    assert json.loads((study_dir / "tracking.json").read_text()) == {
        "tracking_uri": f"sqlite:///{study_dir / 'mlflow.db'}", "experiment_name": "resume-study",
        "experiment_id": tracker.experiment_id, "parent_run_id": resumed["parents"][1]}
    assert tracker.mlflow_ui_command() == (f"mlflow ui --backend-store-uri sqlite:///{study_dir / 'mlflow.db'} "
                                           f"--default-artifact-root {(study_dir / 'mlartifacts').as_uri()} --port 5000")


def test_the_analysis_reader_reads_back_what_the_tracker_wrote(resumed):
    from analysis.results import load_from_mlflow

    tracker = resumed["tracker"]
    results = load_from_mlflow(tracker.tracking_uri, "resume-study")
    assert results.name == "resume-study"
    trials = results.trials.set_index("trial_id").sort_index()
    assert list(trials.index) == ["t1", "t3", "zs_litemedsam_box"]
    assert list(trials["stage"]) == ["finetune", "finetune", "zero_shot"]
    assert list(trials["status"]) == ["TERMINATED", "KILLED", "TERMINATED"]
    assert trials.loc["t1", "lr"] == pytest.approx(1e-4) and trials.loc["t1", "image_encoder_params"] == 5_659_216
    assert trials.loc["t1", "val_dice"] == pytest.approx(0.60)  # the value at best_epoch = 2
    assert trials.loc["zs_litemedsam_box", "val_dice"] == pytest.approx(0.45)
    assert trials.loc["t1", "test_dice"] == pytest.approx(0.75) and math.isnan(trials.loc["t3", "test_dice"])
    assert set(results.factors) == set(FACTORS)  # every param but family and image_encoder_params is a factor
    expected = pd.concat([pd.read_csv(resumed["per_image_t1"]), pd.read_csv(resumed["per_image_zs"])])
    got = results.per_image.sort_values(["trial_id", "image_id"]).reset_index(drop=True)
    expected = expected.sort_values(["trial_id", "image_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["trial_id", "image_id", "dice", "hd95", "area"]],
                                  expected[["trial_id", "image_id", "dice", "hd95", "area"]], check_dtype=False)
    history = results.history[results.history["trial_id"] == "t1"].sort_values("epoch")
    assert list(history["epoch"]) == [1, 2, 3] and list(history["val_dice"]) == pytest.approx([0.50, 0.60, 0.75])
    assert set(results.history["trial_id"]) == {"t1", "t3"}  # the zero-shot run has no epochs


# --- closing, fresh starts and misuse (one shared SQLite store, one experiment per test) -------------


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("shared") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # migrate the schema once
    return f"sqlite:///{db}"


def open_study(shared_db, tmp_path, name: str) -> StudyTracker:
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text("study: {}\n")
    tracker = StudyTracker(shared_db, name, tmp_path / name)
    tracker.start_parent(name, "h", resolved, "plan", {"study": {"name": name}})
    return tracker


@pytest.mark.parametrize("error, parent_status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_the_context_manager_closes_on_errors_and_kills_open_trials(shared_db, tmp_path, error, parent_status):
    name = f"ctx-{parent_status.lower()}"
    with pytest.raises(error):
        with open_study(shared_db, tmp_path, name) as tracker:
            tracker.trial_run("a", "finetune", FACTORS)
            tracker.log_epoch("a", {"val_dice": 0.5}, step=1)
            tracker.trial_run("b", "finetune", {**FACTORS, "lr": 1e-3})
            tracker.finish_trial("b", "FAILED", {"epochs_run": 1}, reason="loss became NaN at epoch 1")
            raise error()
    status = {run.info.run_name: (run.info.status, run.data.tags.get("sam_study.status"),
                                  run.data.tags.get("sam_study.failure_reason"))
              for run in runs_of(tracker._client, tracker.experiment_id)}
    assert status == {name: (parent_status, None, None),
                      "a": ("KILLED", "KILLED", f"the study stopped ({parent_status}) while this trial was still running"),
                      "b": ("FAILED", "ERROR", "loss became NaN at epoch 1")}
    assert tracker.mlflow_ui_command().startswith(f"mlflow ui --backend-store-uri {shared_db} --default-artifact-root")


def test_a_killed_trial_resumed_later_reopens_its_run(shared_db, tmp_path):
    tracker = open_study(shared_db, tmp_path, "reopen")
    run_id = tracker.trial_run("a", "finetune", FACTORS)
    tracker.log_epoch("a", {"val_dice": 0.5}, step=1)
    tracker.close("KILLED")
    again = open_study(shared_db, tmp_path, "reopen")
    assert again.trial_status("a") == "KILLED" and again.trial_status("never-started") is None
    assert again.trial_run("a", "finetune", FACTORS) == run_id
    assert again._client.get_run(run_id).info.status == "RUNNING"
    again.log_epoch("a", {"val_dice": 0.6}, step=1)  # already there: skipped
    again.log_epoch("a", {"val_dice": 0.7}, step=2)
    again.finish_trial("a", "FINISHED", {"test_dice": 0.7, "epochs_run": 2})
    again.close()
    assert metric_steps(again._client, run_id, "val_dice") == [(1, 0.5), (2, 0.7)]
    assert [run.info.status for run in runs_of(again._client, again.experiment_id)] == ["FINISHED", "FINISHED"]


def test_a_trials_wall_time_survives_its_last_epochs_duration(shared_db, tmp_path):
    """Regression: the per-epoch duration was logged as `seconds` at step = epoch, so the trial's total
    `seconds`, logged at step = epochs run, was dropped as a duplicate and MLflow showed the last epoch's time."""
    from analysis.results import load_from_mlflow
    from study.runner import epoch_metrics as logged_epoch_metrics

    tracker = open_study(shared_db, tmp_path, "wall-time")
    tracker.trial_run("a", "finetune", FACTORS)
    for epoch in (1, 2):  # what a trial reports each epoch, as the runner forwards it
        report = {"epoch": epoch, **epoch_metrics(epoch), "seconds": 4.0, "trial_id": "a"}
        tracker.log_epoch("a", logged_epoch_metrics(report), step=epoch)
    per_image = tmp_path / "per_image.csv"
    per_image_table("a", "finetune", [0.7, 0.7]).to_csv(per_image, index=False)
    tracker.finish_trial("a", "FINISHED", {"test_dice": 0.7, "epochs_run": 2, "seconds": 11.5},
                         {"per_image.csv": per_image})
    tracker.close()
    run_id = tracker._trial_run_id("a")
    assert metric_steps(tracker._client, run_id, "seconds") == [(2, 11.5)]
    assert metric_steps(tracker._client, run_id, "epoch_seconds") == [(1, 4.0), (2, 4.0)]
    trials = load_from_mlflow(shared_db, "wall-time").trials.set_index("trial_id")
    assert trials.loc["a", "seconds"] == pytest.approx(11.5)


def test_fresh_deletes_the_previous_runs_and_starts_a_new_parent(shared_db, tmp_path):
    tracker = open_study(shared_db, tmp_path, "fresh")
    old_parent = tracker.parent_run_id
    old_trial = tracker.trial_run("a", "finetune", FACTORS)
    tracker.close()
    tracker = StudyTracker(shared_db, "fresh", tmp_path / "fresh")
    new_parent = tracker.start_parent("fresh", "h", tmp_path / "resolved.yaml", "plan", {}, fresh=True)
    new_trial = tracker.trial_run("a", "finetune", FACTORS)
    tracker.close()
    assert new_parent != old_parent and new_trial != old_trial
    assert sorted(run.info.run_id for run in runs_of(tracker._client, tracker.experiment_id)) == sorted(
        [new_parent, new_trial])
    assert tracker._client.get_run(old_trial).info.lifecycle_stage == "deleted"


def test_experiments_are_of_mlflow_3s_machine_learning_kind(resumed, shared_db, tmp_path):
    embedded = resumed["client"].get_experiment(resumed["tracker"].experiment_id)
    assert embedded.tags["mlflow.experimentKind"] == "custom_model_development"
    client = MlflowClient(shared_db)
    created = StudyTracker(shared_db, "kind-new", tmp_path / "kind-new").experiment_id
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made without the tag (by hand, or by an older tracker) gets it when opened ...
    untagged = client.create_experiment("untagged", artifact_location=(tmp_path / "untagged").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(untagged).tags
    StudyTracker(shared_db, "untagged", tmp_path / "untagged")
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    # ... and one whose kind someone chose in the UI keeps it
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    StudyTracker(shared_db, "chosen", tmp_path / "chosen")
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_run_name_says_the_configuration():
    trial = {"backbone": "litemedsam", "optimizer": "adamw", "loss": "dice", "prompt": "box", "eval_prompt": "box",
             "epochs": 3, "batch_size": 8, "seed": 0, "family": "litemedsam", "image_encoder_params": 5_659_216,
             "multimask": False}
    assert run_name(trial, "finetune") == "litemedsam · adamw · dice · box · s0"
    searched = {**trial, "target": "whole_tumor", "lr": 3.162e-4, "weight_decay": 0.05, "seed": 2}
    assert run_name(searched, "finetune") == (
        "whole_tumor · litemedsam · adamw · dice · box · lr=3.2e-4 · weight_decay=0.05 · s2")
    assert run_name({**trial, "lr": 1e-4, "iou_loss_weight": 1.0}, "finetune") == (
        "litemedsam · adamw · dice · box · iou_loss_weight=1 · lr=1e-4 · s0")
    # integer and boolean factors are named where the study varies them (else two arms share a name)
    assert run_name({**trial, "train_clicks": 2, "swa": True}, "finetune", varying=("train_clicks", "swa", "loss")) == (
        "litemedsam · adamw · dice · box · swa=True · train_clicks=2 · s0")
    zero_shot = {"backbone": "sam_b", "prompt": "center_point", "eval_prompt": "center_point", "family": "sam",
                 "image_encoder_params": 85_000_000}
    assert run_name(zero_shot, "zero_shot") == "zero-shot · sam_b · center_point"
    assert run_name({"backbone": "sam_b", "eval_prompt": "box", "target": "edema"}, "zero_shot") == (
        "zero-shot · sam_b · box · edema")
    with pytest.raises(ValueError, match="stage"):
        run_name(trial, "pretrain")


def test_trial_runs_take_the_given_name_and_are_renamed_on_a_resume(shared_db, tmp_path):
    tracker = open_study(shared_db, tmp_path, "named")
    params = {**FACTORS, "seed": 0}
    run_id = tracker.trial_run("a", "finetune", params, run_name=run_name(params, "finetune"))
    unnamed = tracker.trial_run("b", "finetune", {**params, "loss": "focal"})
    client = tracker._client
    assert client.get_run(run_id).info.run_name == "litemedsam · adamw · dice · box · lr=1e-4 · s0"
    assert client.get_run(unnamed).info.run_name == "b"  # no name given: the trial id
    tracker.close("KILLED")
    again = open_study(shared_db, tmp_path, "named")
    assert again.trial_run("a", "finetune", params) == run_id  # no name given: the run keeps its name
    assert client.get_run(run_id).info.run_name == "litemedsam · adamw · dice · box · lr=1e-4 · s0"
    assert again.trial_run("b", "finetune", {**params, "loss": "focal"}, run_name="focal run") == unnamed
    renamed = client.get_run(unnamed)
    assert renamed.info.run_name == "focal run" and renamed.data.tags["mlflow.runName"] == "focal run"
    assert renamed.info.status == "RUNNING"
    again.close()


def test_the_parent_description_is_the_plan_then_the_summary(shared_db, tmp_path):
    tracker = open_study(shared_db, tmp_path, "described")
    client = tracker._client
    assert client.get_run(tracker.parent_run_id).data.tags["mlflow.note.content"] == "plan"
    summary = "Best configuration: litemedsam · adamw · dice · box (test Dice 0.81)\nReport: runs/x/report.html"
    tracker.describe_parent(summary)
    assert client.get_run(tracker.parent_run_id).data.tags["mlflow.note.content"] == summary
    tracker.describe_parent("x" * 9000)  # MLflow refuses tag values over 8000 characters
    assert client.get_run(tracker.parent_run_id).data.tags["mlflow.note.content"] == "x" * 8000
    tracker.close()
    with pytest.raises(RuntimeError, match="start_parent"):
        StudyTracker(shared_db, "described", tmp_path / "described").describe_parent(summary)


def test_finishing_a_trial_again_uploads_its_artifacts_once(shared_db, tmp_path, monkeypatch):
    tracker = open_study(shared_db, tmp_path, "upload-once")
    client = tracker._client
    uploads = []
    for method in ("log_artifact", "log_artifacts"):
        original = getattr(client, method)

        def counted(run_id, local, artifact_path=None, _original=original, _method=method):
            uploads.append((_method, Path(local).name, artifact_path))
            return _original(run_id, local, artifact_path)

        monkeypatch.setattr(client, method, counted)
    per_image, history = tmp_path / "per_image.csv", tmp_path / "history.csv"
    per_image_table("a", "finetune", [0.7, 0.6]).to_csv(per_image, index=False)
    history.write_text("epoch,val_dice\n1,0.7\n")
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    run_id = tracker.trial_run("a", "finetune", FACTORS)
    artifacts = {"per_image.csv": per_image, "checkpoint/best_decoder.pt": checkpoint}
    tracker.finish_trial("a", "FINISHED", {"test_dice": 0.65, "epochs_run": 2}, artifacts)
    assert sorted(name for _, name, _ in uploads) == ["best_decoder.pt", "per_image.csv"]
    stored = Path(urllib.parse.urlparse(client.get_run(run_id).info.artifact_uri).path) / "per_image.csv"
    written, ended = stored.stat().st_mtime_ns, client.get_run(run_id).info.end_time

    uploads.clear()
    time.sleep(0.05)
    tracker.finish_trial("a", "FINISHED", {"test_dice": 0.65, "epochs_run": 2}, artifacts)  # a resume reports it again
    assert uploads == []
    assert stored.stat().st_mtime_ns == written and client.get_run(run_id).info.end_time == ended
    # an artifact the run lacks is still uploaded, alone
    tracker.finish_trial("a", "FINISHED", {"test_dice": 0.65, "epochs_run": 2}, {**artifacts, "history.csv": history})
    assert [name for _, name, _ in uploads] == ["history.csv"]
    # another outcome, or a run reopened to train again, uploads anew
    uploads.clear()
    tracker.finish_trial("a", "FAILED", {"epochs_run": 2}, artifacts, reason="re-evaluation failed")
    assert sorted(name for _, name, _ in uploads) == ["best_decoder.pt", "per_image.csv"]
    uploads.clear()
    tracker.trial_run("a", "finetune", FACTORS)
    tracker.finish_trial("a", "FAILED", {"epochs_run": 2}, artifacts, reason="re-evaluation failed")
    assert sorted(name for _, name, _ in uploads) == ["best_decoder.pt", "per_image.csv"]
    tracker.close()
    assert {a.path for a in client.list_artifacts(run_id)} == {"per_image.csv", "checkpoint", "history.csv"}


def log_small_study(uri: str, experiment: str, study_dir: Path, name: str, dice: float, fresh: bool = False):
    """A study of two fine-tune trials (t1, t2) in `experiment`; every per-image Dice is `dice`."""
    resolved = study_dir.parent / f"{name}-resolved.yaml"
    resolved.write_text(f"study: {{name: {name}}}\n")
    with StudyTracker(uri, experiment, study_dir) as tracker:
        tracker.start_parent(name, "h", resolved, f"plan of {name}", {"study": {"name": name}}, fresh=fresh)
        for trial_id, loss in (("t1", "dice"), ("t2", "focal")):
            params = {**FACTORS, "loss": loss, **BACKBONE}
            tracker.trial_run(trial_id, "finetune", params, run_name=run_name(params, "finetune"))
            tracker.log_epoch(trial_id, {"val_dice": dice}, step=1)
            per_image = study_dir.parent / f"{name}-{trial_id}.csv"
            per_image_table(trial_id, "finetune", [dice, dice]).to_csv(per_image, index=False)
            tracker.finish_trial(trial_id, "FINISHED", {"test_dice": dice, "epochs_run": 1},
                                 {"per_image.csv": per_image})
    return tracker


def test_two_studies_in_one_experiment_are_read_and_started_fresh_apart(shared_db, tmp_path):
    from analysis.results import ResultsError, load_from_mlflow

    first = log_small_study(shared_db, "two-studies", tmp_path / "a", "study-a", dice=0.4)
    second = log_small_study(shared_db, "two-studies", tmp_path / "b", "study-b", dice=0.8)
    assert first.experiment_id == second.experiment_id and first.parent_run_id != second.parent_run_id
    client = first._client

    def dice_of(results) -> set[float]:
        return set(results.per_image["dice"])

    # the same trial ids in both studies: each study reads only the trial runs under its own parent
    a = load_from_mlflow(shared_db, "two-studies", parent_run_id=first.parent_run_id)
    assert a.name == "study-a" and sorted(a.trials["trial_id"]) == ["t1", "t2"] and dice_of(a) == {0.4}
    b = load_from_mlflow(shared_db, "two-studies", config={"study": {"name": "study-b"}})
    assert b.name == "study-b" and sorted(b.trials["trial_id"]) == ["t1", "t2"] and dice_of(b) == {0.8}
    a_by_name = load_from_mlflow(shared_db, "two-studies", config={"study": {"name": "study-a"}})
    assert a_by_name.name == "study-a" and dice_of(a_by_name) == {0.4} and a_by_name.notes == []
    newest = load_from_mlflow(shared_db, "two-studies")  # nothing says which study: the newest, with a note
    assert newest.name == "study-b" and dice_of(newest) == {0.8}
    assert any("2 parent runs" in note and second.parent_run_id in note for note in newest.notes)
    with pytest.raises(ResultsError, match="no active parent run"):
        load_from_mlflow(shared_db, "two-studies", parent_run_id="0" * 32)

    # --fresh of study a deletes a's parent and trials only
    a_runs = [run.info.run_id for run in runs_of(client, first.experiment_id)
              if first.parent_run_id in (run.info.run_id, run.data.tags.get("mlflow.parentRunId"))]
    b_runs = sorted(run.info.run_id for run in runs_of(client, first.experiment_id) if run.info.run_id not in a_runs)
    assert len(a_runs) == len(b_runs) == 3
    again = log_small_study(shared_db, "two-studies", tmp_path / "a", "study-a", dice=0.5, fresh=True)
    assert again.parent_run_id != first.parent_run_id
    assert all(client.get_run(run_id).info.lifecycle_stage == "deleted" for run_id in a_runs)
    active = {run.info.run_id: run for run in runs_of(client, first.experiment_id)}
    assert set(b_runs) <= set(active) and len(active) == 6
    assert dice_of(load_from_mlflow(shared_db, "two-studies", parent_run_id=second.parent_run_id)) == {0.8}
    assert dice_of(load_from_mlflow(shared_db, "two-studies", parent_run_id=again.parent_run_id)) == {0.5}
    names = sorted(run.info.run_name for run in active.values() if run.data.tags["sam_study.role"] == "trial")
    assert names == ["litemedsam · adamw · dice · box · lr=1e-4", "litemedsam · adamw · dice · box · lr=1e-4",
                     "litemedsam · adamw · focal · box · lr=1e-4", "litemedsam · adamw · focal · box · lr=1e-4"]


def test_a_changed_param_of_a_trial_is_refused_and_log_before_trial_run_is_an_error(shared_db, tmp_path):
    tracker = open_study(shared_db, tmp_path, "misuse")
    tracker.trial_run("a", "finetune", FACTORS)
    with pytest.raises(ValueError, match="other param values"):
        tracker.trial_run("a", "finetune", {**FACTORS, "lr": 0.5})
    with pytest.raises(ValueError, match="call trial_run first"):
        tracker.log_epoch("unknown", {"val_dice": 0.5}, step=1)
    with pytest.raises(ValueError, match="stage"):
        tracker.trial_run("c", "pretrain", FACTORS)
    tracker.close()


def test_flatten_params():
    assert flatten_params({"a": {"b": 1e-4, "c": [1, "x"], "d": None, "e": {}}, "f": True}) == {
        "a.b": "0.0001", "a.c": '[1, "x"]', "a.d": "None", "a.e": "{}", "f": "True"}


# --- tracking servers ------------------------------------------------------------------------------------


@pytest.fixture
def http_defaults(monkeypatch):
    """The tracker's own retry/timeout defaults, whatever the environment running the tests says."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_a_dead_server_is_a_user_error_naming_the_uri_within_seconds(tmp_path, http_defaults):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        StudyTracker(uri, "dead", tmp_path / "dead")
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert f"Cannot reach the MLflow tracking server at {uri}" in message
    assert "mlflow server --host 127.0.0.1" in message and "\n" not in message


def test_refused_credentials_are_a_user_error_naming_the_variables(tmp_path, http_defaults):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = b"You are not authenticated. Please see the documentation."
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(UserError) as caught:
            StudyTracker(uri, "auth", tmp_path / "auth")
    finally:
        server.shutdown()
        server.server_close()
    message = str(caught.value)
    assert f"tracking server at {uri} refused" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts; stopped after."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--artifacts-destination", (folder / "artifacts").as_uri()]
    with serve_mlflow(command, folder, port) as url:
        yield url


def rest(url: str, path: str, body: dict | None = None) -> dict:
    """One request to the server's REST API (127.0.0.1 only), bounded to 10 s."""
    assert url.startswith("http://127.0.0.1:")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_runs_logged_to_a_real_mlflow_server_are_visible_through_its_rest_api(mlflow_server, tmp_path, http_defaults):
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text("study: {name: served}\n")
    per_image = tmp_path / "per_image.csv"
    per_image_table("t1", "finetune", [0.8, 0.6]).to_csv(per_image, index=False)
    with StudyTracker(mlflow_server, "served", tmp_path / "served") as tracker:
        parent = tracker.start_parent("served", "h", resolved, "plan", RESOLVED)
        for trial_id, lr in (("t1", 1e-4), ("t2", 1e-3)):
            tracker.trial_run(trial_id, "finetune", {**FACTORS, "lr": lr, **BACKBONE})
            for epoch in (1, 2):
                tracker.log_epoch(trial_id, epoch_metrics(epoch), step=epoch)
        tracker.finish_trial("t1", "FINISHED", {"test_dice": 0.7, "epochs_run": 2}, {"per_image.csv": per_image})
    assert tracker.mlflow_ui_command() == (f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs?"
                                           f"workflowType=machine_learning&orderByKey=metrics.%60test_dice%60"
                                           f"&orderByAsc=false")
    # a resume against the server finds the same parent
    with StudyTracker(mlflow_server, "served", tmp_path / "served") as resumed_tracker:
        assert resumed_tracker.start_parent("served", "h", resolved, "plan", RESOLVED) == parent

    found = rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [tracker.experiment_id], "max_results": 100})["runs"]
    runs = {run["info"]["run_name"]: run for run in found}
    assert sorted(runs) == ["served", "t1", "t2"]
    tags = {name: {t["key"]: t["value"] for t in run["data"].get("tags", [])} for name, run in runs.items()}
    assert tags["served"]["sam_study.role"] == "parent"
    assert {tags[t]["sam_study.trial_id"] for t in ("t1", "t2")} == {"t1", "t2"}
    assert {tags[t]["mlflow.parentRunId"] for t in ("t1", "t2")} == {parent}
    assert {runs[t]["info"]["status"] for t in ("t1", "t2")} == {"FINISHED", "KILLED"}
    params = {p["key"]: p["value"] for p in runs["t2"]["data"]["params"]}
    assert params["lr"] == "0.001" and params["image_encoder_params"] == "5659216"
    t1 = runs["t1"]["info"]["run_id"]
    history = rest(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={t1}&metric_key=val_dice")["metrics"]
    assert sorted(int(m["step"]) for m in history) == [1, 2]
    artifacts = rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={t1}")["files"]
    assert [a["path"] for a in artifacts] == ["per_image.csv"]
