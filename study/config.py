"""The `grid.yaml` schema: validated once at the edge into typed, frozen objects.

`load_config(path)` reads a study file, rejects unknown keys, fills every default, checks every
registry name (backbone, optimizer, loss, prompt, reader, schedule) and returns a `StudyConfig`.
Any mistake becomes a `UserError` whose one-paragraph message names the file, the YAML line, the
key path, the bad value and what is allowed. `write_resolved` saves the resolved config (every
default filled in) as `resolved.yaml`; `config_hash` is a stable hash of it.

Under `factors`, a list is a grid axis and a single value is fixed for all trials; numeric
factors may instead be a range (`{loguniform: [lo, hi]}` or `{uniform: [lo, hi]}`) searched by
the `random` or `optuna` algorithm. `search.seeds` trains every configuration that many times
(training seeds 0..seeds-1); `data.target` may also be a list, which makes `target` a grid
axis (`DataSection.targets()`); `evaluation` holds how predictions are scored. Inner code takes
plain values from these objects; YAML never holds import paths or expressions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from foundation.errors import UserError
from foundation.files import write_atomic


class _Section(BaseModel):
    """Every section is frozen and rejects keys it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Section):
    """A continuous search range for a numeric factor: `{loguniform: [lo, hi]}` or `{uniform: [lo, hi]}`."""

    kind: Literal["loguniform", "uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"the range needs low < high, got [{self.low}, {self.high}]")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform range needs low > 0, got {self.low}")
        return self


