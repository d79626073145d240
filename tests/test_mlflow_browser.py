"""A study in the MLflow UI as a browser shows it: headless Chromium opens `experiment_url()`.

A small study (a parent and three fine-tune trial runs named with `run_name`) is logged with
`StudyTracker` to a SQLite store (while the UI starts, to keep the test short); the `mlflow ui`
command the tracker prints serves it on a free port of 127.0.0.1, and headless Chromium renders
the experiment's URL and dumps the DOM once the page's JavaScript has run. The page must be MLflow 3's runs table ("Model training"), not the
GenAI overview or traces, with every trial's configuration name in it.

Skipped, with the reason, where no Chromium is installed (`apt-get install chromium` provides it)
or the `mlflow ui` process does not answer within 60 s.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from study.tracking import StudyTracker, run_name

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000",
                  "--virtual-time-budget=15000"]  # let the page's requests and rendering finish, then dump
TRIALS = [("t-dice", "dice", 0.61), ("t-focal", "focal", 0.72), ("t-dice-ce", "dice_ce", 0.83)]


def find_chromium() -> str | None:
    """Chromium as tests/analysis/test_report_browser.py finds it."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM: scripts and styles dropped, tags as spaces, entities decoded."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def stop(process: subprocess.Popen) -> None:
    """Stop the UI's process group (the command and its uvicorn worker): SIGTERM, SIGKILL after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


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
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (looked for /usr/bin/chromium and chromium on PATH); "
                    "install it with `apt-get install -y chromium` to run this check.")
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = tmp_path / "ui.log"
    with open(log_path, "wb") as ui_log:
        process = subprocess.Popen(command, stdout=ui_log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                   start_new_session=True)  # its own process group: its workers stop with it
    base = f"http://127.0.0.1:{port}"
    try:
        log_study(tracker)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.skip(f"mlflow ui exited with {process.returncode} before answering: "
                            f"{log_path.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                pytest.skip(f"mlflow ui did not answer on {base} within 60 s: "
                            f"{log_path.read_text(errors='replace')[-1500:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)

        url = tracker.experiment_url(base)
        assert url.startswith(f"{base}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
        browser = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
        completed = subprocess.run(browser, capture_output=True, text=True, timeout=90)
    finally:
        stop(process)

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
