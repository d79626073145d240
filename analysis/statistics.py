"""The statistics of the report: bootstrap confidence intervals, paired Wilcoxon tests, Holm.

Every function takes plain arrays and returns plain numbers, so each can be checked by hand:

- `bootstrap_mean_ci`: the mean of per-image values and its percentile-bootstrap confidence
  interval (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13): resample the
  images with replacement `n_resamples` times from a generator seeded with `seed`, take the mean
  of each resample, and read the interval off the resample means' percentiles. Non-finite values
  (an HD95 that is undefined because one of prediction/truth is empty) are left out and counted.
- `paired_wilcoxon`: scipy's Wilcoxon signed-rank test on matched pairs, with two effect sizes:
  the median paired difference and the matched-pairs rank-biserial correlation (Kerby, 2014,
  "The simple difference formula", Comprehensive Psychology 3:11.IT.3.1).
- `holm`: Holm's step-down adjustment of a family of p-values (Holm, 1979, "A simple sequentially
  rejective multiple test procedure", Scand. J. Statist. 6:65-70), written out here because
  statsmodels is not a dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.results import FINETUNE, ZERO_SHOT, format_level, search_ranges

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
ZERO_DIFFERENCE = 1e-12


@dataclass(frozen=True)
class MeanCI:
    """A mean over images with its percentile-bootstrap interval.

    `n` counts the finite values the mean is over; `n_missing` the non-finite values left out.
    With no finite value every number is NaN; with one, the interval collapses to that value.
    """

    mean: float
    low: float
    high: float
    n: int
    n_missing: int = 0


def bootstrap_mean_ci(values, n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0) -> MeanCI:
    """Mean of `values` with a percentile-bootstrap CI (images resampled with replacement).

    The resamples are drawn as one `(n_resamples, n)` index matrix from
    `np.random.default_rng(seed).integers(0, n, ...)`; the bounds are `np.percentile` of the
    resample means at `(1 - confidence) / 2` and `(1 + confidence) / 2` (linear interpolation).
    NaN and infinite values are left out of both the mean and the resampling, and counted.
    """
    array = np.asarray(values, dtype=float).ravel()
    finite = array[np.isfinite(array)]
    n, missing = finite.size, array.size - finite.size
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0, missing)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    resample_means = finite[indices].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(resample_means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return MeanCI(float(finite.mean()), float(low), float(high), n, missing)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and are not counted.

    Sort the m p-values ascending, multiply the i-th smallest (i = 0..m-1) by (m - i), carry the
    running maximum forward so the adjusted values never decrease, and cap them at 1. Example:
    p = [0.01, 0.04, 0.03] -> sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, 0.04 -> running max
    0.03, 0.06, 0.06 -> in input order [0.03, 0.06, 0.06].
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = tested.size
    running_max = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running_max = max(running_max, (m - rank) * p[index])
        adjusted[index] = min(1.0, running_max)
    return adjusted


def rank_biserial(differences) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (Kerby 2014).

    Zero differences are dropped (as scipy's default `zero_method="wilcox"` does); the absolute
    differences that remain are ranked (ties get their average rank); r = (R+ - R-) / (R+ + R-),
    where R+ and R- are the rank sums of the positive and negative differences. r = 1: the first
    sample is larger on every pair; -1: smaller on every pair; NaN when every difference is zero.
    """
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return math.nan
    ranks = stats.rankdata(np.abs(d))
    positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((positive - negative) / (positive + negative))


@dataclass(frozen=True)
class PairedTest:
    """A two-sided Wilcoxon signed-rank test of first minus second, matched pair by pair.

    `n` counts the pairs (both values finite); `n_nonzero` those with a non-zero difference (the
    ones the test ranks). `p` is NaN when no pair differs (nothing to test).
    """

    n: int
    n_nonzero: int
    statistic: float
    p: float
    mean_difference: float
    median_difference: float
    rank_biserial: float


