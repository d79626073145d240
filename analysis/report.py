"""`python -m analysis.report STUDY_DIR [--tracking-uri URI --experiment NAME] [--out DIR]`.

Turns a finished study into an ablation report: `report.md`, a self-contained `report.html`
(figures embedded as base64 PNG), every figure as PNG and SVG under `figures/`, every table as
CSV under `tables/`. The report is written to STUDY_DIR/report unless --out says otherwise, and,
when the study folder has a tracking.json, logged as artifacts (`report/`) of the study's
parent MLflow run. Results are read from the study folder, or from an MLflow experiment with
--tracking-uri and --experiment.

The report answers first: a leaderboard (the best configurations on validation Dice with their
test numbers, one sentence per grid factor on which level wins and whether that holds up, the
best configuration per backbone; also written as `leaderboard.json`, an MLflow table), then the
protocol and the numbered sections. Figures stay readable however many configurations a study
has (the top ones drawn, per-level and per-pair small multiples); every table of the HTML sorts
by a click on a header and the per-configuration ones filter by factor level (inline JavaScript:
the page fetches nothing), while the Markdown keeps their first rows and names the CSV.

The document is built once as a list of blocks (headings, paragraphs, tables, figures) and
rendered twice, to Markdown and to HTML, so both say the same thing. Every number comes from
analysis.statistics; this module only arranges and words them. Tables are per configuration
(every factor but the training seed); "How the numbers are computed" states the protocol, with
the values resolved.yaml records.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.clicks import AUC, click_metric, clicks_of
from analysis.overlays import (overlay_examples, prediction_examples, ranked_by_dice, sanitise_image_id,
                               saved_images)
from analysis.results import (FINETUNE, UNET, ZERO_SHOT, ResultsError, StudyResults, format_level, load_from_mlflow,
                              load_study, read_resolved_config, read_tracking, search_ranges)
from analysis.statistics import (ALPHA, BOOTSTRAP_RESAMPLES, CONFIDENCE, HOLDS_UP_RULE, NOISE_MULTIPLE, NOISE_RULE,
                                 best_configuration, cell_means, configuration_ci, factor_tests, factor_verdicts, format_p,
                                 hyperparameter_importance, level_configurations, marginal_means, rank_configurations,
                                 study_seed_sd, subject_3d_table, summary_table, unet_comparison, unit_values,
                                 zero_shot_change)


# --- the document ---------------------------------------------------------------------------------


@dataclass
class Document:
    """The report as an ordered list of blocks, plus the folder its files go to."""

    folder: Path
    blocks: list[tuple] = field(default_factory=list)
    figure_files: list[Path] = field(default_factory=list)
    table_files: list[Path] = field(default_factory=list)

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("heading", level, text))

    def text(self, text: str):
        self.blocks.append(("text", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, shown: pd.DataFrame, name: str, data: pd.DataFrame | None = None, caption: str = "",
              facets: pd.DataFrame | None = None, markdown_rows: int | None = None):
        """Show `shown` (formatted strings) and write `data` (full precision; default `shown`) as CSV.

        In the HTML every table sorts by a click on a column header; `facets` (one column per
        factor, a row per row of `shown`) adds a level filter per column. The Markdown shows the
        first `markdown_rows` rows (all when None) and names the CSV that holds every row.
        """
        path = self.folder / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        (shown if data is None else data).to_csv(path, index=False)
        self.table_files.append(path)
        self.blocks.append(("table", shown, f"tables/{name}.csv", caption,
                            {"name": name, "facets": facets, "markdown_rows": markdown_rows}))

    def figure(self, figure, name: str, caption: str):
        paths = figures.save_figure(figure, self.folder / "figures", name)
        self.figure_files += [paths["png"], paths["svg"]]
        self.blocks.append(("figure", name, paths["png"], caption))


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(document: Document, title: str) -> str:
    lines = [f"# {title}", ""]
    for block in document.blocks:
        kind = block[0]
        if kind == "heading":
            lines += [f"{'#' * block[1]} {block[2]}", ""]
        elif kind == "text":
            lines += [block[1], ""]
        elif kind == "bullets":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, shown, csv, caption, options = block
            if caption:
                lines += [caption, ""]
            limit = options["markdown_rows"]
            rows = shown if limit is None else shown.head(limit)
            lines.append("| " + " | ".join(_markdown_cell(c) for c in shown.columns) + " |")
            lines.append("|" + "|".join("---" for _ in shown.columns) + "|")
            lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows.itertuples(index=False)]
            if len(rows) < len(shown):
                lines += ["", f"The first {len(rows)} of {len(shown)} rows; every row is in the CSV `{csv}` and in "
                              f"report.html, where the table sorts by any column and filters by factor level."]
            lines += ["", f"(CSV: `{csv}`)", ""]
        elif kind == "figure":
            _, name, _, caption = block
            lines += [f"![{caption}](figures/{name}.png)", "",
                      f"*Figure `{name}`* (figures/{name}.svg): {caption}", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px; margin: 24px auto;
       padding: 0 16px; color: #222; line-height: 1.45; background: #fff; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: 6px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0 4px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #eef3f8; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 14px 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .csv { font-size: 12px; color: #555; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
.scroll { max-height: 34em; overflow: auto; border: 1px solid #ddd; }
.scroll table { margin: 0; }
.scroll th { position: sticky; top: 0; z-index: 1; }
.filters { font-size: 12px; margin: 6px 0; }
.filters label { margin-right: 12px; }
"""

#: The HTML tables' behaviour, inline so the page needs nothing from outside: a click on a header
#: sorts by that column (ascending, then descending; numbers as numbers, "-" and "n/a" last); the
#: level filters above a table hide the rows that do not match every chosen level.
SCRIPT = """
(function () {
  var PLACEHOLDER = /^(-|n\\/a|)$/;
  function text(row, column) { return row.cells[column].textContent.trim(); }
  function sortBy(header) {
    var body = header.closest('table').tBodies[0], column = header.cellIndex;
    var ascending = header.getAttribute('aria-sort') !== 'ascending';
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function (r) { var t = text(r, column); return PLACEHOLDER.test(t) || !isNaN(parseFloat(t)); });
    rows.sort(function (a, b) {
      var x = text(a, column), y = text(b, column);
      if (numeric) {
        var p = parseFloat(x), q = parseFloat(y);
        if (isNaN(p) || isNaN(q)) { return isNaN(p) - isNaN(q); }
        return ascending ? p - q : q - p;
      }
      return ascending ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(header.parentNode.cells, function (th) { th.setAttribute('aria-sort', 'none'); });
    header.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
  }
  document.querySelectorAll('table.sortable th').forEach(function (th) {
    th.addEventListener('click', function () { sortBy(th); });
  });
  document.querySelectorAll('.filters').forEach(function (box) {
    var rows = Array.prototype.slice.call(document.getElementById(box.dataset.table).tBodies[0].rows);
    var selects = box.querySelectorAll('select'), count = box.querySelector('.shown');
    function apply() {
      var shown = 0;
      rows.forEach(function (r) {
        var keep = Array.prototype.every.call(selects, function (s) {
          return !s.value || r.getAttribute('data-f' + s.dataset.facet) === s.value;
        });
        r.hidden = !keep;
        shown += keep ? 1 : 0;
      });
      count.textContent = shown + ' of ' + rows.length + ' rows shown';
    }
    selects.forEach(function (s) { s.addEventListener('change', apply); });
  });
})();
"""

#: Tables longer than this many rows scroll inside a box of their own in the HTML.
SCROLL_ROWS = 15


