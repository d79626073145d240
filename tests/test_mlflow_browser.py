"""A study in the MLflow UI as a browser shows it: headless Chromium opens `experiment_url()`.

A small study (a parent and three fine-tune trial runs named with `run_name`) is logged with
`StudyTracker` to a SQLite store; the `mlflow ui`
command the tracker prints serves it on a free port of 127.0.0.1, and headless Chromium renders
the experiment's URL and dumps the DOM once the page's JavaScript has run. The page must be MLflow 3's runs table ("Model training"), not the
GenAI overview or traces, with every trial's configuration name in it.

Skipped, with the reason, where no Chromium is installed (`apt-get install chromium` provides it)
or the `mlflow ui` process does not answer within 60 s.
"""

from __future__ import annotations

import html
import re
import shlex
import subprocess
import sys
from pathlib import Path

from study.tracking import StudyTracker, run_name
from tests.local_processes import CHROMIUM_FLAGS, free_port, require_chromium, serve_mlflow

BROWSER_FLAGS = [*CHROMIUM_FLAGS, "--window-size=1400,1000",
                 "--virtual-time-budget=15000"]  # let the page's requests and rendering finish, then dump
TRIALS = [("t-dice", "dice", 0.61), ("t-focal", "focal", 0.72), ("t-dice-ce", "dice_ce", 0.83)]


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM: scripts and styles dropped, tags as spaces, entities decoded."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def log_study(tracker: StudyTracker) -> None:
    """The parent and three finished fine-tune trials, one per loss; the study closed."""
    resolved = tracker.study_dir.parent / "resolved.yaml"
    resolved.write_text("study: {name: browser-study}\n")
    with tracker:
        tracker.start_parent("browser-study", "h", resolved, "plan: 3 trials", {"study": {"name": "browser-study"}})
        for trial_id, loss, dice in TRIALS:
            params = {"backbone": "litemedsam", "optimizer": "adamw", "loss": loss, "prompt": "box", "epochs": 2,
                      "seed": 0, "family": "litemedsam", "image_encoder_params": 5_659_216}
            tracker.trial_run(trial_id, "finetune", params, run_name=run_name(params, "finetune"))
            for epoch in (1, 2):
                tracker.log_epoch(trial_id, {"val_dice": dice - 0.1 / epoch, "train_loss": 1.0 / epoch}, step=epoch)
            tracker.finish_trial(trial_id, "FINISHED", {"test_dice": dice, "epochs_run": 2, "best_epoch": 2})
        tracker.describe_parent("Best configuration: litemedsam · adamw · dice_ce · box")


def test_the_experiment_url_opens_the_runs_table_with_the_trials_configuration_names(tmp_path):
    chromium = require_chromium()
    tracker = StudyTracker(None, "browser-study", tmp_path / "browser-study")  # the store and the experiment
    names = [run_name({"backbone": "litemedsam", "optimizer": "adamw", "loss": loss, "prompt": "box", "seed": 0},
                      "finetune") for _, loss, _ in TRIALS]
    assert names[0] == "litemedsam · adamw · dice · box · s0"

    # the command the study prints, on a free port, with one worker and no job runner (a faster start)
    port = free_port()
    command = shlex.split(tracker.mlflow_ui_command())
    assert command[:2] == ["mlflow", "ui"] and command[-2:] == ["--port", "5000"]
    command = [str(Path(sys.executable).with_name("mlflow")), *command[1:-1], str(port), "--host", "127.0.0.1",
               "--workers", "1"]
    log_study(tracker)
    with serve_mlflow(command, tmp_path, port, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as base:
        url = tracker.experiment_url(base)
        assert url.startswith(f"{base}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
        browser = [chromium, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
        completed = subprocess.run(browser, capture_output=True, text=True, timeout=90)

    dom = completed.stdout
    assert "<title>" in dom, f"Chromium dumped no page (exit {completed.returncode}): {completed.stderr[-2000:]}"
    title = html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1))
    text = page_text(dom)
    assert title == f"Runs - Experiment {tracker.experiment_id} - MLflow", (title, text[:1500])
    # the runs table, not the GenAI overview (token usage, latency) nor the traces table
    assert "Run Name" in text and "4 matching runs" in text, text[:1500]
    assert "Token Usage" not in text and "Tokens per Trace" not in text, text[:1500]
    # every trial run is a row of its own, best test Dice first; the parent (no test Dice) last
    positions = [text.find(name) for name in names]
    assert all(position >= 0 for position in positions), (names, text[:1500])
    assert positions[2] < positions[1] < positions[0] < text.rfind("browser-study")
