"""A study of several targets (`data.target` a list): `target` is a factor, and the report has a per-region table."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.report import main
from analysis.results import load_study
from analysis.statistics import configuration_ci, subject_3d_table
from tests.analysis.conftest import REGION_CONFIGURATIONS, write_region_study


@pytest.fixture(scope="module")
def region_study(tmp_path_factory):
    return write_region_study(tmp_path_factory.mktemp("regions") / "region-study")


def test_target_is_a_factor_read_from_data_target(region_study):
    results = load_study(region_study)
    assert "target" in results.factors and "target" in results.grid_factors
    zero_shot = results.configurations[results.configurations["stage"] == "zero_shot"]
    assert len(zero_shot) == 4 and zero_shot["label"].is_unique  # one per backbone x target
    assert set(zero_shot["label"]) >= {"zero-shot · sam_b · box · whole_tumor", "zero-shot · sam_b · box · tumor_core"}


def test_the_report_has_a_per_region_table_of_the_best_configuration_per_target(region_study):
    assert main([str(region_study)]) == 0
    report = (region_study / "report" / "report.md").read_text()
    assert "### Per region (data.target)" in report
    table = pd.read_csv(region_study / "report" / "tables" / "per_region.csv")
    assert list(table["target"]) == ["whole_tumor", "tumor_core"]  # data.target's order
    results = load_study(region_study)
    best = {target: max((b for t, b in REGION_CONFIGURATIONS if t == target),
                        key=lambda b: REGION_CONFIGURATIONS[(target, b)][1]) for target in ("whole_tumor", "tumor_core")}
    assert best == {"whole_tumor": "sam_b", "tumor_core": "litemedsam"}
    configurations = results.configurations.set_index("configuration")
    table_3d = subject_3d_table(results).set_index("configuration")
    for _, row in table.iterrows():
        chosen = configurations.loc[row["configuration"]]
        assert chosen["stage"] == "finetune" and chosen["target"] == row["target"]
        assert chosen["backbone"] == best[row["target"]]
        ci = configuration_ci(results, [row["configuration"]], "dice")
        assert row["dice_mean"] == pytest.approx(ci.mean) and row["dice_low"] == pytest.approx(ci.low)
        assert row["dice_3d_mean"] == pytest.approx(table_3d.loc[row["configuration"], "dice_3d_mean"])
        zero_shot = configurations.loc[row["zero_shot"]]
        assert (zero_shot["stage"], zero_shot["target"], zero_shot["backbone"]) == (
            "zero_shot", row["target"], chosen["backbone"])
        assert row["zero_shot_dice_mean"] == pytest.approx(configuration_ci(results, [row["zero_shot"]], "dice").mean)
        assert row["zero_shot_dice_mean"] < row["dice_mean"]
    change = pd.read_csv(region_study / "report" / "tables" / "zero_shot_change.csv")
    assert set(zero for zero in change["target"]) == {"whole_tumor", "tumor_core"}
    for _, row in change.iterrows():  # fine-tuned side: same backbone, prompt and target
        assert configurations.loc[row["finetuned"], "target"] == row["target"]