def _as_axis(value: Any) -> Any:
    """A single value becomes a one-level axis; a `{loguniform|uniform: [lo, hi]}` mapping a Range."""
    if isinstance(value, dict):
        if len(value) == 1:
            (kind, bounds), = value.items()
            if kind in ("loguniform", "uniform") and isinstance(bounds, (list, tuple)) and len(bounds) == 2:
                return {"kind": kind, "low": bounds[0], "high": bounds[1]}
        raise ValueError("a range is written {loguniform: [low, high]} or {uniform: [low, high]}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("a factor list needs at least one value")
        return tuple(value)
    return (value,)


# --- sections -------------------------------------------------------------------------------


class StudySection(_Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out: Path = Path("runs")
    seed: int = 0
    cache_dir: Path | None = None  # prepared data and embeddings; default <out>/cache


class ChannelsSection(_Section):
    strategy: Literal["stack", "repeat", "pca", "grey"] | None = None  # None: the reader's default
    modalities: tuple[str, ...] | None = None  # None: the reader's default


class SlicingSection(_Section):
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    min_area: int = Field(0, ge=0)
    keep_empty: int = Field(0, ge=0)


class SplitSection(_Section):
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave subjects for training, got {self.val} + {self.test}")
        return self


class AugmentSection(_Section):
    views: int = Field(0, ge=0, le=64)
    rotate_deg: float = Field(20.0, ge=0, le=180)
    elastic: bool = True
    flip: bool = False
    intensity: float = Field(0.0, ge=0, le=1)  # maximum intensity shift, a fraction of the range


class DataSection(_Section):
    reader: str = "phantom"
    root: Path | None = None  # phantom: where to generate it (default <cache_dir>/phantom)
    # None: the reader's default target; a list of two or more: each target is a level of the
    # `target` grid axis, with its own prepared store (the images are encoded once for all)
    target: str | tuple[str, ...] | None = None
    channels: ChannelsSection = ChannelsSection()
    slicing: SlicingSection = SlicingSection()
    split: SplitSection = SplitSection()
    augment: AugmentSection = AugmentSection()
    limit: int | None = Field(None, gt=0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # MRI intensities, per modality and subject
    window: tuple[float, float] = (-175.0, 250.0)  # CT Hounsfield window

    @field_validator("clip_percentiles", "window")
    @classmethod
    def _ordered_pair(cls, value):
        if not value[0] < value[1]:
            raise ValueError(f"needs low < high, got {list(value)}")
        return value

    @field_validator("root")
    @classmethod
    def _expand_root(cls, value):
        return None if value is None else Path(os.path.expanduser(value))

    @field_validator("target", mode="before")
    @classmethod
    def _target_names(cls, value):
        """A name, or a list of distinct names; a one-name list is that name (the same study)."""
        if value is None or isinstance(value, str):
            if isinstance(value, str) and not value.strip():
                raise ValueError("a target name cannot be empty")
            return value
        if not isinstance(value, (list, tuple)):
            raise ValueError("data.target is one target name or a list of them")
        if not value:
            raise ValueError("a target list needs at least one name")
        for index, name in enumerate(value):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"data.target[{index}] = {name!r} is not a target name")
            if name in value[:index]:
                raise ValueError(f"data.target[{index}] = {name!r} repeats data.target[{list(value).index(name)}]")
        return value[0] if len(value) == 1 else tuple(value)

    def targets(self) -> tuple[str | None, ...]:
        """The study's targets in the order written: one (None: the reader's default) or several."""
        return self.target if isinstance(self.target, tuple) else (self.target,)

    @property
    def multi_target(self) -> bool:
        """Whether `target` is a grid axis (two or more targets)."""
        return len(self.targets()) > 1


class WeightsSection(_Section):
    dir: Path = Field(Path("~/.cache/sam-study/weights"), validate_default=True)
    files: dict[str, str] = {}  # backbone name -> checkpoint path, or "random"

    @field_validator("dir")
    @classmethod
    def _expand_dir(cls, value):
        return Path(os.path.expanduser(value))


class PromptsSection(_Section):
    """How prompts are derived from the ground truth; every length is in pixels of the original image."""

    random_points_k: int = Field(3, ge=1)
    box_margin_px: int = Field(5, ge=0)
    jitter_px: float = Field(5.0, ge=0)
    jitter_frac: float = Field(0.0, ge=0, le=1)
    positive_points: int = Field(1, ge=1)
    negative_points: int = Field(1, ge=0)
    negative_margin_px: int = Field(20, ge=0)  # negatives lie within the mask's box grown by this
    file: Path | None = None  # external prompts for the `file` prompt, CSV or JSON keyed by image id


Categorical = tuple[str, ...]
Number = Union[tuple[float, ...], Range]


class FactorsSection(_Section):
    """Grid axes. Each key takes one value (fixed) or a list (an axis); numbers may also be a Range."""

    backbone: Categorical = ("litemedsam",)
    optimizer: Categorical = ("adamw",)
    loss: Categorical = ("dice_bce",)
    prompt: Categorical = ("box",)
    eval_prompt: Union[Literal["same"], Categorical] = "same"
    lr: Number = (1e-4,)
    weight_decay: Union[tuple[float | None, ...], Range] = (None,)  # None: the optimizer's default
    momentum: Number = (0.9,)  # SGD only
    epochs: tuple[int, ...] = (5,)
    batch_size: tuple[int, ...] = (8,)
    grad_accum: tuple[int, ...] = (1,)
    schedule: Categorical = ("constant",)
    warmup_epochs: tuple[int, ...] = (0,)
    swa: tuple[bool, ...] = (False,)
    multimask: tuple[Literal["single", "best_iou"], ...] = ("single",)
    train_prompt_encoder: tuple[bool, ...] = (False,)
    iou_loss_weight: Number = (1.0,)  # SAM, SAM 2 and micro-sam regress the IoU head with weight 1
    train_clicks: tuple[int, ...] = (0,)  # corrective-click sub-iterations per training step
    # what trains besides the decoder (trainables/backbones/adaptation.py): decoder | late_blocks | lora | full
    adaptation: tuple[Literal["decoder", "late_blocks", "lora", "full"], ...] = ("decoder",)
    adapt_blocks: tuple[int, ...] = (2,)  # late_blocks, and lora with lora_blocks: last
    lora_rank: tuple[int, ...] = (8,)
    lora_alpha: Number = (8.0,)
    lora_blocks: tuple[Literal["all", "last"], ...] = ("all",)

    @field_validator("*", mode="before")
    @classmethod
    def _axis(cls, value, info):
        if info.field_name == "eval_prompt" and value == "same":
            return value
        return _as_axis(value)

    @field_validator("epochs", "batch_size", "grad_accum", "adapt_blocks", "lora_rank")
    @classmethod
    def _positive(cls, values):
        for v in values:
            if v < 1:
                raise ValueError(f"must be at least 1, got {v}")
        return values

    @field_validator("lr", "weight_decay", "momentum", "iou_loss_weight", "warmup_epochs", "train_clicks", "lora_alpha")
    @classmethod
    def _non_negative(cls, values, info):
        if isinstance(values, Range):
            return values
        for v in values:
            if v is not None and (v < 0 or (info.field_name == "lr" and v == 0)):
                raise ValueError(f"must be {'> 0' if info.field_name == 'lr' else '>= 0'}, got {v}")
        return values

    def categorical_axes(self) -> dict[str, tuple]:
        """The factors that form the grid (every non-Range factor except eval_prompt), name -> levels."""
        return {
            name: value
            for name, value in self
            if name != "eval_prompt" and not isinstance(value, Range)
        }

    def ranges(self) -> dict[str, Range]:
        return {name: value for name, value in self if isinstance(value, Range)}

    def eval_prompts(self) -> tuple[str, ...]:
        """Every prompt used at evaluation: the training prompts when `same`, else the listed ones."""
        return self.prompt if self.eval_prompt == "same" else self.eval_prompt


class UNetSection(_Section):
    """The U-Net baseline (`baseline.unet`, trainables/unet.py): trained from scratch on the prepared
    slices, so its defaults are a from-scratch network's, not the decoder's."""

    enabled: bool = False
    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: str = "adamw"
    loss: str = "dice_bce"
    batch_size: int = Field(8, ge=1)
    schedule: str = "cosine"
    weight_decay: float | None = Field(None, ge=0)  # None: the optimizer's default
    input_size: int = Field(256, ge=16)  # every slice is resized to input_size x input_size
    deep_supervision: bool = False
    box_channel: bool = False  # also train the arm that gets the prompt box as a fourth input channel

    @field_validator("input_size")
    @classmethod
    def _multiple_of_four(cls, value):
        if value % 4:
            raise ValueError(f"must be a multiple of 4 (the U-Net halves it at least twice), got {value}")
        return value


class BaselineSection(_Section):
    zero_shot: bool = True
    unet: UNetSection = UNetSection()


class SearchSection(_Section):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)  # draws per grid cell (random, optuna); grid: 1
    seeds: int = Field(1, ge=1)  # replicates: every configuration trained with training seeds 0..seeds-1
    metric: Literal["val_dice", "val_iou", "val_loss", "train_loss"] = "val_dice"
    mode: Literal["max", "min"] = "max"


class EvaluationSection(_Section):
    """How test (and validation) predictions are scored; part of the config hash, as it changes numbers."""

    single_point_multimask: bool = True  # one-point prompts: 3 masks, keep the best predicted IoU
    nsd_tolerance_mm: float = Field(2.0, gt=0)  # NSD tolerance: mm with spacing, else pixels
    hd95_penalty: Literal["diagonal"] = "diagonal"  # HD95 when exactly one mask is empty
    clicks: int = Field(0, ge=0, le=100)  # corrective clicks after the prompt, on every test image
    click_rule: Literal["center", "random"] = "center"  # centre of the largest error, or uniform in the error


class SchedulerSection(_Section):
    kind: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3, gt=1)


