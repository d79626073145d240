"""`python -m study.run`: the dry-run plan and errors without a traceback."""

import os
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
    assert "U-Net baseline: off" in out


def test_dry_run_counts_the_unet_baselines_trials_per_arm_seed_and_target(phantom_root, tmp_path, capsys):
    path = example_pointed_at(phantom_root, tmp_path, search={"seeds": 3},
                              baseline={"unet": {"enabled": True, "box_channel": True, "epochs": 40}})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("U-Net baseline: 6 trials (unet and unet_box (the prompt box as a fourth channel) x 3 seeds): MONAI "
            "DynUNet in the nnU-Net 2D layout from scratch at 256 px, 40 epochs") in out
    assert "Trials: 180 configurations x 3 seeds = 540 trials" in out  # the SAM trials are unchanged
    from study.config import load_config
    from study.plan import unet_plan

    raw = yaml.safe_load(path.read_text())
    raw["data"]["target"] = ["whole_tumor", "tumor_core"]
    path.write_text(yaml.safe_dump(raw))
    plan = unet_plan(load_config(path))
    assert plan.total_trials == 2 * 2 * 3 and {c["target"] for c in plan.cells} == {"whole_tumor", "tumor_core"}
    assert all(c["epochs"] == 40 and c["input_size"] == 256 for c in plan.cells)


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


