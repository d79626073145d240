"""The study runner end to end on a two-node Ray cluster (Ray's cluster utilities, one machine).

One small phantom study design is shared: LiteMedSAM's real weights, a handful of slices, two
short epochs. The prepared store and the embedding cache are shared by every study here (and by
the session's other phantom users, `phantom_folder` in tests/conftest.py), so the encoder runs
once for the whole module; a study that needs its own cache starts from a copy.
"""

import json
import os
import shutil
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.run import main

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def shared(phantom_folder):
    """The folder of the phantom (`phantom/`) and of the cache (`cache/`) the studies share."""
    return phantom_folder


def copy_of_shared_cache(shared: Path, cache: Path) -> None:
    """`cache` as a copy of the shared cache (what the tests before filled; an empty folder when
    there is none yet), for a study that damages or empties part of its cache."""
    if (shared / "cache").is_dir():
        shutil.copytree(shared / "cache", cache)
    cache.mkdir(parents=True, exist_ok=True)


def cache_entries(cache: Path) -> list[Path]:
    """The meta.json of every embedding-cache entry under `cache` (one per encoded image)."""
    return list(cache.glob("embeddings/**/meta.json"))


def write_grid(folder: Path, shared: Path, name: str, **sections) -> Path:
    grid = {
        "study": {"name": name, "out": str(folder / "runs"), "seed": 0, "cache_dir": str(shared / "cache")},
        "data": {"reader": "phantom", "root": str(shared / "phantom"), "slicing": {"min_area": 50},
                 "split": {"val": 0.15, "test": 0.25}, "limit": 4},
        "factors": {"backbone": "litemedsam", "optimizer": ["adam", "adamw"], "loss": "dice_bce", "prompt": "box",
                    "lr": 1.0e-4, "epochs": 2, "batch_size": 4},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 1},
    }
    for section, values in sections.items():
        grid[section] = {**grid.get(section, {}), **values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def mlflow_runs(study_dir: Path):
    client = MlflowClient(f"sqlite:///{study_dir.resolve()}/mlflow.db")
    experiments = client.search_experiments()
    runs = [run for exp in experiments for run in client.search_runs([exp.experiment_id], max_results=1000)]
    return client, runs


def trials_table(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "results" / "trials.csv")


def test_a_study_runs_on_two_nodes_and_leaves_every_trial_in_mlflow(cluster, shared, tmp_path, capsys):
    """search.seeds: 2 on the phantom (MSD Task01 layout) on two nodes: one trial per seed, the same
    evaluation prompts, per-subject rows over every target slice of each test subject's label volume,
    one MLflow run per trial; trained with one corrective click per step and evaluated with two,
    every test image's click curve in per_click.csv and MLflow; the U-Net baseline (both arms, both
    seeds) on the same test slices, its rows in every table and its comparison in the report."""
    grid = write_grid(tmp_path, shared, "e2e", search={"seeds": 2},
                      baseline={"zero_shot": True, "unet": {"enabled": True, "epochs": 2, "input_size": 64,
                                                            "box_channel": True}},
                      factors={"optimizer": "adamw", "train_clicks": 1}, evaluation={"clicks": 2})
    assert main([str(grid), "--address", cluster.address]) == 0
    out = capsys.readouterr().out
    study = tmp_path / "runs" / "e2e"
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "Report:" in out

    trials = trials_table(study)
    tuned = trials[trials["stage"] == "finetune"]
    assert sorted(tuned["seed"]) == [0, 1] and tuned["trial_id"].nunique() == 2
    assert trials.loc[trials["stage"] == "zero_shot", "seed"].isna().all()
    assert set(trials["stage"]) == {"finetune", "zero_shot", "unet"}
    unets = trials[trials["stage"] == "unet"]
    assert sorted(zip(unets["backbone"], unets["seed"])) == [("unet", 0), ("unet", 1), ("unet_box", 0), ("unet_box", 1)]
    assert (unets["status"] == "TERMINATED").all() and (unets["epochs_run"] == 2).all()
    assert unets[["test_dice", "image_encoder_params"]].notna().all().all() and set(unets["family"]) == {"unet"}
    assert (tuned["status"] == "TERMINATED").all() and (tuned["epochs_run"] == 2).all()
    assert tuned[["val_dice", "test_dice", "test_iou", "test_miou"]].notna().all().all()
    assert trials["node"].nunique() == 2, "trials and evaluations ran on both nodes"

    per_image = pd.read_csv(study / "results" / "per_image.csv")
    test_images = per_image.groupby("trial_id")["image_id"].nunique()
    assert set(test_images.index) == set(trials["trial_id"]) and test_images.nunique() == 1
    for trial, rows in per_image.groupby("trial_id"):  # the table's Dice is the mean of the per-image Dice
        assert rows["dice"].mean() == pytest.approx(float(trials.set_index("trial_id").loc[trial, "test_dice"]))
    history = pd.read_csv(study / "results" / "history.csv")
    assert len(history) == (2 + 4) * 2  # two fine-tunes and four U-Nets, two epochs each
    assert set(per_image.loc[per_image["trial_id"].isin(unets["trial_id"]), "prompt"]) == {"none", "box"}

    per_subject = pd.read_csv(study / "results" / "per_subject.csv")
    assert set(per_image.loc[per_image["stage"] == "finetune", "seed"]) == {0, 1}
    # The two seeds were scored on the same test images with the same prompts (boxes from the truth).
    images = per_image[per_image["stage"] == "finetune"].groupby("seed")["image_id"].apply(sorted)
    assert images[0] == images[1]
    labels = {p.name.split(".")[0]: p for p in (shared / "phantom" / "Task01_BrainTumour" / "labelsTr").glob("*.nii.gz")}
    assert set(per_subject["trial_id"]) == set(trials["trial_id"])
    for (trial, subject), rows in per_image.groupby(["trial_id", "subject"]):
        volume = np.asarray(nib.load(labels[subject]).dataobj) > 0  # whole tumour: every tumour label
        target_slices = int(volume.any(axis=(0, 1)).sum())
        assert len(rows) == target_slices, (trial, subject)  # every slice with target voxels, no other
        row = per_subject[(per_subject["trial_id"] == trial) & (per_subject["subject"] == subject)]
        assert len(row) == 1 and int(row["slices"].iloc[0]) == target_slices
        assert int(row["voxels"].iloc[0]) == int(volume.sum())
        assert 0 <= float(row["dice_3d"].iloc[0]) <= 1 and np.isfinite(row["hd95_3d_mm"].iloc[0])

    per_click = pd.read_csv(study / "results" / "per_click.csv")
    sam_rows = per_image[~per_image["trial_id"].isin(unets["trial_id"])]  # a U-Net takes no clicks
    assert len(per_click) == 3 * len(sam_rows) and set(per_click["click"]) == {0, 1, 2}
    first = per_click[per_click["click"] == 0].set_index(["trial_id", "image_id"])["dice"]
    assert np.allclose(first.sort_index(), sam_rows.set_index(["trial_id", "image_id"])["dice"].sort_index())
    for _, rows in per_click.groupby(["trial_id", "image_id"]):  # a click was added, or the mask was perfect
        for _, row in rows[rows["click"] > 0].iterrows():
            assert pd.notna(row["click_x"]) or rows.loc[rows["click"] == row["click"] - 1, "dice"].item() == 1.0
    report = (study / "report" / "report.md").read_text()
    assert "## 6. Corrective clicks" in report and "### Fine-tuned SAM against the U-Net baseline" in report
    versus = pd.read_csv(study / "report" / "tables" / "sam_vs_unet.csv")
    assert set(versus["unet"]) == {"U-Net", "U-Net + box channel"} and versus["p"].notna().all()

    client, runs = mlflow_runs(study)
    for run in runs:
        if run.data.tags.get("sam_study.stage") == "unet":  # its network's size, for the model-size plot
            assert run.data.metrics["model_params"] > 1e6 and run.data.params["family"] == "unet"
            assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best_unet.pt"]
        elif run.data.tags.get("sam_study.role") == "trial":
            curve = client.get_metric_history(run.info.run_id, "test_dice_click")
            assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [0, 1, 2]
            assert 0 <= run.data.metrics["test_click_auc"] <= 1
    seeds = sorted(run.data.params["seed"] for run in runs if run.data.tags.get("sam_study.stage") == "finetune")
    assert seeds == ["0", "1"]
    roles = [run.data.tags.get("sam_study.role") for run in runs]
    assert roles.count("parent") == 1 and roles.count("trial") == len(trials)
    assert all(run.info.status != "RUNNING" for run in runs)
    for run in runs:
        if run.data.tags.get("sam_study.stage") == "finetune":
            assert run.data.params["optimizer"] == "adamw" and "image_encoder_params" in run.data.params
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")]
            assert steps[:2] == [1, 2]
    assert (study / "report" / "report.html").exists() and (study / "resolved.yaml").exists()
    assert (study / "tune").is_dir()


def final_entries(study: Path) -> dict[str, int]:
    """Trial id -> the mtime of its ledger entry, for the trials whose entry is final."""
    out = {}
    for path in (study / "results" / "trials").glob("*/trial.json"):
        try:
            if json.loads(path.read_text())["status"] in ("TERMINATED", "STOPPED_EARLY", "ERROR"):
                out[path.parent.name] = path.stat().st_mtime_ns
        except (OSError, ValueError):
            pass
    return out


def start_driver(grid: Path, cluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study.run", str(grid), "--address", cluster.address],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_when(driver: subprocess.Popen, ready, what: str, timeout: float = 420) -> bool:
    """SIGKILL the driver (and its process group) once `ready()`; False when it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        if driver.poll() is not None:
            return False
        time.sleep(0.05)
    assert ready(), f"timed out waiting for {what}"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    return True


def test_a_driver_killed_during_encode_a_trial_and_the_report_resumes_without_rerunning(cluster, shared, tmp_path,
                                                                                        capsys):
    """SIGKILL of the driver at three moments, then the same command: every trial once in trials.csv,
    none re-run after it finished, one MLflow run each, none left RUNNING. The search is Optuna's
    (2 optimizer cells x 2 proposals of lr), whose state survives the kills: no proposal is lost
    or repeated, and every proposal is within its range."""
    from study.config import load_config
    from study.data.prepare import prepare_dataset

    cache = tmp_path / "cache"
    grid = write_grid(tmp_path, shared, "resume", baseline={"zero_shot": False},
                      study={"cache_dir": str(cache)},  # its own cache: the encode stage has work
                      factors={"lr": {"loguniform": [1.0e-5, 1.0e-3]}, "epochs": 1},
                      search={"algorithm": "optuna", "num_samples": 2}, resources={"max_concurrent": 1})
    study = tmp_path / "runs" / "resume"
    # A copy of the shared cache without the entries of 4 of the study's images (all of them are
    # missing when no test before filled it): 2 images for each of the two encode workers, an
    # encoder pass of seconds each, so the first new entry comes with the stage still under way.
    copy_of_shared_cache(shared, cache)
    removed = {record.image_sha256 for record in prepare_dataset(load_config(grid), progress=False).records[:4]}
    for meta in cache_entries(cache):
        if json.loads(meta.read_text()).get("image_sha256") in removed:
            shutil.rmtree(meta.parent)
    held = len(cache_entries(cache))

    def encoding() -> bool:  # the encode stage wrote an entry
        return len(cache_entries(cache)) > held

    assert kill_when(start_driver(grid, cluster), encoding, "the encode stage")
    assert not final_entries(study), "killed during encode: no trial had finished"
    kill_when(start_driver(grid, cluster), lambda: len(final_entries(study)) >= 2, "two finished trials")
    mid = final_entries(study)
    assert 2 <= len(mid) < 4
    assert (study / "results" / "search_state.pkl").exists()
    (study / "results" / "trials.csv").unlink(missing_ok=True)
    kill_when(start_driver(grid, cluster), lambda: (study / "results" / "trials.csv").exists(), "the report stage")
    before_last = final_entries(study)
    assert len(before_last) == 4

    capsys.readouterr()
    assert main([str(grid), "--address", cluster.address]) == 0
    assert "nothing to run (Ray is not started)" in capsys.readouterr().out  # every trial was final
    after = final_entries(study)
    for name, mtime in before_last.items():  # finished trials were not run again
        assert after[name] == mtime, name
    trials = trials_table(study)
    assert len(trials) == 4 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    assert trials.groupby("optimizer").size().to_dict() == {"adam": 2, "adamw": 2}
    assert trials["lr"].between(1.0e-5, 1.0e-3).all() and trials["lr"].nunique() == 4
    client, runs = mlflow_runs(study)
    assert len(runs) == 4 + 1  # one run per trial, plus the parent
    assert all(run.info.status != "RUNNING" for run in runs)
    for run in runs:
        if run.data.tags.get("sam_study.role") == "trial":
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")]
            assert steps == [1], "its epoch logged once"


def test_asha_stops_some_trials_early_and_still_evaluates_them(cluster, shared, tmp_path):
    # One trial at a time, good learning rates first: the weak trials (LiteMedSAM starts near zero
    # Dice with centre points, and lr 1e-6 barely moves it) reach each rung after strong results
    # are recorded there, so ASHA's cut does not depend on timing.
    grid = write_grid(tmp_path, shared, "asha", baseline={"zero_shot": False},
                      factors={"optimizer": "adamw", "prompt": "center_point",
                               "lr": [3.0e-4, 3.0e-6, 1.0e-6], "epochs": 3}, report={"enabled": False},
                      scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                      # the single-token path: the three-mask one starts LiteMedSAM's centre-point
                      # masks empty, so every trial would tie at the first rung
                      evaluation={"single_point_multimask": False},
                      resources={"max_concurrent": 1})
    assert main([str(grid), "--address", cluster.address]) == 0
    trials = trials_table(tmp_path / "runs" / "asha")
    assert len(trials) == 3
    stopped = trials[trials["epochs_run"] < 3]
    assert len(stopped) >= 1 and (stopped["status"] == "STOPPED_EARLY").all()
    assert (trials.loc[trials["epochs_run"] == 3, "status"] == "TERMINATED").all()  # max_t is plainly done
    assert set(stopped["lr"]) >= {3.0e-6, 1.0e-6}  # the weakest are cut at the first rung
    assert trials.loc[trials["lr"] == 3.0e-4, "epochs_run"].item() == 3  # the first, strongest runs to max_t
    assert trials["test_dice"].notna().all()


def test_a_user_error_inside_a_worker_reaches_the_user_as_one_paragraph(cluster, shared, tmp_path, capsys):
    """A prepared slice deleted after the store was written: met by a trial (its embedding is cached)
    and then by an encode worker (its embedding removed too), each time the study stops with the
    reader's one-paragraph message naming the file, exit 2, and no traceback."""
    from foundation.embedding_cache import EmbeddingCache
    from study.config import load_config
    from study.data.prepare import prepare_dataset
    from trainables.backbones import resolve_weights
    from trainables.residency import build

    cache = tmp_path / "cache"
    grid = write_grid(tmp_path, shared, "user-error", baseline={"zero_shot": False}, study={"cache_dir": str(cache)},
                      factors={"optimizer": "adamw", "epochs": 1}, report={"enabled": False})
    copy_of_shared_cache(shared, cache)  # its own copy of the module's store and cache (filled by the tests above)
    dataset = prepare_dataset(load_config(grid), progress=False)
    backbone = build("litemedsam", str(resolve_weights("litemedsam", None, {})), None, "cpu")
    EmbeddingCache.for_backbone(cache, backbone, dataset.key).ensure(backbone, dataset, dataset.records, progress=False)
    index = dataset.root / "index.json"
    record = next(r for r in json.loads(index.read_text())["records"] if r["split"] == "train")
    (index.parent / record["file"]).unlink()

    for stage in ("trial", "encode"):
        if stage == "encode":  # the embedding gone as well: an encode worker must read the slice
            entries = [meta.parent for meta in cache.glob("embeddings/**/meta.json")
                       if json.loads(meta.read_text()).get("image_sha256") == record["image_sha256"]]
            assert entries
            for entry in entries:
                shutil.rmtree(entry)
        assert main([str(grid), "--address", cluster.address]) == 2, stage
        captured = capsys.readouterr()
        message = [line[line.index("error:"):] for line in captured.err.splitlines() if "error:" in line]
        assert len(message) == 1 and record["file"] in message[0] and "delete that folder" in message[0], stage
        assert "Traceback" not in captured.err + captured.out, stage


def test_worker_faults_a_lost_node_and_a_failing_trial(cluster, shared, tmp_path, capsys):
    """On two nodes: a trial that raises on every attempt ends as an ERROR row with its reason (in
    trials.csv and MLflow) and the study finishes; a truncated state.pt is discarded and its trial
    recovers; a trial's worker killed mid-epoch resumes from its checkpoint; when a worker node is
    removed mid-study its trials finish on the other node. Last in this module: it removes a node."""
    from search_spaces.space import trial_id
    from study.config import load_config
    from study.plan import search_plan

    grid = write_grid(tmp_path, shared, "faults", baseline={"zero_shot": False},
                      factors={"optimizer": ["adam", "adamw", "sgd"], "epochs": 3},
                      resources={"max_concurrent": 2, "max_failures": 2}, report={"enabled": False})
    study = tmp_path / "runs" / "faults"
    cells = search_plan(load_config(grid)).cells
    ids = {cell["optimizer"]: trial_id({**cell, "seed": 0}) for cell in cells}
    # the failing one last in the grid's order, so that the first two run on both nodes at the start
    failing, truncated = ids["sgd"], ids["adamw"]
    folders = study / "results" / "trials"
    (folders / failing).mkdir(parents=True)
    (folders / failing / "checkpoint").write_text("a file where the checkpoint folder goes")  # every attempt fails
    (folders / truncated / "checkpoint").mkdir(parents=True)
    (folders / truncated / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    head = cluster.head_node.node_id
    events = {}

    def entries():
        out = {}
        for path in folders.glob("*/trial.json"):
            try:
                out[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        return out

    def inject_faults():
        """First remove the worker node under a trial in its first epoch; then, on the head node
        alone, SIGKILL the worker of a trial that has checkpointed an epoch (so mid-epoch)."""
        deadline = time.time() + 400
        while time.time() < deadline and len(events) < 2:
            for name, entry in entries().items():
                if entry["status"] != "RUNNING" or name == failing:
                    continue
                checkpointed = (folders / name / "checkpoint" / "state.pt").exists()
                if "removed" not in events and entry["node"] != head and not checkpointed:
                    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == entry["node"]))
                    events["removed"] = name
                elif "removed" in events and "killed" not in events and entry["node"] == head and checkpointed:
                    os.kill(entry["pid"], signal.SIGKILL)
                    events["killed"] = name
                    break
            time.sleep(0.05)

    watcher = threading.Thread(target=inject_faults, daemon=True)
    watcher.start()
    assert main([str(grid), "--address", cluster.address]) == 0
    watcher.join(timeout=5)
    out = capsys.readouterr().out
    assert set(events) == {"killed", "removed"}, events

    table = trials_table(study).set_index("trial_id")
    assert len(table) == len(cells) == 3
    failed = table.loc[failing]
    assert failed["status"] == "ERROR" and "FileExistsError" in failed["reason"] and failed["attempts"] == 3
    assert "1 trial(s) failed" in out and "Traceback" not in out
    others = table.drop(index=failing)
    assert (others["status"] == "TERMINATED").all() and (others["epochs_run"] == 3).all()
    assert (folders / truncated / "checkpoint" / "state.pt.unreadable").exists()  # discarded, kept aside
    for name in others.index:  # one more attempt for every fault a trial met, no other retry
        assert table.loc[name, "attempts"] == 1 + sum(hit == name for hit in events.values()), name
    assert table.loc[events["removed"], "node"] == head  # it finished on the other node
    history = pd.read_csv(study / "results" / "history.csv")
    assert sorted(history.loc[history["trial_id"] == events["killed"], "epoch"]) == [1, 2, 3]  # resumed, not redone

    _, runs = mlflow_runs(study)
    trial_runs = {run.data.tags["sam_study.trial_id"]: run for run in runs if run.data.tags.get("sam_study.role") == "trial"}
    assert len(trial_runs) == 3 and all(run.info.status != "RUNNING" for run in runs)
    assert trial_runs[failing].info.status == "FAILED"
    assert "FileExistsError" in trial_runs[failing].data.tags["sam_study.failure_reason"]
