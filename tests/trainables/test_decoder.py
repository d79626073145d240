"""The decoder fine-tune trial: real LiteMedSAM on the phantom, resume, failure, residency, options."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from foundation.embedding_cache import EmbeddingCache
from study.data.prepare import prepare_dataset
from trainables import fine_tune as fine_tune_module
from trainables import trial as trial_module
from trainables.backbones import build_backbone, resolve_weights
from trainables.decoding import decode_rows, rows_for
from trainables.fine_tune import DecoderFineTune, EncoderInTheLoop, TrialFailed, TrialSpec
from trainables.residency import Residency
from trainables.trial import run_trial
from trainables.prompts import Prompt
from trainables.result_tables import PER_IMAGE_COLUMNS

SMALL = 64
HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "val_dice", "val_iou", "seconds"}
# Measured here: LiteMedSAM's zero-shot box Dice on the fixture's 12 test slices is 0.80 (the
# prompt is deterministic, so this is the value every run gets); the floor leaves a margin for
# other CPUs' arithmetic. Chance (a random mask) scores about twice the tumour's share of the
# image, under 0.1 here.
ZERO_SHOT_BOX_DICE_FLOOR = 0.45


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def litemedsam_weights() -> str:
    return str(resolve_weights("litemedsam", None, {}))


@pytest.fixture(scope="module")
def unaugmented_phantom(phantom_dataset):
    """`phantom_dataset` without its augmented training views: the same phantom, splits and slices
    (8 train, 8 val, 12 test), so 28 images for the real encoder instead of 36. Its 12 test slices
    are those of the study tests' phantom store, whose cache entries the session shares
    (`phantom_folder`). Treat the store as read-only."""
    config, _ = phantom_dataset
    unaugmented = config.model_copy(update={"data": config.data.model_copy(
        update={"augment": config.data.augment.model_copy(update={"views": 0})})})
    return unaugmented, prepare_dataset(unaugmented, progress=False)


@pytest.fixture(scope="module")
def real_runs(unaugmented_phantom, litemedsam_weights):
    """Zero-shot box, zero-shot center_point (also scored with box) and a center_point fine-tune
    of the real LiteMedSAM on the unaugmented phantom, with the epoch callbacks it made."""
    config, dataset = unaugmented_phantom
    base = TrialSpec(trial_id="", backbone="litemedsam", weights=litemedsam_weights)
    epochs_seen = []
    runs = {
        "box": run_trial(dataclasses.replace(base, trial_id="zs-box", stage="zero_shot", prompt="box"),
                         dataset, config.cache_dir),
        "center": run_trial(dataclasses.replace(base, trial_id="zs-center", stage="zero_shot", prompt="center_point",
                                                eval_prompts=("center_point", "box")),
                            dataset, config.cache_dir),
        # A single point takes the three-mask path (lowest loss, IoU head trained), whose masks
        # start empty for LiteMedSAM: lr 1e-3 gets it out of there in 3 epochs (1e-4 needs about 10).
        # Measured: test Dice 0.44 against 0.06 zero-shot (0.37-0.56 with train_seed 0-2; 0.35-0.56
        # with the augmented views, which the claim does not need).
        "finetune": run_trial(dataclasses.replace(base, trial_id="ft-center", prompt="center_point", epochs=3,
                                                  lr=1e-3, batch_size=4),
                              dataset, config.cache_dir, on_epoch=epochs_seen.append),
    }
    return runs, epochs_seen


@pytest.mark.slow
def test_zero_shot_box_dice_is_well_above_chance(real_runs, unaugmented_phantom):
    runs, _ = real_runs
    box = runs["box"]
    assert box.history == [] and box.summary["epochs_run"] == 0
    assert box.summary["test_images"] == len(unaugmented_phantom[1].records_for("test"))
    assert box.summary["test_dice"] > ZERO_SHOT_BOX_DICE_FLOOR


@pytest.mark.slow
def test_center_point_fine_tuning_raises_test_dice_above_zero_shot(real_runs):
    runs, epochs_seen = real_runs
    zero_shot, tuned = runs["center"].summary["test_dice"], runs["finetune"].summary["test_dice"]
    assert zero_shot < 0.1  # LiteMedSAM was trained with boxes: a single point starts near zero
    assert tuned > zero_shot + 0.2
    history = runs["finetune"].history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(set(row) == HISTORY_KEYS and all(math.isfinite(v) for v in row.values()) for row in history)
    assert epochs_seen == history
    best = runs["finetune"].summary["best_epoch"]
    assert runs["finetune"].summary["val_dice"] == max(row["val_dice"] for row in history) == history[best - 1]["val_dice"]


@pytest.mark.slow
def test_per_image_rows_and_summary_agree(real_runs, unaugmented_phantom):
    runs, _ = real_runs
    _, dataset = unaugmented_phantom
    result = runs["finetune"]
    test_ids = sorted(r.image_id for r in dataset.records_for("test"))
    assert sorted(row["image_id"] for row in result.per_image) == test_ids
    for row in result.per_image:
        assert tuple(row) == PER_IMAGE_COLUMNS
        assert row["trial_id"] == "ft-center" and row["stage"] == "finetune" and row["prompt"] == "center_point"
        assert 0 <= row["dice"] <= 1 and 0 <= row["iou"] <= row["dice"] + 1e-12 <= 1 + 1e-12
        assert math.isclose(row["iou"], row["dice"] / (2 - row["dice"]))  # IoU = D / (2 - D) per image
    assert result.summary["test_dice"] == pytest.approx(np.mean([row["dice"] for row in result.per_image]))
    assert result.summary["test_iou"] == pytest.approx(np.mean([row["iou"] for row in result.per_image]))
    assert result.summary["test_miou"] == pytest.approx(np.mean([row["miou"] for row in result.per_image]))


@pytest.mark.slow
def test_each_eval_prompt_gets_rows_and_eval_prompts_are_the_same_in_every_trial(real_runs):
    runs, _ = real_runs
    rows = runs["center"].per_image
    n = len(rows) // 2
    assert [row["prompt"] for row in rows] == ["center_point"] * n + ["box"] * n
    assert runs["center"].summary["test_dice"] == pytest.approx(np.mean([r["dice"] for r in rows[:n]]))
    # The box rows of this trial score exactly as the zero-shot box trial: same prompts, same model.
    box_trial = {row["image_id"]: row["dice"] for row in runs["box"].per_image}
    assert {row["image_id"]: row["dice"] for row in rows[n:]} == box_trial


@pytest.mark.slow
def test_features_from_the_encoder_in_the_loop_equal_the_cached_ones(unaugmented_phantom, litemedsam_weights,
                                                                     real_runs):
    config, dataset = unaugmented_phantom
    backbone = build_backbone("litemedsam", litemedsam_weights)
    records = dataset.records_for("val")[:2]
    cached = EmbeddingCache.for_backbone(config.cache_dir, backbone, dataset.key).load_batch(records)
    in_loop = EncoderInTheLoop(backbone, dataset).batch(records, "cpu")
    # One image alone when cached, two together in the loop: equal up to float16 rounding.
    torch.testing.assert_close(in_loop["image_embed"], cached["image_embed"], rtol=1e-2, atol=1e-2)


# --- random-weights backbones at a small input size: fast tests of the machinery ----------------------


def _small_spec(**changes) -> TrialSpec:
    spec = TrialSpec(trial_id="small", backbone="sam_b", weights="random", input_size=SMALL, epochs=1, batch_size=4,
                     prompt="box", lr=1e-3)
    return dataclasses.replace(spec, **changes)


def _differs(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backbone", ["sam_b", "sam2_t"])
def test_random_backbones_train_with_every_option(backbone, phantom_dataset):
    config, dataset = phantom_dataset
    spec = _small_spec(trial_id=f"opts-{backbone}", backbone=backbone, prompt="box_per_component",
                       eval_prompts=("box_per_component", "points_pos_neg"), multimask="best_iou", grad_accum=2,
                       swa=True, iou_loss_weight=0.5, schedule="cosine", warmup_epochs=1)
    residency = Residency()
    backbone = residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device, image_encoder=True)
    pristine = backbone.trained_state_dict()
    result = run_trial(spec, dataset, config.cache_dir, residency=residency)
    assert len(result.history) == 1 and all(math.isfinite(v) for v in result.history[0].values())
    assert {row["prompt"] for row in result.per_image} == {"box_per_component", "points_pos_neg"}
    assert len(result.per_image) == 2 * len(dataset.records_for("test"))
    assert _differs(pristine, backbone.trained_state_dict())  # it trained (and kept the SWA weights)
    assert residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device) is backbone  # reused,
    # and the next trial gets the built weights back
    assert not _differs(pristine, backbone.trained_state_dict())


def test_training_changes_the_decoder_but_not_the_frozen_parts(phantom_dataset):
    config, dataset = phantom_dataset
    spec = _small_spec(backbone="sam2_t", trial_id="frozen", epochs=1)
    residency = Residency()
    backbone = residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    run_trial(spec, dataset, config.cache_dir, residency=residency)
    after = backbone.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("sam_mask_decoder.") for k in changed)
    assert not any(k.startswith(("sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1")) for k in changed)


def test_box_per_component_unites_the_masks_of_its_boxes(phantom_dataset):
    """Decoding two boxes of one image as rows gives the element-wise maximum of decoding each alone."""
    config, dataset = phantom_dataset
    backbone = build_backbone("sam_b", "random", input_size=SMALL)
    records = dataset.records_for("val")[:2]
    cache = EmbeddingCache.for_backbone(config.cache_dir, backbone, dataset.key)
    cache.ensure(backbone, dataset, records, progress=False)
    features = cache.load_batch(records)
    boxes = np.array([[10, 10, 40, 50], [70, 60, 120, 100]], np.float32)
    prompts = [Prompt(boxes=boxes), Prompt(points=[[64, 64]], point_labels=[1])]
    hw = (records[0].height, records[0].width)
    with torch.no_grad():
        united, _ = decode_rows(backbone, features, rows_for(prompts, [hw, hw], backbone), 2, "single", "cpu")
        alone = [decode_rows(backbone, {k: v[:1] for k, v in features.items()},
                                 rows_for([Prompt(boxes=box[None])], [hw], backbone), 1, "single", "cpu")[0]
                 for box in boxes]
        point, _ = decode_rows(backbone, {k: v[1:] for k, v in features.items()},
                                   rows_for(prompts[1:], [hw], backbone), 1, "single", "cpu")
    torch.testing.assert_close(united[0], torch.maximum(alone[0][0], alone[1][0]))
    torch.testing.assert_close(united[1], point[0])


def test_checkpoint_resume_continues_from_the_next_epoch(phantom_dataset, tmp_path):
    config, dataset = phantom_dataset
    spec = _small_spec(trial_id="resume", optimizer="adam")
    first = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "state.pt").is_file() and (tmp_path / "ckpt" / "best_decoder.pt").is_file()
    reported = []
    longer = dataclasses.replace(spec, epochs=2)
    resumed = run_trial(longer, dataset, config.cache_dir, checkpoint_dir=tmp_path / "ckpt",
                        on_epoch=lambda m: reported.append(m["epoch"]))
    assert resumed.history[0] == first.history[0]
    assert [row["epoch"] for row in resumed.history] == [1, 2] and resumed.summary["epochs_run"] == 2
    assert reported == [2]
    # Epoch 2 after a resume is the epoch 2 of an uninterrupted run.
    straight = run_trial(longer, dataset, config.cache_dir, checkpoint_dir=tmp_path / "straight")
    assert _without_seconds(resumed.history) == _without_seconds(straight.history)
    assert [row["dice"] for row in resumed.per_image] == [row["dice"] for row in straight.per_image]


def test_a_data_parallel_trials_other_workers_train_the_same_steps_without_validating_or_testing(
        phantom_dataset, tmp_path, monkeypatch):
    """A worker that is not the first (`distributed.is_main` false) trains the same epochs as the
    first one, but neither validates nor tests (the first worker keeps and tests the best epoch) and
    writes no checkpoint; its history has the same training losses and no validation numbers."""
    from trainables import distributed

    config, dataset = phantom_dataset
    spec = _small_spec(trial_id="ranks", optimizer="adam", epochs=2)
    first = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "first")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a worker that is not the first validated or tested")

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(DecoderFineTune, "evaluate", must_not_run)
    monkeypatch.setattr(trial_module, "evaluate_on_test", must_not_run)
    other = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "other")
    assert [row["epoch"] for row in other.history] == [1, 2] and other.summary["epochs_run"] == 2
    assert [row["train_loss"] for row in other.history] == [row["train_loss"] for row in first.history]
    assert all(math.isnan(row["val_dice"]) and math.isnan(row["val_loss"]) for row in other.history)
    assert other.per_image == [] and not (tmp_path / "other").exists()


def test_a_non_finite_loss_fails_the_trial_naming_it_and_the_epoch(phantom_dataset, monkeypatch):
    config, dataset = phantom_dataset

    def exploding_loss(name):
        def loss(logits, target):
            return logits.mean() * float("nan")
        return loss

    monkeypatch.setattr(fine_tune_module, "build_loss", exploding_loss)
    spec = _small_spec(trial_id="trial-that-explodes", epochs=2)
    residency = Residency()
    backbone = residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device)
    pristine = backbone.trained_state_dict()
    with pytest.raises(TrialFailed, match=r"trial trial-that-explodes: .*nan at epoch 1\b"):
        run_trial(spec, dataset, config.cache_dir, residency=residency)
    assert not _differs(pristine, backbone.trained_state_dict())  # stopped before the optimizer step


def test_a_second_trial_in_the_process_starts_from_the_built_weights(phantom_dataset):
    config, dataset = phantom_dataset
    residency = Residency()
    other = _small_spec(trial_id="first", prompt="center_point", epochs=2, lr=1e-2)
    second = _small_spec(trial_id="second", prompt="box", epochs=1)
    run_trial(other, dataset, config.cache_dir, residency=residency)
    backbone = residency.backbone(second.backbone, second.weights, second.input_size, second.device)
    after_first = run_trial(second, dataset, config.cache_dir, residency=residency)
    assert residency.backbone(second.backbone, second.weights, second.input_size, second.device) is backbone
    assert after_first.summary["cache"]["from_memory"]  # and the embeddings stayed in RAM
    alone = run_trial(second, dataset, config.cache_dir)
    assert not alone.summary["cache"]["from_memory"]
    assert _without_seconds(after_first.history) == _without_seconds(alone.history)
    assert [r["dice"] for r in after_first.per_image] == [r["dice"] for r in alone.per_image]


def test_a_trial_without_its_image_encoder_holds_only_the_prompt_encoder_and_decoder(phantom_dataset):
    """A study's trial (image_encoder False) keeps no image-encoder weights on its device, and
    trains and scores exactly as one built with its encoder."""
    config, dataset = phantom_dataset
    residency = Residency()
    spec = _small_spec(trial_id="no-encoder", backbone="sam_b", image_encoder=False)
    result = run_trial(spec, dataset, config.cache_dir, residency=residency)
    backbone = residency.backbone(spec.backbone, spec.weights, spec.input_size, spec.device, image_encoder=False)
    held = sum(p.numel() for p in backbone.model.parameters())
    parts = backbone.spec.params
    assert backbone.param_counts()["image_encoder"] == 0
    assert held == parts.prompt_encoder + parts.mask_decoder + parts.other < parts.image_encoder / 10
    with pytest.raises(RuntimeError, match="without its image encoder"):
        backbone.encode(torch.zeros(1, 3, SMALL, SMALL))
    full = run_trial(dataclasses.replace(spec, image_encoder=True), dataset, config.cache_dir)
    assert _without_seconds(result.history) == _without_seconds(full.history)
    assert [r["dice"] for r in result.per_image] == [r["dice"] for r in full.per_image]


def test_fine_tune_pieces_logits_are_at_the_original_resolution(phantom_dataset):
    config, dataset = phantom_dataset
    spec = _small_spec()
    backbone = build_backbone("sam_b", "random", input_size=SMALL)
    records = dataset.records_for("val")[:3]
    fine_tune = DecoderFineTune(spec, dataset, backbone, EncoderInTheLoop(backbone, dataset), epochs=0)
    logits, iou_pred, target, _ = fine_tune.forward(records, "box", None)
    assert logits.shape == target.shape == (3, 1, records[0].height, records[0].width)
    assert iou_pred.shape == (3, 1)
    assert torch.equal(target[:, 0].bool(), torch.from_numpy(np.stack([dataset.load(r)[1] for r in records])))


class _Crash(Exception):
    pass


def test_a_trial_killed_after_an_epoch_resumes_exactly(phantom_dataset, tmp_path):
    """A crash after epoch 1's checkpoint, then the same call: epoch 2 as if nothing happened,
    with the optimizer state and the (warm-up, cosine) learning-rate schedule restored."""
    config, dataset = phantom_dataset
    spec = _small_spec(trial_id="crash", optimizer="sgd", schedule="cosine", warmup_epochs=1, epochs=3)

    def crash_after_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "a", on_epoch=crash_after_epoch_1)
    resumed = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "a")
    straight = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=tmp_path / "b")
    assert _without_seconds(resumed.history) == _without_seconds(straight.history)
    assert resumed.summary["best_epoch"] == straight.summary["best_epoch"]
    assert [row["dice"] for row in resumed.per_image] == [row["dice"] for row in straight.per_image]


def test_a_truncated_checkpoint_is_set_aside_and_the_trial_resumes_from_the_previous_one(phantom_dataset, tmp_path,
                                                                                         caplog):
    """state.pt cut short (a machine crash before the disk had it): the trial goes on from
    state.prev.pt (the epoch before), and with both unreadable from scratch; either way the
    result is that of an uninterrupted run."""
    config, dataset = phantom_dataset
    spec = _small_spec(trial_id="truncated", optimizer="adam", epochs=2)
    folder = tmp_path / "ckpt"
    straight = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=folder)  # uninterrupted, both checkpoints kept
    assert (folder / "state.pt").is_file() and (folder / "state.prev.pt").is_file()
    assert torch.load(folder / "state.prev.pt", weights_only=True)["epoch"] == 1
    (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:200])
    reported = []
    with caplog.at_level("WARNING"):
        resumed = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=folder, on_epoch=reported.append)
    assert reported and [m["epoch"] for m in reported] == [2]  # epoch 1 came from state.prev.pt
    assert "cannot be read" in caplog.text and (folder / "state.pt.unreadable").is_file()
    assert _without_seconds(resumed.history) == _without_seconds(straight.history)
    for name in ("state.pt", "state.prev.pt"):
        (folder / name).write_bytes(b"\x00" * 10)
    again = run_trial(spec, dataset, config.cache_dir, checkpoint_dir=folder)
    assert _without_seconds(again.history) == _without_seconds(straight.history)  # from scratch
