"""A data-parallel trial: Ray Train's TorchTrainer with two gloo workers on CPU inside the study's
Ray Tune run (`resources.workers_per_trial: 2`), against the same trial with one worker.

The two-worker trial must leave what a one-worker trial leaves (one ledger entry, its history,
per-image and checkpoint files, one MLflow run with every epoch) and train to the same numbers:
each worker takes half of every batch and the gradients are summed (trainables/distributed.py), so
the steps equal the one-worker steps up to the order of float sums.
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
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_two_worker_gloo_trial_leaves_one_trials_files_and_run_and_matches_one_worker(tmp_path):
    shared = tmp_path / "shared"
    studies = {}
    for workers in (1, 2):
        name = f"workers{workers}"
        assert main([str(write_grid(tmp_path, shared, name, workers))]) == 0
        studies[workers] = tmp_path / "runs" / name

    one, two = ({key: pd.read_csv(study / "results" / f"{key}.csv") for key in ("trials", "history", "per_image")}
                for study in (studies[1], studies[2]))
    assert len(two["trials"]) == 1 and two["trials"]["status"].tolist() == ["TERMINATED"]
    assert two["trials"]["trial_id"].tolist() == one["trials"]["trial_id"].tolist()  # workers are not a factor
    name = two["trials"]["trial_id"][0]
    assert [TrialLedger(studies[w]).read(name).summary["workers"] for w in (1, 2)] == [1, 2]
    assert two["history"]["epoch"].tolist() == [1, 2]
    trial_dir = studies[2] / "results" / "trials" / name
    assert (trial_dir / "checkpoint" / "best_decoder.pt").is_file() and (trial_dir / "history.csv").is_file()

    # the same training, up to float summation order
    for column in ("train_loss", "val_loss", "val_dice"):
        assert two["history"][column].tolist() == pytest.approx(one["history"][column].tolist(), abs=2e-3), column
    merged = one["per_image"].merge(two["per_image"], on=["image_id", "prompt"], suffixes=("_one", "_two"))
    assert len(merged) == len(one["per_image"]) > 0
    assert (merged["dice_one"] - merged["dice_two"]).abs().max() < 5e-3

    # one MLflow run for the trial, with both epochs
    client = MlflowClient(f"sqlite:///{studies[2].resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("workers2")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sam_study.stage") == "finetune"]
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")] == [1, 2]
    assert runs[0].data.metrics["workers"] == 2
