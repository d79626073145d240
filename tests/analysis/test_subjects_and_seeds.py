"""Subject-level statistics and replicate seeds, against hand computations on the raw CSVs.

Every expected number here is computed in the test from results/per_image.csv (or
per_subject.csv) with pandas and numpy, independently of analysis.statistics.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis.results import load_from_mlflow, load_study
from analysis.statistics import (BOOTSTRAP_RESAMPLES, bootstrap_mean_ci, factor_tests, replicate_mean_ci,
                                 subject_3d_table, summary_table, two_level_bootstrap_ci, zero_shot_change)
from tests.analysis.conftest import SEEDS, SUBJECT_SLICES, log_to_mlflow, seeded_images

TAIL = 2.5  # percent in each tail of a 95% interval


@pytest.fixture(scope="module")
def seeded(seeded_study_dir):
    return load_study(seeded_study_dir)


@pytest.fixture(scope="module")
def per_image(seeded_study_dir) -> pd.DataFrame:
    return pd.read_csv(seeded_study_dir / "results" / "per_image.csv")


def subject_means(per_image: pd.DataFrame, trial_ids, metric: str = "dice") -> pd.DataFrame:
    """By hand: subject x seed table of the mean of `metric` over each subject's slices in each trial."""
    rows = per_image[per_image["trial_id"].isin(trial_ids)]
    return rows.groupby(["subject", "trial_id"])[metric].mean().unstack("trial_id")[list(trial_ids)]


def hand_cluster_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    return tuple(np.percentile(values[indices].mean(axis=1), [TAIL, 100 - TAIL]))


def hand_two_level_ci(matrices: list[np.ndarray], seed: int = 0) -> tuple[float, float]:
    """Resample by resample, as two_level_bootstrap_ci's docstring says: subjects once, then each
    configuration's seeds; the mean over drawn subjects of the mean over drawn seeds."""
    rng = np.random.default_rng(seed)
    subjects = matrices[0].shape[0]
    drawn_subjects = rng.integers(0, subjects, size=(BOOTSTRAP_RESAMPLES, subjects))
    drawn_seeds = [rng.integers(0, m.shape[1], size=(BOOTSTRAP_RESAMPLES, m.shape[1])) for m in matrices]
    statistic = []
    for b in range(BOOTSTRAP_RESAMPLES):
        per_configuration = [m[np.ix_(drawn_subjects[b], seeds[b])].mean() for m, seeds in zip(matrices, drawn_seeds)]
        statistic.append(np.mean(per_configuration))
    return tuple(np.percentile(statistic, [TAIL, 100 - TAIL]))


def test_the_unit_is_the_subject_and_seeds_make_configurations(seeded):
    assert seeded.unit == "subject" and seeded.units == len(SUBJECT_SLICES)
    finetuned = seeded.configurations[seeded.configurations["stage"] == "finetune"].set_index("configuration")
    assert len(finetuned) == 4 and (finetuned["seeds"] == len(SEEDS)).all()
    assert finetuned.loc["sam_b · box", "trial_ids"] == ["ft_sam_b_box_s0", "ft_sam_b_box_s1"]
    assert "seed" not in seeded.factors and seeded.grid_factors == ["backbone", "prompt"]
    assert seeded.seeds == len(SEEDS)


