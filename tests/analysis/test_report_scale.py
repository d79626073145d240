"""The report of a study at the scale of the example grid: 180 fine-tuning trials and 20 zero-shot
evaluations (tests/analysis/synthetic_study.py, 12 subjects x 2 slices each, so it builds in
seconds). The leaderboard, the factor sentences and the worst-image table are checked against
computations made here from the raw CSVs; every figure's height against a bound; the HTML table's
sorting and filtering in headless Chromium, by clicking; and that the page asks for nothing outside
the file.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from analysis.report import LEADERBOARD_JSON, LOGGED_ARTIFACTS_TAG, log_report, main
from tests.analysis.conftest import reference_bootstrap
from tests.analysis.devtools import open_page
from tests.analysis.synthetic_study import GRID, write_synthetic_study

SUBJECTS, SLICES = 12, 2
#: About two screens: no figure of the report may be taller, whatever the number of configurations.
MAX_HEIGHT_PX = 2200


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The synthetic 180-trial study with its report, built once by the command-line entry point."""
    folder = write_synthetic_study(tmp_path_factory.mktemp("scale") / "scale-study", SUBJECTS, SLICES)
    assert main([str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def raw(study):
    """The study's own CSVs, and per fine-tuning trial its per-subject mean Dice (subject x trial)."""
    trials = pd.read_csv(study / "results" / "trials.csv")
    per_image = pd.read_csv(study / "results" / "per_image.csv")
    subject_dice = per_image.groupby(["subject", "trial_id"])["dice"].mean().unstack("trial_id")
    finetuned = trials[trials["stage"] == "finetune"].copy()
    finetuned["label"] = [" · ".join(row[f] for f in GRID) for _, row in finetuned.iterrows()]
    return trials, per_image, subject_dice, finetuned


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after `heading` in report.md."""
    section = markdown.split(heading, 1)[1]
    lines = [line for line in section.split("(CSV:", 1)[0].splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_the_leaderboard_is_the_ten_best_on_validation_dice_with_their_test_numbers(study, raw):
    _, _, subject_dice, finetuned = raw
    markdown = (study / "report" / "report.md").read_text(encoding="utf-8")
    assert markdown.index("## Leaderboard") < markdown.index("## How the numbers are computed") < markdown.index("## 1.")
    top = finetuned.sort_values("val_dice", ascending=False, kind="stable").head(10)
    rows = markdown_table(markdown, "## Leaderboard")
    assert len(rows) == 10
    for rank, (row, (_, trial)) in enumerate(zip(rows, top.iterrows()), 1):
        values = subject_dice[trial["trial_id"]].to_numpy()
        low, high = reference_bootstrap(values, seed=0)
        assert row[:4] == [str(rank), trial["label"], "1", f"{trial['val_dice']:.3f}"]
        assert row[4] == f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"
        assert row[-1] == str(SUBJECTS)
    written = pd.read_csv(study / "report" / "tables" / "leaderboard.csv")
    assert list(written["label"]) == list(top["label"])
    np.testing.assert_allclose(written["dice_mean"], [subject_dice[t].mean() for t in top["trial_id"]])


def test_the_best_configuration_of_each_backbone(study, raw):
    _, _, _, finetuned = raw
    rows = markdown_table((study / "report" / "report.md").read_text(encoding="utf-8"), "(CSV: `tables/leaderboard.csv`)")
    best = finetuned.sort_values("val_dice", ascending=False, kind="stable").drop_duplicates("backbone")
    assert [(r[0], r[3]) for r in rows] == list(zip(best["backbone"], best["label"]))
    assert all(r[7] == f"zero-shot · {r[0]} · box" for r in rows)  # box is every backbone's best zero-shot prompt


def test_one_sentence_per_factor_names_the_winning_level_and_whether_it_holds_up(study, raw):
    _, _, subject_dice, finetuned = raw
    markdown = (study / "report" / "report.md").read_text(encoding="utf-8")
    tests = pd.read_csv(study / "report" / "tables" / "paired_tests.csv")
    for factor, levels in GRID.items():
        # per subject the mean over the configurations at a level, then the mean over subjects
        per_level = {level: subject_dice[list(finetuned.loc[finetuned[factor] == level, "trial_id"])].mean(axis=1)
                     for level in levels}
        means = pd.Series({level: values.mean() for level, values in per_level.items()}).sort_values(ascending=False)
        winner, runner_up = means.index[:2]
        sentence = next(line for line in markdown.splitlines() if line.startswith(f"- {factor}: "))
        assert sentence.startswith(f"- {factor}: {winner} wins among {len(levels)} levels (marginal mean test Dice "
                                   f"{means[winner]:.3f} [")
        assert f"ahead of {runner_up} ({means[runner_up]:.3f})" in sentence
        pair = [{a, b} == {winner, runner_up} for a, b in zip(tests["level_a"], tests["level_b"])]
        row = tests[(tests["factor"] == factor) & (tests["comparison"] == "pooled") & np.array(pair)].iloc[0]
        first, second = (winner, runner_up) if row["level_a"] == winner else (runner_up, winner)
        assert row["p"] == pytest.approx(stats.wilcoxon(per_level[first], per_level[second]).pvalue)
        if row["p_holm"] < 0.05:  # one seed: significant, but the training noise is not measured
            assert "Significant (section 5's paired test (pooled)" in sentence and "cannot tell" in sentence
        else:
            assert "The lead does not hold up: not significant" in sentence
        assert f"p = {row['p_holm']:.3f} after Holm" in sentence or row["p_holm"] < 0.001
    loss = next(line for line in markdown.splitlines() if line.startswith("- loss: "))
    assert "does not hold up" in loss  # the synthetic study gives the loss no effect


def test_every_figure_is_at_most_two_screens_tall(study):
    report = study / "report"
    page = (report / "report.html").read_text(encoding="utf-8")
    pngs = sorted((report / "figures").glob("*.png"))
    assert {"box_dice", "box_dice_by_level", "interactions", "overlays_per_backbone",
            "worst_images_best_config", "learning_curves"} <= {p.stem for p in pngs}
    for path in pngs:
        with Image.open(path) as image:
            assert image.height <= MAX_HEIGHT_PX, (path.name, image.size)
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(embedded) == len(pngs)
    for data in embedded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert 100 < image.height <= MAX_HEIGHT_PX
    markdown = (report / "report.md").read_text(encoding="utf-8")
    assert "Test Dice per subject (a subject's value: the mean over its test images) of the 12 fine-tuned " \
           "configurations with the highest validation Dice (of 180" in markdown
    assert "for every pair of grid factors (6 pair(s))" in markdown
    assert "The best fine-tuned configuration of each of the 5 backbones" in markdown


def test_the_markdown_keeps_the_top_rows_and_links_the_csv(study):
    markdown = (study / "report" / "report.md").read_text(encoding="utf-8")
    assert len(markdown_table(markdown, "## 1. Summary of every configuration")) == 25
    assert "The first 25 of 200 rows; every row is in the CSV `tables/summary.csv`" in markdown
    assert len(pd.read_csv(study / "report" / "tables" / "summary.csv")) == 200


def test_the_worst_images_are_the_lowest_dice_of_the_best_configuration(study, raw):
    _, per_image, _, finetuned = raw
    best = finetuned.sort_values("val_dice", ascending=False).iloc[0]["trial_id"]
    expected = per_image[per_image["trial_id"] == best].sort_values(["dice", "image_id"]).head(12)
    written = pd.read_csv(study / "report" / "tables" / "worst_images.csv")
    assert list(written["image_id"]) == list(expected["image_id"])
    np.testing.assert_allclose(written["dice"], expected["dice"])


def test_the_page_refers_to_nothing_outside_the_file(study):
    page = (study / "report" / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href|action)\s*=\s*['"]?\s*(?:[a-z]+:)?//""", page, re.IGNORECASE)
    assert not re.search(r"""url\(\s*['"]?\s*(?:[a-z]+:)?//|@import""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and "<link" not in page


def visible_rows(page, column: int) -> list[str]:
    return page.evaluate(f"[...document.querySelectorAll('#table-summary tbody tr')].filter(r => !r.hidden)"
                         f".map(r => r.cells[{column}].textContent)")


def click_header(page, name: str) -> None:
    """A real click at the centre of the summary table's header `name`, scrolled into view."""
    x, y = page.evaluate(f"""(() => {{
        const th = [...document.querySelectorAll('#table-summary th')].find(t => t.textContent === {json.dumps(name)});
        th.scrollIntoView({{block: 'center', inline: 'center'}});
        const box = th.getBoundingClientRect();
        return [box.x + box.width / 2, box.y + box.height / 2];
    }})()""")
    assert page.evaluate(f"document.elementFromPoint({x}, {y}).textContent") == name  # the click lands on it
    page.click(x, y)


def test_the_summary_sorts_by_a_click_on_a_header_and_filters_by_level_offline(study, tmp_path):
    summary = pd.read_csv(study / "report" / "tables" / "summary.csv")  # in the page's row order
    best = pd.read_csv(study / "report" / "tables" / "leaderboard.csv")["label"].iloc[0]
    shown = summary.assign(label=[f"{v} (best)" if v == best else v for v in summary["label"]],
                           val=summary["val_dice"].map(lambda v: float(f"{v:.3f}")),
                           dice=summary["dice_mean"].map(lambda v: float(f"{v:.3f}")))
    with open_page((study / "report" / "report.html").resolve().as_uri(), tmp_path) as page:
        headers = page.evaluate("[...document.querySelectorAll('#table-summary th')].map(t => t.textContent)")
        assert visible_rows(page, 0) == list(shown["label"])
        # each sort is stable, so rows that tie keep the order the previous sort left them in
        click_header(page, "Val Dice")
        order = shown.sort_values("val", kind="stable")
        assert visible_rows(page, 0) == list(order["label"])
        assert visible_rows(page, headers.index("Val Dice")) == [f"{v:.3f}" for v in order["val"]]
        click_header(page, "Val Dice")  # again: descending
        order = order.assign(key=-order["val"]).sort_values("key", kind="stable")
        assert visible_rows(page, 0) == list(order["label"])
        click_header(page, "Dice [95% CI]")  # "mean [low, high]" cells sort by their mean
        order = order.sort_values("dice", kind="stable")
        assert visible_rows(page, 0) == list(order["label"])
        page.evaluate("""(() => { const select = [...document.querySelectorAll('.filters select')]
            .find(s => s.parentNode.firstChild.textContent.trim() === 'backbone');
            select.value = 'sam2_l'; select.dispatchEvent(new Event('change')); })()""")
        expected = order[order["backbone"] == "sam2_l"]
        assert visible_rows(page, 0) == list(expected["label"]) and len(expected) == 36 + 4
        assert page.evaluate("document.querySelector('.filters .shown').textContent") == "40 of 200 rows shown"
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalHeight])")
        requests = list(page.requests)
    assert len(images) == len(list((study / "report" / "figures").glob("*.png")))
    assert all(complete and 0 < height <= MAX_HEIGHT_PX for complete, height in images)  # every figure drawn
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests


