"""The report's plots, drawn with matplotlib's Agg backend (no display needed).

Each function takes tables already computed (analysis.statistics) and returns a Figure;
`save_figure` writes it as PNG and SVG. No function here computes a statistic of its own:
what a plot shows is what the report's tables say.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from analysis.overlays import FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, TRUTH_BORDER  # noqa: E402

DPI = 110
FINETUNED_COLOUR, ZERO_SHOT_COLOUR = "#1f77b4", "#ff7f0e"
#: The tallest a figure is drawn (inches; 1,980 pixels at DPI): about two screens, whatever the
#: number of configurations, levels or panels; figures that grow with them shrink their rows to fit.
MAX_HEIGHT_IN = 18.0


def _fit(height: float) -> float:
    return min(height, MAX_HEIGHT_IN)


def save_figure(figure, folder: Path, name: str) -> dict[str, Path]:
    """Write `figure` as folder/name.png and folder/name.svg, close it, return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"png": folder / f"{name}.png", "svg": folder / f"{name}.svg"}
    figure.savefig(paths["png"], dpi=DPI, bbox_inches="tight")
    figure.savefig(paths["svg"], bbox_inches="tight")
    plt.close(figure)
    return paths


def _interval(means, lows, highs) -> np.ndarray:
    """Error-bar lengths below and above each mean (0 where the CI is NaN)."""
    means, lows, highs = (np.asarray(x, float) for x in (means, lows, highs))
    return np.nan_to_num(np.vstack([means - lows, highs - means]), nan=0.0)


def ablation_figure(marginal: pd.DataFrame, factor: str, metric: str = "Dice"):
    """Marginal mean per level of `factor` with its 95% CI, and each cell's mean as a grey dot."""
    figure, axes = plt.subplots(figsize=(max(3.5, 1.1 * len(marginal) + 1.5), 3.6))
    x = np.arange(len(marginal))
    for position, cells in zip(x, marginal["cell_means"]):
        jitter = np.linspace(-0.12, 0.12, len(cells)) if len(cells) > 1 else np.zeros(len(cells))
        axes.scatter(position + jitter, cells, s=14, color="0.6", zorder=1,
                     label="one configuration" if position == 0 else None)
    axes.errorbar(x, marginal["mean"], yerr=_interval(marginal["mean"], marginal["low"], marginal["high"]),
                  fmt="o", color=FINETUNED_COLOUR, capsize=5, markersize=7, zorder=2,
                  label="marginal mean, 95% CI")
    axes.set_xticks(x, marginal["level"], rotation=20 if len(marginal) > 4 else 0)
    axes.set_xlabel(factor)
    axes.set_ylabel(f"test {metric}")
    axes.set_title(f"{factor}: marginal mean over the other factors", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    return figure


def interaction_heatmap(panels: dict[str, pd.DataFrame], metric: str = "Dice", per_row: int = 2):
    """Small multiples of heatmaps, `per_row` panels a row, one colour scale for all: per panel
    (title -> a table of mean `metric`, its index and columns named after the two factors) one
    cell per pair of levels, with its value written in."""
    panels = {title: table for title, table in panels.items() if not table.empty}
    per_row = min(per_row, len(panels))
    rows = int(np.ceil(len(panels) / per_row))
    width = per_row * (2.2 + 0.9 * max(t.shape[1] for t in panels.values())) + 1.2
    height = _fit(rows * (1.7 + 0.5 * max(t.shape[0] for t in panels.values())))
    figure, axes_grid = plt.subplots(rows, per_row, squeeze=False, layout="constrained", figsize=(width, height))
    values = np.concatenate([t.to_numpy(float).ravel() for t in panels.values()])
    low, high = np.nanmin(values), np.nanmax(values)
    for axes in axes_grid.ravel()[len(panels):]:
        axes.axis("off")
    for axes, (title, table) in zip(axes_grid.ravel(), panels.items()):
        image = axes.imshow(table.to_numpy(float), cmap="viridis", vmin=low, vmax=high if high > low else low + 1e-9,
                            aspect="auto")
        axes.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right", fontsize=8)
        axes.set_yticks(range(table.shape[0]), [str(r) for r in table.index], fontsize=8)
        axes.set_xlabel(table.columns.name or "")
        axes.set_ylabel(table.index.name or "")
        axes.set_title(title, fontsize=10)
        for (i, j), value in np.ndenumerate(table.to_numpy(float)):
            if np.isfinite(value):
                bright = (value - low) / (high - low) > 0.6 if high > low else False
                axes.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                          color="black" if bright else "white")
    figure.colorbar(image, ax=list(axes_grid.ravel()), label=f"mean test {metric}", shrink=min(1.0, 0.9 / rows + 0.1))
    return figure


