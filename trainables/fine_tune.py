"""One fine-tune: a backbone's mask decoder trained on encoder features, and evaluated.

`DecoderFineTune(spec, dataset, backbone, embeddings)` holds one trial's model, data, prompts and
optimizer; `train_epoch` and `evaluate` are what a trial's loop (trainables/trial.py) calls.
Features come from an `EmbeddingSource`: cache entries held in RAM, read memory-mapped, or the
frozen encoder run for every batch (`EncoderInTheLoop`, the benchmark's baseline).

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
- Corrective clicks (`evaluation.clicks`, `DecoderFineTune.click_curve`): after the test
  prediction from the prompt, each round adds one click where the prediction is wrong
  (`trainables.clicks`, computed at the original resolution and mapped into the backbone's frame
  like every prompt) to all earlier ones and decodes again with the previous low-resolution
  logits as the mask input; each round is one more decoder pass over the cached features. After
  the first click a prompt has two points or a box and a point, so the single-point three-mask
  rule no longer applies (as in SamPredictor's interactive use). With `box_per_component` the
  clicks and the image's previous mask (the union) go to every box's row. Training with
  `train_clicks` is `DecoderFineTune.training_loss`.
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
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch

from foundation.embedding_cache import EmbeddingCache
from foundation.prepared_store import PreparedDataset, SliceRecord
from trainables import distributed
from trainables.backbones import Backbone
from trainables.backbones.adaptation import Adaptation
from trainables.clicks import Click, corrective_click
from trainables.decoding import decode_rows, lowest_loss_and_mask, rows_for, seeded_rng
from trainables.losses import build_loss, iou_head_loss
from trainables.metrics import dice, image_metrics, iou
from trainables.optimizers import build_optimizer, build_schedule, resume_schedule
from trainables.prompts import Prompt, PromptSettings, load_prompt_file, make_prompt

#: Images per decoder call when evaluating (no gradients are kept, so larger batches fit).
EVAL_BATCH_SIZE = 16


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
    adaptation: str = "decoder"  # what else trains: trainables.backbones.adaptation
    adapt_blocks: int = 2
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_blocks: str = "all"
    iou_loss_weight: float = 1.0  # the IoU head that ranks three masks is trained (SAM: weight 1)
    train_clicks: int = 0  # corrective-click sub-iterations per training step (random rule)
    seed: int = 0  # the study seed: evaluation prompts
    train_seed: int = 0  # the replicate seed (search.seeds): training randomness
    single_point_multimask: bool = True  # evaluation.single_point_multimask
    nsd_tolerance: float = 2.0  # evaluation.nsd_tolerance_mm (pixels for images without spacing)
    clicks: int = 0  # evaluation.clicks: corrective clicks after the initial prompt, on the test images
    click_rule: str = "center"  # evaluation.click_rule
    prompt_settings: dict = field(default_factory=dict)
    prompts_file: str | None = None
    select_metric: str = "val_dice"
    select_mode: str = "max"
    input_size: int | None = None  # test-only override of the backbone's input size; the U-Net's input size
    deep_supervision: bool = False  # the U-Net baseline only (trainables.unet)
    image_encoder: bool = True  # False: built without it (the study's trials, on a filled cache)
    device: str = "cpu"

    @property
    def adaptation_arm(self) -> Adaptation:
        """The adaptation of a fine-tune; a zero-shot evaluation trains nothing (the decoder arm)."""
        if self.stage == "zero_shot":
            return Adaptation()
        return Adaptation(self.adaptation, self.adapt_blocks, self.lora_rank, self.lora_alpha, self.lora_blocks)

    @property
    def primary_eval_prompt(self) -> str:
        return self.eval_prompts[0] if self.eval_prompts else self.prompt


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
    """What a cache entry holds, computed by the frozen encoder for every batch under `no_grad`:
    what the usual fine-tuning scripts do, and the baseline of benchmarks/cache_speedup.py (the
    encoder's output) and benchmarks/adaptation_cost.py (with `tuned_blocks`, the frozen prefix's
    output, `Backbone.cache_features`).

    The batch's images are read from the prepared store and encoded together, or in chunks of at
    most `max_batch` images (SAM's ViT-B at 1024 pixels needs about 3 GB of CPU memory per image in
    one call). The features are rounded to float16 exactly as cache entries are, so a
    fine-tune fed by this source trains on the same numbers as one fed by the cache.
    """

    def __init__(self, backbone: Backbone, dataset: PreparedDataset, max_batch: int | None = None,
                 tuned_blocks: int | None = None):
        self.backbone = backbone
        self.dataset = dataset
        self.max_batch = max_batch
        self.tuned_blocks = tuned_blocks

    def batch(self, records: list[SliceRecord], device: str | torch.device) -> dict[str, torch.Tensor]:
        size = self.max_batch or len(records)
        parts = []
        for start in range(0, len(records), size):
            pixels = encoder_pixels(self.backbone, self.dataset, records[start:start + size])
            parts.append(self.backbone.cache_features(pixels, self.tuned_blocks))
        return {name: torch.cat([part[name] for part in parts]).half().to(device).float() for name in parts[0]}


class EncoderInput:
    """The encoder's input images, ``{"pixels": (N, 3, S, S)}``, for trials whose whole encoder runs
    in the loop (`Adaptation.source` pixels: LoRA on every block, full fine-tuning): nothing of
    the encoder can be cached, so nothing is."""

    def __init__(self, backbone: Backbone, dataset: PreparedDataset):
        self.backbone = backbone
        self.dataset = dataset

    def batch(self, records: list[SliceRecord], device: str | torch.device) -> dict[str, torch.Tensor]:
        return {"pixels": encoder_pixels(self.backbone, self.dataset, records).to(device)}


def encoder_pixels(backbone: Backbone, dataset: PreparedDataset, records: list[SliceRecord]) -> torch.Tensor:
    """The encoder's input for `records`: their prepared images, preprocessed, (N, 3, S, S)."""
    return backbone.preprocess(np.stack([dataset.load(r)[0] for r in records]))


