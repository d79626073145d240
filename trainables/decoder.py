"""The trial: fine-tune a backbone's mask decoder on cached image embeddings, then evaluate it.

`run_trial(spec, prepared_root, cache_root)` is what one trial computes, as a plain function (no
Ray): the study runner calls it inside a Ray Tune trainable, tests and benchmarks call it
directly. The image encoder never runs here except to fill missing cache entries; every
training step is one batched mask-decoder pass over cached embeddings (`DecoderFineTune`).

Conventions, each a decision a reviewer should know:

- Prompts come from the ground truth in original pixels (trainables/prompts.py) and are mapped
  into the backbone's input frame by the backbone. Evaluation prompts are seeded by (study seed,
  image, view, prompt name) only, so every trial, every replicate seed and the zero-shot
  baseline see the same prompt for an image and paired comparisons are fair.
- Training randomness (the data order, the view drawn per image, the training-prompt draws,
  torch's generator) is seeded by (study seed, `train_seed`, epoch) and not by the other
  factors, so replicate seeds differ only in it, and two configurations with the same
  `train_seed` see the same data order (common random numbers, which makes paired comparisons
  between them less noisy).
- Metrics are always computed at the mask's original resolution: the decoder's low-resolution
  logits are upsampled, un-padded and resized by the backbone (`Backbone.postprocess`), then
  thresholded at logit 0.
- The loss is computed at the original resolution as well, on the same logits the metrics see,
  so the objective and the score agree (and a `box_per_component` union is formed in the frame it
  is scored in). The alternative, a loss on the decoder's 256 x 256 output with the mask resized
  into that frame, would save little: measured on this project's 2-core CPU, a decoder training
  step on 8 images costs 1.2 s, the loss at 256 x 256 5 ms (0.4 %), the upsampling plus loss at
  the original size 4-26 ms for LiteMedSAM and SAM 2 (128-512 pixel masks, 0.3-2 %) and 52-82 ms
  for SAM-family models at 1024 pixels (whose chain goes 256 -> 1024 -> H x W; 4-7 %).
- `box_per_component` gives several boxes for one image: each box is decoded as its own row
  and the image's logits are the element-wise maximum over its rows (the union of the masks).
- Masks per prompt. `multimask: single` asks the decoder for one mask; `best_iou` for three.
  Evaluation keeps the mask with the highest predicted IoU; training backpropagates, per image,
  the mask with the lowest loss and regresses the IoU head on all three (the SAM rule, as sam2's
  `training/loss_fns.py` and micro-sam's trainer do; `iou_loss_weight`, default 1 as theirs,
  so the head that ranks the masks is trained). A single point is ambiguous (part or
  whole?), so with `single_point_multimask` (the default; `evaluation.single_point_multimask`)
  a prompt of exactly one point and no box always takes the three-mask path, in training and
  evaluation, as the official `SamPredictor` users and micro-sam do; the masks evaluated are
  then the ones that were trained.
- Zero-shot evaluation decodes with the official predictor's inference settings
  (`Backbone.use_official_inference`: SAM 2's dynamic multimask via stability); a fine-tuned
  decoder is evaluated as it was trained.
- `prompts.file` prompts are given in the original image's pixels, so they do not fit an
  augmented (rotated, deformed) view: trials trained with the `file` prompt train on the
  original views only.
- An epoch visits every training image once, each time as one of its cached views (0 is the
  original, 1..K augmented) drawn at random. Its `val_loss` is the training loss function on the
  validation images with the evaluation prompt, averaged over images; `val_dice` and `val_iou`
  the means of the per-image Dice and IoU (`trainables.metrics`).
- Gradient accumulation averages the batch losses of each group of `grad_accum` batches (a last,
  shorter group averages over its own size). The loss is checked once per optimizer step, before
  the step, so a non-finite value never reaches the weights (`TrialFailed`).
- SWA (`swa`): from the first epoch after half of the epochs, the decoder weights at the end of
  each epoch are averaged (equal weights); validation, best-epoch selection and the test use the
  averaged weights, while training continues from the live ones.
- The best epoch (by `select_metric`/`select_mode`) is restored before the test evaluation.

Residency. The study runner runs many trials in one worker process, so by default
(`keep_resident=True`) a process keeps what trials share:

- the built `Backbone` per (backbone, weights file, input size, device), at most
  `MAX_RESIDENT_BACKBONES` of them; every trial starts by restoring the decoder and prompt
  encoder to the weights the backbone was built with, so no trial starts from another's training;
- the cache entries a trial reads, copied into RAM once per (cache namespace, prepared store),
  while they fit in `RESIDENT_MEMORY_FRACTION` of physical memory (else they are read
  memory-mapped per batch);
- the ground-truth masks per prepared store;
- glibc's freed memory (`retain_freed_memory`), which cuts a CPU training step by about a third.

`release_resident()` drops all of it. A process runs one trial at a time (Ray Tune's actors do):
trials in parallel threads of one process would share a backbone and must not.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
import zlib
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from foundation.prepared_store import PreparedDataset, SliceRecord, open_prepared
from foundation.embedding_cache import EmbeddingCache, ResidentEmbeddings
from trainables.backbones import Backbone, build_backbone
from trainables.losses import build_loss, iou_head_loss
from trainables.metrics import dice, image_metrics, iou, subject_metrics
from trainables.optimizers import build_optimizer, build_schedule
from trainables.prompts import Prompt, PromptSettings, load_prompt_file, make_prompt

#: Images per decoder call when evaluating (no gradients are kept, so larger batches fit).
EVAL_BATCH_SIZE = 16
KEPT_PREDICTIONS = 4  # best and worst test images whose predictions a trial returns
MAX_RESIDENT_BACKBONES = 2
RESIDENT_MEMORY_FRACTION = 0.25


class TrialFailed(RuntimeError):
    """A trial that cannot go on (a non-finite loss); the study records the reason and continues."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs, as plain values (one grid cell of the study plus context)."""

    trial_id: str
    backbone: str
    weights: str  # a checkpoint path, or "random"
    stage: str = "finetune"  # or "zero_shot": evaluation only
    optimizer: str = "adamw"
    loss: str = "dice_bce"
    prompt: str = "box"
    eval_prompts: tuple[str, ...] = ()  # empty: the training prompt
    lr: float = 1e-4
    weight_decay: float | None = None
    momentum: float = 0.9
    epochs: int = 5
    batch_size: int = 8
    grad_accum: int = 1
    schedule: str = "constant"
    warmup_epochs: int = 0
    swa: bool = False
    multimask: str = "single"
    train_prompt_encoder: bool = False
    iou_loss_weight: float = 1.0  # the IoU head that ranks three masks is trained (SAM: weight 1)
    seed: int = 0  # the study seed: evaluation prompts
    train_seed: int = 0  # the replicate seed (search.seeds): training randomness
    single_point_multimask: bool = True  # evaluation.single_point_multimask
    nsd_tolerance: float = 2.0  # evaluation.nsd_tolerance_mm (pixels for images without spacing)
    prompt_settings: dict = field(default_factory=dict)
    prompts_file: str | None = None
    select_metric: str = "val_dice"
    select_mode: str = "max"
    input_size: int | None = None  # test-only override of the backbone's input size
    device: str = "cpu"

    @property
    def primary_eval_prompt(self) -> str:
        return self.eval_prompts[0] if self.eval_prompts else self.prompt