ZERO_SHOT_NUDGE = 1.04  # zero-shot points sit 4% right of their parameter count, so error bars do not overlap


def model_size_figure(points: pd.DataFrame, metric: str = "Dice"):
    """`metric` vs image-encoder parameters (log x): one colour per family, fine-tuned solid,
    zero-shot dashed (nudged right by ZERO_SHOT_NUDGE). `points` has family, backbone, params,
    stage, mean, low, high."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    colours = dict(zip(sorted(points["family"].astype(str).unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for (family, stage), group in points.groupby([points["family"].astype(str), "stage"]):
        group = group.sort_values("params")
        x = group["params"] * (ZERO_SHOT_NUDGE if stage == "zero_shot" else 1.0)
        axes.errorbar(x, group["mean"], yerr=_interval(group["mean"], group["low"], group["high"]),
                      color=colours[family], linestyle="--" if stage == "zero_shot" else "-",
                      marker="s" if stage == "zero_shot" else "o", capsize=3)
        if stage != "zero_shot":
            for _, p in group.iterrows():
                axes.annotate(p["backbone"], (p["params"], p["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("image-encoder parameters (log scale)")
    axes.set_ylabel(f"test {metric} (mean, 95% CI)")
    axes.set_title("Model size: best configuration per backbone", fontsize=10)
    axes.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=c, marker="o", label=f) for f, c in colours.items()]
    handles += [Line2D([], [], color="0.3", linestyle="-", label="fine-tuned"),
                Line2D([], [], color="0.3", linestyle="--", label="zero-shot")]
    axes.legend(handles=handles, fontsize=7, loc="best")
    return figure


def click_curves(curves: dict[str, pd.DataFrame], zero_shot: set[str]):
    """Mean test Dice against the number of corrective clicks, one line per configuration (label ->
    table of click, mean, low, high) with its 95% CI as a band; zero-shot configurations dashed."""
    figure, axes = plt.subplots(figsize=(7.2, 4.2))
    for label, curve in curves.items():
        style = "--" if label in zero_shot else "-"
        line, = axes.plot(curve["click"], curve["mean"], style, marker="o", markersize=4, label=label)
        axes.fill_between(curve["click"], curve["low"], curve["high"], color=line.get_color(), alpha=0.12)
    clicks = int(max(curve["click"].max() for curve in curves.values()))
    axes.set_xticks(range(clicks + 1))
    axes.set_xlabel("corrective clicks after the prompt (0: the prompt alone)")
    axes.set_ylabel("test Dice (mean, 95% CI)")
    axes.set_title("Dice against clicks", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return figure


def box_plot(values: dict[str, np.ndarray], metric: str, note: str = "", unit: str = "image"):
    """Horizontal box plots of per-`unit` `metric` (unit: image or subject), one box per configuration
    (label -> values), top to bottom in the order given."""
    figure, axes = plt.subplots(figsize=(7.5, _fit(max(2.5, 0.32 * len(values) + 1.2))))
    _boxes(axes, values)
    axes.set_xlabel(f"per-{unit} test {metric}" + (f" ({note})" if note else ""))
    axes.set_title(f"{metric} per configuration (triangle: mean)", fontsize=10)
    return figure


def _boxes(axes, values: dict[str, np.ndarray]):
    """One horizontal box per label (finite values only), the first on top, the mean as a triangle."""
    data = [np.asarray(v, float)[np.isfinite(v)] for v in values.values()]
    axes.boxplot(data, orientation="horizontal", tick_labels=list(values), showmeans=True,
                 meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
                 flierprops={"markersize": 3, "alpha": 0.5})
    axes.invert_yaxis()
    axes.tick_params(axis="y", labelsize=7)
    axes.grid(axis="x", alpha=0.3)


def level_box_plots(panels: dict[str, dict[str, np.ndarray]], metric: str, unit: str = "image", per_row: int = 2):
    """Small multiples of box plots, one panel per factor (factor -> level -> per-`unit` values)
    and one box per level; the panels share the metric axis."""
    per_row = min(per_row, len(panels))
    rows = int(np.ceil(len(panels) / per_row))
    height = _fit(rows * (0.8 + 0.3 * max(len(levels) for levels in panels.values())) + 0.4)
    figure, axes_grid = plt.subplots(rows, per_row, squeeze=False, sharex=True, layout="constrained",
                                     figsize=(5.2 * per_row, height))
    for axes in axes_grid.ravel()[len(panels):]:
        axes.axis("off")
    for position, (axes, (factor, levels)) in enumerate(zip(axes_grid.ravel(), panels.items())):
        _boxes(axes, levels)
        axes.set_title(factor, fontsize=10)
        if position + per_row >= len(panels):  # the lowest panel of its column carries the axis
            axes.set_xlabel(f"per-{unit} test {metric}", fontsize=8)
            axes.xaxis.set_tick_params(labelbottom=True)
    figure.suptitle(f"{metric} per level, pooled over the other factors (triangle: mean)", fontsize=10)
    return figure


def dice_vs_area(series: dict[str, pd.DataFrame]):
    """Per-image Dice against target area (pixels, log x), one colour per evaluation (label -> table
    with columns area and dice)."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for (label, table), colour in zip(series.items(), (FINETUNED_COLOUR, ZERO_SHOT_COLOUR, "#2ca02c", "#d62728")):
        table = table[(table["area"] > 0) & np.isfinite(table["dice"])]
        axes.scatter(table["area"], table["dice"], s=16, alpha=0.7, color=colour, label=f"{label} (n = {len(table)})")
    axes.set_xscale("log")
    axes.set_xlabel("target area (pixels, log scale)")
    axes.set_ylabel("per-image test Dice")
    axes.set_ylim(-0.03, 1.03)
    axes.set_title("Dice vs target size", fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, loc="lower right")
    return figure