def paired_wilcoxon(first, second) -> PairedTest:
    """Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided, zeros dropped) of first vs second.

    Pairs where either value is non-finite are dropped first. Differences smaller than
    ZERO_DIFFERENCE in magnitude (floating-point noise, e.g. of two equal means summed in a
    different order) count as zero. Effect sizes are of first - second.
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    d[np.abs(d) < ZERO_DIFFERENCE] = 0.0
    n, n_nonzero = int(d.size), int(np.count_nonzero(d))
    if n_nonzero == 0:
        mean_d = float(d.mean()) if n else math.nan
        return PairedTest(n, 0, math.nan, math.nan, mean_d, float(np.median(d)) if n else math.nan, math.nan)
    result = stats.wilcoxon(d)  # the one-sample form on the differences is scipy's paired test
    return PairedTest(n, n_nonzero, float(result.statistic), float(result.pvalue), float(d.mean()),
                      float(np.median(d)), rank_biserial(d))


def format_p(p: float) -> str:
    """A p-value as printed in the report: three decimals, or two significant digits below 0.001."""
    if not np.isfinite(p):
        return "n/a"
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}"


# --- the study's tables ---------------------------------------------------------------------------
# Everything below works on a `StudyResults` (analysis.results): the unit is an evaluation (one
# trial scored with one prompt on the test images), images pair up by image_id.

SUMMARY_METRICS = ("dice", "iou", "miou", "hd95")
ALPHA = 0.05


def _same(series: pd.Series, value) -> pd.Series:
    """series == value, with NaN equal to NaN (a factor left at its default is a level too)."""
    if isinstance(value, float) and math.isnan(value):
        return series.isna()
    return series == value


def factor_levels(results, factor: str) -> list:
    """The levels of `factor` among fine-tuned evaluations, in the order resolved.yaml lists them."""
    finetuned = results.evaluations[results.evaluations["stage"] == FINETUNE]
    present = list(pd.unique(finetuned[factor]))
    declared = (results.config.get("factors") or {}).get(factor)
    declared = declared if isinstance(declared, list) else []
    ordered = [v for v in declared if any(_same(pd.Series([p]), v).iloc[0] for p in present)]
    rest = sorted((p for p in present if not any(_same(pd.Series([d]), p).iloc[0] for d in ordered)),
                  key=lambda v: (isinstance(v, str), format_level(v)))
    return ordered + rest


def level_name(factor: str, value) -> str:
    """How a level reads in a sentence: `adamw`, `lr=0.001`, `swa=True`, `eval_prompt=box`."""
    return value if isinstance(value, str) and factor != "eval_prompt" else f"{factor}={format_level(value)}"


def summary_table(results, seed: int = 0) -> pd.DataFrame:
    """One row per evaluation: mean and 95% percentile-bootstrap CI over images of Dice, IoU, mIoU,
    HD95 (HD95 over the images where it is finite; `hd95_missing` counts the others), plus the
    trial's epochs run, wall time, encoder size and validation Dice. Every CI uses `seed`."""
    rows = []
    factors = results.grid_factors + results.searched_factors
    for _, ev in results.evaluations.iterrows():
        row = {"label": ev["label"], "evaluation": ev["evaluation"], "trial_id": ev["trial_id"],
               "stage": ev["stage"], "status": ev["status"], "backbone": ev["backbone"],
               "family": ev["family"], "eval_prompt": ev["eval_prompt"]}
        row.update({f: ev[f] for f in factors if f not in row})
        row["n_images"] = int(ev["n_images"])
        for metric in SUMMARY_METRICS:
            ci = bootstrap_mean_ci(_column(results, metric, ev["evaluation"]), seed=seed)
            row.update({f"{metric}_mean": ci.mean, f"{metric}_low": ci.low, f"{metric}_high": ci.high})
            if metric == "hd95":
                row.update({"hd95_n": ci.n, "hd95_missing": ci.n_missing})
        row.update({"val_dice": ev["val_dice"], "epochs_run": ev["epochs_run"], "seconds": ev["seconds"],
                    "image_encoder_params": ev["image_encoder_params"]})
        rows.append(row)
    return pd.DataFrame(rows)


def _column(results, metric: str, evaluation: str) -> np.ndarray:
    """The per-image values of one evaluation, NaN included (scored images only)."""
    rows = results.per_image[results.per_image["evaluation"] == evaluation]
    return rows[metric].to_numpy(dtype=float)


def best_evaluation(results, candidates: pd.DataFrame) -> tuple[str | None, str]:
    """The best of `candidates` (rows of results.evaluations) and the rule that chose it.

    Chosen by validation Dice (highest first), so the test numbers reported for it are not
    selected on the test set; among equal validation Dice a trial's primary evaluation (the prompt
    its summary refers to) wins, then the first key. When no candidate has a validation Dice, the
    highest mean test Dice is used, and the rule says so.
    """
    if candidates.empty:
        return None, ""
    if candidates["val_dice"].notna().any():
        ranked = candidates.assign(_primary=candidates["primary"].astype(bool)).sort_values(
            ["val_dice", "_primary", "evaluation"], ascending=[False, False, True], na_position="last")
        return ranked["evaluation"].iloc[0], "highest validation Dice"
    means = results.scores("dice")[list(candidates["evaluation"])].mean()
    return means.sort_values(ascending=False, kind="stable").index[0], "highest test Dice (no validation Dice recorded)"


