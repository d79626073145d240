"""`python -m analysis.report STUDY_DIR [--tracking-uri URI --experiment NAME] [--out DIR]`.

Turns a finished study into an ablation report: `report.md`, a self-contained `report.html`
(figures embedded as base64 PNG), every figure as PNG and SVG under `figures/`, every table as
CSV under `tables/`. The report is written to STUDY_DIR/report unless --out says otherwise, and,
when the study folder has a tracking.json, logged as artifacts (`report/`) of the study's
parent MLflow run. Results are read from the study folder, or from an MLflow experiment with
--tracking-uri and --experiment.

The document is built once as a list of blocks (headings, paragraphs, tables, figures) and
rendered twice, to Markdown and to HTML, so both say the same thing. Every number comes from
analysis.statistics; this module only arranges and words them.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures
from analysis.overlays import prediction_examples
from analysis.results import (FINETUNE, ZERO_SHOT, ResultsError, StudyResults, format_level, load_from_mlflow,
                              load_study, read_resolved_config, read_tracking, search_ranges)
from analysis.statistics import (ALPHA, BOOTSTRAP_RESAMPLES, CONFIDENCE, best_evaluation, cell_means, factor_tests,
                                 format_p, hyperparameter_importance, marginal_means, summary_table, zero_shot_change)


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

    def table(self, shown: pd.DataFrame, name: str, data: pd.DataFrame | None = None, caption: str = ""):
        """Show `shown` (formatted strings) and write `data` (full precision; default `shown`) as CSV."""
        path = self.folder / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        (shown if data is None else data).to_csv(path, index=False)
        self.table_files.append(path)
        self.blocks.append(("table", shown, f"tables/{name}.csv", caption))

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
            _, shown, csv, caption = block
            if caption:
                lines += [caption, ""]
            lines.append("| " + " | ".join(_markdown_cell(c) for c in shown.columns) + " |")
            lines.append("|" + "|".join("---" for _ in shown.columns) + "|")
            lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
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
"""


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
            _, shown, csv, caption = block
            if caption:
                out.append(f"<p>{html.escape(caption)}</p>")
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                           for row in shown.itertuples(index=False))
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            out.append(f"<p class='csv'>CSV: {html.escape(csv)}</p>")
        elif kind == "figure":
            _, name, png, caption = block
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            out.append(f"<figure id='{html.escape(name)}'><img src='data:image/png;base64,{data}' "
                       f"alt='{html.escape(caption)}'><figcaption>Figure <code>{html.escape(name)}</code> "
                       f"(figures/{html.escape(name)}.png, .svg): {html.escape(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# --- formatting -------------------------------------------------------------------------------------


def _ci(mean, low, high, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _params(value) -> str:
    return f"{value / 1e6:.1f} M" if np.isfinite(value) else "-"


def _number(value, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float, np.number)) and np.isfinite(value) else "-"


# --- the sections -----------------------------------------------------------------------------------


@dataclass
class ReportContext:
    results: StudyResults
    study_dir: Path
    seed: int
    summary: pd.DataFrame = None
    best_key: str | None = None
    best_rule: str = ""


def _introduction(doc: Document, ctx: ReportContext, source: str):
    results = ctx.results
    ev = results.evaluations
    finetune_trials = results.trials[results.trials["stage"] == FINETUNE]
    zero_shot = ev[ev["stage"] == ZERO_SHOT]
    images = results.per_image["image_id"].nunique()
    doc.text(f"Source: {source}. {len(finetune_trials)} fine-tuning trial(s), "
             f"{ev.loc[ev['stage'] == FINETUNE, 'trial_id'].nunique()} with test results; {len(zero_shot)} zero-shot "
             f"evaluation(s); {images} distinct test image(s). Factors varied in the grid: "
             f"{', '.join(results.grid_factors) or 'none'}"
             + (f"; searched over a range: {', '.join(results.searched_factors)}" if results.searched_factors else "")
             + ".")
    doc.heading("How the numbers are computed", 3)
    doc.bullets([
        "Every number is computed from the per-image test results (results/per_image.csv or the per_image.csv "
        "artifact of each MLflow trial run). An evaluation is one trial scored on the test images with one prompt.",
        f"Means are over test images; {CONFIDENCE:.0%} confidence intervals are percentile bootstrap intervals over "
        f"images ({BOOTSTRAP_RESAMPLES} resamples, numpy default_rng seed {ctx.seed}); n is the number of images.",
        "HD95 is in pixels of the original image. It is undefined when exactly one of prediction and ground truth "
        "is empty; such images are left out of HD95 and counted in the table.",
        f"The best configuration is the fine-tuned evaluation with the {ctx.best_rule or 'highest validation Dice'}, "
        "so its test numbers are not selected on the test set.",
        "Paired tests are two-sided Wilcoxon signed-rank tests (scipy.stats.wilcoxon, zero differences dropped) on "
        f"per-image Dice matched by image_id, Holm-adjusted within each family; significance at {ALPHA} after Holm.",
    ])
    if results.notes:
        doc.heading("Data notes", 3)
        doc.bullets(results.notes)


def _summary_section(doc: Document, ctx: ReportContext):
    results, summary = ctx.results, ctx.summary
    doc.heading("1. Summary of every configuration")
    order = pd.concat([summary[summary["stage"] == ZERO_SHOT],
                       summary[summary["stage"] != ZERO_SHOT].sort_values("dice_mean", ascending=False)])
    shown = pd.DataFrame({
        "Configuration": order["label"],
        "Stage": order["stage"].str.replace("_", "-"),
        "Status": order["status"].fillna(""),
        "n images": order["n_images"],
        "Dice [95% CI]": [_ci(*v) for v in order[["dice_mean", "dice_low", "dice_high"]].to_numpy()],
        "IoU [95% CI]": [_ci(*v) for v in order[["iou_mean", "iou_low", "iou_high"]].to_numpy()],
        "mIoU [95% CI]": [_ci(*v) for v in order[["miou_mean", "miou_low", "miou_high"]].to_numpy()],
        "HD95 px [95% CI]": [_ci(*v, digits=1) for v in order[["hd95_mean", "hd95_low", "hd95_high"]].to_numpy()],
        "HD95 n (undefined)": [f"{int(n)} ({int(m)})" for n, m in order[["hd95_n", "hd95_missing"]].to_numpy()],
        "Epochs run": [_number(v) for v in order["epochs_run"]],
        "Wall time (s)": [_number(v) for v in order["seconds"]],
        "Encoder params": [_params(v) for v in order["image_encoder_params"]],
        "Val Dice": [_number(v, 3) for v in order["val_dice"]],
    })
    if ctx.best_key:
        best_label = results.evaluation(ctx.best_key)["label"]
        shown["Configuration"] = [f"{label} (best)" if label == best_label else label for label in shown["Configuration"]]
    doc.table(shown, "summary", order, caption="Fine-tuned configurations are sorted by mean test Dice; "
              "(best) marks the configuration chosen on validation Dice.")
    finished = set(results.evaluations["trial_id"])
    missing = results.trials[~results.trials["trial_id"].isin(finished)]
    if len(missing):
        columns = ["trial_id", "stage", "status", *[f for f in ["backbone", *results.grid_factors] if f in missing]]
        columns = list(dict.fromkeys(columns))
        doc.table(missing[columns].astype(str), "trials_without_results",
                  caption=f"{len(missing)} trial(s) have no per-image test results (failed or stopped before "
                          f"testing) and are left out of every number below.")
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
        "Fine-tuned Dice": [_number(v, 3) for v in change["finetuned_mean"]],
        "Change [95% CI]": [_ci(m, lo, hi) for m, lo, hi in change[["change_mean", "change_low", "change_high"]].to_numpy()],
        "Median change": [_number(v, 3) for v in change["change_median"]],
        "n": change["n"],
        "p (Holm)": [format_p(p) for p in change["p_holm"]],
    })
    doc.table(shown, "zero_shot_change", change, caption="Change = fine-tuned minus zero-shot per-image Dice on the "
              "images both scored; the fine-tuned side is the same backbone and evaluation prompt's best "
              "configuration on validation Dice. p: paired Wilcoxon, Holm-adjusted over this table's rows.")