def learning_curves(history: pd.DataFrame, panels: dict[str, list[str]], highlight: str | None, labels: dict[str, str]):
    """Validation Dice by epoch, one line per trial, one panel per group (e.g. backbone -> trial ids);
    the `highlight` trial (the best configuration) is drawn thick and black."""
    per_row = min(len(panels), 4)
    rows = int(np.ceil(len(panels) / per_row))
    figure, axes_grid = plt.subplots(rows, per_row, squeeze=False, sharey=True, layout="constrained",
                                     figsize=(min(4.2 * per_row, 16), _fit(3.4 * rows)))
    for axes in axes_grid.ravel()[len(panels):]:
        axes.axis("off")
    for axes, (title, trial_ids) in zip(axes_grid.ravel(), panels.items()):
        for trial_id in trial_ids:
            curve = history[history["trial_id"] == trial_id].sort_values("epoch")
            if curve.empty:
                continue
            best = trial_id == highlight
            axes.plot(curve["epoch"], curve["val_dice"], marker="o", markersize=3,
                      linewidth=2.6 if best else 1.0, color="black" if best else None, zorder=3 if best else 2,
                      label=labels.get(trial_id, trial_id) + (" (best)" if best else ""))
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
        if len(trial_ids) <= 8:
            axes.legend(fontsize=6, loc="lower right")
    for axes in axes_grid[:, 0]:
        axes.set_ylabel("validation Dice")
    return figure


