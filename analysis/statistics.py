"""The statistics of the report: subject-level bootstrap CIs, paired Wilcoxon tests, Holm, seed noise.

The primitives take plain arrays and return plain numbers, so each can be checked by hand:

- `bootstrap_mean_ci`: the mean of per-unit values and its percentile-bootstrap confidence
  interval (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13), the interval
  `scipy.stats.bootstrap(method="percentile")` computes, written out in numpy (a report computes
  thousands of them; scipy's general machinery costs 5x the arithmetic) and tested equal to
  scipy's. Given one value per subject it is the cluster
  (subject-level) bootstrap: whole subjects are resampled, so slices of one subject never count
  as independent evidence. Non-finite values are left out and counted.
- `two_level_bootstrap_ci`: the same with replicate seeds, which scipy does not do: resample the
  subjects and, independently, the seeds (each seed's model scores every subject, so seeds and
  subjects are crossed factors: Owen, 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1:386-411).
  Written out here, exactly as its docstring says, from a seeded `np.random.default_rng`.
- `replicate_mean_ci`: chooses between the two (cluster with one seed, two-level with several).
- `paired_wilcoxon`: scipy's Wilcoxon signed-rank test on matched pairs, with two effect sizes:
  the median paired difference and the matched-pairs rank-biserial correlation (Kerby, 2014,
  "The simple difference formula", Comprehensive Psychology 3:11.IT.3.1).
- `holm`: Holm's step-down adjustment of a family of p-values (Holm, 1979, "A simple sequentially
  rejective multiple test procedure", Scand. J. Statist. 6:65-70), by statsmodels' `multipletests`.
- `seed_sd`, `pooled_seed_sd`, `difference_noise_sd`, `within_noise`: the training noise that
  replicate seeds measure, and the rule that flags an effect as within it (NOISE_RULE).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis.results import FINETUNE, UNET, ZERO_SHOT, format_level, search_ranges

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
ZERO_DIFFERENCE = 1e-12
NOISE_MULTIPLE = 2.0
NOISE_RULE = (f"an effect is within training noise when |mean effect| < {NOISE_MULTIPLE:g} x the SD that seed noise "
              f"alone gives the difference of the two sides' seed-averaged means, sigma x sqrt(v_a + v_b), where sigma "
              f"is the pooled seed-to-seed SD of a configuration's mean and v = mean(1/seeds) / configurations for "
              f"each side (sqrt(2 / n_seeds) x sigma for two single configurations with n_seeds seeds each)")


@dataclass(frozen=True)
class MeanCI:
    """A mean over units (subjects or images) with its percentile-bootstrap interval.

    `n` counts the units the mean is over; `n_missing` the units (or values) left out as
    non-finite. With no unit every number is NaN; with one, the interval collapses to its value.
    `method` is `cluster` (units resampled) or `two-level` (units and seeds resampled);
    `seeds` the most replicates a configuration in the mean has.
    """

    mean: float
    low: float
    high: float
    n: int
    n_missing: int = 0
    method: str = "cluster"
    seeds: int = 1


def bootstrap_mean_ci(values, n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0) -> MeanCI:
    """Mean of `values` (one per unit) with a percentile-bootstrap CI: the cluster bootstrap.

    What `scipy.stats.bootstrap((values,), np.mean, method="percentile", vectorized=True)` computes
    with `np.random.default_rng(seed)`, step by step: draw one `(n_resamples, n)` index matrix with
    `rng.integers(0, n, ...)`, take each resample's mean, and read the bounds off the resample
    means' percentiles at `(1 - confidence) / 2` and `(1 + confidence) / 2` (linear
    interpolation); tests/analysis/test_statistics.py checks it against scipy. NaN and infinite
    values are left out of both the mean and the resampling, and counted.
    """
    array = np.asarray(values, dtype=float).ravel()
    finite = array[np.isfinite(array)]
    n, missing = finite.size, array.size - finite.size
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0, missing)
    mean = float(finite.mean())
    if n == 1:
        return MeanCI(mean, mean, mean, 1, missing)
    resampled = _resample_counts(n, n_resamples, seed) @ finite / n  # each resample's mean
    low, high = np.percentile(resampled, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return MeanCI(mean, float(low), float(high), n, missing)


@functools.lru_cache(maxsize=32)
def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each of n units is drawn in each resample of `bootstrap_mean_ci`: the rows of
    `np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))`, counted. The draws depend
    only on (n, n_resamples, seed), and a report asks for thousands of intervals over the same
    units, so they are drawn once (read-only)."""
    counts = _counts(np.random.default_rng(seed).integers(0, n, size=(n_resamples, n)), n)
    counts.setflags(write=False)
    return counts


def _counts(indices: np.ndarray, size: int) -> np.ndarray:
    """How often each of 0..size-1 occurs in each row of `indices` (a (B, m) integer matrix)."""
    counts = np.zeros((indices.shape[0], size))
    np.add.at(counts, (np.arange(indices.shape[0])[:, None], indices), 1.0)
    return counts