def _ablation_section(doc: Document, ctx: ReportContext):
    results = ctx.results
    doc.heading("2. Ablations")
    if not results.grid_factors:
        doc.text("No factor takes more than one value among the fine-tuned trials, so there is nothing to ablate.")
    marginal_tables = []
    for factor in results.grid_factors:
        marginal = marginal_means(results, factor, seed=ctx.seed)
        marginal_tables.append(marginal.drop(columns="cell_means"))
        doc.figure(figures.ablation_figure(marginal, factor), f"ablation_{factor}",
                   f"Test Dice per level of {factor}: per image, the mean over the other factors' configurations at "
                   f"that level; the mean over images with its 95% bootstrap CI (blue), and each configuration's "
                   f"own mean (grey dots).")
    if marginal_tables:
        table = pd.concat(marginal_tables, ignore_index=True)
        shown = table.assign(**{"Dice [95% CI]": [_ci(*v) for v in table[["mean", "low", "high"]].to_numpy()]})
        doc.table(shown[["factor", "level", "cells", "n_images", "Dice [95% CI]"]], "marginal_means", table,
                  caption="Marginal means of test Dice; cells = configurations averaged per image.")
    if results.searched_factors:
        doc.text(f"Factors searched over a range ({', '.join(results.searched_factors)}) take a different value in "
                 f"every trial; they appear in section 6 (importance, parallel coordinates), not as levels here.")
    panels = {}
    ev = results.evaluations
    if "prompt" in ev and (ev["backbone"].nunique() > 1 or ev["eval_prompt"].nunique() > 1):
        for stage, title in ((ZERO_SHOT, "zero-shot"), (FINETUNE, "fine-tuned (mean over other factors)")):
            key = "eval_prompt" if stage == ZERO_SHOT else "prompt"
            table = cell_means(results, "backbone", key, stage)
            if not table.empty:
                panels[title] = table
    if panels:
        doc.figure(figures.interaction_heatmap(panels, "backbone", "prompt"), "interaction_backbone_prompt",
                   "Mean test Dice per backbone x prompt (zero-shot: the evaluated prompt; fine-tuned: the training "
                   "prompt, each cell averaged per image over the other factors).")
    _model_size(doc, ctx)


