"""`python -m study.run`: the dry-run plan and errors without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.data.phantom import generate_phantom
from study.run import main

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "grid.example.yaml"


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, subjects=5, seed=0)
    return out / "Task01_BrainTumour"


def example_pointed_at(phantom_root: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["data"]["root"] = str(phantom_root)
    raw["study"]["out"] = str(tmp_path / "runs")
    raw["weights"]["dir"] = str(tmp_path / "weights")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_of_the_example_grid_prints_the_180_trial_plan(phantom_root, tmp_path, capsys):
    assert main([str(example_pointed_at(phantom_root, tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 180 (grid search" in out
    assert "backbone       sam2_s: 36, sam2_bplus: 36, sam2_l: 36, microsam_b: 36, microsam_h: 36" in out
    assert "optimizer      adam: 60, adamw: 60, sgd: 60" in out
    assert "prompt         center_point: 45, random_points: 45, box: 45, box_jitter: 45" in out
    assert "Zero-shot evaluations: 20 (5 backbone(s) x eval prompts" in out
    assert "sam2_l      MISSING  " in out and "sam2.1_hiera_large.pt  <- https://dl.fbaipublicfiles.com" in out
    for split in ("train", "val", "test"):
        assert f"  {split} " in out
    assert "Dry run: nothing was trained." in out
    assert not (tmp_path / "runs" / "brats-decoder-ablation").exists()  # a dry run writes no study folder


def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("data:\n  reader: msd_brain\n  root: /nonexistent/Task01\n")
    run = subprocess.run([sys.executable, "-m", "study.run", str(path), "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "/nonexistent/Task01" in run.stderr and run.stderr.startswith("error: ")
