"""The report on the hand-written fixture study: numbers against hand computations, files on disk."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from analysis.overlays import FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUTH_BORDER, overlay, sanitise_image_id
from analysis.report import main
from analysis.results import load_from_mlflow, load_study
from analysis.statistics import factor_tests, holm, marginal_means, summary_table, zero_shot_change
from tests.analysis.conftest import (EVALUATIONS, FAILED_TRIAL, IMAGES, TRAINED_PARAMS, iou_from_dice, log_to_mlflow,
                                     reference_bootstrap, write_searched_study)

FIGURES = ["ablation_backbone", "ablation_prompt", "box_dice_by_level", "interaction_backbone_prompt", "interactions",
           "model_size", "box_dice", "box_hd95", "dice_vs_area", "learning_curves", "overlays_best_config",
           "worst_images_best_config", "overlays_per_backbone"]


def dice_of(trial_id):
    return np.asarray(EVALUATIONS[trial_id][3], float)


@pytest.fixture(scope="module")
def results(study_dir):
    return load_study(study_dir)


def test_load_study_reads_every_evaluation_and_the_grid(results):
    assert set(results.evaluations["trial_id"]) == set(EVALUATIONS)  # the failed trial has no test results
    assert FAILED_TRIAL in set(results.trials["trial_id"])
    assert results.grid_factors == ["backbone", "prompt"]         # eval_prompt repeats prompt: not an axis
    assert results.name == "fixture-study"
    assert results.scores("dice").shape == (len(IMAGES), len(EVALUATIONS))
    assert results.notes == []                                    # trials.csv test_dice = per-image means


def test_summary_means_and_cis_equal_direct_computations(results):
    summary = summary_table(results, seed=0).set_index("trial_id")
    for trial_id, (_, _, _, dice, hd95, _) in EVALUATIONS.items():
        row = summary.loc[trial_id]
        assert row["n_images"] == len(IMAGES)
        assert row["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-12)
        assert (row["dice_low"], row["dice_high"]) == pytest.approx(reference_bootstrap(dice, seed=0), abs=1e-12)
        iou = iou_from_dice(dice)
        assert row["iou_mean"] == pytest.approx(iou.mean())
        assert (row["iou_low"], row["iou_high"]) == pytest.approx(reference_bootstrap(iou, seed=0))
        hd95 = np.asarray(hd95, float)
        assert row["hd95_mean"] == pytest.approx(np.nanmean(hd95))
        assert (row["hd95_n"], row["hd95_missing"]) == (np.isfinite(hd95).sum(), np.isnan(hd95).sum())
        assert (row["hd95_low"], row["hd95_high"]) == pytest.approx(reference_bootstrap(hd95, seed=0))
        assert row["image_encoder_params"] > 0


def test_summary_csv_and_markdown_carry_the_same_numbers(built_report, results):
    written = pd.read_csv(built_report / "tables" / "summary.csv").set_index("trial_id")
    low, high = reference_bootstrap(dice_of("ft_lite_point"), seed=0)
    assert written.loc["ft_lite_point", "dice_low"] == pytest.approx(low, abs=1e-12)
    assert written.loc["ft_lite_point", "dice_high"] == pytest.approx(high, abs=1e-12)
    markdown = (built_report / "report.md").read_text(encoding="utf-8")
    mean = dice_of("ft_lite_point").mean()
    assert f"| litemedsam · center_point | finetune | TERMINATED | 1 | 8 | {mean:.3f} [{low:.3f}, {high:.3f}]" in markdown
    assert FAILED_TRIAL in markdown                             # listed among trials without results
    # what each trial's optimiser updated (trials.csv), beside the encoder's size
    assert written.loc["ft_lite_point", "trainable_params"] == TRAINED_PARAMS["litemedsam"] == 4_058_340
    assert written.loc["zs_sam_b_box", "trainable_params"] == 0
    assert "| 5.7 M | 4.1 M | 0.740 |" in markdown and "| 89.7 M | 0 | 0.660 |" in markdown


def test_paired_tests_equal_scipy_on_hand_matched_images(results):
    tests = factor_tests(results).set_index(["factor", "comparison"])
    # best configuration on validation Dice: sam_b with box (val 0.86)
    held = {"backbone": (dice_of("ft_sam_b_box"), dice_of("ft_lite_box")),
            "prompt": (dice_of("ft_sam_b_box"), dice_of("ft_sam_b_point"))}
    pooled = {"backbone": ((dice_of("ft_sam_b_box") + dice_of("ft_sam_b_point")) / 2,
                           (dice_of("ft_lite_box") + dice_of("ft_lite_point")) / 2),
              "prompt": ((dice_of("ft_sam_b_box") + dice_of("ft_lite_box")) / 2,
                         (dice_of("ft_sam_b_point") + dice_of("ft_lite_point")) / 2)}
    for comparison, pairs in (("held at best", held), ("pooled", pooled)):
        for factor, (a, b) in pairs.items():
            row = tests.loc[(factor, comparison)]
            assert row["p"] == stats.wilcoxon(a, b).pvalue
            assert row["n"] == len(IMAGES)
            assert row["median_difference"] == pytest.approx(np.median(a - b))
            assert row["mean_a"] == pytest.approx(a.mean()) and row["mean_b"] == pytest.approx(b.mean())
    # every difference is positive on all 8 images: exact p = 2 / 2^8, Holm over 4 tests multiplies by 4
    np.testing.assert_allclose(tests["p"], 2 / 256)
    np.testing.assert_allclose(tests["p_holm"], 4 * 2 / 256)
    np.testing.assert_allclose(tests["p_holm"], holm(tests["p"]))
    assert (tests["rank_biserial"] == 1.0).all()


def test_paired_statements_are_in_words_in_the_report(built_report):
    markdown = (built_report / "report.md").read_text(encoding="utf-8")
    difference = np.median(dice_of("ft_sam_b_box") - dice_of("ft_lite_box"))
    assert (f"sam_b beats litemedsam by {difference:.3f} Dice (median paired difference; rank-biserial r = 1.00), "
            f"p = 0.031 after Holm, n = 8 images") in markdown


def test_marginal_means_average_per_image_over_the_other_factors(results):
    marginal = marginal_means(results, "prompt", seed=0).set_index("level")
    box = (dice_of("ft_sam_b_box") + dice_of("ft_lite_box")) / 2
    assert marginal.loc["box", "mean"] == pytest.approx(box.mean())
    assert (marginal.loc["box", "low"], marginal.loc["box", "high"]) == pytest.approx(reference_bootstrap(box, seed=0))
    assert marginal.loc["box", "cells"] == 2


def test_zero_shot_change_pairs_the_same_backbone_and_prompt(results):
    change = zero_shot_change(results, seed=0).set_index(["backbone", "prompt"])
    row = change.loc[("litemedsam", "center_point")]
    difference = dice_of("ft_lite_point") - dice_of("zs_lite_point")
    assert row["change_mean"] == pytest.approx(difference.mean())
    assert (row["change_low"], row["change_high"]) == pytest.approx(reference_bootstrap(difference, seed=0))
    assert row["p"] == stats.wilcoxon(dice_of("ft_lite_point"), dice_of("zs_lite_point")).pvalue
    np.testing.assert_allclose(change["p_holm"], holm(change["p"]))


def test_every_figure_is_written_and_the_report_mentions_it(built_report):
    markdown = (built_report / "report.md").read_text(encoding="utf-8")
    page = (built_report / "report.html").read_text(encoding="utf-8")
    for name in FIGURES:
        for suffix in ("png", "svg"):
            path = built_report / "figures" / f"{name}.{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
        with Image.open(built_report / "figures" / f"{name}.png") as image:
            assert min(image.size) > 100
        assert f"figures/{name}.png" in markdown
        assert f"<figure id='{name}'>" in page
    for table in ("leaderboard", "best_per_backbone", "summary", "zero_shot_change", "marginal_means", "paired_tests",
                  "model_size", "worst_images"):
        assert (built_report / "tables" / f"{table}.csv").stat().st_size > 0
    assert "http://" not in page and "https://" not in page
    assert len(re.findall(r"<img src='data:image/png;base64,", page)) == len(FIGURES)


def test_overlay_colours_follow_the_seed_convention():
    image = np.full((7, 7, 3), 100, np.uint8)
    truth = np.zeros((7, 7), bool)
    truth[1:6, 1:6] = True          # a 5 x 5 square: border ring, 3 x 3 interior
    pred = np.zeros((7, 7), bool)
    pred[2:5, 2:6] = True           # covers the interior, one interior-adjacent border column, nothing outside
    pred[3, 6] = True               # one pixel outside the truth: false positive
    out = overlay(image, truth, pred)

    def blend(colour):
        return tuple(np.round(0.5 * 100 + 0.5 * np.asarray(colour)).astype(int))

    assert tuple(out[3, 3]) == blend(TRUE_POSITIVE)      # interior, predicted
    assert tuple(out[3, 6]) == blend(FALSE_POSITIVE)     # outside truth, predicted
    assert tuple(out[1, 1]) == TRUTH_BORDER              # the truth's border is red, predicted or not
    assert tuple(out[0, 0]) == (100, 100, 100)           # background untouched
    truth_only = np.zeros((7, 7), bool)
    truth_only[2:5, 2:5] = True
    big_truth = np.ones((7, 7), bool)
    out = overlay(image, big_truth, truth_only)
    assert tuple(out[3, 3]) == blend(TRUE_POSITIVE)
    assert tuple(out[1, 1]) == blend(FALSE_NEGATIVE)      # truth, not predicted, not on the border
    assert tuple(out[0, 3]) == TRUTH_BORDER               # on the image edge
    assert sanitise_image_id("BRATS_001:z077") == "BRATS_001_z077"


def test_missing_trials_csv_is_one_paragraph_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty-study").mkdir()
    assert main([str(tmp_path / "empty-study")]) == 2
    err = capsys.readouterr().err
    assert "has no results/trials.csv: the study has not finished any trial; run python -m study.run" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main([str(tmp_path / "no-such-folder")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "empty-study"), "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "go together" in capsys.readouterr().err


def test_searched_study_reports_fanova_importance(tmp_path):
    study = write_searched_study(tmp_path / "searched")
    assert main([str(study)]) == 0
    importance = pd.read_csv(study / "report" / "tables" / "importance.csv").set_index("parameter")
    assert set(importance.index) == {"lr", "optimizer"}
    assert importance["importance"].sum() == pytest.approx(1.0)
    assert importance.loc["lr", "importance"] > importance.loc["optimizer", "importance"]  # lr drives the objective
    for name in ("importance", "parallel_coordinates"):
        assert (study / "report" / "figures" / f"{name}.png").stat().st_size > 1000
    assert "lr searched" in (study / "report" / "report.md").read_text(encoding="utf-8")


def test_mlflow_reading_equals_the_study_folder_and_the_report_is_logged(study_dir, tmp_path, mlflow_uri):
    study = tmp_path / "tracked"
    shutil.copytree(study_dir, study, ignore=shutil.ignore_patterns("report"))
    uri = mlflow_uri
    client, experiment_id, parent_id = log_to_mlflow(study, uri, tmp_path / "mlartifacts")

    from_folder, from_mlflow = load_study(study), load_from_mlflow(uri, "fixture-study")
    assert from_mlflow.name == "fixture-study"
    columns = ["trial_id", "stage", "status", "backbone", "family", "image_encoder_params", "prompt", "lr",
               "val_dice", "test_dice", "test_hd95", "epochs_run", "seconds", "trainable_params"]
    folder_trials = from_folder.trials[columns].sort_values("trial_id").reset_index(drop=True)
    mlflow_trials = from_mlflow.trials[columns].sort_values("trial_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(folder_trials, mlflow_trials, check_dtype=False)
    key = ["trial_id", "image_id"]
    pd.testing.assert_frame_equal(
        from_folder.per_image.sort_values(key).reset_index(drop=True)[key + ["dice", "hd95", "area"]],
        from_mlflow.per_image.sort_values(key).reset_index(drop=True)[key + ["dice", "hd95", "area"]])
    pd.testing.assert_frame_equal(
        summary_table(from_folder).sort_values("evaluation").reset_index(drop=True)[["evaluation", "dice_mean", "dice_low"]],
        summary_table(from_mlflow).sort_values("evaluation").reset_index(drop=True)[["evaluation", "dice_mean", "dice_low"]])
    assert len(from_mlflow.history) == len(from_folder.history)

    (study / "tracking.json").write_text(json.dumps({"tracking_uri": uri, "experiment_name": "fixture-study",
                                                     "experiment_id": experiment_id, "parent_run_id": parent_id}))
    assert main([str(study), "--tracking-uri", uri, "--experiment", "fixture-study"]) == 0
    logged = {item.path for item in client.list_artifacts(parent_id, "report")}
    assert {"report/report.html", "report/report.md", "report/figures", "report/tables"} <= logged


def test_a_trial_scored_with_several_prompts_gives_one_evaluation_per_prompt(tmp_path):
    """eval_prompt: [box, center_point] scores each trial with both prompts: eval_prompt becomes an axis."""
    from tests.analysis.conftest import write_study

    study = write_study(tmp_path / "two-eval-prompts", with_predictions=False)
    per_image = pd.read_csv(study / "results" / "per_image.csv")
    other = per_image[per_image["stage"] == "finetune"].copy()
    other["prompt"] = other["prompt"].map({"box": "center_point", "center_point": "box"})
    other["dice"] -= 0.05
    pd.concat([per_image, other]).to_csv(study / "results" / "per_image.csv", index=False)
    results = load_study(study)
    evaluations = results.evaluations.set_index("evaluation")
    assert "ft_sam_b_box[center_point]" in evaluations.index and "ft_sam_b_box[box]" in evaluations.index
    assert evaluations.loc["ft_sam_b_box[box]", "primary"] and not evaluations.loc["ft_sam_b_box[center_point]", "primary"]
    assert results.grid_factors == ["backbone", "prompt", "eval_prompt"]
    tests = factor_tests(results).set_index(["factor", "comparison"])
    # trained with box, scored with box vs with center_point: 0.05 better on every image
    row = tests.loc[("eval_prompt", "held at best")]
    assert row["median_difference"] == pytest.approx(0.05)
    assert row["p"] == stats.wilcoxon(dice_of("ft_sam_b_box"), dice_of("ft_sam_b_box") - 0.05).pvalue