def prompt_for(spec: TrialSpec, settings: PromptSettings, external: dict | None, mask: np.ndarray,
               record: SliceRecord, name: str, epoch: int | None) -> Prompt:
    """The prompt `name` of one image. An evaluation prompt (epoch None) depends on (study seed,
    image, view, prompt) only, so every trial, seed and baseline gets the same one; a training
    prompt also on the training seed and the epoch."""
    parts = (spec.seed, record.image_id, record.view, name) + (() if epoch is None else ("train", spec.train_seed, epoch))
    return make_prompt(name, mask, rng=seeded_rng(*parts), settings=settings, image_id=record.image_id,
                       external=external)


def score_image(record: SliceRecord, prediction: np.ndarray, truth: np.ndarray, prompt_name: str, full: bool,
                nsd_tolerance: float) -> dict:
    """One per-image row: every metric of `trainables.metrics.image_metrics` (`full`: the test table)
    or Dice and IoU only (the per-epoch validation), at the original resolution."""
    if full:
        metrics = image_metrics(prediction, truth, record.spacing, nsd_tolerance=nsd_tolerance)
        scores = {k: metrics[k] for k in ("dice", "iou", "miou", "hd95", "hd95_mm")}
        scores.update(hd95_penalised=int(metrics["hd95_penalised"]), nsd=metrics["nsd"])
    else:
        scores = {"dice": dice(prediction, truth), "iou": iou(prediction, truth)}
    return {"image_id": record.image_id, "subject": record.subject, "slice": record.slice_index, "area": record.area,
            "prompt": prompt_name, **scores}


def size_batches(records: list[SliceRecord], size: int,
                 rng: np.random.Generator | None = None) -> list[list[SliceRecord]]:
    """Batches of at most `size` images of one image size (predictions are mapped back to each size
    separately); in the order given, or shuffled within and across sizes when `rng` is given."""
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