def two_level_bootstrap_ci(matrices, n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                           seed: int = 0) -> MeanCI:
    """Mean over configurations of the seed-averaged subject values, with a two-level bootstrap CI.

    `matrices` holds one `(S, K_c)` array per configuration c: the value of subject s (rows, the
    same subjects in every matrix) under seed k of c. The statistic is
    `mean_c( mean_s( mean_k M_c[s, k] ) )`. Each of the `n_resamples` resamples b draws, from
    `rng = np.random.default_rng(seed)` and in this order,
      1. S subjects with replacement: `rng.integers(0, S, size=(n_resamples, S))` (one matrix for
         all resamples, shared by every configuration, so the configurations stay paired);
      2. for each configuration c in turn, K_c of its seeds with replacement:
         `rng.integers(0, K_c, size=(n_resamples, K_c))`, the same seeds for every subject (a seed's
         model is one training run that scores every subject);
    and takes `mean_c` of the mean of `M_c[i, j]` over the drawn subjects i and drawn seeds j.
    The bounds are `np.percentile` of the resample statistics, as in `bootstrap_mean_ci`.
    Every value must be finite (`replicate_mean_ci` leaves out the subjects that are not).
    """
    arrays = [np.asarray(m, dtype=float) for m in matrices]
    if not arrays or arrays[0].shape[0] == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0, method="two-level")
    subjects = arrays[0].shape[0]
    if any(a.ndim != 2 or a.shape[0] != subjects for a in arrays) or not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("two_level_bootstrap_ci needs finite (subjects, seeds) matrices with the same subjects")
    mean = float(np.mean([a.mean() for a in arrays]))
    seeds = max(a.shape[1] for a in arrays)
    if subjects == 1 and seeds == 1:
        return MeanCI(mean, mean, mean, 1, method="two-level", seeds=1)
    rng = np.random.default_rng(seed)
    subject_weights = _counts(rng.integers(0, subjects, size=(n_resamples, subjects)), subjects)
    statistic = np.zeros(n_resamples)
    for array in arrays:
        k = array.shape[1]
        seed_weights = _counts(rng.integers(0, k, size=(n_resamples, k)), k)
        # sum over drawn subjects i and drawn seeds j of M[i, j], as counts x M x counts
        statistic += np.einsum("bs,sk,bk->b", subject_weights, array, seed_weights) / (subjects * k)
    statistic /= len(arrays)
    alpha = 1.0 - confidence
    low, high = np.percentile(statistic, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return MeanCI(mean, float(low), float(high), subjects, method="two-level", seeds=seeds)


def replicate_mean_ci(matrices, n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0) -> MeanCI:
    """Mean over configurations of seed-averaged unit values with its subject-level bootstrap CI.

    `matrices`: one (units x replicates) table per configuration, rows the same units. Units with
    a non-finite value in any replicate are left out (`n_missing`). When every configuration has
    one replicate, the cluster bootstrap (`bootstrap_mean_ci`) of the per-unit mean over
    configurations; otherwise `two_level_bootstrap_ci`.
    """
    arrays = [np.asarray(m, dtype=float) for m in matrices]
    arrays = [a.reshape(-1, 1) if a.ndim == 1 else a for a in arrays if a.size]
    if not arrays:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    complete = np.logical_and.reduce([np.isfinite(a).all(axis=1) for a in arrays])
    missing = int((~complete).sum())
    arrays = [a[complete] for a in arrays]
    if all(a.shape[1] == 1 for a in arrays):
        ci = bootstrap_mean_ci(np.mean([a[:, 0] for a in arrays], axis=0), n_resamples, confidence, seed)
        return MeanCI(ci.mean, ci.low, ci.high, ci.n, missing)
    ci = two_level_bootstrap_ci(arrays, n_resamples, confidence, seed)
    return MeanCI(ci.mean, ci.low, ci.high, ci.n, missing, ci.method, ci.seeds)


def seed_sd(matrix) -> float:
    """Seed-to-seed SD of a configuration's mean: per replicate (column) the mean over the units
    scored by every replicate, then the sample SD (ddof = 1) of those means; NaN with one replicate."""
    array = np.asarray(matrix, dtype=float)
    if array.ndim != 2 or array.shape[1] < 2:
        return math.nan
    array = array[np.isfinite(array).all(axis=1)]
    if array.shape[0] == 0:
        return math.nan
    return float(np.std(array.mean(axis=0), ddof=1))


def pooled_seed_sd(matrices) -> tuple[float, int]:
    """Pooled seed-to-seed SD over configurations: sqrt(sum (K_c - 1) s_c^2 / sum (K_c - 1)) over
    the configurations with K_c >= 2 replicates (s_c their `seed_sd`); returns (SD, degrees of
    freedom sum (K_c - 1)); (NaN, 0) when no configuration has two replicates."""
    total, df = 0.0, 0
    for matrix in matrices:
        array = np.asarray(matrix, dtype=float)
        sd = seed_sd(array)
        if np.isfinite(sd):
            total += (array.shape[1] - 1) * sd ** 2
            df += array.shape[1] - 1
    return (math.sqrt(total / df), df) if df else (math.nan, 0)


def difference_noise_sd(sd: float, seeds_a: list[int], seeds_b: list[int]) -> float:
    """The SD that seed noise alone gives the difference of two sides' means.

    A side is the mean over its c configurations of each one's mean over its K seeds, so its
    variance from seed noise is sd^2 / c^2 x sum(1 / K) = sd^2 x v with v = mean(1 / K) / c; the
    difference of two independent sides has SD sd x sqrt(v_a + v_b) (sd x sqrt(2 / K) for one
    configuration per side with K seeds each).
    """
    if not np.isfinite(sd) or not seeds_a or not seeds_b:
        return math.nan
    v_a = float(np.mean([1.0 / k for k in seeds_a])) / len(seeds_a)
    v_b = float(np.mean([1.0 / k for k in seeds_b])) / len(seeds_b)
    return sd * math.sqrt(v_a + v_b)


def within_noise(effect: float, noise_sd: float) -> bool | None:
    """NOISE_RULE: True when |effect| < NOISE_MULTIPLE x noise_sd; None when either is not finite."""
    if not (np.isfinite(effect) and np.isfinite(noise_sd)):
        return None
    return bool(abs(effect) < NOISE_MULTIPLE * noise_sd)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and are not counted.

    statsmodels' `multipletests(p, method="holm")` on the finite entries. By hand: sort the m
    p-values ascending, multiply the i-th smallest (i = 0..m-1) by (m - i), carry the running
    maximum forward so the adjusted values never decrease, and cap them at 1. Example:
    p = [0.01, 0.04, 0.03] -> sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, 0.04 -> running max
    0.03, 0.06, 0.06 -> in input order [0.03, 0.06, 0.06].
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], method="holm")[1]
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
# Everything below works on a `StudyResults` (analysis.results). The unit of analysis is the
# subject where subjects have several test slices, the image otherwise (`results.unit`); a
# configuration's value for a unit is the mean over its replicate seeds of the unit's value in
# each replicate evaluation. Units pair up by name across configurations.

