"""Corrective-click curves: Dice after k clicks and the normalised area under the curve.

A study with `evaluation.clicks: N` writes results/per_click.csv: for every evaluation (trial and
prompt) and test image, the Dice of the prediction from the prompt alone (click 0) and after each
of N corrective clicks (`trainables.fine_tune.DecoderFineTune.click_curve`). Here those rows become
per-image metric columns, so every statistic of analysis.statistics (unit-level means, bootstrap
CIs, paired tests) applies to them as to Dice:

- `dice_click_k` (k = 1..N): the image's Dice after k clicks; after 0 clicks it is the image's
  `dice` (per_image.csv), the single-shot score;
- `click_auc`: the normalised area under the image's Dice-against-clicks curve from click 0 to
  N, by the trapezoid rule: (1/N) * sum over k = 1..N of (Dice_{k-1} + Dice_k) / 2. It lies in
  [0, 1], is 1 only for a perfect mask from the first prompt on, and weighs the early clicks as
  much as the late ones; it is linear, so the mean of per-image AUCs is the AUC of the mean curve.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

AUC = "click_auc"
KEY = ["trial_id", "prompt", "image_id"]


def click_metric(k: int) -> str:
    """The per-image column of Dice after k clicks: `dice` for k = 0, else `dice_click_k`."""
    return "dice" if k == 0 else f"dice_click_{k}"


def click_auc(curve: Sequence[float]) -> float:
    """The normalised trapezoid area under a Dice curve over clicks 0..N (NaN with no click)."""
    values = np.asarray(curve, float)
    if len(values) < 2:
        return math.nan
    return float((values[:-1] + values[1:]).sum() / 2 / (len(values) - 1))


def clicks_of(per_image: pd.DataFrame) -> int:
    """N, the most clicks recorded: the highest k with a `dice_click_k` column (0 for none)."""
    ks = [int(c.rsplit("_", 1)[1]) for c in per_image.columns if c.startswith("dice_click_")]
    return max(ks, default=0)


def per_image_click_columns(per_click: pd.DataFrame) -> pd.DataFrame:
    """per_click.csv rows as one row per (trial_id, prompt, image_id): `click0` (the Dice at click
    0, to check against per_image.csv), `dice_click_1..N` and `click_auc`. An image with fewer
    rows than the most clicks (a trial evaluated with fewer clicks) gets NaN beyond its last."""
    table = per_click.assign(click=pd.to_numeric(per_click["click"]).astype(int),
                             dice=pd.to_numeric(per_click["dice"], errors="coerce"))
    wide = table.pivot_table(index=KEY, columns="click", values="dice", aggfunc="first")
    wide = wide.reindex(columns=range(int(table["click"].max()) + 1))
    out = pd.DataFrame(index=wide.index)
    out["click0"] = wide[0]
    for k in wide.columns[1:]:
        out[click_metric(k)] = wide[k]
    complete = wide.notna().all(axis=1)
    out[AUC] = [click_auc(row) if ok else math.nan for row, ok in zip(wide.to_numpy(), complete)]
    return out.reset_index()