def _model_size(doc: Document, ctx: ReportContext):
    results, summary = ctx.results, ctx.summary.set_index("evaluation")
    points, skipped = [], []
    for backbone, group in results.evaluations.groupby("backbone"):
        for stage in (ZERO_SHOT, FINETUNE):
            key, _ = best_evaluation(results, group[group["stage"] == stage])
            if key is None:
                continue
            row = summary.loc[key]
            if not np.isfinite(row["image_encoder_params"]):
                skipped.append(backbone)
                continue
            points.append({"family": row["family"], "backbone": backbone, "params": row["image_encoder_params"],
                           "stage": stage, "mean": row["dice_mean"], "low": row["dice_low"], "high": row["dice_high"],
                           "configuration": row["label"]})
    if not points:
        doc.text("No model-size plot: trials.csv records no image-encoder parameter counts.")
        return
    table = pd.DataFrame(points)
    doc.figure(figures.model_size_figure(table), "model_size",
               "Test Dice (mean, 95% CI) against image-encoder parameter count (log scale), one colour per family; "
               "solid: the backbone's best fine-tuned configuration, dashed: its best zero-shot prompt (both chosen "
               f"on validation Dice; zero-shot points drawn {figures.ZERO_SHOT_NUDGE - 1:.0%} to the right so the "
               "error bars stay apart).")
    doc.table(table.assign(params=table["params"].map(_params), mean=table["mean"].map(lambda v: _number(v, 3)))[
        ["family", "backbone", "params", "stage", "configuration", "mean"]], "model_size", table)
    if skipped:
        doc.text(f"Left out of the model-size plot (no parameter count): {', '.join(sorted(set(skipped)))}.")


