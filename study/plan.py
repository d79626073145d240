"""The plan of a study: what `python -m study.run grid.yaml` will do, computed before any work.

`build_plan` reads the config, the dataset index (label data only) and the weights directory;
`format_plan` renders it for the terminal. The dry run prints exactly this and exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

from search_spaces.grid import grid_axes, grid_cells
from search_spaces.space import SearchPlan, SearchRange
from study.config import StudyConfig, config_hash
from study.data.prepare import DatasetPlan, plan_targets
from study.weights import weights_table
from trainables.unet import UNET, UNET_BOX


@dataclass
class StudyPlan:
    config: StudyConfig
    config_hash: str
    configurations: int  # grid cells, times the draws per cell for random and optuna
    trials: int  # configurations x search.seeds
    per_level: dict
    datasets: list[DatasetPlan]  # one per target, in data.target's order
    #: Images each backbone encodes: every training view plus the val and test slices, each
    #: distinct image once over all targets' stores (a slice two targets keep is one image).
    encode_images: int
    weights: list[dict]

    @property
    def targets(self) -> list[str]:
        return [d.target for d in self.datasets]

    @property
    def zero_shot_evaluations(self) -> int:
        if not self.config.baseline.zero_shot:
            return 0
        return len(self.config.factors.backbone) * len(self.config.factors.eval_prompts()) * len(self.datasets)

    @property
    def missing_weights(self) -> list[dict]:
        return [row for row in self.weights if not row["present"]]


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for: CPUs, and GPUs and data-parallel workers, each either one
    number for every trial or one per adaptation arm (`gpus_for`, `workers_for`)."""

    cpus: float
    gpus: float | dict = 0.0
    workers: int | dict = 1

    def gpus_for(self, params: dict) -> float:
        return float(self.gpus[params.get("adaptation", "decoder")] if isinstance(self.gpus, dict) else self.gpus)

    def workers_for(self, params: dict) -> int:
        return int(self.workers[params.get("adaptation", "decoder")] if isinstance(self.workers, dict) else self.workers)


def trial_resources(resources) -> TrialResources:
    """The fine-tunes' resources from the `resources` section (per adaptation arm)."""
    arms = ("decoder", "late_blocks", "lora", "full")
    return TrialResources(resources.cpus_per_trial, {arm: resources.gpus_for(arm) for arm in arms},
                          {arm: resources.workers_for(arm) for arm in arms})


def cached_prefixes(config: StudyConfig) -> list[int]:
    """The k of every partial-encoder cache the study's trials read: adapt_blocks, for late_blocks
    and for LoRA on the last blocks (`trainables.backbones.adaptation.Adaptation.source`)."""
    factors = config.factors
    reads = "late_blocks" in factors.adaptation or ("lora" in factors.adaptation and "last" in factors.lora_blocks)
    return sorted(set(factors.adapt_blocks)) if reads else []


def study_axes(config: StudyConfig) -> dict[str, tuple]:
    """The grid axes of a study: `target` when data.target is a list, then every categorical factor."""
    return grid_axes(config.factors.categorical_axes(), config.data.targets())


def search_plan(config: StudyConfig) -> SearchPlan:
    """The `factors`, `search` and `scheduler` sections as a SearchPlan of plain values."""
    return SearchPlan(
        algorithm=config.search.algorithm,
        cells=grid_cells(study_axes(config)),
        ranges={name: SearchRange(r.kind, r.low, r.high) for name, r in config.factors.ranges().items()},
        num_samples=config.search.num_samples,
        metric=config.search.metric,
        mode=config.search.mode,
        scheduler=config.scheduler.kind,
        grace_period=config.scheduler.grace_period,
        reduction_factor=config.scheduler.reduction_factor,
        max_epochs=max(config.factors.epochs),
        seed=config.study.seed,
        seeds=config.search.seeds,
    )


def unet_plan(config: StudyConfig) -> SearchPlan | None:
    """The U-Net baseline's trials (`baseline.unet`), None when it is off: backbone `unet`, and
    `unet_box` with `box_channel`, times the targets when data.target lists several, each with the
    baseline's settings as its params and trained `search.seeds` times. FIFO: a baseline is never
    stopped early."""
    unet = config.baseline.unet
    if not unet.enabled:
        return None
    settings = {name: (value,) for name, value in unet.model_dump().items() if name not in ("enabled", "box_channel")}
    backbones = (UNET, UNET_BOX) if unet.box_channel else (UNET,)
    return SearchPlan(
        algorithm="grid", cells=grid_cells(grid_axes({"backbone": backbones, **settings}, config.data.targets())),
        ranges={}, num_samples=1, metric=config.search.metric, mode=config.search.mode, scheduler="fifo",
        grace_period=1, reduction_factor=config.scheduler.reduction_factor, max_epochs=unet.epochs,
        seed=config.study.seed, seeds=config.search.seeds)