SUMMARY_METRICS = ("dice", "iou", "miou", "nsd", "hd95", "hd95_mm")
SUBJECT_3D_METRICS = ("dice_3d", "hd95_3d", "hd95_3d_mm", "nsd_3d")
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


def _table(results, metric: str, source: str) -> pd.DataFrame:
    """The unit x evaluation table of `metric`: per-image values averaged per unit, or per_subject.csv's."""
    return results.unit_scores(metric) if source == "unit" else results.subject_scores_3d(metric)


def replicate_matrices(results, configurations: list[str], metric: str = "dice",
                       source: str = "unit") -> list[pd.DataFrame]:
    """Per configuration, its units x replicates table of `metric` (columns: its evaluations in
    seed order; source `unit`: results.unit_scores, `3d`: per_subject.csv). Configurations with no
    evaluation in the table are left out."""
    if _table(results, metric, source).empty:
        return []
    matrices = [results.replicate_scores(key, metric, source) for key in configurations]
    return [matrix for matrix in matrices if matrix.shape[1]]


def unit_values(results, configurations: list[str], metric: str = "dice", source: str = "unit") -> pd.Series:
    """Per unit, the mean over `configurations` of the unit's mean over each one's replicates
    (NaN values skipped); NaN where no configuration scored the unit."""
    matrices = replicate_matrices(results, configurations, metric, source)
    if not matrices:
        return pd.Series(dtype=float)
    return pd.concat([m.mean(axis=1, skipna=True) for m in matrices], axis=1).mean(axis=1, skipna=True)


def configuration_ci(results, configurations: list[str], metric: str = "dice", seed: int = 0,
                     source: str = "unit") -> MeanCI:
    """`replicate_mean_ci` of the configurations' replicate matrices (see replicate_matrices)."""
    return replicate_mean_ci(replicate_matrices(results, configurations, metric, source), seed=seed)


def study_seed_sd(results, metric: str = "dice") -> tuple[float, int]:
    """The pooled seed-to-seed SD of a fine-tuned configuration's mean `metric` (pooled_seed_sd over
    every fine-tuned configuration with two or more seeds) and its degrees of freedom."""
    keys = list(_finetuned(results)["configuration"])
    return pooled_seed_sd(replicate_matrices(results, keys, metric))


def _finetuned(results) -> pd.DataFrame:
    """The fine-tuned configurations (rows of results.configurations)."""
    return results.configurations[results.configurations["stage"] == FINETUNE]