def _per_image_section(doc: Document, ctx: ReportContext):
    results, summary = ctx.results, ctx.summary
    doc.heading("3. Per-image views")
    order = pd.concat([summary[summary["stage"] == ZERO_SHOT],
                       summary[summary["stage"] != ZERO_SHOT].sort_values("dice_mean", ascending=False)])
    per_image = results.per_image
    dice = {row["label"]: per_image.loc[per_image["evaluation"] == row["evaluation"], "dice"].to_numpy(float)
            for _, row in order.iterrows()}
    doc.figure(figures.box_plot(dice, "Dice"), "box_dice", "Per-image test Dice per configuration.")
    hd95 = {row["label"]: per_image.loc[per_image["evaluation"] == row["evaluation"], "hd95"].to_numpy(float)
            for _, row in order.iterrows()}
    undefined = int(order["hd95_missing"].sum())
    if any(np.isfinite(v).any() for v in hd95.values()):
        doc.figure(figures.box_plot(hd95, "HD95 (pixels)", f"{undefined} undefined values left out"), "box_hd95",
                   f"Per-image test HD95 (pixels) per configuration; {undefined} image score(s) where HD95 is "
                   f"undefined (one of prediction/truth empty) are left out.")
    else:
        doc.text("No HD95 box plot: no image has a defined HD95.")
    if ctx.best_key and per_image["area"].notna().any():
        best = results.evaluation(ctx.best_key)
        series = {f"best: {best['label']}": per_image.loc[per_image["evaluation"] == ctx.best_key, ["area", "dice"]]}
        ev = results.evaluations
        twin = ev[(ev["stage"] == ZERO_SHOT) & (ev["backbone"] == best["backbone"])
                  & (ev["eval_prompt"] == best["eval_prompt"])]
        for _, row in twin.iterrows():
            series[row["label"]] = per_image.loc[per_image["evaluation"] == row["evaluation"], ["area", "dice"]]
        doc.figure(figures.dice_vs_area(series), "dice_vs_area",
                   "Per-image test Dice against the target's area (pixels, log scale) for the best configuration"
                   + (" and the zero-shot model with the same backbone and prompt." if len(twin) else "."))
    history = results.history
    if not history.empty and "val_dice" in history and history["val_dice"].notna().any():
        finetuned = results.evaluations[(results.evaluations["stage"] == FINETUNE) & results.evaluations["primary"]]
        trial_ids = set(history["trial_id"])
        panels = {str(b): [t for t in g["trial_id"] if t in trial_ids] for b, g in finetuned.groupby("backbone")}
        panels = {b: ids for b, ids in panels.items() if ids}
        if panels:
            labels = dict(zip(finetuned["trial_id"], finetuned["label"]))
            best_trial = results.evaluation(ctx.best_key)["trial_id"] if ctx.best_key else None
            doc.figure(figures.learning_curves(history, panels, best_trial, labels), "learning_curves",
                       "Validation Dice by epoch, one line per trial, one panel per backbone; the best "
                       "configuration's trial is drawn thick and black.")
    else:
        doc.text("No learning curves: the study recorded no per-epoch validation Dice.")


def _overlay_section(doc: Document, ctx: ReportContext):
    doc.heading("4. Overlays of the best configuration")
    if not ctx.best_key:
        doc.text("No overlays: the study has no fine-tuned configuration with test results.")
        return
    best = ctx.results.evaluation(ctx.best_key)
    dice = ctx.results.per_image.loc[ctx.results.per_image["evaluation"] == ctx.best_key].set_index("image_id")["dice"]
    examples, message = prediction_examples(ctx.study_dir, best["trial_id"], dice)
    if examples:
        doc.figure(figures.overlay_figure(examples, f"Best configuration: {best['label']}"), "overlays_best_config",
                   message)
    else:
        doc.text(message)