@dataclass
class TrialResult:
    trial_id: str
    stage: str
    history: list[dict]
    per_image: list[dict]
    summary: dict
    per_subject: list[dict] = field(default_factory=list)
    #: image_id -> (image, truth, prediction) for the best and worst test images with the primary
    #: evaluation prompt (`KEPT_PREDICTIONS` of each), for overlays in the report.
    predictions: dict = field(default_factory=dict)


# --- what a worker process keeps between trials --------------------------------------------------

_RESIDENT_BACKBONES: OrderedDict[tuple, tuple[Backbone, dict[str, torch.Tensor]]] = OrderedDict()
_RESIDENT_EMBEDDINGS: OrderedDict[tuple[str, str], ResidentEmbeddings] = OrderedDict()
_RESIDENT_MASKS: dict[tuple[str, str], dict[tuple[str, int], np.ndarray]] = {}
_FREED_MEMORY_RETAINED: bool | None = None

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB with a fresh `mmap` and unmaps it on
    free, so each training step touches newly zeroed pages for its large activations: measured
    here, a LiteMedSAM decoder step on 8 images took 460,000 page faults and 1 s of kernel time
    (2.0 s wall); with this setting, no faults and 1.3 s. Process-wide and irreversible: all
    allocations then come from the heap (one arena, so threads share it), which keeps its peak
    size. Meant for worker processes that run trials; returns False where it does not apply
    (not Linux/glibc), True when set.
    """
    global _FREED_MEMORY_RETAINED
    if _FREED_MEMORY_RETAINED is None:
        _FREED_MEMORY_RETAINED = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _FREED_MEMORY_RETAINED = all(libc.mallopt(option, value) == 1 for option, value in (
                    (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
            except (OSError, AttributeError):
                pass
    return _FREED_MEMORY_RETAINED


def release_resident() -> None:
    """Forget every backbone, embedding set and mask kept for later trials in this process."""
    _RESIDENT_BACKBONES.clear()
    _RESIDENT_EMBEDDINGS.clear()
    _RESIDENT_MASKS.clear()


def _weights_key(weights: str) -> tuple:
    if weights == "random":
        return ("random",)
    path = Path(weights).expanduser().resolve()
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _build(spec: TrialSpec) -> Backbone:
    weights = spec.weights if spec.weights == "random" else Path(spec.weights)
    return build_backbone(spec.backbone, weights, input_size=spec.input_size, device=spec.device)


def resident_backbone(spec: TrialSpec) -> Backbone:
    """The backbone `spec` names, built once per process and restored to its built weights.

    Kept per (backbone, weights file identity, input size, device); the least recently used is
    dropped beyond `MAX_RESIDENT_BACKBONES`. The mask decoder and prompt encoder get back the
    state they had when built, gradients are cleared and the model is in eval mode.
    """
    try:
        key = (spec.backbone, _weights_key(spec.weights), spec.input_size, str(spec.device))
    except OSError:
        return _build(spec)  # a missing file: let build_backbone say so
    if key in _RESIDENT_BACKBONES:
        _RESIDENT_BACKBONES.move_to_end(key)
        backbone, pristine = _RESIDENT_BACKBONES[key]
        backbone.load_decoder_state_dict(pristine)
        for parameter in backbone.model.parameters():
            parameter.grad = None
        backbone.model.eval()
        return backbone
    backbone = _build(spec)
    _RESIDENT_BACKBONES[key] = (backbone, backbone.decoder_state_dict())
    while len(_RESIDENT_BACKBONES) > MAX_RESIDENT_BACKBONES:
        _RESIDENT_BACKBONES.popitem(last=False)
    return backbone


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def resident_embeddings(cache: EmbeddingCache, records: list[SliceRecord]) -> ResidentEmbeddings | None:
    """The entries of `records` in RAM, loading those not yet resident; None if they would not fit.

    Kept per (cache namespace, prepared-store key); older sets are dropped (least recently used
    first) to stay within `RESIDENT_MEMORY_FRACTION` of physical memory. The entries must be in
    the cache already (`EmbeddingCache.ensure`).
    """
    key = (str(cache.namespace), cache.prepared_key)
    held = _RESIDENT_EMBEDDINGS.pop(key, ResidentEmbeddings({}, {}))
    missing = [r for r in records if (r.image_id, r.view) not in held.rows]
    if missing:
        budget = int(RESIDENT_MEMORY_FRACTION * _physical_memory_bytes())
        unique = len({(r.image_id, r.view) for r in missing})
        if held.nbytes + unique * cache.entry_bytes(missing[0]) > budget:
            if held.rows:
                _RESIDENT_EMBEDDINGS[key] = held
            return None
        held = held.merged(cache.load_resident(missing))
        while _RESIDENT_EMBEDDINGS and held.nbytes + sum(e.nbytes for e in _RESIDENT_EMBEDDINGS.values()) > budget:
            _RESIDENT_EMBEDDINGS.popitem(last=False)
    _RESIDENT_EMBEDDINGS[key] = held
    return held


def _resident_masks(dataset: PreparedDataset) -> dict[tuple[str, int], np.ndarray]:
    return _RESIDENT_MASKS.setdefault((str(dataset.root), dataset.key), {})


# --- where features come from -------------------------------------------------------------------


class EmbeddingSource(Protocol):
    def batch(self, records: list[SliceRecord], device: str | torch.device) -> dict[str, torch.Tensor]:
        """Encoder features of `records` as float32 tensors (N, C, h, w) on `device`."""


class MappedEmbeddings:
    """Features read memory-mapped from the cache for every batch (when they do not fit in RAM)."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache

    def batch(self, records: list[SliceRecord], device: str | torch.device) -> dict[str, torch.Tensor]:
        return self.cache.load_batch(records, device)