def _finetuned(results) -> pd.DataFrame:
    return results.evaluations[results.evaluations["stage"] == FINETUNE]


def per_image_mean(results, evaluations: list[str], metric: str = "dice") -> pd.Series:
    """Per image, the mean of `metric` over the given evaluations (NaN values skipped)."""
    return results.scores(metric)[list(evaluations)].mean(axis=1, skipna=True)


def marginal_means(results, factor: str, seed: int = 0, metric: str = "dice") -> pd.DataFrame:
    """Marginal mean of `metric` per level of `factor`, over every other factor.

    For a level: per image, the mean over all fine-tuned evaluations at that level (the cells of
    the other factors); then the mean over images with its bootstrap CI over images. `cells` is
    the number of evaluations averaged; `cell_means` their individual means (for the plot).
    """
    finetuned = _finetuned(results)
    rows = []
    for level in factor_levels(results, factor):
        keys = list(finetuned.loc[_same(finetuned[factor], level), "evaluation"])
        ci = bootstrap_mean_ci(per_image_mean(results, keys, metric), seed=seed)
        rows.append({"factor": factor, "level": format_level(level), "cells": len(keys), "n_images": ci.n,
                     "mean": ci.mean, "low": ci.low, "high": ci.high,
                     "cell_means": [float(results.scores(metric)[k].mean()) for k in keys]})
    return pd.DataFrame(rows)


def cell_means(results, rows: str, columns: str, stage: str = FINETUNE, metric: str = "dice") -> pd.DataFrame:
    """Mean `metric` per (rows level, columns level), each cell the per-image mean over the
    evaluations of that cell (over the other factors) averaged over images; NaN where none ran."""
    chosen = results.evaluations[results.evaluations["stage"] == stage]
    table = {}
    for (r, c), group in chosen.groupby([rows, columns], dropna=False):
        table[(r, c)] = float(per_image_mean(results, list(group["evaluation"]), metric).mean())
    if not table:
        return pd.DataFrame()
    series = pd.Series(table)
    return series.unstack()


def _sentence(test: dict, factor: str) -> str:
    a, b = level_name(factor, test["level_a"]), level_name(factor, test["level_b"])
    where = test["context"]
    if not np.isfinite(test["p"]):
        return f"{a} vs {b} ({where}): not tested, {test['reason']}."
    p = f"p = {format_p(test['p_holm'])} after Holm"
    if test["p_holm"] < ALPHA:
        winner, loser = (a, b) if test["rank_biserial"] > 0 else (b, a)
        return (f"{winner} beats {loser} by {abs(test['median_difference']):.3f} Dice (median paired "
                f"difference; rank-biserial r = {abs(test['rank_biserial']):.2f}), {p}, n = {test['n']} images "
                f"({where}).")
    return (f"{a} vs {b}: no significant difference (median paired difference {test['median_difference']:+.3f} "
            f"Dice, {p}, n = {test['n']} images; {where}).")


def _paired(results, keys_a: list[str], keys_b: list[str], metric: str = "dice") -> tuple[PairedTest, str]:
    a, b = per_image_mean(results, keys_a, metric), per_image_mean(results, keys_b, metric)
    both = a.notna() & b.notna()
    test = paired_wilcoxon(a[both].to_numpy(), b[both].to_numpy())
    reason = "no test image scored by both" if test.n == 0 else "every image has the same Dice under both"
    return test, reason


