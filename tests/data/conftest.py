"""Phantoms shared by the data tests, generated once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from study.data.phantom import generate_phantom

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def phantom_cli(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m study.data.phantom OUT --subjects 8` run once: (OUT, the finished process)."""
    out = tmp_path_factory.mktemp("phantom_cli") / "phantom"
    process = subprocess.run(
        [sys.executable, "-m", "study.data.phantom", str(out), "--subjects", "8"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    return out, process


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """A 3-subject phantom (seed 0) written by `generate_phantom` in this process."""
    out = tmp_path_factory.mktemp("phantom_small") / "phantom"
    generate_phantom(out, subjects=3, seed=0)
    return out
