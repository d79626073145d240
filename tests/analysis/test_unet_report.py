"""The U-Net baseline in the analysis: its own stage and labels, kept out of the SAM factor tests,
paired against the best SAM configuration (by hand and against scipy), on the model-size plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.results import load_study
from analysis.statistics import factor_tests, unet_comparison
from tests.analysis.conftest import EVALUATIONS, UNET_DICE, UNET_PARAMS


@pytest.fixture(scope="module")
def unet_study(baselines_study):
    """The fixture study with the U-Net arms (and click curves, which the U-Net tests do not read)."""
    return baselines_study[0]


def test_the_unet_arms_are_their_own_configurations_outside_the_sam_factor_tests(unet_study):
    results = load_study(unet_study)
    unets = results.configurations[results.configurations["stage"] == "unet"]
    assert sorted(unets["label"]) == ["U-Net", "U-Net + box channel"]
    tests = factor_tests(results)
    backbone_levels = set(tests.loc[tests["factor"] == "backbone", "level_a"]) | set(
        tests.loc[tests["factor"] == "backbone", "level_b"])
    assert backbone_levels == {"sam_b", "litemedsam"}


def test_the_best_sam_configuration_against_each_unet_arm_by_hand_and_scipy(unet_study):
    """The best fine-tuned SAM configuration on validation Dice is sam_b with the box (0.86); it is
    box-prompted, so each arm gets one row: SAM minus U-Net per image, Wilcoxon as scipy's."""
    results = load_study(unet_study)
    table = unet_comparison(results).set_index("unet")
    sam = np.array(EVALUATIONS["ft_sam_b_box"][3])
    for label, backbone in (("U-Net", "unet"), ("U-Net + box channel", "unet_box")):
        row = table.loc[label]
        difference = sam - np.array(UNET_DICE[backbone])
        assert row["sam_label"] == "sam_b · box"
        assert row["difference_mean"] == pytest.approx(difference.mean())
        assert row["difference_median"] == pytest.approx(np.median(difference))
        assert row["p"] == pytest.approx(stats.wilcoxon(sam, UNET_DICE[backbone]).pvalue)
        assert row["difference_low"] < row["difference_mean"] < row["difference_high"]
        assert row["n"] == 8 and row["within_noise"] is None  # one seed: noise not measured
    assert len(table) == 2 and table["p_holm"].ge(table["p"]).all()


def test_the_report_shows_the_unet_rows_the_comparison_and_the_model_size_point(baselines_report):
    out = baselines_report
    text = (out / "report.md").read_text()
    assert "### Fine-tuned SAM against the U-Net baseline" in text and "| U-Net + box channel |" in text
    assert "not nnU-Net's full pipeline" in text
    versus = pd.read_csv(out / "tables" / "sam_vs_unet.csv")
    assert len(versus) == 2
    sizes = pd.read_csv(out / "tables" / "model_size.csv")
    assert set(sizes.loc[sizes["family"] == "unet", "params"]) == {UNET_PARAMS}
    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert summary.loc[summary["label"] == "U-Net", "dice_mean"].item() == pytest.approx(np.mean(UNET_DICE["unet"]))