def test_cluster_bootstrap_equals_a_hand_computation(seeded, per_image):
    """One seed (a zero-shot configuration): resample subjects, the statistic the mean of subject means."""
    values = subject_means(per_image, ["zs-sam_b-box"])["zs-sam_b-box"].to_numpy()
    assert len(values) == len(SUBJECT_SLICES)
    low, high = hand_cluster_ci(values, seed=0)
    row = summary_table(seeded, seed=0).set_index("configuration").loc["zero-shot · sam_b · box"]
    assert row["n"] == len(SUBJECT_SLICES) and row["seeds"] == 1
    assert row["dice_mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert (row["dice_low"], row["dice_high"]) == pytest.approx((low, high), abs=1e-12)
    ci = bootstrap_mean_ci(values, seed=3)
    assert (ci.low, ci.high) == pytest.approx(hand_cluster_ci(values, seed=3), abs=1e-12)
    # the image-level interval (slices as if independent) is not what the report prints
    slices = per_image.loc[per_image["trial_id"] == "zs-sam_b-box", "dice"].to_numpy()
    assert (row["dice_low"], row["dice_high"]) != pytest.approx(hand_cluster_ci(slices), abs=1e-6)


def test_two_level_bootstrap_equals_a_hand_computation(seeded, per_image):
    trials = ["ft_sam_b_center_point_s0", "ft_sam_b_center_point_s1"]
    matrix = subject_means(per_image, trials).to_numpy()  # subjects x seeds, seeds in order
    low, high = hand_two_level_ci([matrix], seed=0)
    row = summary_table(seeded, seed=0).set_index("configuration").loc["sam_b · center_point"]
    assert row["seeds"] == 2 and row["n"] == len(SUBJECT_SLICES)
    assert row["dice_mean"] == pytest.approx(matrix.mean(axis=1).mean(), abs=1e-12)
    assert (row["dice_low"], row["dice_high"]) == pytest.approx((low, high), abs=1e-12)
    seed_means = matrix.mean(axis=0)
    assert row["dice_seed_sd"] == pytest.approx(np.std(seed_means, ddof=1), abs=1e-12)


def test_two_level_bootstrap_of_several_configurations_with_unequal_seeds():
    rng = np.random.default_rng(9)
    matrices = [rng.uniform(0.5, 0.9, size=(11, 2)), rng.uniform(0.5, 0.9, size=(11, 3))]
    ci = two_level_bootstrap_ci(matrices, seed=5)
    assert (ci.low, ci.high) == pytest.approx(hand_two_level_ci(matrices, seed=5), abs=1e-12)
    assert ci.mean == pytest.approx(np.mean([m.mean() for m in matrices]))
    assert (ci.n, ci.seeds, ci.method) == (11, 3, "two-level")
    # a subject missing in one replicate is left out of every configuration, and counted
    holed = [matrices[0].copy(), matrices[1]]
    holed[0][4, 1] = np.nan
    left = replicate_mean_ci(holed, seed=5)
    keep = np.arange(11) != 4
    assert left.n == 10 and left.n_missing == 1
    assert (left.low, left.high) == pytest.approx(hand_two_level_ci([m[keep] for m in matrices], seed=5), abs=1e-12)
    # one replicate everywhere: the cluster bootstrap of the per-subject mean over configurations
    single = replicate_mean_ci([m[:, :1] for m in matrices], seed=5)
    per_subject = (matrices[0][:, 0] + matrices[1][:, 0]) / 2
    assert single.method == "cluster"
    assert (single.low, single.high) == pytest.approx(hand_cluster_ci(per_subject, seed=5), abs=1e-12)


def test_paired_test_is_wilcoxon_on_seed_averaged_subject_values(seeded, per_image, seeded_study_dir):
    trials = pd.read_csv(seeded_study_dir / "results" / "trials.csv")[["trial_id", "backbone"]]
    finetuned = per_image[per_image["stage"] == "finetune"].merge(trials, on="trial_id")
    # by hand: mean over slices per (trial, subject), then over the seeds per (configuration, subject)
    per_trial = finetuned.groupby(["backbone", "prompt", "seed", "subject"])["dice"].mean()
    per_configuration = per_trial.groupby(["backbone", "prompt", "subject"]).mean()
    tests = factor_tests(seeded).set_index(["factor", "comparison"])
    # held at best (sam_b · box has the highest mean val Dice): backbone at prompt=box
    a, b = per_configuration.loc[("sam_b", "box")], per_configuration.loc[("litemedsam", "box")]
    row = tests.loc[("backbone", "held at best")]
    assert row["p"] == stats.wilcoxon(a, b).pvalue
    assert row["n"] == len(SUBJECT_SLICES) and row["unit"] == "subject"
    assert row["median_difference"] == pytest.approx(np.median(a - b))
    assert row["mean_difference"] == pytest.approx((a - b).mean())
    # pooled: per subject the mean over the prompt cells
    pooled_a = per_configuration.loc["sam_b"].groupby("subject").mean()
    pooled_b = per_configuration.loc["litemedsam"].groupby("subject").mean()
    row = tests.loc[("backbone", "pooled")]
    assert row["p"] == stats.wilcoxon(pooled_a, pooled_b).pvalue
    assert row["mean_a"] == pytest.approx(pooled_a.mean()) and row["mean_b"] == pytest.approx(pooled_b.mean())
    np.testing.assert_allclose(tests["p_holm"], multipletests(tests["p"], method="holm")[1])
    # Holm by hand over the 4 tests: the smallest p times 4, then the running maximum
    p = np.sort(tests["p"].to_numpy())
    assert tests["p_holm"].min() == pytest.approx(min(1.0, 4 * p[0]))


def hand_seed_sd(per_image: pd.DataFrame) -> float:
    """Pooled seed SD: per fine-tuned trial the mean over subjects of subject means, the variance over
    a configuration's seeds, pooled (every configuration has the same seeds: the mean variance)."""
    finetuned = per_image[per_image["stage"] == "finetune"]
    subject_level = finetuned.groupby(["trial_id", "subject"])["dice"].mean()
    trial_means = subject_level.groupby("trial_id").mean()
    configuration = trial_means.index.str.replace(r"_s\d+$", "", regex=True)
    return float(np.sqrt(trial_means.groupby(configuration).var(ddof=1).mean()))


def test_every_effect_stands_beside_the_seed_noise(seeded, per_image):
    sd = hand_seed_sd(per_image)
    tests = factor_tests(seeded).set_index(["factor", "comparison"])
    np.testing.assert_allclose(tests["seed_sd"], sd)
    held, pooled = tests.loc[("backbone", "held at best")], tests.loc[("backbone", "pooled")]
    assert held["noise_sd"] == pytest.approx(sd * np.sqrt(2 / 2))            # one configuration, 2 seeds a side
    assert pooled["noise_sd"] == pytest.approx(sd * np.sqrt(2 / (2 * 2)))    # two configurations, 2 seeds each
    # backbone: 0.08 Dice, far beyond 2 x the noise SD; prompt: 0.005 Dice by construction, within it
    assert [bool(v) for v in tests["within_noise"]] == [False, False, True, True]
    for (factor, comparison), row in tests.iterrows():
        assert bool(row["within_noise"]) == (abs(row["mean_difference"]) < 2 * row["noise_sd"])
    assert list(tests.index) == [("backbone", "held at best"), ("backbone", "pooled"), ("prompt", "held at best"),
                                 ("prompt", "pooled")]


def test_the_report_states_the_unit_the_seed_sd_and_the_noise_flag(seeded_report, per_image):
    markdown = (seeded_report / "report.md").read_text(encoding="utf-8")
    assert "Unit of analysis: the subject (n = 8 subjects)" in markdown
    assert "unit of analysis: the subject, n = 8 subjects" in markdown
    assert "n = 8 subjects (prompt=box held at the best setting)" in markdown
    sd = hand_seed_sd(per_image)
    assert f"pooled over the fine-tuned configurations, is {sd:.3f} (4 degrees of freedom)" in markdown
    assert "search.seeds = 2" in markdown
    effects = pd.read_csv(seeded_report / "tables" / "factor_effects.csv")
    assert len(effects) == 4
    rows = [line for line in markdown.splitlines() if line.startswith("| prompt | held at best |")]
    assert rows and all(f"| {sd:.3f} |" in line and "within training noise" in line for line in rows)
    assert "| backbone | held at best | sam_b | litemedsam | 2 / 2 |" in markdown
    assert "beyond training noise" in markdown
    assert "cannot measure" not in markdown  # the one-seed sentence is for one-seed studies only
    # the protocol, with resolved.yaml's values
    assert "evaluation.single_point_multimask: true" in markdown and "highest predicted IoU" in markdown
    assert "tolerance of 2.0 (evaluation.nsd_tolerance_mm)" in markdown
    assert "evaluation.hd95_penalty: diagonal" in markdown
    assert f"{int(per_image['hd95_penalised'].sum())} of {len(per_image)} per-image scores are this penalty" in markdown
    assert "min_area filters training and validation slices only" in markdown
    assert "seeded by (study seed 0, image, prompt)" in markdown
    assert "two-level bootstrap" in markdown and "statsmodels multipletests" in markdown


def test_the_one_seed_report_says_what_it_cannot_measure(built_report):
    markdown = (built_report / "report.md").read_text(encoding="utf-8")
    assert "Unit of analysis: the image (n = 8 images)" in markdown
    assert ("Each configuration was trained once (one seed), so every effect in this report includes training "
            "noise") in markdown
    assert "that this study cannot measure" in markdown and "`search.seeds: N` in grid.yaml" in markdown
    assert "not measured (one seed)" in markdown


def test_summary_has_nsd_and_penalised_hd95(seeded, per_image):
    summary = summary_table(seeded).set_index("configuration")
    trials = ["ft_litemedsam_center_point_s0", "ft_litemedsam_center_point_s1"]
    row = summary.loc["litemedsam · center_point"]
    nsd = subject_means(per_image, trials, "nsd").mean(axis=1)
    hd95 = subject_means(per_image, trials, "hd95_mm").mean(axis=1)
    assert row["nsd_mean"] == pytest.approx(nsd.mean()) and row["hd95_mm_mean"] == pytest.approx(hd95.mean())
    assert row["hd95_penalised"] == 1 and row["hd95_scores"] == 2 * len(seeded_images())
    assert summary.loc["sam_b · box", "hd95_penalised"] == 0


def test_zero_shot_change_averages_the_fine_tuned_seeds(seeded, per_image):
    change = zero_shot_change(seeded, seed=0).set_index(["backbone", "prompt"])
    row = change.loc[("sam_b", "box")]
    finetuned = subject_means(per_image, ["ft_sam_b_box_s0", "ft_sam_b_box_s1"])
    zero_shot = subject_means(per_image, ["zs-sam_b-box"])["zs-sam_b-box"]
    difference = finetuned.mean(axis=1) - zero_shot
    assert row["seeds"] == 2 and row["n"] == len(SUBJECT_SLICES)
    assert row["change_mean"] == pytest.approx(difference.mean())
    assert row["p"] == stats.wilcoxon(finetuned.mean(axis=1), zero_shot).pvalue
    matrix = finetuned.sub(zero_shot, axis=0).to_numpy()
    assert (row["change_low"], row["change_high"]) == pytest.approx(hand_two_level_ci([matrix], seed=0), abs=1e-12)


def test_per_subject_3d_table_when_per_subject_csv_exists(seeded, seeded_study_dir, seeded_report):
    per_subject = pd.read_csv(seeded_study_dir / "results" / "per_subject.csv")
    table = subject_3d_table(seeded).set_index("configuration")
    trials = ["ft_sam_b_box_s0", "ft_sam_b_box_s1"]
    values = per_subject[per_subject["trial_id"].isin(trials)].pivot(index="subject", columns="trial_id",
                                                                     values="dice_3d")[trials].to_numpy()
    row = table.loc["sam_b · box"]
    assert row["n"] == len(SUBJECT_SLICES) and row["seeds"] == 2
    assert row["dice_3d_mean"] == pytest.approx(values.mean())
    assert (row["dice_3d_low"], row["dice_3d_high"]) == pytest.approx(hand_two_level_ci([values], seed=0), abs=1e-12)
    markdown = (seeded_report / "report.md").read_text(encoding="utf-8")
    assert "### Per-subject 3D metrics" in markdown and "| Dice 3D [95% CI] | HD95 3D mm [95% CI] |" in markdown
    assert (seeded_report / "tables" / "subject_3d.csv").stat().st_size > 0


def test_an_older_folder_without_per_subject_csv_still_reports(built_report, study_dir):
    assert not (study_dir / "results" / "per_subject.csv").exists()
    markdown = (built_report / "report.md").read_text(encoding="utf-8")
    assert "results/per_subject.csv is absent" in markdown
    assert "per_image.csv has no nsd column" in markdown and "records no HD95 penalty" in markdown
    assert not (built_report / "tables" / "subject_3d.csv").exists()


def test_mlflow_reader_reads_the_seed_and_per_subject_csv(seeded_study_dir, tmp_path, mlflow_uri):
    study = tmp_path / "seeded"
    shutil.copytree(seeded_study_dir, study, ignore=shutil.ignore_patterns("report"))
    uri = mlflow_uri
    log_to_mlflow(study, uri, tmp_path / "mlartifacts", experiment="seeded-study")
    from_folder, from_mlflow = load_study(study), load_from_mlflow(uri, "seeded-study")
    assert "seed" not in from_mlflow.factors
    columns = ["configuration", "seeds", "trial_ids"]
    key = "configuration"
    pd.testing.assert_frame_equal(from_folder.configurations[columns].sort_values(key).reset_index(drop=True),
                                  from_mlflow.configurations[columns].sort_values(key).reset_index(drop=True))
    trials = from_mlflow.trials.set_index("trial_id")
    assert trials.loc["ft_sam_b_box_s1", "seed"] == 1 and np.isnan(trials.loc["zs-sam_b-box", "seed"])
    order = ["trial_id", "subject"]
    pd.testing.assert_frame_equal(
        from_folder.per_subject.sort_values(order).reset_index(drop=True)[order + ["dice_3d", "nsd_3d"]],
        from_mlflow.per_subject.sort_values(order).reset_index(drop=True)[order + ["dice_3d", "nsd_3d"]])
    pd.testing.assert_frame_equal(subject_3d_table(from_folder).sort_values(key).reset_index(drop=True),
                                  subject_3d_table(from_mlflow).sort_values(key).reset_index(drop=True))