def optimizer_steps(spec: TrialSpec, batches: list[list], batch_loss: Callable[[list], torch.Tensor], optimizer,
                    schedule, epoch: int, advice: str) -> tuple[float, int]:
    """One epoch's training steps with gradient accumulation: each group of `spec.grad_accum`
    batches averages its batch losses (a last, shorter group over its own size), then one optimizer
    and schedule step. The loss is checked once per step, before it, so a non-finite value never
    reaches the weights (`TrialFailed`, naming the trial, epoch and step, then `advice`). In a
    data-parallel trial each worker trains on its shard of every batch and the gradients and
    losses are summed over the workers (`trainables.distributed`). Returns (the mean training loss
    per image, the optimizer steps taken)."""
    total, seen, steps = torch.zeros((), device=spec.device), 0, 0
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(batches), spec.grad_accum):
        group = batches[start:start + spec.grad_accum]
        group_loss = torch.zeros((), device=spec.device)
        for batch in group:
            part = distributed.shard(batch)  # the whole batch in a one-worker trial
            if part:
                loss = batch_loss(part)
                (loss * (len(part) / len(batch)) / len(group)).backward()
                group_loss += loss.detach() * len(part)
        distributed.sum_gradients(parameters)
        group_loss = distributed.sum_tensor(group_loss)
        if not torch.isfinite(group_loss):  # the one host sync per optimizer step
            optimizer.zero_grad(set_to_none=True)
            raise TrialFailed(
                f"trial {spec.trial_id}: the training loss became {group_loss.item()} at epoch {epoch} "
                f"(optimizer step {start // spec.grad_accum + 1} of the epoch; lr {spec.lr:g}, optimizer "
                f"{spec.optimizer}, loss {spec.loss}); the trial was stopped before that step. {advice}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        steps += 1
        total += group_loss
        seen += sum(len(b) for b in group)
    return total.item() / max(seen, 1), steps


def mean_metric(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


class Decoded(NamedTuple):
    """One decoder pass over a batch."""

    logits: torch.Tensor  # (N, K, H, W) at the original resolution, what metrics and the loss see
    iou: torch.Tensor  # (N, K) predicted IoU
    target: torch.Tensor  # (N, 1, H, W) the ground truth
    low: torch.Tensor  # (N, K, h, w) the decoder's low-resolution logits (a later mask input)


# --- one fine-tune --------------------------------------------------------------------------------


class DecoderFineTune:
    """One trial's model, data and optimizer: training epochs and evaluations on a feature source.

    `embeddings` supplies encoder features per batch: resident cache entries (`ResidentEmbeddings`),
    memory-mapped ones (`MappedEmbeddings`) or the encoder itself (`EncoderInTheLoop`).
    `epochs` sizes the learning-rate schedule (0: evaluation only, no optimizer). `masks` is a
    dict (image id, view) -> ground truth, filled as masks are read and may be shared.
    """

    best_file = "best_decoder.pt"  # the best epoch's decoder, in the trial's checkpoint folder

    def __init__(self, spec: TrialSpec, dataset: PreparedDataset, backbone: Backbone, embeddings: EmbeddingSource,
                 *, epochs: int | None = None, masks: dict[tuple[str, int], np.ndarray] | None = None):
        self.spec = spec
        self.dataset = dataset
        self.backbone = backbone
        self.embeddings = embeddings
        self.masks = {} if masks is None else masks
        self.epochs = spec.epochs if epochs is None else epochs
        torch.manual_seed(int(seeded_rng(spec.seed, "train", spec.train_seed).integers(2**62)))
        self.settings = PromptSettings(**spec.prompt_settings)
        self.external = load_prompt_file(Path(spec.prompts_file)) if spec.prompts_file else None
        self.loss_fn = build_loss(spec.loss)
        self.eval_prompts: dict[tuple[str, str, int], Prompt] = {}
        self.views: dict[str, list[SliceRecord]] = defaultdict(list)
        for record in dataset.records_for("train", views=True):
            self.views[record.image_id].append(record)
        self.optimizer = self.schedule = None
        self.optimizer_steps = 0
        self.trainable_params = 0
        if self.epochs:
            parameters = backbone.trainable_parameters(spec.train_prompt_encoder)
            self.trainable_params = sum(parameter.numel() for parameter in parameters)
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
        """The prompts `name` of `records` (`prompt_for`); evaluation prompts are computed once."""
        out = []
        for r in records:
            key = (name, r.image_id, r.view)
            if epoch is None and key in self.eval_prompts:
                out.append(self.eval_prompts[key])
                continue
            prompt = prompt_for(self.spec, self.settings, self.external, self.mask(r), r, name, epoch)
            if epoch is None:
                self.eval_prompts[key] = prompt
            out.append(prompt)
        return out

    def batches(self, records: list[SliceRecord], rng: np.random.Generator | None,
                batch_size: int | None = None) -> list[list[SliceRecord]]:
        """`size_batches` of `records`, `spec.batch_size` images each unless `batch_size` says otherwise."""
        return size_batches(records, batch_size or self.spec.batch_size, rng)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: batches of the training images, grouped by `grad_accum`."""
        originals = [views[0] for views in self.views.values()]
        return max(math.ceil(len(self.batches(originals, None)) / self.spec.grad_accum), 1)

    def features(self, batch: list[SliceRecord]) -> dict[str, torch.Tensor]:
        """The decoder's features of `batch`: the source's, through the encoder blocks the trial
        tunes (`Backbone.adapted_features`; nothing for the decoder arm)."""
        return self.backbone.adapted_features(self.embeddings.batch(batch, self.spec.device))

    def forward(self, batch: list[SliceRecord], prompt_name: str, epoch: int | None, *,
                prompts: list[Prompt] | None = None, features: dict[str, torch.Tensor] | None = None,
                mask_input: torch.Tensor | None = None) -> Decoded:
        """The decoder's output for `batch` with its `prompt_name` prompts (see `Decoded`).

        Training (an epoch given) keeps every mask of the three-mask path (K = 3 where it is
        taken); evaluation keeps one (K = 1), see the module docstring's "Masks per prompt".
        `prompts` and `features`, when given, replace the batch's own (a corrective click adds to
        the prompts; the features are read once per batch); `mask_input` (N,1,h,w) is fed back.
        """
        spec, device = self.spec, self.spec.device
        features = self.features(batch) if features is None else features
        hw = (batch[0].height, batch[0].width)
        prompts = self.prompts(batch, prompt_name, epoch) if prompts is None else prompts
        rows = rows_for(prompts, [hw] * len(batch), self.backbone)
        three = "all" if epoch is not None else "best_iou"
        masks = three if spec.multimask == "best_iou" else "single"
        low, iou_pred = decode_rows(self.backbone, features, rows, len(batch), masks, device,
                                    single_point=three if spec.single_point_multimask else None,
                                    mask_input=mask_input)
        logits = self.backbone.postprocess(low, hw)
        target = torch.from_numpy(np.stack([self.mask(r) for r in batch])).to(device, torch.float32)[:, None]
        return Decoded(logits, iou_pred, target, low)

    # --- training

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training images (one view each); the mean training loss per image."""
        spec = self.spec
        rng = seeded_rng(spec.seed, "train", spec.train_seed, "epoch", epoch)
        picks = [int(rng.integers(len(views))) for views in self.views.values()]
        if spec.prompt == "file":  # external prompts fit the original views only
            picks = [0] * len(picks)
        chosen = [views[pick] for views, pick in zip(self.views.values(), picks)]
        batches = self.batches(chosen, rng)
        self.backbone.train_mode(True)
        loss, steps = optimizer_steps(spec, batches, lambda batch: self.training_loss(batch, epoch),
                                      self.optimizer, self.schedule, epoch, "A lower learning rate usually helps.")
        self.optimizer_steps += steps
        self.backbone.train_mode(False)
        return loss

    def step_loss(self, out: Decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of one decoder pass (the lowest-loss mask per image, plus the IoU head
        regressed on every mask), and per image the index of the mask it took."""
        loss, picks = lowest_loss_and_mask(self.loss_fn, out.logits, out.target)
        if self.spec.iou_loss_weight:
            loss = loss + self.spec.iou_loss_weight * sum(
                iou_head_loss(out.iou[:, k], out.logits[:, k:k + 1], out.target)
                for k in range(out.logits.shape[1])) / out.logits.shape[1]
        return loss, picks

    def training_loss(self, batch: list[SliceRecord], epoch: int) -> torch.Tensor:
        """One batch's training loss: the initial prompt's pass, then `train_clicks` click passes.

        Each click pass adds, per image, a corrective click drawn by the random rule from the
        error region of the mask the previous pass trained (`trainables.clicks`), to all the
        earlier prompts and clicks, and feeds that mask's low-resolution logits back as the mask
        input (detached, as micro-sam's trainer does: no gradient flows between passes); an image
        already segmented perfectly gets no click and is decoded again with its mask input. The
        loss is the mean over the 1 + train_clicks passes. A click's draw depends on the image, its
        view, the epoch and the pass only (seeded per image), not on the batch it is in, so a
        data-parallel worker that trains a shard of the batch draws what a one-worker trial draws.
        """
        spec = self.spec
        features = self.features(batch)
        prompts = self.prompts(batch, spec.prompt, epoch)
        out = self.forward(batch, spec.prompt, epoch, prompts=prompts, features=features)
        total, picks = self.step_loss(out)
        for step in range(1, spec.train_clicks + 1):
            images = torch.arange(len(batch), device=out.logits.device)
            predictions = (out.logits[images, picks] > 0).cpu().numpy()
            for i, record in enumerate(batch):
                rng = seeded_rng(spec.seed, "train", spec.train_seed, "epoch", epoch, record.image_id, record.view,
                                 "click", step)
                click = corrective_click(predictions[i], self.mask(record), "random", rng)
                if click is not None:
                    prompts[i] = prompts[i].with_point(click.x, click.y, click.label)
            previous = out.low[images, picks].unsqueeze(1).detach()
            out = self.forward(batch, spec.prompt, epoch, prompts=prompts, features=features, mask_input=previous)
            loss, picks = self.step_loss(out)
            total = total + loss
        return total / (spec.train_clicks + 1)

    # --- evaluation

    def evaluate(self, records: list[SliceRecord], prompt_name: str, *, full: bool = True,
                 keep: dict | None = None, click_rows: list | None = None) -> tuple[list[dict], float]:
        """Per-image metrics at the original resolution, and the mean loss, with the current decoder.

        `full`: every metric of `trainables.metrics.image_metrics` (the test table); otherwise
        Dice and IoU only (the per-epoch validation, which needs no surface distances).
        `keep`, when given, receives image_id -> predicted mask for every image. `click_rows`,
        when given, receives the corrective-click curve of every image (`click_curve`, with
        `spec.clicks` clicks after the prompt; its click 0 is the prediction scored here).
        """
        rows, loss_sum = [], torch.zeros((), device=self.spec.device)
        self.backbone.train_mode(False)
        with torch.no_grad():
            for batch in self.batches(records, None, max(self.spec.batch_size, EVAL_BATCH_SIZE)):
                features = self.features(batch)
                prompts = self.prompts(batch, prompt_name, None)
                out = self.forward(batch, prompt_name, None, prompts=prompts, features=features)
                loss_sum += self.loss_fn(out.logits, out.target) * len(batch)
                predictions = (out.logits[:, 0] > 0).cpu().numpy()
                for record, pred in zip(batch, predictions):
                    if keep is not None:
                        keep[record.image_id] = pred
                    rows.append(score_image(record, pred, self.mask(record), prompt_name, full, self.spec.nsd_tolerance))
                if click_rows is not None:
                    click_rows += self.click_curve(batch, prompt_name, prompts, features, out.low[:, :1],
                                                   list(predictions))
        return rows, (loss_sum.item() / len(records) if records else float("nan"))

    def click_curve(self, batch: list[SliceRecord], prompt_name: str, prompts: list[Prompt],
                    features: dict[str, torch.Tensor], low: torch.Tensor, predictions: list[np.ndarray]) -> list[dict]:
        """Corrective-click evaluation of `batch`: per image one row per click 0..spec.clicks.

        Click 0 is `predictions` (from `prompts`, with low-resolution logits `low`). Each round
        adds one click (`trainables.clicks.corrective_click` with `spec.click_rule`; the random
        rule seeded by study seed, image, view, prompt and round, so every trial sees the same
        draws for the same errors) to all earlier ones, in original pixels, and decodes again with
        the previous low-resolution logits as the mask input. An image whose prediction is perfect
        gets no more clicks: its later rows repeat its last prediction (the curve stays flat).
        Rows: image_id, subject, prompt, click, dice, iou, and the click added at that round
        (click_x, click_y, click_label; empty at click 0 and after the interaction ended).
        """
        spec = self.spec
        truths = [self.mask(r) for r in batch]
        prompts, low = list(prompts), low.clone()

        def row(i: int, k: int, click: Click | None) -> dict:
            record = batch[i]
            return {"image_id": record.image_id, "subject": record.subject, "prompt": prompt_name, "click": k,
                    "dice": dice(predictions[i], truths[i]), "iou": iou(predictions[i], truths[i]),
                    "click_x": None if click is None else click.x, "click_y": None if click is None else click.y,
                    "click_label": None if click is None else click.label}

        rows = [row(i, 0, None) for i in range(len(batch))]
        for k in range(1, spec.clicks + 1):
            added: list[Click | None] = []
            for i, record in enumerate(batch):
                rng = seeded_rng(spec.seed, record.image_id, record.view, prompt_name, "click", k)
                click = corrective_click(predictions[i], truths[i], spec.click_rule, rng)
                if click is not None:
                    prompts[i] = prompts[i].with_point(click.x, click.y, click.label)
                added.append(click)
            active = [i for i, click in enumerate(added) if click is not None]
            if active:
                index = torch.tensor(active, device=low.device)
                out = self.forward([batch[i] for i in active], prompt_name, None, prompts=[prompts[i] for i in active],
                                   features={name: value.index_select(0, index) for name, value in features.items()},
                                   mask_input=low.index_select(0, index))
                low[index] = out.low[:, :1]
                for i, pred in zip(active, (out.logits[:, 0] > 0).cpu().numpy()):
                    predictions[i] = pred
            rows += [row(i, k, added[i]) for i in range(len(batch))]
        return rows

    # --- checkpoints

    def state_dict(self) -> dict:
        return {"trained": self.backbone.trained_state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the trained weights and the optimizer; the schedule continues at the saved step
        count (of this spec's schedule, so a resumed trial with more epochs follows the longer schedule)."""
        self.backbone.load_trained_state_dict(state["trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = state["optimizer_steps"]
        resume_schedule(self.schedule, self.optimizer_steps)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights (`Backbone.trained_state_dict`), for the best epoch and SWA (`trainables.trial`)."""
        return self.backbone.trained_state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.load_trained_state_dict(state)