def _statistics_section(doc: Document, ctx: ReportContext):
    results = ctx.results
    doc.heading("5. Paired statistics")
    tests = factor_tests(results)
    if tests.empty:
        doc.text("No paired tests: no factor takes more than one value among the fine-tuned trials.")
        return
    tested = int(tests["p"].notna().sum())
    best = results.evaluation(ctx.best_key)["label"] if ctx.best_key else "-"
    doc.text(f"Per-image Dice is compared between every pair of levels of every grid factor, matched image by "
             f"image, (a) with the other grid factors held at the best configuration's setting ({best}) and "
             f"(b) pooled: per image, the mean over the other factors' configurations that ran at both levels. "
             f"The {tested} tests form one family for Holm's adjustment. Effect sizes: the median paired "
             f"difference and the matched-pairs rank-biserial correlation r.")
    for comparison, title in (("held at best", "(a) Other factors held at their best setting"),
                              ("pooled", "(b) Pooled over the other factors")):
        doc.heading(title, 3)
        sentences = list(tests.loc[tests["comparison"] == comparison, "sentence"])
        doc.bullets(sentences)
        if not sentences:
            doc.text("No other grid factor to pool over: the comparisons in (a) are the whole story.")
    shown = pd.DataFrame({
        "Factor": tests["factor"], "Comparison": tests["comparison"],
        "A": [format_level(v) for v in tests["level_a"]], "B": [format_level(v) for v in tests["level_b"]],
        "n": tests["n"], "Mean A": [_number(v, 3) for v in tests["mean_a"]],
        "Mean B": [_number(v, 3) for v in tests["mean_b"]],
        "Median A-B": [_number(v, 3) for v in tests["median_difference"]],
        "r (rank-biserial)": [_number(v, 2) for v in tests["rank_biserial"]],
        "W": [_number(v, 1) for v in tests["statistic"]], "p": [format_p(p) for p in tests["p"]],
        "p (Holm)": [format_p(p) for p in tests["p_holm"]],
    })
    doc.table(shown, "paired_tests", tests)


def _importance_section(doc: Document, ctx: ReportContext):
    results = ctx.results
    algorithm = (results.config.get("search") or {}).get("algorithm", "grid")
    if algorithm not in ("random", "optuna"):
        return
    doc.heading("6. Hyperparameter importance")
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
    finetuned = results.evaluations[results.evaluations["stage"] == FINETUNE]
    ctx.best_key, ctx.best_rule = best_evaluation(results, finetuned)
    if ctx.best_key:
        best = results.evaluation(ctx.best_key)
        row = ctx.summary.set_index("evaluation").loc[ctx.best_key]
        best_text = (f"Best configuration ({ctx.best_rule}): {best['label']} (trial {best['trial_id']}), test Dice "
                     f"{_ci(row['dice_mean'], row['dice_low'], row['dice_high'])}, n = {int(row['n_images'])} images.")
    else:
        best_text = "The study has no fine-tuned configuration with test results; only zero-shot evaluations are shown."
    _introduction(doc, ctx, source)
    doc.text(best_text)
    _summary_section(doc, ctx)
    _ablation_section(doc, ctx)
    _per_image_section(doc, ctx)
    _overlay_section(doc, ctx)
    _statistics_section(doc, ctx)
    _importance_section(doc, ctx)
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


def log_report(study_dir: Path, report_dir: Path) -> str:
    """Log the report folder as artifacts `report/` of the parent run named in tracking.json.

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

        MlflowClient(_local_tracking_uri(uri, study_dir)).log_artifacts(run_id, str(report_dir), "report")
    except Exception as err:  # a tracking server that is down must not lose the report on disk
        return f"warning: the report was written but not logged to MLflow run {run_id} at {uri}: {err}"
    return f"Logged the report as artifacts report/ of MLflow run {run_id} ({uri})."


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