def factor_tests(results, metric: str = "dice") -> pd.DataFrame:
    """Paired Wilcoxon tests of per-image `metric` between every pair of levels of every grid factor.

    Two comparisons per pair, matched image by image:
    - `held at best`: the other grid factors at the setting of the best fine-tuned evaluation
      (`best_evaluation`); where several evaluations share that setting (repeats, searched
      ranges) their per-image mean is used.
    - `pooled`: per image, the mean over the other factors' cells; only cells (combinations of
      the other grid factors) that ran at both levels are used, so both sides average the same cells.
      A factor with no other grid factor gets only the first comparison (the second is the same).
    Holm's adjustment runs over the whole family (every row with a p-value). Effect sizes are of
    level_a minus level_b.
    """
    finetuned = _finetuned(results)
    grid = results.grid_factors
    best_key, _ = best_evaluation(results, finetuned)
    best = results.evaluation(best_key) if best_key else None
    rows = []
    for factor in grid:
        others = [f for f in grid if f != factor]
        levels = factor_levels(results, factor)
        at_best = finetuned
        for other in others:
            at_best = at_best[_same(at_best[other], best[other])]
        setting = ", ".join(f"{o}={format_level(best[o])}" for o in others)
        for i, level_a in enumerate(levels):
            for level_b in levels[i + 1:]:
                # (a) the other factors held at the best setting
                keys_a = list(at_best.loc[_same(at_best[factor], level_a), "evaluation"])
                keys_b = list(at_best.loc[_same(at_best[factor], level_b), "evaluation"])
                context = f"{setting} held at the best setting" if others else "no other grid factor"
                context += _averaged(results, keys_a, keys_b)
                rows.append(_test_row(results, factor, "held at best", level_a, level_b, keys_a, keys_b,
                                      context, metric))
                if not others:
                    continue  # (b) would repeat (a) exactly; a duplicate test would only inflate Holm
                # (b) pooled over the cells that ran at both levels
                side_a = finetuned[_same(finetuned[factor], level_a)]
                side_b = finetuned[_same(finetuned[factor], level_b)]
                cells_a = {_cell(row, others) for _, row in side_a.iterrows()}
                cells_b = {_cell(row, others) for _, row in side_b.iterrows()}
                common = cells_a & cells_b
                keys_a = [row["evaluation"] for _, row in side_a.iterrows() if _cell(row, others) in common]
                keys_b = [row["evaluation"] for _, row in side_b.iterrows() if _cell(row, others) in common]
                context = f"averaged over {len(common)} cell(s) of {', '.join(others)}" + _averaged(results, keys_a, keys_b)
                rows.append(_test_row(results, factor, "pooled", level_a, level_b, keys_a, keys_b, context, metric))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = holm(table["p"])
    table["sentence"] = [_sentence(row, row["factor"]) for _, row in table.iterrows()]
    return table


def _averaged(results, keys_a: list[str], keys_b: list[str]) -> str:
    """Words for how many evaluations each side's per-image mean is over, when more than one."""
    if max(len(keys_a), len(keys_b)) <= 1:
        return ""
    searched = f", {', '.join(results.searched_factors)} searched" if results.searched_factors else ""
    return f"; per image the mean of {len(keys_a)} vs {len(keys_b)} evaluations{searched}"


def _cell(row: pd.Series, others: list[str]) -> tuple:
    return tuple("<none>" if (isinstance(row[o], float) and math.isnan(row[o])) else row[o] for o in others)


def _test_row(results, factor, comparison, level_a, level_b, keys_a, keys_b, context, metric) -> dict:
    row = {"factor": factor, "comparison": comparison, "level_a": level_a, "level_b": level_b,
           "evaluations_a": len(keys_a), "evaluations_b": len(keys_b), "context": context}
    if not keys_a or not keys_b:
        missing = level_name(factor, level_a if not keys_a else level_b)
        row.update(n=0, n_nonzero=0, mean_a=math.nan, mean_b=math.nan, statistic=math.nan, p=math.nan,
                   mean_difference=math.nan, median_difference=math.nan, rank_biserial=math.nan,
                   reason=f"no finished evaluation of {missing} here")
        return row
    test, reason = _paired(results, keys_a, keys_b, metric)
    a, b = per_image_mean(results, keys_a, metric), per_image_mean(results, keys_b, metric)
    both = a.notna() & b.notna()
    row.update(n=test.n, n_nonzero=test.n_nonzero, mean_a=float(a[both].mean()), mean_b=float(b[both].mean()),
               statistic=test.statistic, p=test.p, mean_difference=test.mean_difference,
               median_difference=test.median_difference, rank_biserial=test.rank_biserial,
               reason="" if np.isfinite(test.p) else reason)
    return row


