"""How much of a study's wall time is not trial compute (start-up, scheduling, logging)?

Runs `python -m study.run` as a user would, on the embedded default (phantom data, LiteMedSAM,
a local Ray instance, the SQLite MLflow store), with at least 8 short real trials. The
prepared store and the embedding cache are filled beforehand, and zero-shot and the report are
off, so what is timed is exactly: interpreter and Ray start-up, Tune's scheduling, the driver's
MLflow logging and result tables, and the trials themselves.

- `wall_s`: the whole command, from process start to exit.
- `trial_compute_s`: the time during which at least one trial was computing (the union of the
  trials' [started, ended] intervals from their ledger entries (trial.json); overlapping trials count once).
- `overhead_fraction` = 1 - trial_compute_s / wall_s.
- `startup_s`: from process start to the first trial's start (the study's fixed start-up cost);
  `teardown_s`: from the last trial's end to the process's exit.
- `resume_s`: the same command run again on the finished study (nothing is left to run: no
  encoding, no trial, no upload; the tables are rewritten from the ledger).

The last stdout line is one JSON object: {"trials", "wall_s", "trial_compute_s", "overhead_fraction",
"startup_s", "teardown_s", "resume_s"}.
Usage: python benchmarks/study_overhead.py [--trials 8] [--epochs 3] [--limit 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials (optimizer x loss x prompt x lr levels)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=16, help="slices per split")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="study-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    lrs = [1e-4 * (2 ** i) for i in range(max(1, args.trials // 8))]
    grid = {
        "study": {"name": "overhead", "out": str(work / "runs"), "seed": 0, "cache_dir": str(work / "cache")},
        "data": {"reader": "phantom", "root": str(work / "phantom"), "slicing": {"min_area": 50},
                 "split": {"val": 0.15, "test": 0.25}, "limit": args.limit},
        "factors": {"backbone": "litemedsam", "optimizer": ["adam", "adamw"], "loss": ["dice", "dice_bce"],
                    "prompt": ["center_point", "box"], "lr": lrs, "epochs": args.epochs, "batch_size": 8},
        "baseline": {"zero_shot": False},
        "report": {"enabled": False},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
    }
    path = work / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))

    # Fill the prepared store and the embedding cache first: encoding is real work, not overhead.
    from study.config import load_config
    from study.data.prepare import prepare_dataset
    from foundation.embedding_cache import EmbeddingCache
    from trainables.backbones import build_backbone, resolve_weights

    config = load_config(path)
    dataset = prepare_dataset(config, progress=False)
    backbone = build_backbone("litemedsam", resolve_weights("litemedsam", config.weights.dir, {}))
    EmbeddingCache.for_backbone(config.cache_dir, backbone, dataset.key).ensure(backbone, dataset, dataset.records)

    command = [sys.executable, "-m", "study.run", str(path)]
    print(f"timing `python -m study.run {path}` ...", file=sys.stderr)
    start, wall = timed(command)
    records = [json.loads(p.read_text()) for p in (work / "runs" / "overhead" / "results" / "trials").glob("*/trial.json")]
    compute = union_seconds([(r["started"], r["ended"]) for r in records])
    print("timing the same command on the finished study ...", file=sys.stderr)
    _, resume = timed(command)
    print(json.dumps({"trials": len(records), "wall_s": round(wall, 2), "trial_compute_s": round(compute, 2),
                      "overhead_fraction": round(1 - compute / wall, 4),
                      "startup_s": round(min(r["started"] for r in records) - start, 2),
                      "teardown_s": round(start + wall - max(r["ended"] for r in records), 2),
                      "resume_s": round(resume, 2)}))


def timed(command: list[str]) -> tuple[float, float]:
    """(Unix time at the start, wall seconds) of running `command`; exits if it fails."""
    start, clock = time.time(), time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - clock
    if run.returncode != 0:
        sys.exit(f"the study failed:\n{run.stderr[-3000:]}")
    return start, wall


if __name__ == "__main__":
    main()
