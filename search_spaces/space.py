"""The search of a study as plain data: which cells, which ranges, how many samples, which scheduler.

`search_plan(config)` turns the `factors`, `search` and `scheduler` sections into a `SearchPlan`;
study/ray_tune.py (the one module that talks to Ray) turns that into a Ray Tune param space,
searcher and scheduler. `trial_id(params)` names a trial by its parameters, so the same trial has
the same name in every process, in MLflow and across a resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from search_spaces.grid import grid_cells
from study.config import Range, StudyConfig


@dataclass(frozen=True)
class SearchPlan:
    algorithm: str  # grid | random | optuna
    cells: list[dict]  # every combination of the categorical factors
    ranges: dict[str, Range]  # continuous factors, searched within each cell
    num_samples: int  # trials per cell
    metric: str
    mode: str
    scheduler: str  # fifo | asha
    grace_period: int
    reduction_factor: float
    max_epochs: int
    seed: int

    @property
    def total_trials(self) -> int:
        return len(self.cells) * self.num_samples


def search_plan(config: StudyConfig) -> SearchPlan:
    return SearchPlan(
        algorithm=config.search.algorithm,
        cells=grid_cells(config),
        ranges=config.factors.ranges(),
        num_samples=config.search.num_samples,
        metric=config.search.metric,
        mode=config.search.mode,
        scheduler=config.scheduler.kind,
        grace_period=config.scheduler.grace_period,
        reduction_factor=config.scheduler.reduction_factor,
        max_epochs=max(config.factors.epochs),
        seed=config.study.seed,
    )


def trial_id(params: dict) -> str:
    """A short stable name for a fine-tune trial: its backbone and a hash of all its parameters."""
    canonical = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return f"{params.get('backbone', 'trial')}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def zero_shot_id(backbone: str, prompt: str) -> str:
    return f"zs-{backbone}-{prompt}"