def test_dry_run_with_two_targets_counts_trials_twice_and_encodes_shared_images_once(phantom_root, tmp_path, capsys):
    path = example_pointed_at(phantom_root, tmp_path, data={"target": ["whole_tumor", "tumor_core"]})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Trials: 360 configurations x 1 seed = 360 trials (grid search" in out
    assert "target         whole_tumor: 180, tumor_core: 180" in out
    assert "Targets: 2 (whole_tumor, tumor_core)" in out
    assert "target whole_tumor;" in out and "target tumor_core;" in out
    assert "Zero-shot evaluations: 40 (5 backbone(s) x eval prompts" in out and "x 2 targets)" in out

    from study.config import load_config
    from study.data.prepare import plan_dataset, plan_targets

    config = load_config(path)
    plans, unique = plan_targets(config, progress=False)
    per_store = [sum(p.images.values()) for p in plans]
    # the tumour core lies inside the whole tumour, so its slices are mostly the same images
    assert max(per_store) <= unique < sum(per_store)
    assert f"x {unique} images (distinct over the 2 targets' {sum(per_store)} store images)" in out
    assert plans[1].key != plans[0].key and plan_dataset(config, progress=False, target="tumor_core").key == plans[1].key


def test_an_unknown_target_in_a_list_is_named_with_its_index(phantom_root, tmp_path, capsys):
    path = example_pointed_at(phantom_root, tmp_path, data={"target": ["whole_tumor", "tumour_core"]})
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "data.target[1] = 'tumour_core' is not a target" in err and "tumor_core" in err


def test_the_runner_pieces_route_each_target_to_its_store_and_encode_shared_images_once(
        two_target_datasets, tmp_path, monkeypatch):
    """Without Ray: encode jobs cover every store with each distinct image once; zero-shot runs per
    backbone x prompt x target; a trial or zero-shot evaluation opens its target's store; trials.csv
    gets a target column."""
    import json

    import pandas as pd

    import trainables.trial
    from search_spaces.space import trial_id
    from study.plan import search_plan, study_axes
    from study import stages
    from study.runner import encode_keys, zero_shot_runs

    config, stores = two_target_datasets
    datasets = [stores["whole_tumor"], stores["tumor_core"]]
    per_store = encode_keys(datasets)
    assert [root for root, _ in per_store] == [str(d.root.resolve()) for d in datasets]
    assert len(per_store[0][1]) == len(datasets[0].records)  # the first store: all its images
    shas = {(r.image_id, r.view): r.image_sha256 for r in datasets[1].records}
    first = {r.image_sha256 for r in datasets[0].records}
    assert per_store[1][1] and all(shas[key] not in first for key in per_store[1][1])  # only its own images
    assert sum(len(keys) for _, keys in per_store) == len(first | set(shas.values()))

    assert zero_shot_runs(config) == [("litemedsam", "box", "whole_tumor"), ("litemedsam", "box", "tumor_core")]
    assert list(study_axes(config))[0] == "target"
    trials = [{**cell, "seed": 0} for cell in search_plan(config).cells]
    assert [t["target"] for t in trials] == ["whole_tumor", "tumor_core"]
    assert trial_id(trials[0]) != trial_id(trials[1])

    context = stages.StudyContext(study_dir=str(tmp_path), cache_root=str(tmp_path),
                                  weights={"litemedsam": "random"}, seed=0, eval_prompt="same",
                                  prepared_roots={"whole_tumor": str(datasets[0].root),
                                                  "tumor_core": str(datasets[1].root)})
    opened = []

    class Result:
        trial_id, stage, per_image, per_subject, history, predictions, per_click = "", "zero_shot", [], [], [], {}, []
        summary = {"test_dice": 0.5}

    def fake_run_trial(spec, dataset, cache_root, **_):
        opened.append((spec.trial_id, Path(dataset.root)))
        result = Result()
        result.trial_id, result.stage = spec.trial_id, spec.stage
        return result

    monkeypatch.setattr(trainables.trial, "run_trial", fake_run_trial)
    entry = stages.zero_shot("litemedsam", "box", context, target="tumor_core")
    assert entry.trial_id == "zs-litemedsam-box-tumor_core" and entry.params["target"] == "tumor_core"
    stages.finetune({**trials[1], "epochs": 1}, context, report=lambda metrics: None)
    assert opened == [("zs-litemedsam-box-tumor_core", datasets[1].root),
                      (trial_id({**trials[1], "epochs": 1}), datasets[1].root)]
    stages.collect_results(tmp_path, list(study_axes(config)), {})
    table = pd.read_csv(tmp_path / "results" / "trials.csv")
    assert list(table.columns[4:6]) == ["image_encoder_params", "target"] and set(table["target"]) == {"tumor_core"}
    assert json.loads((tmp_path / "results" / "trials" / entry.trial_id / "trial.json").read_text())["params"][
        "target"] == "tumor_core"


def test_a_missing_checkpoint_does_not_claim_the_study_folder(phantom_root, tmp_path, capsys):
    """The weights resolve before resolved.yaml is written, so pointing weights.dir at the right
    folder afterwards is the same study, not "a different config"."""
    path = example_pointed_at(phantom_root, tmp_path, factors={"backbone": "sam_b"}, study={"name": "claim"})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and str(tmp_path / "weights") in err
    assert not (tmp_path / "runs" / "claim" / "resolved.yaml").exists()


def test_a_second_driver_on_a_running_study_stops_with_a_clear_error(phantom_root, tmp_path, capsys):
    from study.runner import study_lock

    path = example_pointed_at(phantom_root, tmp_path, factors={"backbone": "litemedsam"}, study={"name": "locked"})
    study_dir = tmp_path / "runs" / "locked"
    with study_lock(study_dir):  # the first driver, still running
        assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "is being run by another driver" in err and f"pid {os.getpid()}" in err and "Traceback" not in err
    assert not (study_dir / "resolved.yaml").exists()  # the second driver touched nothing
    with study_lock(study_dir):  # released by the first: it can be taken again
        pass


@pytest.mark.parametrize("bad", ["checkpoint", "prompts"])
def test_a_corrupt_checkpoint_or_prompts_file_stops_the_study_before_any_worker(phantom_root, tmp_path, capsys, bad):
    """Checked on the driver before the study folder is claimed and before Ray starts: one paragraph
    naming the file, exit code 2, no traceback."""
    broken = tmp_path / ("litemedsam.pth" if bad == "checkpoint" else "prompts.json")
    broken.write_bytes(b"PK\x03\x04 half a download" if bad == "checkpoint" else b'{"case_001": {"boxes": [[1, 2')
    sections = ({"weights": {"files": {"litemedsam": str(broken)}}} if bad == "checkpoint"
                else {"prompts": {"file": str(broken)}})
    path = example_pointed_at(phantom_root, tmp_path, factors={"backbone": "litemedsam"}, study={"name": bad},
                              **sections)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert str(broken) in captured.err and "Traceback" not in captured.err + captured.out
    message = [line for line in captured.err.replace("\r", "\n").splitlines() if str(broken) in line]
    assert len(message) == 1 and len(message[0]) > 80  # one paragraph: what is wrong and the fix
    assert not (tmp_path / "runs" / bad / "resolved.yaml").exists()


def test_a_cluster_with_gpus_and_gpus_per_trial_0_is_warned_about():
    from study.runner import idle_gpu_warning

    warning = idle_gpu_warning({"CPU": 16, "GPU": 2.0}, 0)
    assert "2 GPU(s)" in warning and "resources.gpus_per_trial" in warning
    assert idle_gpu_warning({"CPU": 16, "GPU": 2.0}, 0.25) is None and idle_gpu_warning({"CPU": 2}, 0) is None


def test_the_report_is_rebuilt_and_logged_only_when_the_result_tables_change(tmp_path, monkeypatch):
    """A finished study rerun keeps its report: `_report` rebuilds and re-logs it only when
    resolved.yaml or a results/*.csv differs from what it was last built from."""
    import analysis.report
    from study.config import config_from_dict
    from study.runner import _report
    from tests.analysis.conftest import write_study

    study_dir = write_study(tmp_path / "study", with_predictions=False)
    builds, uploads = [], []
    original = analysis.report.build_report
    monkeypatch.setattr(analysis.report, "build_report", lambda *a, **k: builds.append(1) or original(*a, **k))

    class Tracker:
        def log_parent_artifacts(self, folder, path):
            uploads.append((Path(folder).name, path))

    config = config_from_dict({"study": {"name": "study", "out": str(tmp_path)}})
    assert _report(config, study_dir, Tracker()) == study_dir / "report"
    assert (study_dir / "report" / "report.html").is_file() and builds == [1] and uploads == [("report", "report")]
    assert _report(config, study_dir, Tracker()) == study_dir / "report"
    assert builds == [1] and len(uploads) == 1  # unchanged tables: neither rebuilt nor uploaded again
    trials = study_dir / "results" / "trials.csv"
    trials.write_text(trials.read_text())  # rewritten with the same bytes, as every rerun does: up to date
    assert _report(config, study_dir, Tracker()) and builds == [1]
    trials.write_text(trials.read_text() + "\n")  # a changed table
    _report(config, study_dir, Tracker())
    assert builds == [1, 1] and len(uploads) == 2
