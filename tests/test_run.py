"""`python -m study.run`: the dry-run plan and errors without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.data.phantom import generate_phantom
from study.run import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grid.example.yaml"


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, subjects=5, seed=0)
    return out / "Task01_BrainTumour"


def example_pointed_at(phantom_root: Path, tmp_path: Path, **sections) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["data"]["root"] = str(phantom_root)
    raw["study"]["out"] = str(tmp_path / "runs")
    raw["weights"]["dir"] = str(tmp_path / "weights")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_of_the_example_grid_prints_the_180_trial_plan(phantom_root, tmp_path, capsys):
    assert main([str(example_pointed_at(phantom_root, tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 180 configurations x 1 seed = 180 trials (grid search, scheduler fifo, metric val_dice max)" in out
    assert "Evaluation: single-point prompts multimask" in out and "NSD at 2 mm" in out
    assert "image diagonal" in out
    assert "backbone       sam2_s: 36, sam2_bplus: 36, sam2_l: 36, microsam_b: 36, microsam_h: 36" in out
    assert "optimizer      adam: 60, adamw: 60, sgd: 60" in out
    assert "prompt         center_point: 45, random_points: 45, box: 45, box_jitter: 45" in out
    assert "Zero-shot evaluations: 20 (5 backbone(s) x eval prompts" in out
    assert "sam2_l      MISSING  " in out and "sam2.1_hiera_large.pt  <- https://dl.fbaipublicfiles.com" in out
    for split in ("train", "val", "test"):
        assert f"  {split} " in out
    assert "Dry run: nothing was trained." in out
    assert not (tmp_path / "runs" / "brats-decoder-ablation").exists()  # a dry run writes no study folder


def test_dry_run_counts_every_seed_as_a_trial(phantom_root, tmp_path, capsys):
    path = example_pointed_at(phantom_root, tmp_path, search={"seeds": 3},
                              evaluation={"nsd_tolerance_mm": 1.5, "single_point_multimask": False})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 180 configurations x 3 seeds = 540 trials (grid search" in out
    assert "training seed 0..2, each its own trial" in out
    assert "backbone       sam2_s: 108, sam2_bplus: 108, sam2_l: 108, microsam_b: 108, microsam_h: 108" in out
    assert "Evaluation: single-point prompts single mask; NSD at 1.5 mm" in out


def test_dry_run_of_a_random_search_counts_draws_and_seeds(phantom_root, tmp_path, capsys):
    path = example_pointed_at(phantom_root, tmp_path, factors={"lr": {"loguniform": [1.0e-5, 1.0e-3]}},
                              search={"algorithm": "random", "num_samples": 2, "seeds": 2})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 360 configurations x 2 seeds = 720 trials (random search, 2 draws per grid cell" in out
    assert "searched: lr ~ loguniform[1e-05, 0.001]" in out


def test_grid_replicates_through_num_samples_are_refused_with_the_fix(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("search:\n  num_samples: 3\n")
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "grid.yaml, line 2: search.num_samples = 3" in err and "search.seeds: 3" in err


def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("data:\n  reader: msd_brain\n  root: /nonexistent/Task01\n")
    run = subprocess.run([sys.executable, "-m", "study.run", str(path), "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "/nonexistent/Task01" in run.stderr and run.stderr.startswith("error: ")