def render_html(document: Document, title: str) -> str:
    """The report as one HTML page; figures are embedded as base64 PNG data URIs (no external URL)."""
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for block in document.blocks:
        kind = block[0]
        if kind == "heading":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "text":
            out.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "bullets":
            out.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            _, shown, csv, caption, options = block
            if caption:
                out.append(f"<p>{html.escape(caption)}</p>")
            out.append(_html_table(shown, options["name"], options["facets"]))
            out.append(f"<p class='csv'>CSV: {html.escape(csv)}</p>")
        elif kind == "figure":
            _, name, png, caption = block
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            out.append(f"<figure id='{html.escape(name)}'><img src='data:image/png;base64,{data}' "
                       f"alt='{html.escape(caption)}'><figcaption>Figure <code>{html.escape(name)}</code> "
                       f"(figures/{html.escape(name)}.png, .svg): {html.escape(caption)}</figcaption></figure>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def _html_table(shown: pd.DataFrame, name: str, facets: pd.DataFrame | None) -> str:
    """A sortable table (see SCRIPT), with a level filter per column of `facets` above it."""
    table_id = f"table-{html.escape(name)}"
    filters = ""
    if facets is not None and len(facets.columns):
        facets = facets.astype(str).reset_index(drop=True)
        selects = "".join(
            f"<label>{html.escape(str(column))} <select data-facet='{i}'><option value=''>all</option>"
            + "".join(f"<option>{html.escape(level)}</option>" for level in pd.unique(facets[column]))
            + "</select></label>" for i, column in enumerate(facets.columns))
        filters = (f"<div class='filters' data-table='{table_id}'>Filter: {selects}<span class='shown'>"
                   f"{len(shown)} of {len(shown)} rows shown</span></div>")
    head = "".join(f"<th title='sort by this column'>{html.escape(str(c))}</th>" for c in shown.columns)
    rows = []
    for position, row in enumerate(shown.itertuples(index=False)):
        attributes = "" if not filters else "".join(
            f" data-f{i}='{html.escape(value)}'" for i, value in enumerate(facets.iloc[position]))
        rows.append(f"<tr{attributes}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    table = f"<table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return filters + (f"<div class='scroll'>{table}</div>" if len(shown) > SCROLL_ROWS else table)


# --- formatting -------------------------------------------------------------------------------------


def _ci(mean, low, high, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _cis(table: pd.DataFrame, prefix: str, digits: int = 3) -> list[str]:
    """`_ci` of every row of `table` from its columns <prefix>_mean, _low and _high ("-" without them)."""
    columns = [f"{prefix}_mean", f"{prefix}_low", f"{prefix}_high"]
    if not set(columns) <= set(table):
        return ["-"] * len(table)
    return [_ci(*v, digits=digits) for v in table[columns].astype(float).to_numpy()]


def _params(value) -> str:
    return "-" if not np.isfinite(value) else ("0" if value == 0 else f"{value / 1e6:.1f} M")


def _number(value, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float, np.number)) and np.isfinite(value) else "-"


def _within(flag) -> str:
    if flag is None or (isinstance(flag, float) and np.isnan(flag)):
        return "not measured (one seed)"
    return "within training noise" if flag else "beyond training noise"


# --- the sections -----------------------------------------------------------------------------------

ONE_SEED = ("Each configuration was trained once (one seed), so every effect in this report includes training "
            "noise (the spread between runs that differ only in the seed) that this study cannot measure. To "
            "measure it, train every configuration several times: set `search.seeds: N` in grid.yaml (e.g. "
            "`search.seeds: 3`) and run the study again; the report then shows the seed-to-seed SD beside every "
            "effect and flags the effects within it.")


@dataclass
class ReportContext:
    results: StudyResults
    study_dir: Path
    seed: int
    summary: pd.DataFrame = None
    best_key: str | None = None
    best_rule: str = ""
    tests: pd.DataFrame = None
    #: the fine-tuned configurations, best first (rank_configurations: by validation Dice)
    ranked: list[str] = field(default_factory=list)
    #: grid factor -> its marginal_means table
    marginals: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: _best_per_backbone's table
    best_per_backbone: pd.DataFrame = None

    @property
    def unit(self) -> str:
        return self.results.unit

    @property
    def n_units(self) -> str:
        return f"n = {self.results.units} {self.results.unit}s"

    def best_evaluation(self) -> pd.Series | None:
        """The best configuration's first replicate (seed order): the one overlays and curves show."""
        return self.results.evaluation(self.results.replicates(self.best_key)[0]) if self.best_key else None


def _seed_sentence(ctx: ReportContext) -> str:
    results = ctx.results
    if results.seeds <= 1:
        return ONE_SEED
    sd, df = study_seed_sd(results)
    declared = (results.config.get("search") or {}).get("seeds")
    finetuned = results.configurations[results.configurations["stage"] == FINETUNE]
    counts = sorted(set(int(k) for k in finetuned["seeds"]))
    return (f"Seeds: search.seeds = {declared if declared is not None else 'not recorded'}; the fine-tuned "
            f"configurations have {', '.join(map(str, counts))} finished seed(s) each. The seed-to-seed SD of a "
            f"configuration's mean test Dice, pooled over the fine-tuned configurations, is {_number(sd, 3)} "
            f"({df} degrees of freedom); every factor effect is shown beside it. Rule: {NOISE_RULE}.")


def _unit_value(ctx: ReportContext) -> str:
    """What one unit's value is, in words: 'per subject the mean over its test images, seeds averaged'."""
    seeds = "seeds averaged" if ctx.results.seeds > 1 else "one seed"
    if ctx.unit == "subject":
        return f"per subject the mean over its test images, {seeds}"
    return f"per image, {seeds}"


def _protocol_bullets(ctx: ReportContext) -> list[str]:
    """The evaluation protocol, in words, with the values resolved.yaml records (see DESIGN.md)."""
    results, unit = ctx.results, ctx.unit
    config = results.config
    evaluation = config.get("evaluation") or {}
    study = config.get("study") or {}
    per_image, per_subject = results.per_image, results.per_subject
    bullets = [
        "Every number is computed from the per-image test results (results/per_image.csv or the per_image.csv "
        "artifact of each MLflow trial run)" + (" and the per-subject 3D results (per_subject.csv)" if len(per_subject)
                                                else "") +
        ". An evaluation is one trial scored on the test images with one prompt. A configuration is every factor "
        "but the training seed; with several seeds each of its evaluations is one replicate, and every table is per "
        "configuration, its numbers means over the replicates (column Seeds).",
        f"Unit of analysis: the {unit} ({ctx.n_units}): {results.unit_description}. Every n in this report counts "
        f"{unit}s; CIs and paired tests treat {unit}s" + (", not slices," if unit == "subject" else "") +
        " as the independent observations.",
    ]
    penalty = evaluation.get("hd95_penalty")
    penalised = pd.to_numeric(per_image["hd95_penalised"], errors="coerce")
    if penalised.notna().any():
        rule = f"evaluation.hd95_penalty: {penalty}" if penalty is not None else "the penalty is not named in resolved.yaml"
        text = (f"HD95 (95th-percentile Hausdorff distance) is in mm where spacing is known, else pixels. When exactly "
                f"one of prediction and ground truth is empty it is a stated penalty, not a dropped value ({rule}): "
                f"the image diagonal (the volume diagonal for 3D HD95). {int(penalised.sum())} of {len(per_image)} "
                f"per-image scores are this penalty")
        if len(per_subject):
            penalised_3d = pd.to_numeric(per_subject["hd95_3d_penalised"], errors="coerce")
            text += f", and {int(penalised_3d.sum())} of {len(per_subject)} per-subject 3D scores"
        bullets.append(text + "; the tables count them per configuration.")
    else:
        hd95 = pd.to_numeric(per_image["hd95"], errors="coerce")
        bullets.append(f"HD95 is in pixels of the original image (mm where the table says so). This study folder "
                       f"records no HD95 penalty (per_image.csv has no hd95_penalised column: written by an older "
                       f"version): HD95 is undefined when exactly one of prediction and ground truth is empty, and "
                       f"those {int((~np.isfinite(hd95)).sum())} of {len(per_image)} image scores are left out of HD95 "
                       f"and counted in the table.")
    if pd.to_numeric(per_image["nsd"], errors="coerce").notna().any():
        tolerance = evaluation.get("nsd_tolerance_mm")
        value = f"{tolerance} (evaluation.nsd_tolerance_mm)" if tolerance is not None else "not recorded in resolved.yaml"
        bullets.append(f"NSD is the normalised surface Dice (MONAI's surface Dice) at a tolerance of {value}: in mm "
                       f"where spacing is known, in pixels for 2D images without spacing.")
    else:
        bullets.append("per_image.csv has no nsd column (written before NSD was measured): no NSD is shown.")
    multimask = evaluation.get("single_point_multimask")
    if multimask is True:
        bullets.append("A single-point prompt is ambiguous, so it is evaluated by asking the model for 3 masks and "
                       "keeping the one with the highest predicted IoU (evaluation.single_point_multimask: true), as "
                       "the official SamPredictor and micro-sam do, zero-shot and fine-tuned; fine-tuning with such a "
                       "prompt trains the same three masks (the lowest-loss one per image, the IoU head on all "
                       "three), so the masks evaluated are the ones trained.")
    elif multimask is False:
        bullets.append("Single-point prompts are evaluated with the single-mask output "
                       "(evaluation.single_point_multimask: false).")
    else:
        bullets.append("resolved.yaml does not record evaluation.single_point_multimask (a study written before it "
                       "existed): how single-point prompts were scored is not recorded.")
    clicks = clicks_of(per_image)
    if clicks:
        bullets.append(f"Corrective clicks (evaluation.clicks: {clicks}, click_rule: "
                       f"{evaluation.get('click_rule', 'not recorded')}): every test image is also scored after each "
                       f"of {clicks} simulated clicks, from results/per_click.csv; the single-shot numbers everywhere "
                       f"else are click 0. Section 6 defines Dice@k and the AUC and tests the AUC.")
    if unit == "subject" or (len(per_subject) and (pd.to_numeric(per_subject["slices"], errors="coerce") > 1).any()):
        if len(per_subject):
            bullets.append("Volumes: every test slice that holds the target is evaluated (min_area filters training "
                           "and validation slices only), with a ground-truth prompt on every target slice; per-subject "
                           "3D Dice, HD95 and NSD are computed over the subject's stacked test slices (per_subject.csv).")
        else:
            bullets.append("Volumes: results/per_subject.csv is absent (a study written before 3D metrics), so there "
                           "are no 3D metrics; a study of that age may also have left small test slices out (min_area).")
    else:
        bullets.append("The test images are 2D images, each its own subject; there are no 3D metrics to add.")
    bullets.append(f"Every evaluation prompt is derived from the ground truth and seeded by (study seed "
                   f"{study.get('seed', 'not recorded')}, image, prompt), so every trial, seed and baseline sees the "
                   f"same prompts for an image.")
    bullets.append(f"Means are over {unit}s. {CONFIDENCE:.0%} confidence intervals are percentile bootstrap "
                   f"intervals over {unit}s ({BOOTSTRAP_RESAMPLES} resamples, numpy default_rng seed {ctx.seed}): with "
                   f"one seed the cluster bootstrap (scipy.stats.bootstrap's percentile interval on the per-{unit} "
                   f"values, written out in numpy in analysis.statistics.bootstrap_mean_ci, so whole {unit}s are "
                   f"resampled); with several seeds a two-level bootstrap (analysis.statistics."
                   f"two_level_bootstrap_ci): each resample draws the {unit}s with replacement and, independently, "
                   f"each configuration's seeds with replacement (one draw for all {unit}s, as a seed's model scores "
                   f"them all), and takes the mean over the drawn {unit}s of the mean over the drawn seeds.")
    bullets.append(_seed_sentence(ctx))
    bullets.append(f"The best configuration is the fine-tuned configuration with the "
                   f"{ctx.best_rule or 'highest validation Dice'}, so its test numbers are not selected on the test set.")
    bullets.append(f"Paired tests are two-sided Wilcoxon signed-rank tests (scipy.stats.wilcoxon, zero differences "
                   f"dropped) on {unit}-level Dice ({_unit_value(ctx)}), matched {unit} by {unit}, Holm-adjusted "
                   f"within each family (statsmodels multipletests, method holm); significance at {ALPHA} after Holm.")
    return bullets


def _introduction(doc: Document, ctx: ReportContext, source: str, best_text: str):
    results = ctx.results
    ev, conf = results.evaluations, results.configurations
    finetune_trials = results.trials[results.trials["stage"] == FINETUNE]
    zero_shot = conf[conf["stage"] == ZERO_SHOT]
    images = results.per_image["image_id"].nunique()
    finetuned = conf[conf["stage"] == FINETUNE]
    doc.text(f"Source: {source}. {len(finetune_trials)} fine-tuning trial(s), "
             f"{ev.loc[ev['stage'] == FINETUNE, 'trial_id'].nunique()} with test results, in {len(finetuned)} "
             f"configuration(s) ({results.seeds or 0} seed(s) at most); {len(zero_shot)} zero-shot configuration(s); "
             + (f"{int((results.trials['stage'] == UNET).sum())} U-Net baseline trial(s); "
                if (results.trials["stage"] == UNET).any() else "") +
             f"{images} distinct test image(s); unit of analysis: the {ctx.unit}, {ctx.n_units}. Factors varied in "
             f"the grid: {', '.join(results.grid_factors) or 'none'}"
             + (f"; searched over a range: {', '.join(results.searched_factors)}" if results.searched_factors else "")
             + ".")
    doc.text(best_text)
    _leaderboard_section(doc, ctx)
    doc.heading("How the numbers are computed")
    doc.bullets(_protocol_bullets(ctx))
    if results.notes:
        doc.heading("Data notes", 3)
        doc.bullets(results.notes)


#: The leaderboard's length: the fine-tuned configurations ranked first on validation Dice.
LEADERBOARD_ROWS = 10
#: The leaderboard in MLflow's table format (MlflowClient.log_table's JSON), at the report's root.
LEADERBOARD_JSON = "leaderboard.json"


def leaderboard_table(ctx: ReportContext) -> pd.DataFrame:
    """The LEADERBOARD_ROWS fine-tuned configurations ranked first by rank_configurations (validation
    Dice), with the summary's test numbers: rank, configuration, label, the grid factors, seeds,
    val_dice, n and each metric's mean, low and high."""
    results = ctx.results
    hd95, _ = _hd95_unit(ctx.summary)
    rows = ctx.summary.set_index("configuration").loc[ctx.ranked[:LEADERBOARD_ROWS]].reset_index()
    metrics = [f"{m}_{part}" for m in ("dice", "iou", "nsd", hd95) for part in ("mean", "low", "high")]
    factors = [f for f in ["backbone", *results.grid_factors, *results.searched_factors] if f in rows]
    table = rows[["configuration", "label", *dict.fromkeys(factors), "seeds", "val_dice", "n", *metrics]]
    return table.assign(rank=range(1, len(table) + 1))[["rank", *table.columns]]


def _leaderboard_section(doc: Document, ctx: ReportContext):
    """The answer first: the top configurations, the best per backbone, and one sentence per factor."""
    unit = ctx.unit
    doc.heading("Leaderboard")
    if not ctx.ranked:
        doc.text("No leaderboard: the study has no fine-tuned configuration with test results.")
        return
    table = leaderboard_table(ctx)
    hd95, hd95_unit = _hd95_unit(ctx.summary)
    shown = pd.DataFrame({
        "Rank": table["rank"], "Configuration": table["label"], "Seeds": table["seeds"],
        "Val Dice": [_number(v, 3) for v in table["val_dice"]],
        "Test Dice [95% CI]": _cis(table, "dice"),
        "IoU [95% CI]": _cis(table, "iou"),
        "NSD [95% CI]": _cis(table, "nsd"),
        f"HD95 {hd95_unit} [95% CI]": _cis(table, hd95, 1),
        f"n {unit}s": table["n"],
    })
    doc.table(shown, "leaderboard", table, caption=(
        f"The {len(table)} fine-tuned configurations (of {len(ctx.ranked)}) with the {ctx.best_rule}, best first; "
        f"ranked on validation, so their test numbers are not selected on the test set. Test numbers as in the "
        f"summary (section 1): means over {unit}s ({_unit_value(ctx)}) with {CONFIDENCE:.0%} {unit}-level "
        f"bootstrap CIs. {LEADERBOARD_JSON} holds this table in MLflow's table format: logged with the report, it "
        f"shows as a table on the study's parent MLflow run."))
    _write_mlflow_table(doc, table)
    verdicts = factor_verdicts(ctx.tests, ctx.marginals)
    if len(verdicts):
        doc.text(f"Which level of each grid factor wins (the highest marginal mean, section 2) and whether its lead "
                 f"over the runner-up holds up. Rule: {HOLDS_UP_RULE}.")
        doc.bullets([_verdict_sentence(row, unit) for _, row in verdicts.iterrows()])
    _best_per_backbone_table(doc, ctx)


def _write_mlflow_table(doc: Document, table: pd.DataFrame):
    """The leaderboard as LEADERBOARD_JSON in MlflowClient.log_table's format (pandas orient="split"),
    so the MLflow UI shows it as a table once register_mlflow_tables has marked it."""
    path = doc.folder / LEADERBOARD_JSON
    table.drop(columns="configuration").round(4).to_json(path, orient="split", index=False)
    doc.table_files.append(path)


def _best_per_backbone_table(doc: Document, ctx: ReportContext):
    best = ctx.best_per_backbone
    if best.empty:
        return
    trained = best[best["stage"] != ZERO_SHOT].sort_values("val_dice", ascending=False, kind="stable")
    zero_shot = best[best["stage"] == ZERO_SHOT].set_index("backbone")
    rows = []
    for _, row in trained.iterrows():
        reference = zero_shot.loc[row["backbone"]] if row["backbone"] in zero_shot.index else None
        rows.append({"Backbone": row["backbone"], "Family": row["family"], "Encoder params": _params(row["params"]),
                     "Best trained configuration (on val Dice)": row["configuration"], "Seeds": row["seeds"],
                     "Val Dice": _number(row["val_dice"], 3),
                     "Test Dice [95% CI]": _ci(row["mean"], row["low"], row["high"]),
                     "Best zero-shot (on val Dice)": reference["configuration"] if reference is not None else "none",
                     "Zero-shot Dice [95% CI]": _ci(reference["mean"], reference["low"], reference["high"])
                     if reference is not None else "-"})
    unet = " (the U-Net baseline: trained from scratch)" if (best["stage"] == UNET).any() else ""
    doc.table(pd.DataFrame(rows), "best_per_backbone", best.drop(columns="key"), caption=(
        f"The best configuration of each backbone: fine-tuned{unet} and zero-shot, each chosen on validation Dice, "
        f"with test Dice as in the summary; backbones by validation Dice."))


def _verdict_sentence(verdict: pd.Series, unit: str) -> str:
    """One factor's factor_verdicts row in words."""
    lead = (f"{verdict['factor']}: {verdict['winner']} wins" + (f" among {int(verdict['levels'])} levels"
                                                                 if verdict["levels"] > 2 else "")
            + f" (marginal mean test Dice {_ci(verdict['winner_mean'], verdict['winner_low'], verdict['winner_high'])} "
            f"over {int(verdict['winner_cells'])} configuration(s)), ahead of {verdict['runner_up']} "
            f"({_number(verdict['runner_up_mean'], 3)})")
    if not verdict["comparison"] or not np.isfinite(verdict["p"]):
        return f"{lead}; section 5 could not test this pair, so whether the lead holds up is not known."
    test = (f"section 5's paired test ({verdict['comparison']}): median difference "
            f"{verdict['median_difference']:+.3f} Dice, p = {format_p(verdict['p_holm'])} after Holm, "
            f"n = {int(verdict['n'])} {unit}s")
    noise = (f"mean effect {verdict['mean_difference']:+.3f} against a noise SD of {verdict['noise_sd']:.3f}"
             if np.isfinite(verdict["noise_sd"]) else "")
    holds_up = verdict["holds_up"]
    holds_up = None if holds_up is None or (isinstance(holds_up, float) and np.isnan(holds_up)) else bool(holds_up)
    if holds_up is True:
        return f"{lead}. The lead holds up: {test}; {noise}, beyond training noise."
    if not verdict["significant"]:
        return f"{lead}. The lead does not hold up: not significant ({test})."
    if holds_up is False:
        return f"{lead}. The lead does not hold up: significant ({test}) but within training noise ({noise})."
    return (f"{lead}. Significant ({test}), but with one seed per configuration this study cannot tell whether it "
            f"exceeds training noise.")


def _order(table: pd.DataFrame, column: str = "dice_mean") -> pd.DataFrame:
    """The trained configurations by `column` (highest first), then the zero-shot ones likewise."""
    zero_shot = table["stage"] == ZERO_SHOT
    return pd.concat([table[~zero_shot].sort_values(column, ascending=False, kind="stable"),
                      table[zero_shot].sort_values(column, ascending=False, kind="stable")])


#: The Markdown shows this many rows of a table with one row per configuration (every row is in
#: its CSV and in the HTML, which sorts and filters them).
MARKDOWN_ROWS = 25


def _facets(ctx: ReportContext, keys) -> pd.DataFrame:
    """What the HTML filters a per-configuration table by (its rows are the configurations `keys`):
    the stage and every grid factor."""
    configurations = ctx.results.configurations.set_index("configuration").loc[list(keys)]
    columns = ["stage", *ctx.results.grid_factors]
    return pd.DataFrame({c: [format_level(v) for v in configurations[c]] for c in columns})


def _hd95_unit(summary: pd.DataFrame) -> tuple[str, str]:
    """HD95 in mm when every configuration has it, else pixels: (column prefix, unit name)."""
    if "hd95_mm_mean" in summary and summary["hd95_mm_mean"].notna().all():
        return "hd95_mm", "mm"
    return "hd95", "px"


def _summary_section(doc: Document, ctx: ReportContext):
    results, summary = ctx.results, ctx.summary
    doc.heading("1. Summary of every configuration")
    order = _order(summary)
    hd95, hd95_unit = _hd95_unit(order)
    shown = pd.DataFrame({
        "Configuration": order["label"],
        "Stage": order["stage"].str.replace("_", "-"),
        "Status": order["status"].fillna(""),
        "Seeds": order["seeds"],
        f"n {ctx.unit}s": order["n"],
        "Dice [95% CI]": _cis(order, "dice"),
        "Dice seed SD": [_number(v, 3) for v in order["dice_seed_sd"]],
        "IoU [95% CI]": _cis(order, "iou"),
        "mIoU [95% CI]": _cis(order, "miou"),
        "NSD [95% CI]": _cis(order, "nsd"),
        f"HD95 {hd95_unit} [95% CI]": _cis(order, hd95, 1),
    })
    if order["hd95_penalised"].notna().any():
        shown["HD95 penalised (of image scores)"] = [
            "-" if np.isnan(k) else f"{int(k)} of {int(n)}" for k, n in order[["hd95_penalised", "hd95_scores"]].to_numpy()]
    else:
        shown["HD95 undefined, left out (of image scores)"] = [
            f"{int(m)} of {int(n)}" for m, n in order[["hd95_missing", "hd95_scores"]].to_numpy()]
    shown["Epochs run"] = [_number(v) for v in order["epochs_run"]]
    shown["Wall time per trial (s)"] = [_number(v) for v in order["seconds"]]
    shown["Encoder params"] = [_params(v) for v in order["image_encoder_params"]]
    shown["Trained params"] = [_params(v) for v in order["trainable_params"]]
    shown["Val Dice"] = [_number(v, 3) for v in order["val_dice"]]
    if ctx.best_key:
        shown["Configuration"] = [f"{label} (best)" if key == ctx.best_key else label
                                  for label, key in zip(shown["Configuration"], order["configuration"])]
    doc.table(shown, "summary", order, caption=f"One row per configuration; Seeds = its replicate trials, every number "
              f"a mean over them (Val Dice, epochs and wall time per trial too). Means over {ctx.unit}s of the "
              f"seed-averaged {ctx.unit} value with {CONFIDENCE:.0%} {ctx.unit}-level bootstrap CIs; HD95 is the "
              f"penalised value where per_image.csv records the penalty. Encoder params: the image encoder's parameter count "
              f"(a U-Net: its whole network); Trained params: the parameters the trial's optimiser updated (decoder, "
              f"tuned encoder blocks or LoRA adapters; 0 zero-shot). Trained configurations first, sorted by "
              f"mean test Dice, then the zero-shot ones; (best) marks the configuration chosen on validation Dice.",
              facets=_facets(ctx, order["configuration"]), markdown_rows=MARKDOWN_ROWS)
    finished = set(results.evaluations["trial_id"])
    missing = results.trials[~results.trials["trial_id"].isin(finished)]
    if len(missing):
        columns = ["trial_id", "stage", "status", *[f for f in ["backbone", *results.grid_factors, "seed"] if f in missing]]
        columns = list(dict.fromkeys(columns))
        doc.table(missing[columns].astype(str), "trials_without_results",
                  caption=f"{len(missing)} trial(s) have no per-image test results (failed or stopped before "
                          f"testing) and are left out of every number below.")
    _subject_3d_section(doc, ctx)
    change = zero_shot_change(results, seed=ctx.seed)
    doc.heading("Zero-shot to fine-tuned, per backbone and prompt", 3)
    if change.empty:
        doc.text("The study has no zero-shot evaluations with test results (baseline.zero_shot off, or not "
                 "finished), so there is no change to show.")
        return
    shown = pd.DataFrame({
        "Backbone": change["backbone"], "Prompt": change["prompt"],
        "Zero-shot Dice": [_number(v, 3) for v in change["zero_shot_mean"]],
        "Fine-tuned (best on val)": change["finetuned"].replace("", "none"),
        "Seeds": change["seeds"],
        "Fine-tuned Dice": [_number(v, 3) for v in change["finetuned_mean"]],
        "Change [95% CI]": [_ci(m, lo, hi) for m, lo, hi in change[["change_mean", "change_low", "change_high"]].to_numpy()],
        "Median change": [_number(v, 3) for v in change["change_median"]],
        f"n {ctx.unit}s": change["n"],
        "p (Holm)": [format_p(p) for p in change["p_holm"]],
    })
    if "target" in change:
        shown.insert(0, "Target", change["target"])
    doc.table(shown, "zero_shot_change", change, caption=f"Change = fine-tuned (seeds averaged) minus zero-shot Dice "
              f"per {ctx.unit}, on the {ctx.unit}s both scored; the fine-tuned side is the same backbone and "
              f"evaluation prompt's best configuration on validation Dice. CI: {ctx.unit}-level bootstrap (two-level "
              f"over the fine-tuned seeds when it has several). p: paired Wilcoxon, Holm-adjusted over this table's rows.")


def _unet_section(doc: Document, ctx: ReportContext):
    """The U-Net baseline (baseline.unet) against the best fine-tuned SAM configuration."""
    results, unit = ctx.results, ctx.unit
    table = unet_comparison(results, seed=ctx.seed)
    if table.empty:
        return
    settings = (results.config.get("baseline") or {}).get("unet") or {}
    described = ", ".join(f"{key} {settings[key]}" for key in ("epochs", "input_size", "optimizer", "lr", "loss",
                                                               "batch_size", "schedule", "deep_supervision")
                          if key in settings) or "settings not recorded in resolved.yaml"
    doc.heading("Fine-tuned SAM against the U-Net baseline", 3)
    doc.text(f"The U-Net baseline is MONAI's DynUNet in nnU-Net's 2D layout (3 x 3 convolutions, stride-2 levels down "
             f"to a 4-pixel feature map, instance norm, leaky ReLU), trained from scratch on the same training slices, "
             f"selected on the same validation slices and scored on the same test slices, splits and seeds, with MONAI "
             f"augmentation on the fly ({described}). It is not nnU-Net's full pipeline: no planning from the dataset's "
             f"spacing and sizes, no 5-fold cross-validation or ensembling, no test-time mirroring. 'U-Net + box channel' "
             f"also gets the prompt box as a fourth input channel, the same box a SAM trial with the box prompt gets, so "
             f"it is the fair opponent of box-prompted SAM.")
    shown = pd.DataFrame({
        **({"Target": table["target"]} if "target" in table else {}),
        "U-Net": table["unet"], "SAM configuration": table["sam_label"].fillna("none"),
        "chosen by": table["selected_by"], "Seeds (SAM / U-Net)": [
            f"{int(a)} / {int(b)}" if np.isfinite(a) else "-" for a, b in table[["sam_seeds", "unet_seeds"]].to_numpy()],
        "SAM Dice": [_number(v, 3) for v in table["sam_mean"]], "U-Net Dice": [_number(v, 3) for v in table["unet_mean"]],
        "SAM - U-Net [95% CI]": [_ci(m, lo, hi) for m, lo, hi in
                                 table[["difference_mean", "difference_low", "difference_high"]].to_numpy()],
        "Median difference": [_number(v, 3) for v in table["difference_median"]],
        f"n {unit}s": table["n"], "p (Holm)": [format_p(p) for p in table["p_holm"]],
        "Training noise": [_within(v) for v in table["within_noise"]],
    })
    doc.table(shown, "sam_vs_unet", table, caption=f"Per {unit}, the SAM configuration's Dice minus the U-Net's "
              f"(each averaged over its seeds), on the {unit}s both scored: mean with a {CONFIDENCE:.0%} {unit}-level "
              f"bootstrap CI (seeds averaged), median, paired Wilcoxon test Holm-adjusted over this table's rows. The "
              f"SAM side is the best fine-tuned configuration on validation Dice; for the box-channel U-Net also the "
              f"best box-prompted one. Training noise: the difference against sqrt(SD_SAM^2 / seeds_SAM + SD_U-Net^2 / "
              f"seeds_U-Net) from each side's seed-to-seed SD: within it when |mean| < {NOISE_MULTIPLE:g} x that SD "
              f"(not measured with one seed).")


def _region_levels(results: StudyResults) -> list:
    """The targets of a study whose `data.target` is a list, in its order; [] for a one-target study."""
    configurations = results.configurations
    if "target" not in results.factors or "target" not in configurations:
        return []
    present = [v for v in pd.unique(configurations["target"]) if isinstance(v, str)]
    declared = (results.config.get("data") or {}).get("target")
    declared = declared if isinstance(declared, list) else []
    levels = [v for v in declared if v in present] + [v for v in present if v not in declared]
    return levels if len(levels) > 1 else []


def region_table(ctx: ReportContext) -> pd.DataFrame:
    """Per target: the best fine-tuned configuration at that target (`best_configuration`: by mean
    validation Dice), its test Dice, HD95 and NSD with CIs (summary_table's), its 3D Dice when
    per_subject.csv exists (subject_3d_table's), and the zero-shot evaluation of the same backbone
    and prompt at that target. Empty for a one-target study."""
    results, summary = ctx.results, ctx.summary.set_index("configuration")
    levels = _region_levels(results)
    if not levels:
        return pd.DataFrame()
    configurations = results.configurations
    table_3d = subject_3d_table(results, seed=ctx.seed)
    table_3d = table_3d.set_index("configuration") if not table_3d.empty else table_3d
    hd95, _ = _hd95_unit(ctx.summary)
    rows = []
    for level in levels:
        at = configurations[configurations["target"] == level]
        best_key, rule = best_configuration(results, at[at["stage"] == FINETUNE])
        zero_shot = at[at["stage"] == ZERO_SHOT]
        row = {"target": level, "configuration": best_key or "", "selected_by": rule}
        if best_key:
            best, numbers = results.configuration(best_key), summary.loc[best_key]
            zero_shot = zero_shot[(zero_shot["backbone"] == best["backbone"])
                                  & (zero_shot["eval_prompt"] == best["eval_prompt"])]
            row.update(label=best["label"], seeds=int(best["seeds"]), val_dice=best["val_dice"], n=numbers["n"])
            for metric in ("dice", hd95, "nsd"):
                row.update({f"{metric}_{part}": numbers[f"{metric}_{part}"] for part in ("mean", "low", "high")})
            if len(table_3d) and best_key in table_3d.index:
                row.update({f"dice_3d_{part}": table_3d.loc[best_key, f"dice_3d_{part}"] for part in ("mean", "low", "high")})
        if len(zero_shot):
            key = zero_shot["configuration"].iloc[0]
            row.update(zero_shot=zero_shot["label"].iloc[0],
                       **{f"zero_shot_dice_{part}": summary.loc[key, f"dice_{part}"] for part in ("mean", "low", "high")})
        rows.append(row)
    return pd.DataFrame(rows)


def _region_section(doc: Document, ctx: ReportContext):
    """Section 1's per-region table, for a study of several targets (`data.target` a list)."""
    table = region_table(ctx)
    if table.empty:
        return
    hd95, hd95_unit = _hd95_unit(ctx.summary)

    doc.heading("Per region (data.target)", 3)
    shown = pd.DataFrame({
        "Target": table["target"],
        "Best configuration (on val Dice)": table.get("label", pd.Series([""] * len(table))).fillna("none"),
        "Seeds": [_number(v) for v in table.get("seeds", pd.Series([np.nan] * len(table)))],
        "Val Dice": [_number(v, 3) for v in table.get("val_dice", pd.Series([np.nan] * len(table)))],
        f"n {ctx.unit}s": [_number(v) for v in table.get("n", pd.Series([np.nan] * len(table)))],
        "Test Dice [95% CI]": _cis(table, "dice"),
        f"HD95 {hd95_unit} [95% CI]": _cis(table, hd95, 1),
        "NSD [95% CI]": _cis(table, "nsd"),
    })
    if not ctx.results.per_subject.empty:
        shown["Dice 3D [95% CI]"] = _cis(table, "dice_3d")
    shown["Zero-shot Dice [95% CI] (same backbone and prompt)"] = _cis(table, "zero_shot_dice")
    doc.table(shown, "per_region", table, caption=f"One row per target (data.target): the fine-tuned configuration "
              f"at that target with the highest mean validation Dice over its seeds, and its test numbers (means over "
              f"{ctx.unit}s of the seed-averaged value with {CONFIDENCE:.0%} {ctx.unit}-level bootstrap CIs, as in the "
              f"summary; Dice 3D per subject from per_subject.csv); the zero-shot column is the same backbone and "
              f"evaluation prompt without training, at that target. Each target is scored on its own test slices "
              f"(the same test subjects, every slice holding that target).")


def _subject_3d_section(doc: Document, ctx: ReportContext):
    results = ctx.results
    doc.heading("Per-subject 3D metrics", 3)
    if results.per_subject.empty:
        doc.text("results/per_subject.csv is absent (a study written before per-subject 3D metrics, or read from "
                 "MLflow runs without the per_subject.csv artifact): no 3D table.")
        return
    table = subject_3d_table(results, seed=ctx.seed)
    if table.empty:
        doc.text("per_subject.csv holds no rows of an evaluated configuration: no 3D table.")
        return
    order = _order(table, "dice_3d_mean")
    mm = order["hd95_3d_mm_mean"].notna().all()
    hd95, hd95_unit = ("hd95_3d_mm", "mm") if mm else ("hd95_3d", "voxels")
    shown = pd.DataFrame({
        "Configuration": order["label"], "Stage": order["stage"].str.replace("_", "-"), "Seeds": order["seeds"],
        "n subjects": order["n"],
        "Dice 3D [95% CI]": _cis(order, "dice_3d"),
        f"HD95 3D {hd95_unit} [95% CI]": _cis(order, hd95, 1),
        "HD95 3D penalised (of subject scores)": ["-" if np.isnan(k) else f"{int(k)} of {int(n)}"
                                                 for k, n in order[["hd95_3d_penalised", "scores"]].to_numpy()],
        "NSD 3D [95% CI]": _cis(order, "nsd_3d"),
        "Slices per subject (median)": [_number(v) for v in order["slices"]],
    })
    doc.table(shown, "subject_3d", order, caption="Per-subject 3D metrics (per_subject.csv): each subject's test slices "
              "stacked at their slice index, 3D Dice, HD95 and NSD over the stack; means over subjects of the "
              f"seed-averaged subject value with {CONFIDENCE:.0%} subject-level bootstrap CIs (two-level with seeds); "
              "trained configurations first, by 3D Dice, then the zero-shot ones.",
              facets=_facets(ctx, order["configuration"]), markdown_rows=MARKDOWN_ROWS)


def _ablation_section(doc: Document, ctx: ReportContext):
    results, unit = ctx.results, ctx.unit
    doc.heading("2. Ablations")
    if not results.grid_factors:
        doc.text("No factor takes more than one value among the fine-tuned trials, so there is nothing to ablate.")
    for factor, marginal in ctx.marginals.items():
        doc.figure(figures.ablation_figure(marginal, factor), f"ablation_{factor}",
                   f"Test Dice per level of {factor}: per {unit}, the mean over the other factors' configurations "
                   f"at that level (each averaged over its seeds); the mean over {unit}s with its 95% "
                   f"{unit}-level bootstrap CI (blue), and each configuration's own mean (grey dots).")
    if ctx.marginals:
        panels = {factor: {format_level(level): unit_values(results, keys).to_numpy(float)
                           for level, keys in level_configurations(results, factor)} for factor in ctx.marginals}
        doc.figure(figures.level_box_plots(panels, "Dice", unit), "box_dice_by_level",
                   f"Test Dice per {unit} for each level of each grid factor, pooled over the other factors: a "
                   f"{unit}'s value at a level is its mean over the fine-tuned configurations at that level (each "
                   f"averaged over its seeds), the values the marginal means and their CIs are computed from.")
        table = pd.concat([m.drop(columns="cell_means") for m in ctx.marginals.values()], ignore_index=True)
        shown = table.assign(**{"Dice [95% CI]": [_ci(*v) for v in table[["mean", "low", "high"]].to_numpy()],
                                "seed SD": [_number(v, 3) for v in table["seed_sd"]]})
        shown = shown.rename(columns={"n": f"n {unit}s"})
        doc.table(shown[["factor", "level", "cells", "seeds", f"n {unit}s", "Dice [95% CI]", "seed SD"]],
                  "marginal_means", table, caption="Marginal means of test Dice; cells = configurations averaged per "
                  f"{unit}, seeds = their replicate trials, seed SD = the pooled seed-to-seed SD of their means.")
        _noise_table(doc, ctx)
    if results.searched_factors:
        doc.text(f"Factors searched over a range ({', '.join(results.searched_factors)}) take a different value in "
                 f"every trial; they appear in section 6 (importance, parallel coordinates), not as levels here.")
    _interactions(doc, ctx)
    _model_size(doc, ctx)


def _interactions(doc: Document, ctx: ReportContext):
    """Zero-shot against fine-tuned per backbone x prompt, and every pair of grid factors as small multiples."""
    results, unit = ctx.results, ctx.unit
    panels = {}
    conf = results.configurations
    if "prompt" in conf and (conf["backbone"].nunique() > 1 or conf["eval_prompt"].nunique() > 1):
        for stage, title in ((ZERO_SHOT, "zero-shot"), (FINETUNE, "fine-tuned (mean over other factors)")):
            key = "eval_prompt" if stage == ZERO_SHOT else "prompt"
            table = cell_means(results, "backbone", key, stage)
            if not table.empty:
                panels[title] = table.rename_axis(columns="prompt")
    pairs = list(combinations(results.grid_factors, 2))
    if not panels and not pairs:
        return
    doc.heading("Interactions", 3)
    if panels:
        doc.figure(figures.interaction_heatmap(panels), "interaction_backbone_prompt",
                   "Mean test Dice per backbone x prompt (zero-shot: the evaluated prompt; fine-tuned: the training "
                   f"prompt, each cell averaged per {unit} over the other factors and the seeds).")
    if pairs:
        grid = {f"{a} x {b}": cell_means(results, a, b) for a, b in pairs}
        doc.figure(figures.interaction_heatmap(grid), "interactions",
                   f"Mean test Dice of the fine-tuned configurations for every pair of grid factors ({len(pairs)} "
                   f"pair(s)), one colour scale: per {unit} the mean over the configurations of the cell (the other "
                   f"factors and the seeds), averaged over {unit}s. A factor that interacts with another shows a "
                   f"pattern that is not the same in every row.")


def _noise_table(doc: Document, ctx: ReportContext):
    """Every factor's effect beside the seed-to-seed spread (or the one-seed sentence)."""
    tests = ctx.tests
    doc.heading("Factor effects beside training noise", 3)
    if tests is None or tests.empty:
        return
    if ctx.results.seeds <= 1:
        doc.text(ONE_SEED)
    else:
        doc.text(f"Each effect is the mean paired difference A - B of test Dice per {ctx.unit} (seeds averaged). "
                 f"Seed SD: the pooled seed-to-seed SD of a configuration's mean; noise SD: the SD seed noise alone "
                 f"gives this difference. Rule: {NOISE_RULE}.")
    shown = pd.DataFrame({
        "Factor": tests["factor"], "Comparison": tests["comparison"],
        "A": [format_level(v) for v in tests["level_a"]], "B": [format_level(v) for v in tests["level_b"]],
        "Seeds A / B": [f"{a} / {b}" for a, b in tests[["seeds_a", "seeds_b"]].to_numpy()],
        "Mean effect A-B": [_number(v, 3) for v in tests["mean_difference"]],
        "Seed SD": [_number(v, 3) for v in tests["seed_sd"]],
        "Noise SD of effect": [_number(v, 3) for v in tests["noise_sd"]],
        "Training noise": [_within(v) for v in tests["within_noise"]],
    })
    doc.table(shown, "factor_effects", tests.drop(columns="sentence"))


def _best_per_backbone(ctx: ReportContext) -> pd.DataFrame:
    """Per backbone and stage (zero-shot, fine-tuned, U-Net), its best configuration (best_configuration:
    on validation Dice) with the summary's test Dice and CI."""
    results, summary = ctx.results, ctx.summary.set_index("configuration")
    points = []
    for backbone, group in results.configurations.groupby("backbone"):
        for stage in (ZERO_SHOT, FINETUNE, UNET):
            key, _ = best_configuration(results, group[group["stage"] == stage])
            if key is None:
                continue
            row = summary.loc[key]
            points.append({"family": row["family"], "backbone": backbone, "params": row["image_encoder_params"],
                           "stage": stage, "seeds": row["seeds"], "mean": row["dice_mean"], "low": row["dice_low"],
                           "high": row["dice_high"], "configuration": row["label"], "key": key,
                           "val_dice": row["val_dice"], "n": row["n"]})
    return pd.DataFrame(points)


def _model_size(doc: Document, ctx: ReportContext):
    doc.heading("Model size", 3)
    best = ctx.best_per_backbone
    measured = np.isfinite(best["params"].astype(float)) if len(best) else []
    if not np.any(measured):
        doc.text("No model-size plot: trials.csv records no image-encoder parameter counts.")
        return
    skipped = sorted(set(best.loc[~measured, "backbone"]))
    table = best[measured].drop(columns=["key", "val_dice", "n"]).reset_index(drop=True)
    doc.figure(figures.model_size_figure(table), "model_size",
               "Test Dice (mean, 95% CI) against image-encoder parameter count (log scale), one colour per family; "
               "solid: the backbone's best fine-tuned configuration (for the U-Net baseline: its whole network's "
               "parameter count), dashed: its best zero-shot prompt (both chosen "
               f"on validation Dice; zero-shot points drawn {figures.ZERO_SHOT_NUDGE - 1:.0%} to the right so the "
               "error bars stay apart).")
    doc.table(table.assign(params=table["params"].map(_params), mean=table["mean"].map(lambda v: _number(v, 3)))[
        ["family", "backbone", "params", "stage", "configuration", "seeds", "mean"]], "model_size", table)
    if skipped:
        doc.text(f"Left out of the model-size plot (no parameter count): {', '.join(skipped)}.")


#: Box plots draw at most this many fine-tuned configurations (those ranked first on validation
#: Dice), beside the U-Net arms and the zero-shot references of the same backbones and prompts.
BOX_CONFIGURATIONS = 12


def _shown_configurations(ctx: ReportContext, count: int, keys=None) -> tuple[list[str], list[str]]:
    """What a figure draws when it cannot draw every configuration: the `count` fine-tuned
    configurations ranked first on validation Dice (ctx.ranked; among `keys` when given) and the
    zero-shot configurations (among `keys`) with the backbone and evaluation prompt of one of them."""
    allowed = set(ctx.summary["configuration"] if keys is None else keys)
    tuned = [key for key in ctx.ranked if key in allowed][:count]
    conf = ctx.results.configurations.set_index("configuration")
    pairs = {(conf.loc[k, "backbone"], conf.loc[k, "eval_prompt"]) for k in tuned}
    order = _order(ctx.summary)
    zero_shot = [k for k, stage in zip(order["configuration"], order["stage"]) if stage == ZERO_SHOT and k in allowed
                 and (conf.loc[k, "backbone"], conf.loc[k, "eval_prompt"]) in pairs]
    return tuned, zero_shot


def _per_image_section(doc: Document, ctx: ReportContext):
    results, summary = ctx.results, ctx.summary
    doc.heading("3. Per-image views")
    unit = ctx.unit
    seeds = " and seeds" if results.seeds > 1 else ""
    tuned, zero_shot = _shown_configurations(ctx, BOX_CONFIGURATIONS)
    unets = list(_order(summary[summary["stage"] == UNET], "val_dice")["configuration"])
    order = summary.set_index("configuration").loc[tuned + unets + zero_shot].reset_index()
    finetuned = len(ctx.ranked)
    which = (f"the {len(tuned)} fine-tuned configurations with the highest validation Dice"
             + (f" (of {finetuned}; every configuration is in the summary table)" if finetuned > len(tuned) else "")
             + (", the U-Net arms" if unets else "")
             + (", and the zero-shot model of the same backbones and prompts" if zero_shot else "") + ", top to bottom")
    dice = {row["label"]: unit_values(results, [row["configuration"]], "dice").to_numpy(float)
            for _, row in order.iterrows()}
    doc.figure(figures.box_plot(dice, "Dice", unit=unit), "box_dice",
               f"Test Dice per {unit}" + (f" (a subject's value: the mean over its test images{seeds})"
                                          if unit == "subject" else (" (averaged over seeds)" if seeds else ""))
               + f" of {which}.")
    hd95 = {row["label"]: unit_values(results, [row["configuration"]], "hd95").to_numpy(float)
            for _, row in order.iterrows()}
    if order["hd95_penalised"].notna().any():
        note = f"{int(order['hd95_penalised'].sum())} penalised image scores included"
    else:
        note = f"{int(order['hd95_missing'].sum())} undefined image scores left out"
    if any(np.isfinite(v).any() for v in hd95.values()):
        doc.figure(figures.box_plot(hd95, "HD95 (pixels)", note, unit=unit), "box_hd95",
                   f"Test HD95 (pixels) per {unit} of {which}; {note} (penalty: the image diagonal where "
                   f"exactly one of prediction and truth is empty; older studies left such scores undefined).")
    else:
        doc.text("No HD95 box plot: no image has a defined HD95.")
    best = ctx.best_evaluation()
    per_image = results.per_image
    if best is not None and per_image["area"].notna().any():
        replicate = f" (seed {format_level(best['seed'])})" if results.configuration(ctx.best_key)["seeds"] > 1 else ""
        series = {f"best: {best['label']}": per_image.loc[per_image["evaluation"] == best.name, ["area", "dice"]]}
        ev = results.evaluations
        twin = ev[(ev["stage"] == ZERO_SHOT) & (ev["backbone"] == best["backbone"])
                  & (ev["eval_prompt"] == best["eval_prompt"])]
        for _, row in twin.iterrows():
            series[row["label"]] = per_image.loc[per_image["evaluation"] == row["evaluation"], ["area", "dice"]]
        doc.figure(figures.dice_vs_area(series), "dice_vs_area",
                   f"Per-image test Dice against the target's area (pixels, log scale) for the best configuration"
                   f"{replicate}" + (" and the zero-shot model with the same backbone and prompt." if len(twin) else "."))
    history = results.history
    if not history.empty and "val_dice" in history and history["val_dice"].notna().any():
        finetuned = results.evaluations[(results.evaluations["stage"] == FINETUNE) & results.evaluations["primary"]]
        trial_ids = set(history["trial_id"])
        panels = {str(b): [t for t in g["trial_id"] if t in trial_ids] for b, g in finetuned.groupby("backbone")}
        panels = {b: ids for b, ids in panels.items() if ids}
        if panels:
            labels = dict(zip(finetuned["trial_id"], finetuned["label"]))
            best_trial = best["trial_id"] if best is not None else None
            doc.figure(figures.learning_curves(history, panels, best_trial, labels), "learning_curves",
                       "Validation Dice by epoch, one line per trial (each seed its own trial), one panel per "
                       "backbone; the best configuration's first trial is drawn thick and black.")
    else:
        doc.text("No learning curves: the study recorded no per-epoch validation Dice.")


#: The worst test images of the best configuration listed (and drawn, where their prediction was kept).
WORST_SHOWN = 12


def _overlay_section(doc: Document, ctx: ReportContext):
    doc.heading("4. Overlays")
    best = ctx.best_evaluation()
    if best is None:
        doc.text("No overlays: the study has no fine-tuned configuration with test results.")
        return
    doc.text("Green: true positive, yellow: false positive, pink: false negative, red: the ground truth's border. "
             "A trial keeps the predictions of its best and worst test images only (results/predictions/), so "
             "only those can be drawn.")
    dice = _dice_of(ctx, best.name)
    examples, message = prediction_examples(ctx.study_dir, best["trial_id"], dice)
    if examples:
        doc.figure(figures.overlay_figure(examples, f"Best configuration: {best['label']}"), "overlays_best_config",
                   message)
    else:
        doc.text(message)
    _worst_images(doc, ctx)
    _backbone_overlays(doc, ctx)


def _dice_of(ctx: ReportContext, evaluation: str) -> pd.Series:
    """image_id -> Dice of one evaluation."""
    per_image = ctx.results.per_image
    return per_image.loc[per_image["evaluation"] == evaluation].set_index("image_id")["dice"]


def _worst_images(doc: Document, ctx: ReportContext):
    """The WORST_SHOWN lowest-Dice test images of the best configuration (every replicate), as a table
    and as a gallery of those whose prediction was kept."""
    results = ctx.results
    doc.heading("Worst test images of the best configuration", 3)
    evaluations = results.replicates(ctx.best_key)
    rows = results.per_image[results.per_image["evaluation"].isin(evaluations)]
    worst = rows.sort_values(["dice", "image_id"], kind="stable").head(WORST_SHOWN)
    several = len(evaluations) > 1
    shown = pd.DataFrame({
        **({"Seed": [format_level(v) for v in worst["seed"]]} if several else {}),
        "Image": worst["image_id"], "Subject": worst.get("subject", pd.Series("-", index=worst.index)).fillna("-"),
        "Target area (px)": [_number(v) for v in worst["area"]], "Dice": [_number(v, 3) for v in worst["dice"]],
        "HD95": [_number(v, 1) for v in worst["hd95"]]})
    doc.table(shown, "worst_images", worst, caption=(
        f"The {len(worst)} test images with the lowest Dice under the best configuration "
        f"({results.configuration(ctx.best_key)['label']}" + (f", all {len(evaluations)} seeds" if several else "")
        + f"), of {len(rows)} image scores."))
    examples = []
    for position, (_, row) in enumerate(worst.iterrows(), 1):
        seed = f" · seed {format_level(row['seed'])}" if several else ""
        examples += overlay_examples(ctx.study_dir, row["trial_id"], [(f"worst #{position}{seed}", row["dice"],
                                                                       row["image_id"])])[0]
    if examples:
        doc.figure(figures.overlay_figure(examples, "Worst test images of the best configuration", per_row=4),
                   "worst_images_best_config", f"The {len(examples)} of these {len(worst)} images whose prediction "
                   f"was kept (a trial keeps its worst and best few), lowest Dice first.")
    else:
        doc.text("None of these images has a saved prediction (results/predictions/), so none is drawn.")


def _backbone_overlays(doc: Document, ctx: ReportContext):
    """Each backbone's best fine-tuned configuration on its best and its worst test image."""
    best = ctx.best_per_backbone
    if best.empty or not (best["stage"] == FINETUNE).any():
        return
    tuned = best[best["stage"] == FINETUNE].sort_values("val_dice", ascending=False, kind="stable")
    doc.heading("The best configuration of each backbone", 3)
    examples, missing = [], []
    for _, row in tuned.iterrows():
        evaluation = ctx.results.evaluation(ctx.results.replicates(row["key"])[0])
        saved = saved_images(ctx.study_dir, evaluation["trial_id"])
        ranked = [(d, i) for d, i in ranked_by_dice(_dice_of(ctx, evaluation.name)) if sanitise_image_id(i) in saved]
        if not ranked:
            missing.append(row["backbone"])
            continue
        chosen = [(f"{row['backbone']} · best", *ranked[0])] + (
            [(f"{row['backbone']} · worst", *ranked[-1])] if len(ranked) > 1 else [])
        examples += overlay_examples(ctx.study_dir, evaluation["trial_id"], chosen)[0]
    caption = (f"The best fine-tuned configuration of each of the {len(tuned)} backbones (on validation Dice; its "
               f"first seed), on the best and the worst by Dice of the test images whose prediction it kept; "
               f"backbones by validation Dice.")
    if missing:
        caption += f" No saved prediction for: {', '.join(missing)}."
    if examples:
        doc.figure(figures.overlay_figure(examples, "Best configuration of each backbone", per_row=4),
                   "overlays_per_backbone", caption)
    else:
        doc.text(f"No overlays per backbone: none of {', '.join(missing)} has a saved prediction of its best and "
                 f"worst test images (results/predictions/).")


def _statistics_section(doc: Document, ctx: ReportContext):
    results, tests, unit = ctx.results, ctx.tests, ctx.unit
    doc.heading("5. Paired statistics")
    if tests.empty:
        doc.text("No paired tests: no factor takes more than one value among the fine-tuned trials.")
        return
    tested = int(tests["p"].notna().sum())
    best = results.configuration(ctx.best_key)["label"] if ctx.best_key else "-"
    doc.text(f"Test Dice per {unit} ({_unit_value(ctx)}) is compared between every pair of levels of every grid "
             f"factor, matched {unit} by {unit}, (a) with the other grid factors held at the best configuration's "
             f"setting ({best}) and (b) pooled: per {unit}, the mean over the other factors' configurations that "
             f"ran at both levels. The {tested} tests form one family for Holm's adjustment. Effect sizes: the "
             f"median paired difference and the matched-pairs rank-biserial correlation r; beside each, the mean "
             f"effect against the seed-to-seed spread.")
    if results.seeds <= 1:
        doc.text("With one seed per configuration these tests compare single training runs: a significant difference "
                 "may still be training noise (see Factor effects beside training noise).")
    for comparison, title in (("held at best", "(a) Other factors held at their best setting"),
                              ("pooled", "(b) Pooled over the other factors")):
        doc.heading(title, 3)
        sentences = list(tests.loc[tests["comparison"] == comparison, "sentence"])
        doc.bullets(sentences)
        if not sentences:
            doc.text("No other grid factor to pool over: the comparisons in (a) are the whole story.")
    doc.table(_tests_table(tests, unit), "paired_tests", tests)


def _tests_table(tests: pd.DataFrame, unit: str) -> pd.DataFrame:
    """The rows of analysis.statistics.factor_tests as the report shows them."""
    return pd.DataFrame({
        "Factor": tests["factor"], "Comparison": tests["comparison"],
        "A": [format_level(v) for v in tests["level_a"]], "B": [format_level(v) for v in tests["level_b"]],
        f"n {unit}s": tests["n"], "Mean A": [_number(v, 3) for v in tests["mean_a"]],
        "Mean B": [_number(v, 3) for v in tests["mean_b"]],
        "Median A-B": [_number(v, 3) for v in tests["median_difference"]],
        "r (rank-biserial)": [_number(v, 2) for v in tests["rank_biserial"]],
        "W": [_number(v, 1) for v in tests["statistic"]], "p": [format_p(p) for p in tests["p"]],
        "p (Holm)": [format_p(p) for p in tests["p_holm"]],
        "Seed SD": [_number(v, 3) for v in tests["seed_sd"]],
        "Training noise": [_within(v) for v in tests["within_noise"]],
    })


#: At most this many configurations' click curves are drawn (the zero-shot ones come on top).
CURVES_SHOWN = 8


def _clicks_section(doc: Document, ctx: ReportContext, number: int) -> bool:
    """Dice against corrective clicks (evaluation.clicks): curves, Dice@k and AUC, paired AUC tests.
    False (and nothing written) when the study evaluated no clicks."""
    results, unit = ctx.results, ctx.unit
    clicks = clicks_of(results.per_image)
    if not clicks:
        return False
    doc.heading(f"{number}. Corrective clicks")
    evaluation = results.config.get("evaluation") or {}
    rule = evaluation.get("click_rule", "not recorded")
    rule_words = {"center": "the centre of the largest error (the deepest pixel of the larger of the false-negative "
                            "and false-positive regions, by a Euclidean distance transform with the image border as "
                            "boundary; a positive click in a false negative, a negative one in a false positive)",
                  "random": "a pixel drawn uniformly from the error region (seeded per image and round)"}
    where = (f"at {rule_words[rule]} (evaluation.click_rule: {rule})" if rule in rule_words
             else "(the click rule is not recorded in resolved.yaml)")
    doc.text(f"Every test image was also segmented interactively: after the prompt (click 0), {clicks} rounds each add "
             f"one simulated click {where} to all earlier "
             f"clicks, and the model decodes again with its previous low-resolution logits as mask input. An image "
             f"segmented perfectly gets no more clicks (its curve stays flat). Dice@k is the test Dice after k "
             f"clicks; the AUC is the normalised area under an image's Dice-against-clicks curve from click 0 to "
             f"{clicks} (trapezoid rule, divided by {clicks}: 1 only for a perfect mask from the prompt on). Both are "
             f"means over {unit}s ({_unit_value(ctx)}) with {CONFIDENCE:.0%} {unit}-level bootstrap CIs, as in the "
             f"summary.")
    keys = [key for key in ctx.summary["configuration"]
            if np.isfinite(unit_values(results, [key], AUC)).any()]
    indexed = ctx.summary.set_index("configuration")
    ranked = _order(indexed.loc[keys].reset_index(), "val_dice")
    shown_ks = sorted({k for k in (0, 1, 3, 5, 10, clicks) if k <= clicks})

    def at_click(conf: pd.Series, k: int) -> tuple[float, float, float]:
        """Mean Dice after k clicks and its CI; click 0 is the summary's Dice (the same computation)."""
        if k == 0:
            return conf["dice_mean"], conf["dice_low"], conf["dice_high"]
        ci = configuration_ci(results, [conf["configuration"]], click_metric(k), ctx.seed)
        return ci.mean, ci.low, ci.high

    rows = []
    for _, conf in ranked.iterrows():
        auc = configuration_ci(results, [conf["configuration"]], AUC, ctx.seed)
        row = {"Configuration": conf["label"], "Stage": conf["stage"].replace("_", "-"), "Seeds": conf["seeds"],
               f"n {unit}s": auc.n}
        row.update({f"Dice@{k} [95% CI]": _ci(*at_click(conf, k)) for k in shown_ks})
        row["AUC [95% CI]"] = _ci(auc.mean, auc.low, auc.high)
        rows.append(row)
    # Drawn: the CURVES_SHOWN fine-tuned configurations best on validation Dice, and the zero-shot
    # evaluations of their backbones and prompts; only their whole curves are computed.
    tuned, zero_shot = _shown_configurations(ctx, CURVES_SHOWN, keys)
    drawn = indexed.loc[zero_shot + tuned].reset_index()
    curves = {}
    for _, conf in drawn.iterrows():
        points = [at_click(conf, k) for k in range(clicks + 1)]
        curves[conf["label"]] = pd.DataFrame(points, columns=["mean", "low", "high"]).assign(click=range(clicks + 1))
    of = len([key for key in ctx.ranked if key in set(keys)])
    doc.figure(figures.click_curves(curves, set(indexed.loc[zero_shot, "label"])), "click_curves",
               f"Test Dice after 0..{clicks} corrective clicks (mean over {unit}s, band: 95% CI); solid: the "
               f"{len(tuned)} fine-tuned configuration(s) with the highest validation Dice" + (f" (of {of})" if of > len(tuned)
                                                                                             else "")
               + "; dashed: the zero-shot model of the same backbone and prompt. Every configuration is in the table.")
    doc.table(pd.DataFrame(rows), "clicks", caption=f"Dice after k clicks (Dice@0: the prompt alone, the summary's "
              f"Dice) and the normalised AUC over clicks 0..{clicks}; trained configurations first, by validation "
              f"Dice, then the zero-shot ones.", facets=_facets(ctx, ranked["configuration"]),
              markdown_rows=MARKDOWN_ROWS)
    tests = factor_tests(results, AUC)
    if tests.empty:
        doc.text("No paired tests of the AUC: no factor takes more than one value among the fine-tuned trials.")
        return True
    doc.text(f"Paired tests of the click AUC per {unit}, as section 5 does for the single-shot Dice (the same pairs, "
             f"matched {unit} by {unit}; these {int(tests['p'].notna().sum())} tests are their own Holm family). A "
             f"factor can rank differently here than on the single-shot Dice: a model that starts lower may use "
             f"clicks better.")
    doc.bullets(list(tests["sentence"]))
    doc.table(_tests_table(tests, unit), "paired_tests_click_auc", tests)
    return True


def _importance_section(doc: Document, ctx: ReportContext, number: int):
    results = ctx.results
    algorithm = (results.config.get("search") or {}).get("algorithm", "grid")
    if algorithm not in ("random", "optuna"):
        return
    doc.heading(f"{number}. Hyperparameter importance")
    importance, used, objective = hyperparameter_importance(results, seed=ctx.seed)
    if importance.empty:
        doc.text(f"No importance: fANOVA needs at least 3 finished trials with a {objective} and a parameter that "
                 f"varies; this study has {len(used)} such trial(s).")
        return
    doc.figure(figures.importance_figure(importance, objective), "importance",
               f"fANOVA importance (optuna's FanovaImportanceEvaluator, seed {ctx.seed}) of each varied factor for "
               f"{objective}, over {len(used)} finished fine-tuning trials of the {algorithm} search.")
    doc.table(importance.assign(importance=importance["importance"].map(lambda v: _number(v, 3))), "importance",
              importance)
    parameters = [p for p in importance["parameter"]]
    log_scale = {name for name, (kind, _, _) in search_ranges(results.config).items() if kind == "loguniform"}
    doc.figure(figures.parallel_coordinates(used, parameters, objective, log_scale), "parallel_coordinates",
               f"Every finished trial as a line through its parameter values (log scale for log-uniform ranges) "
               f"and its {objective}, coloured by {objective}.")


def build_report(results: StudyResults, study_dir: Path, out_dir: Path, source: str, seed: int = 0) -> Path:
    """Write the whole report into `out_dir`; returns the path of report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = Document(out_dir)
    ctx = ReportContext(results, Path(study_dir), seed)
    ctx.summary = summary_table(results, seed=seed)
    finetuned = results.configurations[results.configurations["stage"] == FINETUNE]
    ctx.ranked, ctx.best_rule = rank_configurations(results, finetuned)
    ctx.best_key = ctx.ranked[0] if ctx.ranked else None
    ctx.tests = factor_tests(results)
    ctx.marginals = {factor: marginal_means(results, factor, seed=seed) for factor in results.grid_factors}
    ctx.best_per_backbone = _best_per_backbone(ctx)
    if ctx.best_key:
        best = results.configuration(ctx.best_key)
        row = ctx.summary.set_index("configuration").loc[ctx.best_key]
        seeds = f" over {int(row['seeds'])} seeds" if row["seeds"] > 1 else ""
        best_text = (f"Best configuration ({ctx.best_rule}): {best['label']} (trial(s) {', '.join(best['trial_ids'])}), "
                     f"test Dice {_ci(row['dice_mean'], row['dice_low'], row['dice_high'])}{seeds}, "
                     f"n = {int(row['n'])} {ctx.unit}s.")
    else:
        best_text = "The study has no fine-tuned configuration with test results; only zero-shot evaluations are shown."
    _introduction(doc, ctx, source, best_text)
    _summary_section(doc, ctx)
    _unet_section(doc, ctx)
    _region_section(doc, ctx)
    _ablation_section(doc, ctx)
    _per_image_section(doc, ctx)
    _overlay_section(doc, ctx)
    _statistics_section(doc, ctx)
    _importance_section(doc, ctx, 7 if _clicks_section(doc, ctx, 6) else 6)
    doc.heading("Files")
    doc.bullets([f"{p.relative_to(out_dir)}" for p in doc.figure_files + doc.table_files])
    title = f"Ablation report: {results.name}"
    (out_dir / "report.md").write_text(render_markdown(doc, title), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(doc, title), encoding="utf-8")
    return out_dir / "report.html"


# --- MLflow -----------------------------------------------------------------------------------------


def _local_tracking_uri(uri: str, study_dir: Path) -> str:
    """A relative sqlite URI that does not resolve from here is tried relative to the study folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        relative = Path(uri[len(prefix):])
        if not relative.exists() and (study_dir / relative).exists():
            return prefix + str((study_dir / relative).resolve())
    return uri


#: MLflow's run tag listing a run's table artifacts (what MlflowClient.log_table sets); the UI
#: shows a file listed there as a table.
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"


def register_mlflow_tables(client, run_id: str, report_dir: Path, artifact_path: str | None = "report") -> list[str]:
    """Mark the report's MLflow tables (LEADERBOARD_JSON, when report_dir has it), logged with the
    folder under `artifact_path`, as table artifacts of run `run_id`: entries {"path", "type":
    "table"} in its LOGGED_ARTIFACTS_TAG, as MlflowClient.log_table adds them. (log_table itself
    appends to an existing file, so a report logged again would double the leaderboard's rows; the
    file is written by build_report and replaced with the folder instead.) Returns the paths marked."""
    if not (Path(report_dir) / LEADERBOARD_JSON).is_file():
        return []
    entry = {"path": f"{artifact_path}/{LEADERBOARD_JSON}" if artifact_path else LEADERBOARD_JSON, "type": "table"}
    listed = json.loads(client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
    if entry not in listed:
        client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, json.dumps(listed + [entry]))
    return [entry["path"]]


def log_report(study_dir: Path, report_dir: Path) -> str:
    """Log the report folder as artifacts `report/` of the parent run named in tracking.json, with
    the leaderboard marked as an MLflow table (register_mlflow_tables).

    Returns a sentence saying what happened; never raises (the report on disk is what matters).
    """
    tracking = read_tracking(study_dir)
    if not tracking:
        return "No tracking.json in the study folder: the report was not logged to MLflow."
    uri, run_id = tracking.get("tracking_uri"), tracking.get("parent_run_id")
    if not uri or not run_id:
        return "tracking.json names no tracking_uri or parent_run_id: the report was not logged to MLflow."
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(_local_tracking_uri(uri, study_dir))
        client.log_artifacts(run_id, str(report_dir), "report")
        tables = register_mlflow_tables(client, run_id, report_dir, "report")
    except Exception as err:  # a tracking server that is down must not lose the report on disk
        return f"warning: the report was written but not logged to MLflow run {run_id} at {uri}: {err}"
    return (f"Logged the report as artifacts report/ of MLflow run {run_id} ({uri})"
            + (f"; {', '.join(tables)} shows as a table in the MLflow UI." if tables else "."))


# --- the command ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="the study folder, <study.out>/<study.name>")
    parser.add_argument("--tracking-uri", help="read the results from this MLflow tracking store instead")
    parser.add_argument("--experiment", help="the MLflow experiment to read (with --tracking-uri)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: STUDY_DIR/report)")
    parser.add_argument("--seed", type=int, help="bootstrap and fANOVA seed (default: study.seed, else 0)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    study_dir: Path = args.study_dir
    if bool(args.tracking_uri) != bool(args.experiment):
        raise ResultsError("--tracking-uri and --experiment go together: pass both to read the study from MLflow "
                           "(e.g. --tracking-uri sqlite:///runs/quickstart/mlflow.db --experiment quickstart), or "
                           "neither to read the study folder.")
    if args.tracking_uri:
        config = read_resolved_config(study_dir) if study_dir.is_dir() else {}
        results = load_from_mlflow(args.tracking_uri, args.experiment, config)
        source = f"MLflow experiment {args.experiment!r} at {args.tracking_uri}"
    else:
        results = load_study(study_dir)
        source = f"study folder {study_dir}"
    seed = args.seed if args.seed is not None else int((results.config.get("study") or {}).get("seed") or 0)
    out_dir = args.out or study_dir / "report"
    page = build_report(results, study_dir, out_dir, source, seed=seed)
    print(f"Wrote {page} and {out_dir / 'report.md'} (figures in {out_dir / 'figures'}, tables in {out_dir / 'tables'}).")
    print(log_report(study_dir, out_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
