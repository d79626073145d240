"""Grid cells: the categorical factors of `grid.yaml` crossed into the trials of a study.

The axes are `factors`' categorical factors and, when `data.target` lists several targets,
`target` (first, so a study's trials run target by target); with one target there is no
`target` axis, so trial ids do not change.

Every algorithm keeps the categorical factors a full factorial grid, so that paired comparisons
between the levels of a factor stay balanced. A cell holds one configuration for `grid` and
`search.num_samples` draws of the continuous ranges for `random` and `optuna`; every
configuration is trained `search.seeds` times (training seeds 0..seeds-1), each its own trial.
"""

from __future__ import annotations

import itertools
from collections import Counter

from study.config import StudyConfig


TARGET_AXIS = "target"


def study_axes(config: StudyConfig) -> dict[str, tuple]:
    """The grid axes, name -> levels: `target` when data.target is a list, then every categorical factor."""
    axes = {TARGET_AXIS: config.data.targets()} if config.data.multi_target else {}
    return {**axes, **config.factors.categorical_axes()}


def grid_cells(config: StudyConfig) -> list[dict]:
    """Every combination of the axes' levels (`study_axes`), in the order the YAML lists them."""
    axes = study_axes(config)
    names = list(axes)
    return [dict(zip(names, levels)) for levels in itertools.product(*(axes[n] for n in names))]


def count_configurations(config: StudyConfig) -> int:
    """Configurations in the study: grid cells, times `search.num_samples` for random and optuna."""
    cells = 1
    for levels in study_axes(config).values():
        cells *= len(levels)
    return cells * (1 if config.search.algorithm == "grid" else config.search.num_samples)


def count_trials(config: StudyConfig) -> int:
    """Trials in the study: every configuration once per seed (`search.seeds`)."""
    return count_configurations(config) * config.search.seeds


def trials_per_level(config: StudyConfig) -> dict[str, Counter]:
    """For each factor with more than one level: how many trials use each level."""
    total = count_trials(config)
    return {
        name: Counter({str(level): total // len(levels) for level in levels})
        for name, levels in study_axes(config).items()
        if len(levels) > 1
    }
