"""The trial: fine-tune a backbone on cached encoder features, then evaluate it.

`run_trial(spec, dataset, cache_root)` is what one trial computes, as a plain function (no Ray):
the study runs it in a Ray Tune trainable, tests and benchmarks call it directly. What runs in a
trial follows its adaptation (`trainables.backbones.adaptation`): for the decoder arm the image
encoder never runs here except to fill missing cache entries, and every training step is one
batched mask-decoder pass over cached embeddings; late_blocks (and LoRA on the last blocks) read
the frozen prefix's cached output and run the tuned blocks, the neck and the decoder; LoRA on
every block and full fine-tuning run the whole encoder (`trainables.fine_tune.DecoderFineTune`,
whose docstring states the training and evaluation conventions). A worker that runs many trials
passes its `Residency` (trainables/residency.py) so backbones, embeddings and masks are kept
between them (a trial that trains encoder weights builds its own model).
`train_and_test(trainer, epochs)` is the loop itself, for any `Trainer`: the U-Net baseline
(`trainables.unet.run_unet_trial`) is trained, checkpointed, selected and tested by it too.

Checkpoints. With `checkpoint_dir`, the end of every epoch writes one file, `state.pt`, holding
all a resume needs: the trained weights and optimizer state, the schedule's step, the epoch, the
history, the best epoch with its value and its weights, and the SWA average. It is written
atomically and durably (`foundation.files`: temp file, fsync, rename), and the previous one is
kept as `state.prev.pt`, so a crash at any moment leaves a whole checkpoint of one of the last two
epochs. A resume reads `state.pt`, else `state.prev.pt`; one that cannot be read (truncated by a
machine crash, say) is moved aside as `*.unreadable` with a warning, and the trial goes on from the
other or from scratch. The trainer's `best_file` (`best_decoder.pt`: the best epoch's decoder, the
MLflow artifact; `best_unet.pt` for the U-Net) is written once, when the trial ends.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from foundation.embedding_cache import EmbeddingCache
from foundation.files import atomic_path
from foundation.prepared_store import PreparedDataset
from trainables import distributed
from trainables.evaluation import evaluate_on_test
from trainables.fine_tune import (DecoderFineTune, EmbeddingSource, EncoderInput, MappedEmbeddings, TrialSpec,
                                  mean_metric)
from trainables.residency import Residency, build, retain_freed_memory

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PREVIOUS_STATE_FILE = "state.prev.pt"


@dataclass
class TrialResult:
    trial_id: str
    stage: str
    history: list[dict]
    per_image: list[dict]
    summary: dict
    per_subject: list[dict] = field(default_factory=list)
    #: image_id -> (image, truth, prediction) for the best and worst test images with the primary
    #: evaluation prompt, for overlays in the report (`trainables.evaluation.KEPT_PREDICTIONS`).
    predictions: dict = field(default_factory=dict)
    #: One row per test image, evaluation prompt and click 0..spec.clicks (empty without clicks).
    per_click: list[dict] = field(default_factory=list)


# --- checkpoints ------------------------------------------------------------------------------


def save_torch(obj, path: Path) -> None:
    """`torch.save` atomically and durably."""
    with atomic_path(path) as temp:
        torch.save(obj, temp)


def save_checkpoint(checkpoint_dir: Path, state: dict) -> None:
    """Write `state.pt`, keeping the one it replaces as `state.prev.pt`."""
    current = checkpoint_dir / STATE_FILE
    if current.exists():
        os.replace(current, checkpoint_dir / PREVIOUS_STATE_FILE)
    save_torch(state, current)


def load_checkpoint(checkpoint_dir: Path, device: str) -> dict | None:
    """The newest readable checkpoint (`state.pt`, else `state.prev.pt`), or None to start from scratch.

    An unreadable file is renamed `<name>.unreadable` (kept for a post-mortem, never read again)
    with a warning.
    """
    for name in (STATE_FILE, PREVIOUS_STATE_FILE):
        path = checkpoint_dir / name
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(state, dict) or "epoch" not in state or "best_state" not in state:
                raise ValueError("it is not a checkpoint of this trial format")
            return state
        except Exception as error:  # a truncated zip, a pickle error, a wrong format: all mean "unusable"
            if not distributed.is_main():  # the first worker moves it aside; this one reads what it reads
                continue
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            log.warning("The checkpoint %s cannot be read (%s); it was moved to %s and the trial continues from %s.",
                        path, str(error).splitlines()[0] if str(error) else type(error).__name__, aside,
                        "the previous epoch's checkpoint" if name == STATE_FILE else "scratch")
    return None


def _state_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


# --- the trial ----------------------------------------------------------------------------------


def run_trial(spec: TrialSpec, dataset: PreparedDataset, cache_root: Path, *, checkpoint_dir: Path | None = None,
              on_epoch: Callable[[dict], None] | None = None, progress: bool = False,
              residency: Residency | None = None) -> TrialResult:
    """Fine-tune (or, for stage zero_shot, only evaluate) one configuration; see the module docstring.

    With `checkpoint_dir`, every epoch is checkpointed there and an existing checkpoint is resumed
    from its next epoch; a checkpoint with more epochs than `spec.epochs` (a trial the scheduler
    stopped while it trained on) trains no more and is evaluated as it is. `on_epoch(metrics)` is
    called after every epoch (after its checkpoint is saved) with epoch, train_loss, val_loss,
    val_dice, val_iou and seconds. `residency` keeps the backbone, embeddings and masks for later
    trials of this process; without one, everything is built for this trial alone. Raises
    `TrialFailed` when the loss becomes non-finite.
    """
    started = time.perf_counter()
    arm = spec.adaptation_arm
    if residency is not None:
        retain_freed_memory()
    if residency is not None and arm.kind == "decoder":
        backbone = residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device, spec.image_encoder)
    else:  # a trial that trains encoder weights (or adds LoRA to them) has a model of its own
        backbone = build(spec.backbone, spec.weights, spec.input_size, spec.device,
                         spec.image_encoder or arm.kind != "decoder")
    backbone.adapt(arm)
    backbone.use_official_inference(spec.stage == "zero_shot")
    train = dataset.records_for("train", views=True)
    val, test = dataset.records_for("val"), dataset.records_for("test")
    epochs = 0 if spec.stage == "zero_shot" else spec.epochs
    needed = (train if epochs else []) + val + test

    summary = {}
    if arm.source == "pixels":
        embeddings: EmbeddingSource = EncoderInput(backbone, dataset)
    else:
        cache = EmbeddingCache.for_backbone(Path(cache_root), backbone, dataset.key, arm.cached_blocks)
        held = residency.held_embeddings(cache) if residency is not None else None
        from_memory = held is not None and held.covers(needed)
        if not from_memory:
            cache.ensure(backbone, dataset, needed, verify=False, progress=progress)
        resident = residency.resident_embeddings(cache, needed) if residency else None
        embeddings = MappedEmbeddings(cache) if resident is None else resident
        summary["cache"] = {**asdict(cache.counts), "from_memory": from_memory}
    masks = residency.masks_of(dataset) if residency is not None else None
    fine_tune = DecoderFineTune(spec, dataset, backbone, embeddings, epochs=epochs, masks=masks)
    summary["trainable_params"] = fine_tune.trainable_params
    summary["workers"] = distributed.world_size()
    return train_and_test(fine_tune, epochs, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, progress=progress,
                          started=started, summary=summary)


class Trainer(Protocol):
    """What the trial loop needs of a trial's model: a decoder fine-tune (`DecoderFineTune`) or the
    U-Net baseline (`trainables.unet.UNetTrainer`)."""

    spec: TrialSpec
    dataset: PreparedDataset
    best_file: str  # the best epoch's weights in the checkpoint folder (the MLflow artifact)

    def train_epoch(self, epoch: int) -> float: ...
    def evaluate(self, records, prompt_name: str, *, full: bool = True, keep: dict | None = None,
                 click_rows: list | None = None) -> tuple[list[dict], float]: ...
    def weights(self) -> dict[str, torch.Tensor]: ...
    def load_weights(self, state: dict[str, torch.Tensor]) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def mask(self, record): ...


def train_and_test(trainer: Trainer, epochs: int, *, checkpoint_dir: Path | None = None,
                   on_epoch: Callable[[dict], None] | None = None, progress: bool = False,
                   started: float | None = None, summary: dict | None = None) -> TrialResult:
    """Train `trainer` for `epochs` epochs (resuming from `checkpoint_dir`), select its best epoch on
    validation, and test it (`trainables.evaluation.evaluate_on_test`); see run_trial and the
    module docstring. `summary` adds entries to the result's summary."""
    started = time.perf_counter() if started is None else started
    spec, dataset = trainer.spec, trainer.dataset
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    val, test = dataset.records_for("val"), dataset.records_for("test")
    eval_prompt = spec.primary_eval_prompt
    history: list[dict] = []
    best = {"epoch": 0, "value": None, "state": trainer.weights()}
    swa_state, swa_count = None, 0
    main = distributed.is_main()  # a data-parallel trial's other workers train only (see below)
    saved = load_checkpoint(checkpoint_dir, spec.device) if epochs and checkpoint_dir else None
    if saved is not None:
        trainer.load_state_dict(saved)
        history = saved["history"]
        best = {"epoch": saved["best_epoch"], "value": saved["best_value"], "state": saved["best_state"]}
        swa_state, swa_count = saved.get("swa_state"), saved.get("swa_count", 0)

    for epoch in range(len(history) + 1, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss = trainer.train_epoch(epoch)
        averaging = spec.swa and epoch > epochs // 2
        if averaging:
            live = trainer.weights()
            swa_count += 1
            swa_state = _state_copy(live) if swa_state is None else {
                k: swa_state[k] + (live[k] - swa_state[k]) / swa_count if live[k].is_floating_point() else live[k]
                for k in live}
            trainer.load_weights(swa_state)
        # validation selects the best epoch, which only the first worker keeps: the others skip it
        val_rows, val_loss = trainer.evaluate(val, eval_prompt, full=False) if main else ([], float("nan"))
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_dice": mean_metric(val_rows, "dice"), "val_iou": mean_metric(val_rows, "iou"),
                   "seconds": time.perf_counter() - epoch_start}
        history.append(metrics)
        value = metrics[spec.select_metric]
        improved = best["value"] is None or (value > best["value"] if spec.select_mode == "max" else value < best["value"])
        if improved and main:
            best = {"epoch": epoch, "value": value, "state": trainer.weights()}
        if averaging:
            trainer.load_weights(live)
        if checkpoint_dir and main:
            save_checkpoint(checkpoint_dir, {
                **trainer.state_dict(), "epoch": epoch, "history": history, "best_epoch": best["epoch"],
                "best_value": best["value"], "best_state": best["state"], "swa_state": swa_state,
                "swa_count": swa_count})
        if on_epoch:
            on_epoch(metrics)
        if progress:
            print(f"[{spec.trial_id}] epoch {epoch}/{epochs} train_loss {metrics['train_loss']:.4f} "
                  f"val_dice {metrics['val_dice']:.4f} ({metrics['seconds']:.1f}s)", flush=True)

    if not main:  # the first worker tests the trial and writes its outputs; this one trained its shards
        return TrialResult(spec.trial_id, spec.stage, history, [], {"epochs_run": len(history), **(summary or {})})
    if checkpoint_dir and history:
        save_torch(best["state"], checkpoint_dir / trainer.best_file)
    trainer.load_weights(best["state"])
    val_rows = trainer.evaluate(val, eval_prompt, full=False)[0] if not history else []
    scores = evaluate_on_test(trainer, test)
    result_summary = {
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "val_dice": history[best["epoch"] - 1]["val_dice"] if history else mean_metric(val_rows, "dice"),
        **scores.summary,
        "seconds": time.perf_counter() - started,
        **(summary or {}),
    }
    return TrialResult(spec.trial_id, spec.stage, history, scores.per_image, result_summary,
                       per_subject=scores.per_subject, predictions=scores.predictions, per_click=scores.per_click)