class UNetResources(_Section):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(1, ge=0)  # a whole GPU; on a cluster without GPUs the trials use none


Adaptation = Literal["decoder", "late_blocks", "lora", "full"]


class ResourcesSection(_Section):
    """Where trials run. `gpus_per_trial` is one number, or one per adaptation arm (a decoder trial
    needs a fraction of a GPU, an encoder trial a whole one or more). A trial with more than one
    GPU is data-parallel over `workers_per_trial` workers (default: its GPU count), one GPU each;
    `workers_per_trial` > 1 without GPUs runs data-parallel on CPU (the gloo backend)."""

    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: Union[float, dict[Adaptation, float]] = 0.0
    workers_per_trial: Union[int, dict[Adaptation, int], None] = None
    unet: UNetResources = UNetResources()  # the U-Net baseline's trials
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)

    @field_validator("gpus_per_trial", "workers_per_trial")
    @classmethod
    def _per_arm(cls, value, info):
        least = 0 if info.field_name == "gpus_per_trial" else 1
        for number in (value.values() if isinstance(value, dict) else [value]):
            if number is not None and number < least:
                raise ValueError(f"must be greater than or equal to {least}, got {number}")
        if info.field_name == "gpus_per_trial" and not isinstance(value, dict):
            return float(value)  # an int stays what the schema says (a float), also when written back
        return value

    def gpus_for(self, adaptation: str) -> float:
        """GPUs one trial of `adaptation` asks for."""
        gpus = self.gpus_per_trial
        return float(gpus.get(adaptation, 0) if isinstance(gpus, dict) else gpus)

    def workers_for(self, adaptation: str) -> int:
        """Data-parallel workers of one trial of `adaptation`: as set, else one per GPU (at least one)."""
        workers = self.workers_per_trial
        if isinstance(workers, dict):
            workers = workers.get(adaptation)
        return int(workers) if workers is not None else max(1, int(self.gpus_for(adaptation)))

    @property
    def most_gpus(self) -> float:
        gpus = self.gpus_per_trial
        return float(max(gpus.values(), default=0) if isinstance(gpus, dict) else gpus)