def summary_table(results, seed: int = 0) -> pd.DataFrame:
    """One row per configuration (all its seeds together).

    For each metric of SUMMARY_METRICS, `<metric>_mean/_low/_high`: the mean over units of the
    seed-averaged unit value with its 95% subject-level bootstrap CI (`replicate_mean_ci`: cluster
    with one seed, two-level with several), units with a non-finite value left out. `n` counts the
    units of the Dice mean, `hd95_n` those of HD95; `hd95_missing` counts the non-finite per-image
    HD95 values (older studies left HD95 undefined when one mask was empty), `hd95_penalised` the
    per-image HD95 values that are the penalty (NaN when per_image.csv does not say). `seeds` is the
    number of replicates, `dice_seed_sd` the seed-to-seed SD of the mean Dice (NaN with one seed).
    `val_dice`, `epochs_run` and `seconds` are means over the replicates.
    """
    rows = []
    factors = results.grid_factors + results.searched_factors
    per_image = results.per_image
    by_configuration = per_image["configuration"]
    scores = by_configuration.value_counts()
    hd95_missing = (~np.isfinite(pd.to_numeric(per_image["hd95"], errors="coerce"))).groupby(by_configuration).sum()
    penalised = pd.to_numeric(per_image["hd95_penalised"], errors="coerce").groupby(by_configuration).sum(min_count=1)
    for _, conf in results.configurations.iterrows():
        key = conf["configuration"]
        row = {"label": conf["label"], "configuration": key, "evaluation": ", ".join(conf["evaluations"]),
               "trial_id": ", ".join(conf["trial_ids"]), "stage": conf["stage"], "status": conf["status"],
               "backbone": conf["backbone"], "family": conf["family"], "eval_prompt": conf["eval_prompt"]}
        row.update({f: conf[f] for f in factors if f not in row})
        row.update(seeds=int(conf["seeds"]), unit=results.unit, n_images=int(conf["n_images"]))
        for metric in SUMMARY_METRICS:
            ci = configuration_ci(results, [key], metric, seed)
            row.update({f"{metric}_mean": ci.mean, f"{metric}_low": ci.low, f"{metric}_high": ci.high})
            if metric == "dice":
                row["n"] = ci.n
            if metric == "hd95":
                row["hd95_n"] = ci.n
        row.update(hd95_scores=int(scores.get(key, 0)), hd95_missing=int(hd95_missing.get(key, 0)),
                   hd95_penalised=float(penalised.get(key, math.nan)),
                   dice_seed_sd=seed_sd(replicate_matrices(results, [key], "dice")[0]),
                   val_dice=conf["val_dice"], epochs_run=conf["epochs_run"], seconds=conf["seconds"],
                   image_encoder_params=conf["image_encoder_params"], trainable_params=conf["trainable_params"])
        rows.append(row)
    return pd.DataFrame(rows)


def rank_configurations(results, candidates: pd.DataFrame) -> tuple[list[str], str]:
    """`candidates` (rows of results.configurations), best first, and the rule that ranked them.

    Ranked by validation Dice, the mean over the configuration's seeds (highest first; none last),
    so the test numbers reported for the top ones are not selected on the test set; among equal
    validation Dice a primary evaluation (the prompt its trials' summaries refer to) comes first,
    then the keys in order. When no candidate has a validation Dice, by mean test Dice (over
    units, seeds averaged), and the rule says so.
    """
    if candidates.empty:
        return [], ""
    if candidates["val_dice"].notna().any():
        ranked = candidates.assign(_primary=candidates["primary"].astype(bool)).sort_values(
            ["val_dice", "_primary", "configuration"], ascending=[False, False, True], na_position="last")
        seeds = " (mean over seeds)" if (candidates["seeds"] > 1).any() else ""
        return list(ranked["configuration"]), f"highest validation Dice{seeds}"
    means = pd.Series({key: float(unit_values(results, [key]).mean()) for key in candidates["configuration"]})
    return list(means.sort_values(ascending=False, kind="stable").index), "highest test Dice (no validation Dice recorded)"


def best_configuration(results, candidates: pd.DataFrame) -> tuple[str | None, str]:
    """The best of `candidates` (rows of results.configurations), the first of `rank_configurations`,
    and the rule that chose it; (None, "") when there is no candidate."""
    ranked, rule = rank_configurations(results, candidates)
    return (ranked[0] if ranked else None), rule


def level_configurations(results, factor: str) -> list[tuple]:
    """(level, the keys of the fine-tuned configurations at that level) per level of `factor`, in
    `factor_levels` order."""
    finetuned = _finetuned(results)
    return [(level, list(finetuned.loc[_same(finetuned[factor], level), "configuration"]))
            for level in factor_levels(results, factor)]


def marginal_means(results, factor: str, seed: int = 0, metric: str = "dice") -> pd.DataFrame:
    """Marginal mean of `metric` per level of `factor`, over every other factor.

    For a level: per unit, the mean over the fine-tuned configurations at that level (the cells of
    the other factors) of the unit's seed-averaged value; then the mean over units with its
    subject-level bootstrap CI (`configuration_ci`). `cells` is the number of configurations
    averaged, `seeds` their replicate evaluations, `seed_sd` the pooled seed-to-seed SD of their
    means (NaN with one seed), `cell_means` each configuration's mean (for the plot).
    """
    finetuned = _finetuned(results)
    rows = []
    for level, keys in level_configurations(results, factor):
        ci = configuration_ci(results, keys, metric, seed)
        sd, _ = pooled_seed_sd(replicate_matrices(results, keys, metric))
        rows.append({"factor": factor, "level": format_level(level), "cells": len(keys),
                     "seeds": int(finetuned.loc[finetuned["configuration"].isin(keys), "seeds"].sum()),
                     "unit": results.unit, "n": ci.n, "mean": ci.mean, "low": ci.low, "high": ci.high,
                     "seed_sd": sd, "cell_means": [float(unit_values(results, [k], metric).mean()) for k in keys]})
    return pd.DataFrame(rows)