def overlay_figure(examples, title: str, per_row: int = 3):
    """A grid of overlays (analysis.overlays.PredictionExample), `per_row` a row in the order given,
    each titled with its rank, image and Dice, with a colour legend."""
    per_row = min(per_row, len(examples))
    rows = int(np.ceil(len(examples) / per_row))
    side = min(3.2, 11.0 / per_row)
    height = _fit((side + 0.45) * rows + 1.2)
    figure, axes_list = plt.subplots(rows, per_row, squeeze=False, figsize=(side * per_row, height))
    # room for two title lines above each image, the title on top and the legend below
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.45 / height, top=1 - 0.75 / height, wspace=0.08,
                           hspace=0.45 / side)
    for axes in axes_list.ravel():
        axes.axis("off")
    for axes, example in zip(axes_list.ravel(), examples):
        axes.imshow(example.picture, interpolation="nearest")
        axes.set_title(f"{example.rank}: {example.image_id}\nDice {example.dice:.3f}", fontsize=8)
    legend = [Patch(color=np.asarray(c) / 255, label=name) for c, name in
              ((TRUE_POSITIVE, "true positive"), (FALSE_POSITIVE, "false positive"),
               (FALSE_NEGATIVE, "false negative"), (TRUTH_BORDER, "ground-truth border"))]
    figure.legend(handles=legend, loc="lower center", ncol=4, fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure


def importance_figure(importance: pd.DataFrame, objective: str):
    """Horizontal bars of fANOVA importance per parameter (normalised to sum to 1)."""
    table = importance.sort_values("importance")
    figure, axes = plt.subplots(figsize=(5.5, _fit(0.45 * len(table) + 1.4)))
    axes.barh(table["parameter"], table["importance"], color=FINETUNED_COLOUR)
    for y, value in enumerate(table["importance"]):
        axes.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    axes.set_xlim(0, max(1.0, float(table["importance"].max()) * 1.15))
    axes.set_xlabel(f"fANOVA importance for {objective}")
    axes.set_title("Hyperparameter importance", fontsize=10)
    return figure


def parallel_coordinates(trials: pd.DataFrame, parameters: list[str], objective: str, log_scale: set[str]):
    """One vertical axis per parameter and one for the objective; one line per trial, coloured by
    the objective. Numbers are scaled to [0, 1] between their min and max (log10 for `log_scale`);
    categories are spaced evenly in sorted order."""
    axes_names = [*parameters, "objective"]
    scaled, ticks = {}, {}
    for name in axes_names:
        column = trials[name]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all() and not column.map(lambda v: isinstance(v, (bool, np.bool_))).any():
            values = np.log10(numeric.to_numpy(float)) if name in log_scale else numeric.to_numpy(float)
            low, high = float(values.min()), float(values.max())
            scaled[name] = (values - low) / (high - low) if high > low else np.full(len(values), 0.5)
            raw_low, raw_high = float(numeric.min()), float(numeric.max())
            ticks[name] = [(0.0, f"{raw_low:.3g}"), (1.0, f"{raw_high:.3g}")] if high > low else [(0.5, f"{raw_low:.3g}")]
        else:
            levels = sorted(column.astype(str).unique())
            position = {level: i / max(len(levels) - 1, 1) for i, level in enumerate(levels)}
            scaled[name] = column.astype(str).map(position).to_numpy(float)
            ticks[name] = [(position[level], level) for level in levels]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.6 * len(axes_names)), 4.0))
    objective_values = trials["objective"].to_numpy(float)
    norm = plt.Normalize(np.nanmin(objective_values), np.nanmax(objective_values))
    colour_map = plt.get_cmap("viridis")
    x = np.arange(len(axes_names))
    for i in range(len(trials)):
        axes.plot(x, [scaled[name][i] for name in axes_names], color=colour_map(norm(objective_values[i])),
                  alpha=0.8, linewidth=1.2)
    for position, name in zip(x, axes_names):
        axes.axvline(position, color="0.3", linewidth=0.8)
        for y, text in ticks[name]:
            axes.text(position + 0.03, y, text, fontsize=7, va="center")
    axes.set_xticks(x, [*parameters, objective])
    axes.set_yticks([])
    axes.set_ylim(-0.08, 1.08)
    axes.set_title("Parallel coordinates of the searched trials", fontsize=10)
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colour_map), ax=axes, label=objective)
    return figure
