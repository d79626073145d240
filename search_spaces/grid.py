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

TARGET_AXIS = "target"


def grid_axes(factors: dict[str, tuple], targets: tuple = ()) -> dict[str, tuple]:
    """The grid axes, name -> levels: `target` first when there are two or more targets, then
    every categorical factor in the order given."""
    return {**({TARGET_AXIS: tuple(targets)} if len(targets) > 1 else {}), **factors}


def grid_cells(axes: dict[str, tuple]) -> list[dict]:
    """Every combination of the axes' levels, in the order the axes and their levels are given."""
    names = list(axes)
    return [dict(zip(names, levels)) for levels in itertools.product(*(axes[n] for n in names))]