def cell_means(results, rows: str, columns: str, stage: str = FINETUNE, metric: str = "dice") -> pd.DataFrame:
    """Mean `metric` per (rows level, columns level): per unit the mean over the configurations of
    that cell (over the other factors) of the seed-averaged value, averaged over units; NaN where
    none ran. The table's index and columns are named `rows` and `columns`, their levels in
    `factor_levels` order where that names them all."""
    chosen = results.configurations[results.configurations["stage"] == stage]
    table = {}
    for (r, c), group in chosen.groupby([rows, columns], dropna=False):
        table[(r, c)] = float(unit_values(results, list(group["configuration"]), metric).mean())
    if not table:
        return pd.DataFrame()
    table = pd.Series(table).unstack()

    def ordered(factor: str, present: pd.Index) -> list:
        levels = factor_levels(results, factor) if factor in results.evaluations else []
        return levels if sorted(map(str, levels)) == sorted(map(str, present)) else list(present)

    table = table.reindex(index=ordered(rows, table.index), columns=ordered(columns, table.columns))
    return table.rename_axis(index=rows, columns=columns)


def _noise_clause(test: dict) -> str:
    if not np.isfinite(test.get("noise_sd", math.nan)):
        return ""
    verdict = ("within training noise: the seeds do not separate it from run-to-run variation" if test["within_noise"]
               else "beyond training noise")
    return (f" Mean effect {test['mean_difference']:+.3f} beside a seed SD of {test['seed_sd']:.3f} "
            f"(noise SD of this difference {test['noise_sd']:.3f}): {verdict}.")


#: How a metric is named in a sentence.
METRIC_NAMES = {"dice": "Dice", "click_auc": "click AUC"}


def _sentence(test: dict, factor: str) -> str:
    a, b = level_name(factor, test["level_a"]), level_name(factor, test["level_b"])
    where = test["context"]
    if not np.isfinite(test["p"]):
        return f"{a} vs {b} ({where}): not tested, {test['reason']}." + _noise_clause(test)
    p = f"p = {format_p(test['p_holm'])} after Holm"
    n = f"n = {test['n']} {test['unit']}s"
    metric = METRIC_NAMES.get(test["metric"], test["metric"])
    if test["p_holm"] < ALPHA:
        winner, loser = (a, b) if test["rank_biserial"] > 0 else (b, a)
        return (f"{winner} beats {loser} by {abs(test['median_difference']):.3f} {metric} (median paired "
                f"difference; rank-biserial r = {abs(test['rank_biserial']):.2f}), {p}, {n} "
                f"({where}).") + _noise_clause(test)
    return (f"{a} vs {b}: no significant difference (median paired difference {test['median_difference']:+.3f} "
            f"{metric}, {p}, {n}; {where}).") + _noise_clause(test)


def paired_configurations(results, keys_a: list[str], keys_b: list[str], metric: str = "dice") -> tuple[pd.Series, pd.Series]:
    """The two sides of a paired comparison: per unit the `unit_values` of each side, on the units
    both sides scored (a finite value on both)."""
    a, b = unit_values(results, keys_a, metric), unit_values(results, keys_b, metric)
    a, b = a.align(b)
    both = a.notna() & b.notna()
    return a[both], b[both]


def factor_tests(results, metric: str = "dice") -> pd.DataFrame:
    """Paired Wilcoxon tests of subject-level `metric` between every pair of levels of every grid factor.

    A side's value per unit is `unit_values` over its configurations (each averaged over its
    seeds); the sides are matched unit by unit. Two comparisons per pair:
    - `held at best`: the other grid factors at the setting of the best fine-tuned configuration
      (`best_configuration`); where several configurations share that setting (searched ranges)
      their per-unit mean is used.
    - `pooled`: per unit, the mean over the other factors' cells; only cells (combinations of the
      other grid factors) that ran at both levels are used, so both sides average the same cells.
      A factor with no other grid factor gets only the first comparison (the second is the same).
    Holm's adjustment runs over the whole family (every row with a p-value). Effect sizes are of
    level_a minus level_b. Beside each effect: `seed_sd` (study_seed_sd: the pooled seed SD of a
    configuration's mean), `noise_sd` (difference_noise_sd for the two sides' seeds) and
    `within_noise` (NOISE_RULE); NaN / None with one seed.
    """
    finetuned = _finetuned(results)
    grid = results.grid_factors
    best_key, _ = best_configuration(results, finetuned)
    best = results.configuration(best_key) if best_key else None
    sd, df = study_seed_sd(results, metric)
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
                keys_a = list(at_best.loc[_same(at_best[factor], level_a), "configuration"])
                keys_b = list(at_best.loc[_same(at_best[factor], level_b), "configuration"])
                context = f"{setting} held at the best setting" if others else "no other grid factor"
                context += _averaged(results, keys_a, keys_b)
                rows.append(_test_row(results, factor, "held at best", level_a, level_b, keys_a, keys_b,
                                      context, metric, sd, df))
                if not others:
                    continue  # (b) would repeat (a) exactly; a duplicate test would only inflate Holm
                # (b) pooled over the cells that ran at both levels
                side_a = finetuned[_same(finetuned[factor], level_a)]
                side_b = finetuned[_same(finetuned[factor], level_b)]
                cells_a = {_cell(row, others) for _, row in side_a.iterrows()}
                cells_b = {_cell(row, others) for _, row in side_b.iterrows()}
                common = cells_a & cells_b
                keys_a = [row["configuration"] for _, row in side_a.iterrows() if _cell(row, others) in common]
                keys_b = [row["configuration"] for _, row in side_b.iterrows() if _cell(row, others) in common]
                context = f"averaged over {len(common)} cell(s) of {', '.join(others)}" + _averaged(results, keys_a, keys_b)
                rows.append(_test_row(results, factor, "pooled", level_a, level_b, keys_a, keys_b, context,
                                      metric, sd, df))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = holm(table["p"])
    table["sentence"] = [_sentence(row, row["factor"]) for _, row in table.iterrows()]
    return table