class RaySection(_Section):
    address: str | None = None  # None: a local instance; "auto" or host:port joins a cluster


class TrackingSection(_Section):
    uri: str | None = None  # None: SQLite inside the study folder
    experiment: str | None = None  # None: the study name


class ReportSection(_Section):
    enabled: bool = True


class StudyConfig(_Section):
    study: StudySection = StudySection()
    data: DataSection = DataSection()
    weights: WeightsSection = WeightsSection()
    prompts: PromptsSection = PromptsSection()
    factors: FactorsSection = FactorsSection()
    baseline: BaselineSection = BaselineSection()
    search: SearchSection = SearchSection()
    evaluation: EvaluationSection = EvaluationSection()
    scheduler: SchedulerSection = SchedulerSection()
    resources: ResourcesSection = ResourcesSection()
    ray: RaySection = RaySection()
    tracking: TrackingSection = TrackingSection()
    report: ReportSection = ReportSection()

    @property
    def study_dir(self) -> Path:
        return self.study.out / self.study.name

    @property
    def cache_dir(self) -> Path:
        return self.study.cache_dir or self.study.out / "cache"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name


# --- loading --------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: dict | None = None) -> StudyConfig:
    """Read, validate and resolve a study file; every mistake is a UserError naming key and line.

    `overrides` is a nested dict merged over the file (used by tests and by `--address`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such study file. Pass the path of a grid.yaml, for example "
                        f"examples/quickstart.yaml.")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}:{where}: this is not valid YAML ({problem}). Fix the syntax "
                        f"there (indentation, a missing colon or an unclosed bracket).") from None
    if raw is None:
        raise UserError(f"{path}: the study file is empty. A grid.yaml names at least the data and the factors "
                        f"to compare; start from examples/quickstart.yaml (the embedded default) or "
                        f"examples/grid.example.yaml (every key).")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study file is a mapping of sections (study, data, factors, ...), "
                        f"but this one holds a {type(raw).__name__}.")
    if overrides:
        raw = _merge(raw, overrides)
    return config_from_dict(raw, source=str(path), lines=lines)


def config_from_dict(raw: dict, source: str = "<config>", lines: dict | None = None) -> StudyConfig:
    """Validate a nested dict (as read from YAML) into a StudyConfig, raising UserError on mistakes."""
    lines = lines or {}
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_describe_validation_error(err, source, lines, raw)) from None
    _check_names(config, source, lines)
    _check_consistency(config, source, lines)
    return config


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _key_lines(node, path=()) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    found: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            found[key_path] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, key_path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found[path + (index,)] = item.start_mark.line + 1
            found.update(_key_lines(item, path + (index,)))
    return found


def _where(source: str, lines: dict, path: tuple) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return f"{source}, line {lines[path[:end]]}"
    return source


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: Any = StudyConfig
    for key in path:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _describe_validation_error(err: ValidationError, source: str, lines: dict, raw: dict) -> str:
    error = err.errors()[0]
    # Drop pydantic's union/validator tags so the path is the one the user wrote.
    loc = tuple(part for part in error["loc"]
                if not (isinstance(part, str) and ("[" in part or part in ("function-after", "function-before")))
                and not (isinstance(part, str) and part in ("tuple[str, ...]", "Range", "literal['same']")))
    dotted = ".".join(str(part) for part in loc)
    where = _where(source, lines, loc)
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return (f"{where}: unknown key '{dotted}'. The keys allowed in {section} are: "
                f"{', '.join(allowed)}.{hint} See the grid.yaml reference in README.md.")
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {dotted} = {value!r} is not accepted: {message}."


def _registry_names() -> dict[str, tuple[str, ...]]:
    """The names users may write, read from the registries that build them."""
    from study.data.readers import READERS
    from trainables.backbones import BACKBONES
    from trainables.losses import LOSSES
    from trainables.optimizers import OPTIMIZERS, SCHEDULES
    from trainables.prompts import PROMPTS

    return {
        "backbone": tuple(BACKBONES), "optimizer": tuple(OPTIMIZERS), "loss": tuple(LOSSES),
        "prompt": tuple(PROMPTS), "schedule": tuple(SCHEDULES), "reader": tuple(READERS),
    }


def _unknown_name(kind: str, value: str, valid, source: str, lines: dict, path: tuple) -> UserError:
    close = difflib.get_close_matches(value, list(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"{_where(source, lines, path)}: {'.'.join(map(str, path))} = {value!r} is not a "
                     f"known {kind}. Valid {kind} names: {', '.join(valid)}.{hint}")


def _check_names(config: StudyConfig, source: str, lines: dict) -> None:
    names = _registry_names()
    if config.data.reader not in names["reader"]:
        raise _unknown_name("reader", config.data.reader, names["reader"], source, lines, ("data", "reader"))
    factors = config.factors
    for factor, kind in (("backbone", "backbone"), ("optimizer", "optimizer"), ("loss", "loss"),
                         ("prompt", "prompt"), ("schedule", "schedule")):
        for index, value in enumerate(getattr(factors, factor)):
            if value not in names[kind]:
                raise _unknown_name(kind, value, names[kind], source, lines, ("factors", factor, index))
    if factors.eval_prompt != "same":
        for index, value in enumerate(factors.eval_prompt):
            if value not in names["prompt"]:
                raise _unknown_name("prompt", value, names["prompt"], source, lines, ("factors", "eval_prompt", index))
    unet = config.baseline.unet
    for key, kind in (("optimizer", "optimizer"), ("loss", "loss"), ("schedule", "schedule")):
        if getattr(unet, key) not in names[kind]:
            raise _unknown_name(kind, getattr(unet, key), names[kind], source, lines, ("baseline", "unet", key))
    for backbone in config.weights.files:
        if backbone not in names["backbone"]:
            raise _unknown_name("backbone", backbone, names["backbone"], source, lines, ("weights", "files", backbone))


def _check_consistency(config: StudyConfig, source: str, lines: dict) -> None:
    factors = config.factors
    split = config.data.split
    if split.val == 0:
        raise UserError(f"{_where(source, lines, ('data', 'split', 'val'))}: data.split.val = 0 leaves no "
                        f"validation subjects, but every fine-tune trial picks its best epoch on the validation "
                        f"images (and the search compares trials by {config.search.metric} on them). Set "
                        f"data.split.val to a fraction > 0, e.g. 0.1 (a dataset's own val folder still wins).")
    if split.test == 0:
        raise UserError(f"{_where(source, lines, ('data', 'split', 'test'))}: data.split.test = 0 leaves no "
                        f"test subjects, so no trial would have test metrics to report. Set data.split.test to "
                        f"a fraction > 0, e.g. 0.2 (a dataset's own test folder still wins).")
    search = config.search
    if search.algorithm == "grid" and search.num_samples > 1:
        raise UserError(f"{_where(source, lines, ('search', 'num_samples'))}: search.num_samples = "
                        f"{search.num_samples} with search.algorithm: grid would train every configuration "
                        f"{search.num_samples} times with the same seed. Replicates are search.seeds: write "
                        f"search.seeds: {search.num_samples} (training seeds 0..{search.num_samples - 1}) and "
                        f"leave num_samples at 1; num_samples is the number of draws per grid cell for the "
                        f"random and optuna algorithms.")
    if search.algorithm != "grid" and search.num_samples > 1 and not factors.ranges():
        raise UserError(f"{_where(source, lines, ('search', 'num_samples'))}: search.num_samples = "
                        f"{search.num_samples} draws per grid cell, but no factor is a range, so every draw "
                        f"would be the same configuration. Give a numeric factor a range (e.g. lr: "
                        f"{{loguniform: [1.0e-5, 1.0e-3]}}), or use search.seeds: {search.num_samples} for "
                        f"replicates.")
    ranges = factors.ranges()
    if ranges and config.search.algorithm == "grid":
        name = next(iter(ranges))
        raise UserError(f"{_where(source, lines, ('factors', name))}: factors.{name} is a range, which the "
                        f"grid search cannot enumerate. Set search.algorithm to random or optuna, or give "
                        f"{name} a list of values.")
    if config.scheduler.kind == "asha" and config.scheduler.grace_period > max(factors.epochs):
        raise UserError(f"{_where(source, lines, ('scheduler', 'grace_period'))}: scheduler.grace_period = "
                        f"{config.scheduler.grace_period} exceeds the most epochs any trial runs "
                        f"({max(factors.epochs)}), so ASHA could never stop a trial early. Lower it.")
    uses_file = "file" in factors.prompt or "file" in factors.eval_prompts()
    if uses_file and config.prompts.file is None:
        raise UserError(f"{_where(source, lines, ('factors', 'prompt'))}: the `file` prompt reads external "
                        f"prompts, but prompts.file is not set. Add prompts.file: the CSV or JSON of boxes "
                        f"or points keyed by image id.")
    _check_adaptation(config, source, lines)
    want = {"max": ("val_dice", "val_iou"), "min": ("val_loss", "train_loss")}
    if config.search.metric not in want[config.search.mode]:
        raise UserError(f"{_where(source, lines, ('search', 'mode'))}: search.mode = {config.search.mode!r} "
                        f"does not fit search.metric = {config.search.metric!r}: Dice and IoU are maximised, "
                        f"losses minimised.")


def _check_adaptation(config: StudyConfig, source: str, lines: dict) -> None:
    """adapt_blocks must fit every backbone's encoder where it is used; per-arm resources must
    name every arm the study trains."""
    from trainables.backbones import get_spec

    factors = config.factors
    uses_blocks = "late_blocks" in factors.adaptation or ("lora" in factors.adaptation and "last" in factors.lora_blocks)
    if uses_blocks:
        for backbone in factors.backbone:
            depth = get_spec(backbone).encoder_blocks
            for blocks in factors.adapt_blocks:
                if blocks > depth:
                    raise UserError(f"{_where(source, lines, ('factors', 'adapt_blocks'))}: factors.adapt_blocks = "
                                    f"{blocks}, but {backbone}'s image encoder has {depth} blocks. Tune at most "
                                    f"{depth} (all of them is the `full` adaptation, or lora with lora_blocks: all).")
    for key in ("gpus_per_trial", "workers_per_trial"):
        value = getattr(config.resources, key)
        missing = [arm for arm in factors.adaptation if isinstance(value, dict) and arm not in value]
        if missing:
            raise UserError(f"{_where(source, lines, ('resources', key))}: resources.{key} is given per adaptation "
                            f"but has no entry for {', '.join(missing)}, which factors.adaptation trains. Add "
                            f"{missing[0]}: <number> to it, or give one number for every trial.")


# --- the resolved config ---------------------------------------------------------------------


def resolved_dict(config: StudyConfig) -> dict:
    """Every key with its value, defaults filled in, paths as strings: what resolved.yaml holds."""
    data = config.model_dump(mode="json")
    for name, value in data["factors"].items():
        if isinstance(value, dict):  # a Range, written back the way the user writes it
            data["factors"][name] = {value["kind"]: [value["low"], value["high"]]}
    data["tracking"]["experiment"] = config.experiment_name
    data["study"]["cache_dir"] = str(config.cache_dir)
    return data


RUNTIME_SECTIONS = ("ray", "resources", "report")  # where and how a study runs, not what it computes


def config_hash(config: StudyConfig) -> str:
    """A stable 16-hex-digit hash of what the study computes (key order and formatting do not matter).

    The runtime sections (cluster address, resources, report) are left out, so the same study
    can be resumed on another cluster or with more GPUs and keep its identity.
    """
    study = {k: v for k, v in resolved_dict(config).items() if k not in RUNTIME_SECTIONS}
    canonical = json.dumps(study, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_resolved(config: StudyConfig, folder: Path) -> Path:
    """Write `resolved.yaml` into `folder` atomically and durably (`foundation.files.write_atomic`)."""
    target = folder / "resolved.yaml"
    body = yaml.safe_dump(resolved_dict(config), sort_keys=False, default_flow_style=None)
    write_atomic(target, f"# resolved by study.config; hash {config_hash(config)}\n{body}")
    return target
