"""The search of a study as plain data: which cells, which ranges, how many samples and seeds, which scheduler.

A `SearchPlan` is built from plain values (study.plan.search_plan turns the `factors`, `search`
and `scheduler` sections of a config into one); study/ray_tune.py (the one module that talks to Ray) turns that into Ray Tune trials, a searcher
and a scheduler. `trial_id(params)` names a trial by its parameters, so the same trial has the
same name in every process, in MLflow and across a resume.

A trial's params are its grid cell (with `target` among its factors when `data.target` lists
several targets, see search_spaces.grid.grid_axes), its values of the continuous ranges and `seed`, the
replicate index (0..seeds-1, the training seed): every configuration is trained `seeds` times,
and each replicate is its own trial. For `grid` and `random` the whole trial list is known in
advance: `plan_trials(plan)` computes it here (Ray's variant generator cannot repeat one random
draw for several seeds); Optuna proposes its configurations as results arrive
(study/ray_tune.py, `CellwiseOptunaSearch`) and runs each proposal once per seed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from collections import Counter


SEED_PARAM = "seed"


@dataclass(frozen=True)
class SearchRange:
    """A continuous factor searched within each cell: `loguniform` or `uniform` on [low, high)."""

    kind: str  # loguniform | uniform
    low: float
    high: float


@dataclass(frozen=True)
class SearchPlan:
    algorithm: str  # grid | random | optuna
    cells: list[dict]  # every combination of the categorical factors
    ranges: dict[str, SearchRange]  # continuous factors, searched within each cell
    num_samples: int  # configurations per cell (random and optuna draws; 1 for grid)
    metric: str
    mode: str
    scheduler: str  # fifo | asha
    grace_period: int
    reduction_factor: float
    max_epochs: int
    seed: int  # the study seed (random draws, Optuna's samplers)
    seeds: int = 1  # replicates: every configuration is trained with seed 0..seeds-1

    @property
    def samples_per_cell(self) -> int:
        """Configurations per grid cell: one for grid, `num_samples` draws for random and optuna."""
        return 1 if self.algorithm == "grid" else self.num_samples

    @property
    def total_configurations(self) -> int:
        return len(self.cells) * self.samples_per_cell

    @property
    def total_trials(self) -> int:
        return self.total_configurations * self.seeds

    def trials_per_level(self) -> dict[str, Counter]:
        """For each grid axis with more than one level: how many trials use each level."""
        per_cell = self.samples_per_cell * self.seeds
        counts: dict[str, Counter] = {}
        for name in self.cells[0]:
            levels = Counter(str(cell[name]) for cell in self.cells)
            if len(levels) > 1:
                counts[name] = Counter({level: n * per_cell for level, n in levels.items()})
        return counts


def with_seeds(params: dict, seeds: int) -> list[dict]:
    """One trial per replicate: `params` with `seed` 0..seeds-1, every other value identical."""
    return [{**params, SEED_PARAM: seed} for seed in range(seeds)]


def draw(ranges: dict[str, SearchRange], study_seed: int, cell: int, sample: int) -> dict[str, float]:
    """One random draw of every range, from a generator seeded by (study seed, cell, sample).

    `uniform` is uniform on [low, high); `loguniform` is exp(uniform(log low, log high)). The
    ranges are drawn in the order the schema lists the factors, so a draw depends only on the
    study seed, the cell's index, the sample's index and the ranges themselves.
    """
    rng = np.random.default_rng([int(study_seed) % (1 << 64), cell, sample])
    values = {}
    for name, span in ranges.items():
        if span.kind == "loguniform":
            value = math.exp(rng.uniform(math.log(span.low), math.log(span.high)))
            values[name] = min(max(value, span.low), span.high)  # exp(log x) may round past a bound
        else:
            values[name] = float(rng.uniform(span.low, span.high))
    return values


def plan_trials(plan: SearchPlan) -> list[dict]:
    """Every trial of a grid or random search, in a fixed order: cells x draws x seeds.

    Grid: each cell once per seed. Random: each cell `num_samples` draws of the ranges (`draw`),
    each draw repeated identically for every seed. Optuna proposes its trials as it goes, so it
    has no list in advance (a ValueError).
    """
    if plan.algorithm == "optuna":
        raise ValueError("optuna proposes its trials during the search; there is no list in advance")
    trials: list[dict] = []
    for index, cell in enumerate(plan.cells):
        for sample in range(plan.samples_per_cell):
            values = draw(plan.ranges, plan.seed, index, sample) if plan.algorithm == "random" else {}
            trials += with_seeds({**cell, **values}, plan.seeds)
    return trials


def trial_id(params: dict) -> str:
    """A short stable name for a fine-tune trial: its backbone and a hash of all its parameters.

    The replicate index `seed` is one of the parameters, so every seed is its own trial.
    """
    canonical = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return f"{params.get('backbone', 'trial')}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def zero_shot_id(backbone: str, prompt: str, target: str | None = None) -> str:
    """`zs-<backbone>-<prompt>`, plus `-<target>` in a study of several targets (`data.target` a list)."""
    return f"zs-{backbone}-{prompt}" + (f"-{target}" if target else "")
