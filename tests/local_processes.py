"""What the browser and tracking-server tests share: finding Chromium, a free port, serving MLflow.

`serve_mlflow(command, folder)` runs an `mlflow ui` or `mlflow server` command in its own process
group, waits until its /health answers, yields its base URL, and stops the group (SIGTERM, then
SIGKILL after 15 s). A server that exits or does not answer within 60 s skips the test with the
tail of its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Headless Chromium flags every browser test uses; each test adds its window size and output.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> str:
    """The Chromium executable, or a skip that says how to install it."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed (looked for /usr/bin/chromium and chromium on PATH); "
                    "install it with `apt-get install -y chromium` to run this check.")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone already
            return
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def serve_mlflow(command: list[str], folder: Path, port: int, env: dict | None = None):
    """Run an MLflow server `command` listening on 127.0.0.1:`port`; yield its base URL."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment.update(env or {})
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder,
                                   start_new_session=True)  # its own process group: its workers stop with it
    base = f"http://127.0.0.1:{port}"
    what = f"{Path(command[0]).name} {command[1]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.skip(f"{what} exited with {process.returncode} before answering: "
                            f"{log_path.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                pytest.skip(f"{what} did not answer on {base} within 60 s: "
                            f"{log_path.read_text(errors='replace')[-1500:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield base
    finally:
        _stop(process)