def _averaged(results, keys_a: list[str], keys_b: list[str]) -> str:
    """Words for how many configurations each side's per-unit mean is over, when more than one."""
    if max(len(keys_a), len(keys_b)) <= 1:
        return ""
    searched = f", {', '.join(results.searched_factors)} searched" if results.searched_factors else ""
    return f"; per {results.unit} the mean of {len(keys_a)} vs {len(keys_b)} configurations{searched}"


def _cell(row: pd.Series, others: list[str]) -> tuple:
    return tuple("<none>" if (isinstance(row[o], float) and math.isnan(row[o])) else row[o] for o in others)


def _seeds_of(results, keys: list[str]) -> list[int]:
    seeds = results.configurations.set_index("configuration")["seeds"]
    return [int(seeds[k]) for k in keys]


def _test_row(results, factor, comparison, level_a, level_b, keys_a, keys_b, context, metric, sd, df) -> dict:
    row = {"factor": factor, "metric": metric, "comparison": comparison, "level_a": level_a, "level_b": level_b,
           "configurations_a": len(keys_a), "configurations_b": len(keys_b),
           "seeds_a": sum(_seeds_of(results, keys_a)), "seeds_b": sum(_seeds_of(results, keys_b)),
           "unit": results.unit, "context": context, "seed_sd": sd, "seed_sd_df": df}
    if not keys_a or not keys_b:
        missing = level_name(factor, level_a if not keys_a else level_b)
        row.update(n=0, n_nonzero=0, mean_a=math.nan, mean_b=math.nan, statistic=math.nan, p=math.nan,
                   mean_difference=math.nan, median_difference=math.nan, rank_biserial=math.nan,
                   noise_sd=math.nan, within_noise=None, reason=f"no finished evaluation of {missing} here")
        return row
    a, b = paired_configurations(results, keys_a, keys_b, metric)
    test = paired_wilcoxon(a.to_numpy(), b.to_numpy())
    noise = difference_noise_sd(sd, _seeds_of(results, keys_a), _seeds_of(results, keys_b))
    reason = (f"no test {results.unit} scored by both" if test.n == 0 else
              f"every {results.unit} has the same {METRIC_NAMES.get(metric, metric)} under both")
    row.update(n=test.n, n_nonzero=test.n_nonzero, mean_a=float(a.mean()) if len(a) else math.nan,
               mean_b=float(b.mean()) if len(b) else math.nan, statistic=test.statistic, p=test.p,
               mean_difference=test.mean_difference, median_difference=test.median_difference,
               rank_biserial=test.rank_biserial, noise_sd=noise, within_noise=within_noise(test.mean_difference, noise),
               reason="" if np.isfinite(test.p) else reason)
    return row


HOLDS_UP_RULE = (f"a difference holds up when section 5's paired Wilcoxon test of the two levels is significant "
                 f"after Holm (p < {ALPHA}) and the effect lies beyond training noise (the rule of 'Factor effects "
                 f"beside training noise'); with one seed per configuration the second half cannot be checked")