class EncoderInTheLoop:
    """Features computed by the frozen image encoder for every batch, under `no_grad`: what the
    usual fine-tuning scripts do, and the baseline of benchmarks/cache_speedup.py.

    The batch's images are read from the prepared store and encoded together, or in chunks of at
    most `max_batch` images (SAM's ViT-B at 1024 pixels needs about 3 GB of CPU memory per image in
    one call). The features are rounded to float16 exactly as cache entries are, so a
    fine-tune fed by this source trains on the same numbers as one fed by the cache.
    """

    def __init__(self, backbone: Backbone, dataset: PreparedDataset, max_batch: int | None = None):
        self.backbone = backbone
        self.dataset = dataset
        self.max_batch = max_batch

    def batch(self, records: list[SliceRecord], device: str | torch.device) -> dict[str, torch.Tensor]:
        size = self.max_batch or len(records)
        parts = []
        for start in range(0, len(records), size):
            images = np.stack([self.dataset.load(r)[0] for r in records[start:start + size]])
            with torch.no_grad():
                parts.append(self.backbone.encode(self.backbone.preprocess(images)))
        return {name: torch.cat([part[name] for part in parts]).half().to(device).float() for name in parts[0]}


# --- prompts into decoder rows ----------------------------------------------------------------


def _rng(*parts) -> np.random.Generator:
    """A generator seeded by a tuple of ints and strings, stable across processes."""
    ints = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng(ints)


