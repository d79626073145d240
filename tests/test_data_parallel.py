"""A data-parallel trial: Ray Train's TorchTrainer with two gloo workers on CPU inside the study's
Ray Tune run (`resources.workers_per_trial: 2`), against the same trial with one worker.

The two-worker trial must leave what a one-worker trial leaves (one ledger entry, its history,
per-image and checkpoint files, one MLflow run with every epoch) and train to the same numbers:
each worker takes half of every batch and the gradients are summed (trainables/distributed.py), so
the steps equal the one-worker steps up to the order of float sums. The one-worker reference is the
same trial (its ledger params) run by the same stage function, `study.stages.finetune`, in this
process: what a one-worker Tune trial calls, without a second study around it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.ledger import TrialLedger
from study.run import main

pytest.importorskip("ray")


def write_grid(folder: Path, shared: Path, name: str, workers: int) -> Path:
    grid = {
        "study": {"name": name, "out": str(folder / "runs"), "seed": 0, "cache_dir": str(shared / "cache")},
        "data": {"reader": "phantom", "root": str(shared / "phantom"), "slicing": {"min_area": 50},
                 "split": {"val": 0.15, "test": 0.25}, "limit": 4},
        "factors": {"backbone": "litemedsam", "optimizer": "adamw", "loss": "dice_bce", "prompt": "box",
                    "lr": 1.0e-3, "epochs": 2, "batch_size": 4},
        "baseline": {"zero_shot": False},
        "resources": {"cpus_per_trial": 1, "workers_per_trial": workers, "max_failures": 0},
        "report": {"enabled": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def one_worker_reference(study: Path, grid: Path, trial: str, folder: Path) -> Path:
    """Trial `trial` of `study` run again with one worker by `study.stages.finetune` in this process,
    on the study's prepared store and cache, into `folder`; returns the trial's folder there."""
    from study import stages
    from study.config import load_config
    from study.data.prepare import prepare_dataset
    from trainables.backbones import resolve_weights

    config = load_config(grid)
    dataset = prepare_dataset(config, progress=False)  # the study's store, reused
    context = stages.StudyContext(study_dir=str(folder), prepared_roots={None: str(dataset.root)},
                                  cache_root=str(config.cache_dir), seed=config.study.seed, eval_prompt="same",
                                  weights={"litemedsam": str(resolve_weights("litemedsam", None, {}))})
    params = TrialLedger(study).read(trial).params
    entry = stages.finetune(params, context, report=lambda metrics: None)
    assert entry.trial_id == trial and entry.summary["workers"] == 1
    return context.trial_dir(trial)


def test_a_two_worker_gloo_trial_leaves_one_trials_files_and_run_and_matches_one_worker(tmp_path, phantom_folder):
    shared = phantom_folder  # the session's phantom and cache: the study tests' store, encoded once a session
    grid = write_grid(tmp_path, shared, "workers2", 2)
    assert main([str(grid)]) == 0
    study = tmp_path / "runs" / "workers2"
    two = {key: pd.read_csv(study / "results" / f"{key}.csv") for key in ("trials", "history", "per_image")}
    assert len(two["trials"]) == 1 and two["trials"]["status"].tolist() == ["TERMINATED"]
    name = two["trials"]["trial_id"][0]
    assert TrialLedger(study).read(name).summary["workers"] == 2
    assert two["history"]["epoch"].tolist() == [1, 2]
    trial_dir = study / "results" / "trials" / name
    assert (trial_dir / "checkpoint" / "best_decoder.pt").is_file() and (trial_dir / "history.csv").is_file()

    reference = one_worker_reference(study, grid, name, tmp_path / "one-worker")
    one = {key: pd.read_csv(reference / f"{key}.csv") for key in ("history", "per_image")}
    # the same training, up to float summation order
    for column in ("train_loss", "val_loss", "val_dice"):
        assert two["history"][column].tolist() == pytest.approx(one["history"][column].tolist(), abs=2e-3), column
    merged = one["per_image"].merge(two["per_image"], on=["image_id", "prompt"], suffixes=("_one", "_two"))
    assert len(merged) == len(one["per_image"]) > 0
    assert (merged["dice_one"] - merged["dice_two"]).abs().max() < 5e-3

    # one MLflow run for the trial, with both epochs
    client = MlflowClient(f"sqlite:///{study.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("workers2")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sam_study.stage") == "finetune"]
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")] == [1, 2]
    assert runs[0].data.metrics["workers"] == 2