def factor_verdicts(tests: pd.DataFrame, marginals: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per grid factor: which level wins and whether its lead over the runner-up holds up.

    `marginals` maps each grid factor to its `marginal_means` table, `tests` is `factor_tests`
    (section 5's family). The winner is the level with the highest marginal mean, the runner-up
    the second highest; their test is the `pooled` row of the pair (per unit the mean over the
    other factors' cells, as the marginal means are), or `held at best` where the factor has no
    pooled row (no other grid factor). `holds_up` follows HOLDS_UP_RULE: True when p_holm < ALPHA
    and `within_noise` is False; False when not significant or within noise; None when the pair
    was not tested, or is significant but the noise is not measured (one seed).
    """
    rows = []
    for factor, marginal in marginals.items():
        ranked = marginal.dropna(subset=["mean"]).sort_values("mean", ascending=False, kind="stable")
        if len(ranked) < 2:
            continue
        winner, runner_up = ranked.iloc[0], ranked.iloc[1]
        row = {"factor": factor, "winner": winner["level"], "winner_mean": winner["mean"],
               "winner_low": winner["low"], "winner_high": winner["high"], "winner_cells": winner["cells"],
               "runner_up": runner_up["level"], "runner_up_mean": runner_up["mean"], "runner_up_cells": runner_up["cells"],
               "levels": len(ranked)}
        pair = {winner["level"], runner_up["level"]}
        of_factor = tests[tests["factor"] == factor] if len(tests) else tests
        matching = of_factor[[{format_level(a), format_level(b)} == pair
                              for a, b in zip(of_factor["level_a"], of_factor["level_b"])]] if len(of_factor) else of_factor
        if matching.empty:
            rows.append({**row, "comparison": "", "holds_up": None})
            continue
        chosen = matching[matching["comparison"] == "pooled"]
        test = (chosen if len(chosen) else matching).iloc[0]
        sign = 1.0 if format_level(test["level_a"]) == winner["level"] else -1.0
        significant = bool(np.isfinite(test["p_holm"]) and test["p_holm"] < ALPHA)
        noise = test["within_noise"]
        noise = None if noise is None or (isinstance(noise, float) and math.isnan(noise)) else bool(noise)
        if not np.isfinite(test["p"]):
            holds_up = None
        elif not significant or noise is True:
            holds_up = False
        else:
            holds_up = None if noise is None else True
        rows.append({**row, "comparison": test["comparison"], "n": test["n"], "unit": test["unit"], "p": test["p"],
                     "p_holm": test["p_holm"], "significant": significant,
                     "median_difference": sign * test["median_difference"],
                     "mean_difference": sign * test["mean_difference"], "noise_sd": test["noise_sd"],
                     "within_noise": noise, "holds_up": holds_up})
    return pd.DataFrame(rows)


def zero_shot_change(results, seed: int = 0, metric: str = "dice") -> pd.DataFrame:
    """Zero-shot -> fine-tuned change of subject-level `metric`, per backbone x evaluated prompt.

    For each zero-shot configuration, the fine-tuned side is the best (`best_configuration`)
    fine-tuned configuration of the same backbone scored with the same prompt (and of the same
    `target`, when the study has several). The change per unit
    is the fine-tuned value (averaged over its seeds) minus the zero-shot value, on the units both
    scored: its mean with a subject-level bootstrap CI (two-level over the fine-tuned seeds when it
    has several: the matrix of fine-tuned replicate minus zero-shot value per unit), its median,
    and a paired Wilcoxon test, Holm-adjusted over this table's family of tests.
    """
    finetuned = _finetuned(results)
    rows = []
    zero_shot = results.configurations[results.configurations["stage"] == ZERO_SHOT]
    for _, zs in zero_shot.iterrows():
        candidates = finetuned[(finetuned["backbone"] == zs["backbone"]) & (finetuned["eval_prompt"] == zs["eval_prompt"])]
        region = {}
        if "target" in results.factors and "target" in finetuned:
            candidates = candidates[_same(candidates["target"], zs.get("target"))]
            region = {"target": zs.get("target")}
        zs_values = unit_values(results, [zs["configuration"]], metric)
        row = {**region, "backbone": zs["backbone"], "prompt": zs["eval_prompt"], "zero_shot": zs["label"],
               "zero_shot_mean": float(zs_values.mean()), "finetuned_configurations": len(candidates),
               "unit": results.unit}
        best_key, rule = best_configuration(results, candidates)
        if best_key is None:
            row.update(finetuned="", finetuned_mean=math.nan, seeds=0, n=0, change_mean=math.nan,
                       change_low=math.nan, change_high=math.nan, change_median=math.nan, rank_biserial=math.nan,
                       p=math.nan)
            rows.append(row)
            continue
        a, b = paired_configurations(results, [best_key], [zs["configuration"]], metric)
        replicates = replicate_matrices(results, [best_key], metric)[0].loc[a.index]
        ci = replicate_mean_ci([replicates.sub(b, axis=0)], seed=seed)
        test = paired_wilcoxon(a.to_numpy(), b.to_numpy())
        row.update(finetuned=best_key, finetuned_mean=float(a.mean()), seeds=int(results.configuration(best_key)["seeds"]),
                   selected_by=rule, n=test.n, change_mean=ci.mean, change_low=ci.low, change_high=ci.high,
                   change_median=test.median_difference, rank_biserial=test.rank_biserial, p=test.p)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table["p"])
    return table


def unet_comparison(results, seed: int = 0, metric: str = "dice") -> pd.DataFrame:
    """The best fine-tuned SAM configuration against each U-Net baseline configuration (stage `unet`).

    Per U-Net configuration: the SAM side is the best fine-tuned configuration (`best_configuration`,
    on validation Dice) of the whole study, and, for the box-channel arm (`unet_box`), also the best
    fine-tuned configuration evaluated with the `box` prompt where that is another one (the fair
    comparison: both see the same box); with several targets, each of the same target. On the units
    both scored: the mean per-unit difference SAM minus U-Net (each side averaged over its seeds) with
    a unit-level bootstrap CI (`bootstrap_mean_ci`: units resampled, seeds averaged), the median, a
    paired Wilcoxon test (Holm over this table), and beside them each side's seed-to-seed SD of its
    mean (`seed_sd`) and `noise_sd` = sqrt(sd_sam^2 / seeds_sam + sd_unet^2 / seeds_unet), the SD seed
    noise alone gives the difference, with `within_noise` (NOISE_RULE).
    """
    finetuned = _finetuned(results)
    unets = results.configurations[results.configurations["stage"] == UNET]
    rows = []
    for _, unet in unets.iterrows():
        pool = finetuned
        region = {}
        if "target" in results.factors and "target" in finetuned:
            pool = pool[_same(pool["target"], unet.get("target"))]
            region = {"target": unet.get("target")}
        sides = [best_configuration(results, pool)]
        if unet["backbone"] == "unet_box":
            boxed = best_configuration(results, pool[pool["eval_prompt"] == "box"])
            if boxed[0] is not None and boxed[0] != sides[0][0]:
                sides.append((boxed[0], "highest validation Dice among box-prompted configurations"))
        for sam_key, rule in sides:
            row = {**region, "unet": unet["label"], "unet_configuration": unet["configuration"], "sam": sam_key,
                   "selected_by": rule, "unit": results.unit}
            if sam_key is None:
                row.update(n=0, p=math.nan, sam_mean=math.nan, unet_mean=math.nan, difference_mean=math.nan,
                           difference_low=math.nan, difference_high=math.nan, difference_median=math.nan,
                           rank_biserial=math.nan, noise_sd=math.nan, within_noise=None)
                rows.append(row)
                continue
            a, b = paired_configurations(results, [sam_key], [unet["configuration"]], metric)
            ci = bootstrap_mean_ci((a - b).to_numpy(), seed=seed)
            test = paired_wilcoxon(a.to_numpy(), b.to_numpy())
            sd_sam = seed_sd(replicate_matrices(results, [sam_key], metric)[0])
            sd_unet = seed_sd(replicate_matrices(results, [unet["configuration"]], metric)[0])
            n_sam, n_unet = (int(results.configuration(k)["seeds"]) for k in (sam_key, unet["configuration"]))
            noise = math.sqrt(sd_sam ** 2 / n_sam + sd_unet ** 2 / n_unet)
            row.update(sam_label=results.configuration(sam_key)["label"], sam_seeds=n_sam, unet_seeds=n_unet, n=test.n,
                       sam_mean=float(a.mean()), unet_mean=float(b.mean()), difference_mean=ci.mean,
                       difference_low=ci.low, difference_high=ci.high, difference_median=test.median_difference,
                       rank_biserial=test.rank_biserial, p=test.p, sam_seed_sd=sd_sam, unet_seed_sd=sd_unet,
                       noise_sd=noise, within_noise=within_noise(ci.mean, noise))
            rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table["p"])
    return table


def subject_3d_table(results, seed: int = 0) -> pd.DataFrame:
    """Per configuration, the per-subject 3D metrics of per_subject.csv (empty when it is absent).

    For each metric of SUBJECT_3D_METRICS, `<metric>_mean/_low/_high`: the mean over subjects of
    the seed-averaged subject value (dice_3d, hd95_3d voxels, hd95_3d_mm, nsd_3d) with its
    subject-level bootstrap CI (`replicate_mean_ci`), subjects with a non-finite value left out;
    `n` the subjects of the Dice mean, `hd95_3d_penalised` the subject scores whose HD95 is the
    penalty (NaN when not recorded), `slices` the median number of test slices per subject.
    """
    per_subject = results.per_subject
    if per_subject is None or per_subject.empty:
        return pd.DataFrame()
    by_configuration = per_subject["configuration"]
    scores = by_configuration.value_counts()
    penalised = pd.to_numeric(per_subject["hd95_3d_penalised"], errors="coerce").groupby(by_configuration).sum(
        min_count=1)
    slices = pd.to_numeric(per_subject["slices"], errors="coerce").groupby(by_configuration).median()
    rows = []
    for _, conf in results.configurations.iterrows():
        key = conf["configuration"]
        if key not in scores.index:
            continue
        row = {"label": conf["label"], "configuration": key, "stage": conf["stage"], "seeds": int(conf["seeds"])}
        for metric in SUBJECT_3D_METRICS:
            ci = configuration_ci(results, [key], metric, seed, source="3d")
            row.update({f"{metric}_mean": ci.mean, f"{metric}_low": ci.low, f"{metric}_high": ci.high})
            if metric == "dice_3d":
                row["n"] = ci.n
        row["hd95_3d_penalised"] = float(penalised.get(key, math.nan))
        row["scores"] = int(scores[key])
        row["slices"] = float(slices.get(key, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


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