@dataclass
class _Rows:
    """Decoder rows of a batch: which image each row belongs to, and its prompt in the input frame."""

    image_index: list[int]
    points: list[np.ndarray]  # (P, 2) input-frame xy; P may be 0
    labels: list[np.ndarray]  # (P,)
    boxes: list[np.ndarray | None]  # (4,) input-frame xyxy or None


def _rows_for(prompts: list[Prompt], sizes: list[tuple[int, int]], backbone: Backbone) -> _Rows:
    rows = _Rows([], [], [], [])
    for index, (prompt, hw) in enumerate(zip(prompts, sizes)):
        if prompt.points is not None and len(prompt.points):
            points = backbone.to_input_frame(np.asarray(prompt.points, np.float32), hw)
            labels = np.asarray(prompt.point_labels, np.int64)
        else:
            points, labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
        boxes = prompt.boxes if prompt.boxes is not None and len(prompt.boxes) else [None]
        for box in boxes:
            mapped = None if box is None else backbone.to_input_frame(np.asarray(box, np.float32).reshape(2, 2), hw).reshape(4)
            rows.image_index.append(index)
            rows.points.append(points)
            rows.labels.append(labels)
            rows.boxes.append(mapped)
    return rows


def _decode(backbone: Backbone, features: dict[str, torch.Tensor], rows: _Rows, n_images: int, masks: str,
            device, single_point: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution logits (N,K,h,w) and predicted IoU (N,K) per image, from its rows.

    `masks`: "single" (token 0), "best_iou" (three masks, the highest predicted IoU kept) or
    "all" (three masks kept, for the lowest-loss training rule). `single_point`, when given, is
    the mode for rows of exactly one point and no box (the single-point protocol). K is 3 when
    any group is decoded with "all", else 1; a one-mask group then repeats its mask three times,
    so its lowest loss is its only loss.

    Rows are decoded in groups of the same prompt structure (with or without a box, the same
    number of points), each group one batched decoder call; a row without any prompt gets one
    padding point (label -1), SAM's encoding of "no point". An image with several rows gets the
    element-wise maximum of their logits (the union of their masks) and their best predicted IoU.
    """
    groups: dict[tuple[bool, int], list[int]] = defaultdict(list)
    for r in range(len(rows.image_index)):
        has_box = rows.boxes[r] is not None
        groups[(has_box, len(rows.points[r]))].append(r)
    modes = {key: single_point if single_point and key == (False, 1) else masks for key in groups}
    keep = 3 if "all" in modes.values() else 1
    row_logits: list[torch.Tensor] = [None] * len(rows.image_index)  # type: ignore[list-item]
    row_iou: list[torch.Tensor] = [None] * len(rows.image_index)  # type: ignore[list-item]
    for (has_box, n_points), members in groups.items():
        mode = modes[(has_box, n_points)]
        index = [rows.image_index[r] for r in members]
        if index == list(range(n_images)):
            feats = features
        else:
            index_tensor = torch.tensor(index, device=device)
            feats = {name: value.index_select(0, index_tensor) for name, value in features.items()}
        points = labels = boxes = None
        width = n_points if n_points or has_box else 1  # a row with no prompt: one padding point
        if width:
            points_np = np.zeros((len(members), width, 2), np.float32)
            labels_np = np.full((len(members), width), -1, np.int64)
            for i, r in enumerate(members):
                p = len(rows.points[r])
                points_np[i, :p] = rows.points[r]
                labels_np[i, :p] = rows.labels[r]
            points, labels = torch.from_numpy(points_np).to(device), torch.from_numpy(labels_np).to(device)
        if has_box:
            boxes = torch.from_numpy(np.stack([rows.boxes[r] for r in members])).to(device)
        logits, iou_pred = backbone.decode(feats, points, labels, boxes, multimask=mode != "single")
        if mode == "best_iou":
            best = iou_pred.argmax(dim=1)
            logits = logits[torch.arange(len(members), device=device), best].unsqueeze(1)
            iou_pred = iou_pred.gather(1, best[:, None])
        if logits.shape[1] != keep:
            logits, iou_pred = logits.expand(-1, keep, -1, -1), iou_pred.expand(-1, keep)
        for i, r in enumerate(members):
            row_logits[r], row_iou[r] = logits[i], iou_pred[i]
    if rows.image_index == list(range(n_images)):  # one row per image, in order: nothing to unite
        return torch.stack(row_logits), torch.stack(row_iou)
    per_image: list[list[int]] = [[] for _ in range(n_images)]
    for r, image in enumerate(rows.image_index):
        per_image[image].append(r)
    logits = torch.stack([torch.stack([row_logits[r] for r in rs]).amax(dim=0) for rs in per_image])
    iou_out = torch.stack([torch.stack([row_iou[r] for r in rs]).amax(dim=0) for rs in per_image])
    return logits, iou_out


def lowest_loss(loss_fn, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean over images of the lowest loss among each image's K masks (N, K, H, W).

    Each image's loss is `loss_fn` on that image alone, which equals its share of the batched
    loss (every registered loss is a mean over images of per-image terms). With K = 1 this is
    `loss_fn(logits, target)`.
    """
    if logits.shape[1] == 1:
        return loss_fn(logits, target)
    per_mask = torch.stack([torch.stack([loss_fn(logits[n:n + 1, k:k + 1], target[n:n + 1])
                                         for k in range(logits.shape[1])]) for n in range(logits.shape[0])])
    return per_mask.min(dim=1).values.mean()


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


# --- one fine-tune --------------------------------------------------------------------------------


class DecoderFineTune:
    """One trial's model, data and optimizer: training epochs and evaluations on a feature source.

    `embeddings` supplies encoder features per batch: resident cache entries (`ResidentEmbeddings`),
    memory-mapped ones (`MappedEmbeddings`) or the encoder itself (`EncoderInTheLoop`).
    `epochs` sizes the learning-rate schedule (0: evaluation only, no optimizer). `masks` is a
    dict (image id, view) -> ground truth, filled as masks are read and may be shared.
    """

    def __init__(self, spec: TrialSpec, dataset: PreparedDataset, backbone: Backbone, embeddings: EmbeddingSource,
                 *, epochs: int | None = None, masks: dict[tuple[str, int], np.ndarray] | None = None):
        self.spec = spec
        self.dataset = dataset
        self.backbone = backbone
        self.embeddings = embeddings
        self.masks = {} if masks is None else masks
        self.epochs = spec.epochs if epochs is None else epochs
        torch.manual_seed(int(_rng(spec.seed, "train", spec.train_seed).integers(2**62)))
        self.settings = PromptSettings(**spec.prompt_settings)
        self.external = load_prompt_file(Path(spec.prompts_file)) if spec.prompts_file else None
        self.loss_fn = build_loss(spec.loss)
        self.eval_prompts: dict[tuple[str, str, int], Prompt] = {}
        self.views: dict[str, list[SliceRecord]] = defaultdict(list)
        for record in dataset.records_for("train", views=True):
            self.views[record.image_id].append(record)
        self.optimizer = self.schedule = None
        self.optimizer_steps = 0
        if self.epochs:
            parameters = backbone.trainable_parameters(spec.train_prompt_encoder)
            self.optimizer = build_optimizer(spec.optimizer, parameters, spec.lr, spec.weight_decay, spec.momentum)
            steps = self.steps_per_epoch()
            self.schedule = build_schedule(spec.schedule, self.optimizer, steps * self.epochs,
                                           spec.warmup_epochs * steps)

    # --- data

    def mask(self, record: SliceRecord) -> np.ndarray:
        key = (record.image_id, record.view)
        if key not in self.masks:
            self.masks[key] = self.dataset.load(record)[1]
        return self.masks[key]

    def prompts(self, records: list[SliceRecord], name: str, epoch: int | None) -> list[Prompt]:
        """Evaluation prompts (epoch None) depend on (seed, image, view, prompt) only and are
        computed once; training prompts also on the training seed and the epoch."""
        out = []
        for r in records:
            key = (name, r.image_id, r.view)
            if epoch is None and key in self.eval_prompts:
                out.append(self.eval_prompts[key])
                continue
            parts = (self.spec.seed, r.image_id, r.view, name) + (() if epoch is None else ("train", self.spec.train_seed, epoch))
            prompt = make_prompt(name, self.mask(r), rng=_rng(*parts), settings=self.settings,
                                 image_id=r.image_id, external=self.external)
            if epoch is None:
                self.eval_prompts[key] = prompt
            out.append(prompt)
        return out

    def batches(self, records: list[SliceRecord], rng: np.random.Generator | None,
                batch_size: int | None = None) -> list[list[SliceRecord]]:
        """Batches of images of one size (the backbone maps each size separately); shuffled when rng given."""
        size = batch_size or self.spec.batch_size
        by_size: dict[tuple[int, int], list[SliceRecord]] = defaultdict(list)
        for r in records:
            by_size[(r.height, r.width)].append(r)
        batches = []
        for group in by_size.values():
            order = rng.permutation(len(group)) if rng is not None else range(len(group))
            group = [group[i] for i in order]
            batches += [group[i:i + size] for i in range(0, len(group), size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: batches of the training images, grouped by `grad_accum`."""
        originals = [views[0] for views in self.views.values()]
        return max(math.ceil(len(self.batches(originals, None)) / self.spec.grad_accum), 1)

    def forward(self, batch: list[SliceRecord], prompt_name: str, epoch: int | None):
        """Logits at the original resolution (N,K,H,W), predicted IoU (N,K) and targets (N,1,H,W).

        Training (an epoch given) keeps every mask of the three-mask path (K = 3 where it is
        taken); evaluation keeps one (K = 1), see the module docstring's "Masks per prompt".
        """
        spec, device = self.spec, self.spec.device
        features = self.embeddings.batch(batch, device)
        hw = (batch[0].height, batch[0].width)
        rows = _rows_for(self.prompts(batch, prompt_name, epoch), [hw] * len(batch), self.backbone)
        three = "all" if epoch is not None else "best_iou"
        masks = three if spec.multimask == "best_iou" else "single"
        low, iou_pred = _decode(self.backbone, features, rows, len(batch), masks, device,
                                single_point=three if spec.single_point_multimask else None)
        logits = self.backbone.postprocess(low, hw)
        target = torch.from_numpy(np.stack([self.mask(r) for r in batch])).to(device, torch.float32)[:, None]
        return logits, iou_pred, target

    # --- training

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training images (one view each); the mean training loss per image."""
        spec = self.spec
        rng = _rng(spec.seed, "train", spec.train_seed, "epoch", epoch)
        picks = [int(rng.integers(len(views))) for views in self.views.values()]
        if spec.prompt == "file":  # external prompts fit the original views only
            picks = [0] * len(picks)
        chosen = [views[pick] for views, pick in zip(self.views.values(), picks)]
        batches = self.batches(chosen, rng)
        self.backbone.model.train()
        total, seen = torch.zeros((), device=spec.device), 0
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(batches), spec.grad_accum):
            group = batches[start:start + spec.grad_accum]
            group_loss = torch.zeros((), device=spec.device)
            for batch in group:
                logits, iou_pred, target = self.forward(batch, spec.prompt, epoch)
                loss = lowest_loss(self.loss_fn, logits, target)
                if spec.iou_loss_weight:  # the IoU head regressed on every mask
                    loss = loss + spec.iou_loss_weight * sum(
                        iou_head_loss(iou_pred[:, k], logits[:, k:k + 1], target)
                        for k in range(logits.shape[1])) / logits.shape[1]
                (loss / len(group)).backward()
                group_loss += loss.detach() * len(batch)
            if not torch.isfinite(group_loss):  # the one host sync per optimizer step
                self.optimizer.zero_grad(set_to_none=True)
                raise TrialFailed(
                    f"trial {spec.trial_id}: the training loss became {group_loss.item()} at epoch {epoch} "
                    f"(optimizer step {start // spec.grad_accum + 1} of the epoch; lr {spec.lr:g}, optimizer "
                    f"{spec.optimizer}, loss {spec.loss}); the trial was stopped before that step. A lower "
                    f"learning rate usually helps.")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            self.optimizer_steps += 1
            total += group_loss
            seen += sum(len(b) for b in group)
        self.backbone.model.eval()
        return total.item() / max(seen, 1)

    # --- evaluation

    def evaluate(self, records: list[SliceRecord], prompt_name: str, *, full: bool = True,
                 keep: dict | None = None) -> tuple[list[dict], float]:
        """Per-image metrics at the original resolution, and the mean loss, with the current decoder.

        `full`: every metric of `trainables.metrics.image_metrics` (the test table); otherwise
        Dice and IoU only (the per-epoch validation, which needs no surface distances).
        `keep`, when given, receives image_id -> predicted mask for every image.
        """
        rows, loss_sum = [], torch.zeros((), device=self.spec.device)
        self.backbone.model.eval()
        with torch.no_grad():
            for batch in self.batches(records, None, max(self.spec.batch_size, EVAL_BATCH_SIZE)):
                logits, _, target = self.forward(batch, prompt_name, None)
                loss_sum += self.loss_fn(logits, target) * len(batch)
                predictions = (logits[:, 0] > 0).cpu().numpy()
                for record, pred in zip(batch, predictions):
                    truth = self.mask(record)
                    if keep is not None:
                        keep[record.image_id] = pred
                    if full:
                        metrics = image_metrics(pred, truth, record.spacing, nsd_tolerance=self.spec.nsd_tolerance)
                        scores = {k: metrics[k] for k in ("dice", "iou", "miou", "hd95", "hd95_mm")}
                        scores.update(hd95_penalised=int(metrics["hd95_penalised"]), nsd=metrics["nsd"])
                    else:
                        scores = {"dice": dice(pred, truth), "iou": iou(pred, truth)}
                    rows.append({"image_id": record.image_id, "subject": record.subject, "slice": record.slice_index,
                                 "area": record.area, "prompt": prompt_name, **scores})
        return rows, (loss_sum.item() / len(records) if records else float("nan"))

    # --- checkpoints

    def state_dict(self) -> dict:
        return {"decoder": self.backbone.decoder_state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore decoder and optimizer; the schedule continues at the saved step count (of this
        spec's schedule, so a resumed trial with more epochs follows the longer schedule)."""
        self.backbone.load_decoder_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = state["optimizer_steps"]
        self.schedule.last_epoch = self.optimizer_steps
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.schedule.base_lrs, self.schedule.lr_lambdas):
            group["lr"] = base_lr * factor(self.optimizer_steps)


def _save_atomic(obj, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, temp)
    os.replace(temp, path)


def _state_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


# --- the trial ----------------------------------------------------------------------------------


def run_trial(spec: TrialSpec, prepared_root: Path, cache_root: Path, *, checkpoint_dir: Path | None = None,
              on_epoch: Callable[[dict, Path | None], None] | None = None, progress: bool = False,
              keep_resident: bool = True) -> TrialResult:
    """Fine-tune (or, for stage zero_shot, only evaluate) one configuration; see the module docstring.

    With `checkpoint_dir`, each epoch's state is saved there atomically (`state.pt`, and the best
    decoder in `best_decoder.pt`) and an existing state is resumed from its next epoch.
    `on_epoch(metrics, checkpoint_dir)` is called after every epoch (after its checkpoint is
    saved) with epoch, train_loss, val_loss, val_dice, val_iou and seconds. `keep_resident`
    keeps the backbone, embeddings and masks in this process for later trials (module docstring).
    Raises `TrialFailed` when the loss becomes non-finite.
    """
    started = time.perf_counter()
    if keep_resident:
        retain_freed_memory()
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    dataset = open_prepared(Path(prepared_root))
    backbone = resident_backbone(spec) if keep_resident else _build(spec)
    backbone.use_official_inference(spec.stage == "zero_shot")
    cache = EmbeddingCache.for_backbone(Path(cache_root), backbone, dataset.key)
    train = dataset.records_for("train", views=True)
    val, test = dataset.records_for("val"), dataset.records_for("test")
    epochs = 0 if spec.stage == "zero_shot" else spec.epochs
    needed = (train if epochs else []) + val + test

    embeddings: EmbeddingSource | None = None
    from_memory = False
    if keep_resident:
        held = _RESIDENT_EMBEDDINGS.get((str(cache.namespace), cache.prepared_key))
        from_memory = held is not None and held.covers(needed)
    if not from_memory:
        cache.ensure(backbone, dataset, needed, verify=False, progress=progress)
    if keep_resident:
        embeddings = resident_embeddings(cache, needed)
    if embeddings is None:
        embeddings = MappedEmbeddings(cache)
    masks = _resident_masks(dataset) if keep_resident else None
    fine_tune = DecoderFineTune(spec, dataset, backbone, embeddings, epochs=epochs, masks=masks)
    eval_prompt = spec.primary_eval_prompt

    history: list[dict] = []
    best = {"epoch": 0, "value": None, "state": backbone.decoder_state_dict()}
    swa_state, swa_count = None, 0
    start_epoch = 1
    state_path = checkpoint_dir / "state.pt" if checkpoint_dir else None
    if epochs and state_path and state_path.exists():
        saved = torch.load(state_path, map_location=spec.device, weights_only=True)
        fine_tune.load_state_dict(saved)
        history, start_epoch = saved["history"], saved["epoch"] + 1
        best = {"epoch": saved["best_epoch"], "value": saved["best_value"],
                "state": torch.load(checkpoint_dir / "best_decoder.pt", map_location="cpu", weights_only=True)}
        swa_state, swa_count = saved.get("swa_state"), saved.get("swa_count", 0)

    for epoch in range(start_epoch, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = fine_tune.train_epoch(epoch)
        averaging = spec.swa and epoch > epochs // 2
        if averaging:
            live = backbone.decoder_state_dict()
            swa_count += 1
            swa_state = _state_copy(live) if swa_state is None else {
                k: swa_state[k] + (live[k] - swa_state[k]) / swa_count if live[k].is_floating_point() else live[k]
                for k in live}
            backbone.load_decoder_state_dict(swa_state)
        val_rows, val_loss = fine_tune.evaluate(val, eval_prompt, full=False)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_dice": _mean(val_rows, "dice"), "val_iou": _mean(val_rows, "iou"),
                   "seconds": time.perf_counter() - epoch_start}
        history.append(metrics)
        value = metrics[spec.select_metric]
        improved = best["value"] is None or (value > best["value"] if spec.select_mode == "max" else value < best["value"])
        if improved:
            best = {"epoch": epoch, "value": value, "state": backbone.decoder_state_dict()}
        if averaging:
            backbone.load_decoder_state_dict(live)
        if checkpoint_dir:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if improved:
                _save_atomic(best["state"], checkpoint_dir / "best_decoder.pt")
            _save_atomic({**fine_tune.state_dict(), "epoch": epoch, "history": history, "best_epoch": best["epoch"],
                          "best_value": best["value"], "swa_state": swa_state, "swa_count": swa_count}, state_path)
        if on_epoch:
            on_epoch(metrics, checkpoint_dir)
        if progress:
            print(f"[{spec.trial_id}] epoch {epoch}/{epochs} train_loss {metrics['train_loss']:.4f} "
                  f"val_dice {metrics['val_dice']:.4f} ({metrics['seconds']:.1f}s)", flush=True)

    backbone.load_decoder_state_dict(best["state"])
    val_rows = fine_tune.evaluate(val, eval_prompt, full=False)[0] if not history else []
    seed = spec.train_seed if spec.stage == "finetune" else None
    per_image: list[dict] = []
    per_subject: list[dict] = []
    kept: dict = {}
    for prompt_name in (spec.eval_prompts or (spec.prompt,)):
        predicted: dict = {}
        rows, _ = fine_tune.evaluate(test, prompt_name, keep=predicted)
        per_image += [{"trial_id": spec.trial_id, "stage": spec.stage, "seed": seed, **row} for row in rows]
        per_subject += [{"trial_id": spec.trial_id, "stage": spec.stage, "seed": seed, "prompt": prompt_name, **row}
                        for row in subject_rows(test, predicted, fine_tune.mask, spec.nsd_tolerance)]
        if prompt_name == eval_prompt:
            kept = predicted
    primary = [r for r in per_image if r["prompt"] == eval_prompt]
    ranked = sorted(primary, key=lambda r: r["dice"])
    chosen = {r["image_id"] for r in ranked[:KEPT_PREDICTIONS] + ranked[-KEPT_PREDICTIONS:]}
    by_id = {r.image_id: r for r in test}
    predictions = {image_id: (*dataset.load(by_id[image_id]), kept[image_id]) for image_id in sorted(chosen)}
    summary = {
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "val_dice": history[best["epoch"] - 1]["val_dice"] if history else _mean(val_rows, "dice"),
        "test_dice": _mean(primary, "dice"), "test_iou": _mean(primary, "iou"),
        "test_miou": _mean(primary, "miou"), "test_hd95": _mean(primary, "hd95"), "test_nsd": _mean(primary, "nsd"),
        "test_hd95_penalised": sum(r["hd95_penalised"] for r in primary),
        "test_images": len(primary), "test_subjects": len({r["subject"] for r in primary}),
        "seconds": time.perf_counter() - started,
        "cache": {**asdict(cache.counts), "from_memory": from_memory},
    }
    return TrialResult(spec.trial_id, spec.stage, history, per_image, summary, per_subject=per_subject,
                       predictions=predictions)


def subject_rows(records: list[SliceRecord], predicted: dict[str, np.ndarray], truth_of,
                 nsd_tolerance: float) -> list[dict]:
    """Per test subject, 3D metrics (`trainables.metrics.subject_metrics`) over its stacked slices.

    A subject's scored slices are placed at their slice index in a (Z, H, W) stack from its
    lowest to its highest index; a slice in between that was not scored (it holds no target, so
    no ground-truth prompt exists for it) is empty in truth and prediction. Spacing (slice,
    row, col) in mm where the records know it, so HD95 and NSD are in mm. A 2D image that is its
    own subject gives a one-slice stack: its 3D values are its 2D values.
    """
    by_subject: dict[str, list[SliceRecord]] = defaultdict(list)
    for record in records:
        by_subject[record.subject].append(record)
    rows = []
    for subject, members in by_subject.items():
        low = min(r.slice_index for r in members)
        depth = max(r.slice_index for r in members) - low + 1
        shape = (depth, members[0].height, members[0].width)
        pred_stack, truth_stack = np.zeros(shape, bool), np.zeros(shape, bool)
        for r in members:
            pred_stack[r.slice_index - low] = predicted[r.image_id]
            truth_stack[r.slice_index - low] = truth_of(r)
        first = members[0]
        spacing = None
        if first.spacing is not None:
            spacing = (first.slice_spacing or 1.0, *first.spacing)
        metrics = subject_metrics(pred_stack, truth_stack, spacing, nsd_tolerance=nsd_tolerance)
        rows.append({"subject": subject, **metrics, "hd95_3d_penalised": int(metrics["hd95_3d_penalised"]),
                     "slices": len(members)})
    return rows