def build_plan(config: StudyConfig) -> StudyPlan:
    backbones = set(config.factors.backbone)
    weights = [row for row in weights_table(config.weights.dir, config.weights.files) if row["name"] in backbones]
    datasets, unique_images = plan_targets(config)
    search = search_plan(config)
    return StudyPlan(
        config=config,
        config_hash=config_hash(config),
        configurations=search.total_configurations,
        trials=search.total_trials,
        per_level=search.trials_per_level(),
        datasets=datasets,
        encode_images=unique_images,
        weights=weights,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _unet_line(cfg: StudyConfig) -> str:
    unet, plan = cfg.baseline.unet, unet_plan(cfg)
    if plan is None:
        return "U-Net baseline: off"
    arms = "unet and unet_box (the prompt box as a fourth channel)" if unet.box_channel else "unet"
    return (f"U-Net baseline: {_count(plan.total_trials, 'trial')} ({arms} x {_count(cfg.search.seeds, 'seed')}"
            + (f" x {len(cfg.data.targets())} targets" if cfg.data.multi_target else "")
            + f"): MONAI DynUNet in the nnU-Net 2D layout from scratch at {unet.input_size} px, {unet.epochs} epochs, "
            f"{unet.optimizer} lr {unet.lr:g}, {unet.loss}; {cfg.resources.unet.cpus_per_trial:g} CPU and "
            f"{cfg.resources.unet.gpus_per_trial:g} GPU per trial (none where the cluster has no GPU)")


def _adaptation_lines(cfg: StudyConfig, plan: StudyPlan) -> list[str]:
    """Per adaptation arm: what is cached (and its size on disk per image, from a meta-device build
    of each backbone) and the encoder work per epoch. Empty for a decoder-only study."""
    from trainables.backbones import get_spec
    from trainables.backbones.adaptation import Adaptation
    from trainables.backbones.parameter_counts import cache_entry_shapes

    factors = cfg.factors
    if factors.adaptation == ("decoder",):
        return []
    train = sum(d.slices.get("train", 0) for d in plan.datasets)  # an epoch visits each slice once, as one view
    val = sum(d.images.get("val", 0) for d in plan.datasets)
    # the distinct arms: adapt_blocks matters only to an arm that reads a prefix cache
    arms = {}
    for kind, lora_blocks, blocks in product(factors.adaptation, factors.lora_blocks, factors.adapt_blocks):
        arm = Adaptation(kind, blocks, lora_blocks=lora_blocks if kind == "lora" else "all")
        arms.setdefault((arm.kind, arm.lora_blocks, arm.cached_blocks), arm)
    lines = ["Adaptation (what trains besides the decoder; the encoder work of each trial per epoch):"]
    for arm in arms.values():
        label = arm.kind + (f" ({arm.lora_blocks} blocks)" if arm.kind == "lora" else "")
        blocks = arm.blocks
        if arm.source == "embeddings":
            lines.append(f"  {label:<20} cached encoder output; no encoder pass in a trial")
        elif arm.source == "pixels":
            lines.append(f"  {label:<20} no cache: the whole encoder runs in the trial, forward and backward "
                         f"on {train} training images and forward on {val} validation images per epoch")
        else:
            sizes = ", ".join(
                f"{name} {sum(math.prod(shape) for shape in cache_entry_shapes(name, blocks).values()) * 2 / 1e6:.1f} MB"
                for name in factors.backbone)
            depth = ", ".join(f"{name} {get_spec(name).encoder_blocks}" for name in factors.backbone)
            lines.append(f"  {label + f' k={blocks}':<20} cached prefix before the last {blocks} blocks (float16 "
                         f"per image: {sizes}); the {blocks} tuned blocks (of {depth}) and the neck run on "
                         f"{train + val} images per epoch")
    return lines


def _resources_line(cfg: StudyConfig) -> str:
    resources = cfg.resources
    per_arm = isinstance(resources.gpus_per_trial, dict) or isinstance(resources.workers_per_trial, dict)
    if per_arm:
        arms = "; ".join(f"{arm}: {resources.gpus_for(arm):g} GPU, {resources.workers_for(arm)} worker(s)"
                         for arm in cfg.factors.adaptation)
        gpus = f"per adaptation ({arms})"
    else:
        workers = resources.workers_for(cfg.factors.adaptation[0])
        gpus = f"{resources.most_gpus:g} GPU" + (f", data-parallel over {workers} workers" if workers > 1 else "")
    return (f"Resources: {resources.cpus_per_trial:g} CPU and {gpus} per trial, "
            f"ray {'local instance' if cfg.ray.address is None else cfg.ray.address}, "
            f"tracking {cfg.tracking.uri or 'SQLite in the study folder'}")


def format_plan(plan: StudyPlan) -> str:
    cfg = plan.config
    factors = cfg.factors
    search, seeds = cfg.search, cfg.search.seeds
    draws = "" if search.algorithm == "grid" else f", {_count(search.num_samples, 'draw')} per grid cell"
    lines = [
        f"Study {cfg.study.name!r} -> {cfg.study_dir} (config hash {plan.config_hash})",
        f"Trials: {_count(plan.configurations, 'configuration')} x {_count(seeds, 'seed')} = "
        f"{_count(plan.trials, 'trial')} ({search.algorithm} search{draws}, scheduler {cfg.scheduler.kind}, "
        f"metric {search.metric} {search.mode})",
        "  seeds: every configuration trained with training seed "
        + ("0" if seeds == 1 else f"0..{seeds - 1}, each its own trial"),
    ]
    for name, counts in plan.per_level.items():
        lines.append(f"  {name:<14} " + ", ".join(f"{level}: {n}" for level, n in counts.items()))
    fixed = {n: v[0] for n, v in factors.categorical_axes().items() if len(v) == 1}
    lines.append("  fixed: " + ", ".join(f"{n}={v}" for n, v in fixed.items()))
    for name, rng in factors.ranges().items():
        lines.append(f"  searched: {name} ~ {rng.kind}[{rng.low:g}, {rng.high:g}]")
    several = len(plan.datasets) > 1
    if several:
        lines.append(f"Targets: {len(plan.datasets)} ({', '.join(plan.targets)}), a grid axis: one prepared store "
                     f"each, the images encoded once for all")
    for data in plan.datasets:
        lines.append(data.describe())
    evaluation = cfg.evaluation
    lines.append(
        "Evaluation: single-point prompts "
        + ("multimask (3 masks, the best predicted IoU kept)" if evaluation.single_point_multimask
           else "single mask")
        + f"; NSD at {evaluation.nsd_tolerance_mm:g} mm (pixels without spacing); HD95 with exactly one "
        f"empty mask = the image {evaluation.hd95_penalty}"
        + (f"; then {evaluation.clicks} corrective click(s) per test image ({evaluation.click_rule} rule, the "
           f"previous mask fed back; one more decoder pass each), results/per_click.csv" if evaluation.clicks else "")
    )
    stored = sum(sum(d.images.values()) for d in plan.datasets)
    shared = f" (distinct over the {len(plan.datasets)} targets' {stored} store images)" if several else ""
    lines += [
        f"Encode: {len(factors.backbone)} backbone(s) x {plan.encode_images} images{shared} = "
        f"{len(factors.backbone) * plan.encode_images} encoder passes, done once and cached"
        + "".join(f"; and {len(factors.backbone) * plan.encode_images} prefix passes for the partial-encoder cache "
                  f"before the last {k} blocks" for k in cached_prefixes(cfg)),
        f"Zero-shot evaluations: {plan.zero_shot_evaluations} "
        f"({len(factors.backbone)} backbone(s) x eval prompts {', '.join(factors.eval_prompts())}"
        + (f" x {len(plan.datasets)} targets" if several else "") + ")"
        if cfg.baseline.zero_shot else "Zero-shot evaluations: off",
        *_adaptation_lines(cfg, plan),
        _unet_line(cfg),
        f"Weights ({cfg.weights.dir}):",
    ]
    for row in plan.weights:
        state = "found" if row["present"] else "MISSING"
        lines.append(f"  {row['name']:<11} {state:<8} {row['file']}" + ("" if row["present"] else f"  <- {row['source']}"))
    lines.append(_resources_line(cfg))
    return "\n".join(lines)
