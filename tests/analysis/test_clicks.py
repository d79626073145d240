"""Corrective-click curves in the analysis: per-image AUC by hand, paired AUC tests against scipy,
the report's click section, and the checks on per_click.csv."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.clicks import click_auc
from analysis.results import ResultsError, load_from_mlflow, load_study
from analysis.statistics import configuration_ci, factor_tests
from tests.analysis.conftest import EVALUATIONS, IMAGES, log_to_mlflow
from tests.analysis.conftest import click_curve as curve


@pytest.fixture(scope="module")
def click_study(baselines_study):
    """The fixture study with click curves (and the U-Net arms, which take no clicks)."""
    return baselines_study


def test_the_auc_is_the_normalised_trapezoid_area():
    assert click_auc([0.5, 0.7, 0.9, 1.0]) == pytest.approx((0.25 + 0.7 + 0.9 + 0.5) / 3)
    assert click_auc([1.0, 1.0]) == 1.0 and click_auc([0.4] * 6) == pytest.approx(0.4)  # a flat curve is its value
    assert np.isnan(click_auc([0.8]))  # no click, no curve


def test_per_image_click_columns_and_their_configuration_means(click_study):
    study, _ = click_study
    results = load_study(study)
    row = results.per_image.set_index(["trial_id", "image_id"]).loc[("ft_sam_b_box", IMAGES[0])]
    d = curve(EVALUATIONS["ft_sam_b_box"][3][0], "sam_b")
    assert (row["dice"], row["dice_click_1"], row["dice_click_3"]) == pytest.approx((d[0], d[1], d[3]))
    assert row["click_auc"] == pytest.approx((d[0] / 2 + d[1] + d[2] + d[3] / 2) / 3)
    hand = np.mean([click_auc(curve(v, "litemedsam")) for v in EVALUATIONS["ft_lite_point"][3]])
    key = results.evaluations.set_index("trial_id").loc["ft_lite_point", "configuration"]
    assert configuration_ci(results, [key], "click_auc").mean == pytest.approx(hand)
    assert not results.notes or not any("click-0" in note for note in results.notes)


def test_paired_tests_of_the_auc_are_scipys_wilcoxon_on_the_per_image_aucs(click_study):
    """backbone sam_b vs litemedsam with prompt held at the best setting (box): the test is scipy's
    two-sided Wilcoxon on the eight images' hand-computed AUC differences."""
    study, _ = click_study
    results = load_study(study)
    tests = factor_tests(results, "click_auc")
    row = tests[(tests["factor"] == "backbone") & (tests["comparison"] == "held at best")].iloc[0]
    sam = np.array([click_auc(curve(v, "sam_b")) for v in EVALUATIONS["ft_sam_b_box"][3]])
    lite = np.array([click_auc(curve(v, "litemedsam")) for v in EVALUATIONS["ft_lite_box"][3]])
    first = sam if row["level_a"] == "sam_b" else lite
    second = lite if row["level_a"] == "sam_b" else sam
    assert row["p"] == pytest.approx(stats.wilcoxon(first, second).pvalue)
    assert row["mean_difference"] == pytest.approx(float(np.mean(first - second)))
    assert "click AUC" in row["sentence"] and "sam_b beats litemedsam" in row["sentence"]


def test_the_report_has_click_curves_a_dice_at_k_and_auc_table_and_the_auc_tests(baselines_report):
    out = baselines_report
    text = (out / "report.md").read_text()
    assert "## 6. Corrective clicks" in text and "## 7." not in text  # no importance: a grid search
    assert (out / "figures" / "click_curves.png").stat().st_size > 0
    table = pd.read_csv(out / "tables" / "clicks.csv")
    assert [c for c in table.columns if "CI" in c] == ["Dice@0 [95% CI]", "Dice@1 [95% CI]", "Dice@3 [95% CI]",
                                                       "AUC [95% CI]"]
    assert len(table) == len(EVALUATIONS)  # every configuration with click results, zero-shot included
    lite = table[table["Configuration"].str.contains("litemedsam") & ~table["Stage"].str.contains("zero")]
    hand = np.mean([click_auc(curve(v, "litemedsam")) for v in EVALUATIONS["ft_lite_box"][3]])
    assert any(cell.startswith(f"{hand:.3f} [") for cell in lite["AUC [95% CI]"])
    tests = pd.read_csv(out / "tables" / "paired_tests_click_auc.csv")
    assert set(tests["metric"]) == {"click_auc"} and tests["p_holm"].notna().any()
    assert "Paired tests of the click AUC" in text


def test_a_click_0_that_is_not_the_per_image_dice_is_noted_and_duplicates_are_refused(click_study, tmp_path):
    study, rows = click_study
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    changed = rows.copy()
    changed.loc[(changed["trial_id"] == "ft_lite_box") & (changed["click"] == 0), "dice"] += 0.01
    changed.to_csv(copy / "results" / "per_click.csv", index=False)
    assert any("click-0 Dice" in note and "ft_lite_box" in note for note in load_study(copy).notes)
    twice = pd.concat([rows, rows.iloc[[5]].assign(dice=0.123)])
    twice.to_csv(copy / "results" / "per_click.csv", index=False)
    with pytest.raises(ResultsError, match="per_click.csv scores click"):
        load_study(copy)


def test_the_click_columns_read_from_mlflow_equal_the_study_folders(click_study, mlflow_uri, tmp_path):
    study, _ = click_study
    log_to_mlflow(study, mlflow_uri, tmp_path / "artifacts", experiment="click-study")
    folder = load_study(study).per_image.set_index(["trial_id", "prompt", "image_id"]).sort_index()
    logged = load_from_mlflow(mlflow_uri, "click-study").per_image.set_index(["trial_id", "prompt", "image_id"])
    columns = ["dice", "dice_click_1", "dice_click_2", "dice_click_3", "click_auc"]
    pd.testing.assert_frame_equal(logged.sort_index()[columns], folder[columns])