def zero_shot_change(results, seed: int = 0, metric: str = "dice") -> pd.DataFrame:
    """Zero-shot -> fine-tuned change of per-image `metric`, per backbone x evaluated prompt.

    For each zero-shot evaluation, the fine-tuned side is the best (`best_evaluation`) fine-tuned
    evaluation of the same backbone scored with the same prompt. The change is fine-tuned minus
    zero-shot on the images both scored: its mean with a bootstrap CI, its median, and a paired
    Wilcoxon test, Holm-adjusted over this table's family of tests.
    """
    finetuned = _finetuned(results)
    rows = []
    zero_shot = results.evaluations[results.evaluations["stage"] == ZERO_SHOT]
    for _, zs in zero_shot.iterrows():
        candidates = finetuned[(finetuned["backbone"] == zs["backbone"]) & (finetuned["eval_prompt"] == zs["eval_prompt"])]
        row = {"backbone": zs["backbone"], "prompt": zs["eval_prompt"], "zero_shot": zs["label"],
               "zero_shot_mean": float(results.scores(metric)[zs["evaluation"]].mean()),
               "finetuned_evaluations": len(candidates)}
        best_key, rule = best_evaluation(results, candidates)
        if best_key is None:
            row.update(finetuned="", finetuned_mean=math.nan, n=0, change_mean=math.nan, change_low=math.nan,
                       change_high=math.nan, change_median=math.nan, rank_biserial=math.nan, p=math.nan)
            rows.append(row)
            continue
        a, b = results.scores(metric)[best_key], results.scores(metric)[zs["evaluation"]]
        both = a.notna() & b.notna()
        change = (a - b)[both]
        ci = bootstrap_mean_ci(change, seed=seed)
        test = paired_wilcoxon(a[both].to_numpy(), b[both].to_numpy())
        row.update(finetuned=results.evaluation(best_key)["label"], finetuned_mean=float(a[both].mean()),
                   selected_by=rule, n=test.n, change_mean=ci.mean, change_low=ci.low, change_high=ci.high,
                   change_median=test.median_difference, rank_biserial=test.rank_biserial, p=test.p)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table["p"])
    return table


# --- hyperparameter importance --------------------------------------------------------------------


def _python_value(value):
    """numpy scalars to plain Python values (optuna's distributions take only those)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def objective_values(results, metric: str, mode: str) -> pd.Series:
    """Per fine-tuned trial, the search objective: the trials.csv column when it has one, else the
    best (by `mode`) value of the per-epoch history."""
    trials = results.trials[results.trials["stage"] == FINETUNE].set_index("trial_id")
    if metric in trials.columns and pd.to_numeric(trials[metric], errors="coerce").notna().any():
        return pd.to_numeric(trials[metric], errors="coerce")
    if results.history.empty or metric not in results.history:
        return pd.Series(np.nan, index=trials.index)
    grouped = results.history.groupby("trial_id")[metric]
    return (grouped.max() if mode == "max" else grouped.min()).reindex(trials.index)


def hyperparameter_importance(results, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """fANOVA importance of the searched factors for the search objective (optuna's evaluator).

    Builds an optuna study from the fine-tuned trials that finished (status TERMINATED) with a
    finite objective (`search.metric`, default val_dice): each factor that varies becomes a
    parameter, a `FloatDistribution` over its resolved.yaml range (log for loguniform) or a
    `CategoricalDistribution` over its levels. Returns (importances with columns parameter and
    importance, the trial table used, the objective's name); an empty table when there are fewer
    than 3 such trials or nothing varies.
    """
    import optuna

    search = results.config.get("search") or {}
    metric, mode = search.get("metric", "val_dice"), search.get("mode", "max")
    objective = objective_values(results, metric, mode)
    trials = results.trials[(results.trials["stage"] == FINETUNE) & (results.trials["status"] == "TERMINATED")]
    trials = trials.assign(objective=trials["trial_id"].map(objective)).dropna(subset=["objective"])
    ranges = search_ranges(results.config)
    parameters = [f for f in results.factors if f in ranges or trials[f].nunique(dropna=False) > 1]
    parameters = [f for f in parameters if trials[f].nunique() > 1]
    used = trials[["trial_id", *parameters, "objective"]].reset_index(drop=True)
    if len(trials) < 3 or not parameters:
        return pd.DataFrame(columns=["parameter", "importance"]), used, metric
    distributions = {}
    for name in parameters:
        if name in ranges:
            kind, low, high = ranges[name]
            values = pd.to_numeric(trials[name])
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            distributions[name] = optuna.distributions.FloatDistribution(low, high, log=kind == "loguniform")
        else:
            levels = sorted({_python_value(v) for v in trials[name].dropna()}, key=str)
            distributions[name] = optuna.distributions.CategoricalDistribution(levels)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in trials.iterrows():
        if any(pd.isna(row[name]) for name in parameters):
            continue
        params = {name: (float(row[name]) if name in ranges else _python_value(row[name])) for name in parameters}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row["objective"])))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    table = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    return table, used, metric