def test_the_leaderboard_is_an_mlflow_table_on_the_parent_run(study, tmp_path, mlflow_uri):
    """Logged by the study's tracker (what `python -m study.run` does) and again by
    `python -m analysis.report` (log_report): one table entry, the leaderboard's 10 rows."""
    from mlflow.tracking import MlflowClient

    from study.tracking import StudyTracker

    tracker = StudyTracker(mlflow_uri, "scale-study", tmp_path / "scale-study")
    parent = tracker.start_parent("scale-study", "0123abcd", study / "resolved.yaml", "plan", {})
    tracker.log_parent_artifacts(study / "report", "report")
    assert "logged" in log_report(tmp_path / "scale-study", study / "report").lower()
    client = MlflowClient(mlflow_uri)
    tags = json.loads(client.get_run(parent).data.tags[LOGGED_ARTIFACTS_TAG])
    assert tags == [{"path": f"report/{LEADERBOARD_JSON}", "type": "table"}]
    local = client.download_artifacts(parent, f"report/{LEADERBOARD_JSON}", str(tmp_path))
    table = pd.read_json(local, orient="split")
    expected = pd.read_csv(study / "report" / "tables" / "leaderboard.csv")
    assert list(table["label"]) == list(expected["label"]) and list(table["rank"]) == list(range(1, 11))
    np.testing.assert_allclose(table["dice_mean"], expected["dice_mean"].round(4))
    tracker.close()
