"""The evaluation protocol of a trial: the single-point multimask rule, SAM 2's zero-shot settings,
the lowest-loss multimask training rule, replicate seeds, per-subject 3D metrics and file prompts
on augmented views. Official predictors (segment-anything's `SamPredictor`, sam2's
`SAM2ImagePredictor`) are the second implementation wherever one exists."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from foundation.embedding_cache import EmbeddingCache
from trainables import fine_tune as fine_tune_module
from trainables.backbones import build_backbone
from trainables.decoding import decode_rows, lowest_loss, rows_for
from trainables.fine_tune import DecoderFineTune, MappedEmbeddings, TrialSpec
from trainables.residency import build
from trainables.trial import run_trial
from trainables.losses import build_loss
from trainables.prompts import Prompt

SMALL = 64


def _spec(**overrides) -> TrialSpec:
    values = dict(trial_id="protocol", backbone="sam_b", weights="random", input_size=SMALL, epochs=1, batch_size=4)
    return TrialSpec(**{**values, **overrides})


def _fine_tune(spec: TrialSpec, phantom_dataset, **kwargs) -> DecoderFineTune:
    """The trial's fine-tune object on the fixture, its training images' embeddings cached."""
    config, dataset = phantom_dataset
    backbone = build(spec.backbone, spec.weights, spec.input_size, spec.device)
    cache = EmbeddingCache.for_backbone(config.cache_dir, backbone, dataset.key)
    cache.ensure(backbone, dataset, dataset.records_for("train", views=True), progress=False)
    return DecoderFineTune(spec, dataset, backbone, MappedEmbeddings(cache), **kwargs)


def test_single_point_evaluation_keeps_the_mask_sam_predictor_ranks_first(phantom_dataset):
    """A one-point prompt: three masks, the highest predicted IoU kept (SamPredictor, multimask_output=True)."""
    from segment_anything import SamPredictor

    config, dataset = phantom_dataset
    torch.manual_seed(3)
    backbone = build_backbone("sam_b", "random", input_size=SMALL)
    record = dataset.records_for("test")[0]
    image, _ = dataset.load(record)
    predictor = SamPredictor(backbone.model)
    predictor.set_image(image)
    point = np.array([[40.0, 52.0]])
    masks, scores, low_res = predictor.predict(point, np.array([1]), multimask_output=True, return_logits=True)
    best = int(np.argmax(scores))

    hw = (record.height, record.width)
    rows = rows_for([Prompt(points=point, point_labels=[1])], [hw], backbone)
    features = {"image_embed": predictor.features}
    with torch.no_grad():
        logits, iou = decode_rows(backbone, features, rows, 1, "single", "cpu", single_point="best_iou")
        single, _ = decode_rows(backbone, features, rows, 1, "single", "cpu")
    assert logits.shape[:2] == (1, 1)
    assert np.allclose(logits[0, 0].numpy(), low_res[best], atol=1e-5)
    assert np.isclose(float(iou[0, 0]), scores[best], atol=1e-5)
    assert np.allclose(backbone.postprocess(logits, hw)[0, 0].numpy(), masks[best], atol=1e-4)
    # Without the protocol the decoder's single-mask token is used, which is another mask.
    assert not np.allclose(single[0, 0].numpy(), low_res[best], atol=1e-3)


def test_a_trial_evaluates_single_points_with_the_rule_and_records_it_as_a_setting(phantom_dataset):
    config, dataset = phantom_dataset
    spec = _spec(trial_id="zs-point", stage="zero_shot", prompt="center_point")
    with_rule = run_trial(spec, dataset, config.cache_dir)
    without = run_trial(dataclasses.replace(spec, single_point_multimask=False), dataset, config.cache_dir)
    assert [r["image_id"] for r in with_rule.per_image] == [r["image_id"] for r in without.per_image]
    assert [r["dice"] for r in with_rule.per_image] != [r["dice"] for r in without.per_image]
    # Box prompts are not ambiguous: the rule leaves them alone.
    box = run_trial(dataclasses.replace(spec, prompt="box"), dataset, config.cache_dir)
    box_off = run_trial(dataclasses.replace(spec, prompt="box", single_point_multimask=False), dataset,
                        config.cache_dir)
    assert [r["dice"] for r in box.per_image] == [r["dice"] for r in box_off.per_image]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_zero_shot_sam2_decodes_as_the_official_builder_and_predictor(phantom_dataset):
    """Zero-shot SAM 2 = SAM2ImagePredictor on a model with build_sam2's dynamic multimask via stability."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    config, dataset = phantom_dataset
    torch.manual_seed(5)
    sam2 = build_backbone("sam2_t", "random", input_size=SMALL)
    record = dataset.records_for("test")[0]
    image, _ = dataset.load(record)
    hw = (record.height, record.width)
    box = np.array([20.0, 25.0, 90.0, 80.0])
    features = sam2.encode(sam2.preprocess(image[None]))
    rows = rows_for([Prompt(boxes=box[None])], [hw], sam2)

    official = SAM2ImagePredictor(sam2.model)
    grid = sam2.embedding_hw[0]
    official._bb_feat_sizes = [(4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid)]  # hard-coded for 1024
    sam2.use_official_inference(True)
    try:
        official.set_image(image)
        _, iou, low_res = official.predict(box=box, multimask_output=False, return_logits=True)
        with torch.no_grad():
            ours, our_iou = decode_rows(sam2, features, rows, 1, "single", "cpu")
    finally:
        sam2.use_official_inference(False)
    assert np.allclose(ours[0].numpy(), low_res, atol=1e-5) and np.allclose(our_iou[0].numpy(), iou, atol=1e-5)
    with torch.no_grad():
        trained_token, _ = decode_rows(sam2, features, rows, 1, "single", "cpu")
        three, three_iou = sam2.decode(features, boxes=torch.from_numpy(rows.boxes[0])[None], multimask=True)
    # The fallback is what makes the difference: on random weights token 0 is unstable and the
    # official setting picks the best of the three multimask outputs instead.
    assert not torch.allclose(trained_token, ours)
    assert torch.allclose(ours[0, 0], three[0, int(three_iou[0].argmax())], atol=1e-5)


def test_lowest_loss_backpropagates_only_the_best_mask_of_each_image():
    loss_fn = build_loss("dice_bce")
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    logits = torch.randn(2, 3, 16, 16)
    logits[0, 1] = (target[0, 0] * 2 - 1) * 8  # image 0: mask 1 is nearly perfect
    logits[1, 2] = (target[1, 0] * 2 - 1) * 8  # image 1: mask 2
    logits.requires_grad_(True)
    loss = lowest_loss(loss_fn, logits, target)
    by_hand = (loss_fn(logits[0:1, 1:2], target[0:1]) + loss_fn(logits[1:2, 2:3], target[1:2])) / 2
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    touched = logits.grad.abs().flatten(2).sum(dim=2) > 0
    assert touched.tolist() == [[False, True, False], [False, False, True]]
    # One mask: the batched loss itself.
    torch.testing.assert_close(lowest_loss(loss_fn, logits[:, :1].detach(), target), loss_fn(logits[:, :1].detach(), target))


def test_best_iou_training_takes_three_masks_and_regresses_the_iou_head_on_all(phantom_dataset, monkeypatch):
    _, dataset = phantom_dataset
    spec = _spec(trial_id="multimask", multimask="best_iou", prompt="box", iou_loss_weight=1.0)
    fine_tune = _fine_tune(spec, phantom_dataset)
    seen = []
    original = fine_tune_module.iou_head_loss
    monkeypatch.setattr(fine_tune_module, "iou_head_loss", lambda p, l, t: seen.append(l.shape[1]) or original(p, l, t))
    batch = dataset.records_for("train")[:2]
    logits, iou, _, _ = fine_tune.forward(batch, "box", epoch=1)
    assert logits.shape[1] == 3 and iou.shape == (2, 3)
    eval_logits, eval_iou, _, _ = fine_tune.forward(batch, "box", epoch=None)
    assert eval_logits.shape[1] == 1
    torch.testing.assert_close(eval_iou[:, 0], iou.max(dim=1).values)  # evaluation keeps the best-ranked mask
    fine_tune.train_epoch(1)
    assert seen and set(seen) == {1} and len(seen) % 3 == 0  # three masks, each regressed


def test_replicate_seeds_change_the_data_order_and_only_it(phantom_dataset):
    """Training randomness depends on (study seed, train_seed, epoch), not on the other factors."""
    orders = {}
    for name, overrides in {"s0": {}, "s1": {"train_seed": 1}, "s0-lr": {"lr": 1e-3}}.items():
        spec = _spec(trial_id=f"order-{name}", **overrides)
        fine_tune = _fine_tune(spec, phantom_dataset)
        used = []
        real_batches = fine_tune.batches

        def record(records, rng, batch_size=None, _used=used, _real=real_batches):
            _used.append([[(r.image_id, r.view) for r in batch] for batch in _real(records, rng, batch_size)])
            return []  # nothing to train on: only the order is looked at

        fine_tune.batches = record
        fine_tune.train_epoch(1)
        orders[name] = used[0]
    assert orders["s0"] == orders["s0-lr"]
    assert orders["s0"] != orders["s1"]


def test_file_prompts_train_on_original_views_only(phantom_dataset, tmp_path):
    """External prompts are in the original image's pixels: augmented views would get wrong boxes."""
    _, dataset = phantom_dataset
    assert any(r.view > 0 for r in dataset.records_for("train", views=True))  # the fixture has views
    lines = ["image_id,x0,y0,x1,y1"] + [f"{r.image_id},10,10,60,60" for r in dataset.records_for("train")]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    views = {}
    for prompt in ("file", "box"):
        spec = _spec(trial_id=f"views-{prompt}", prompt=prompt, prompts_file=str(tmp_path / "boxes.csv"))
        fine_tune = _fine_tune(spec, phantom_dataset)
        used = []
        real_forward = fine_tune.forward
        fine_tune.forward = lambda batch, p, e, _used=used, **kw: _used.extend(r.view for r in batch) or real_forward(batch, p, e, **kw)
        for epoch in (1, 2, 3):
            fine_tune.train_epoch(epoch)
        views[prompt] = set(used)
    assert views["file"] == {0}
    assert views["box"] != {0}  # the other prompts do sample the augmented views


def test_per_subject_rows_are_3d_metrics_of_the_stacked_slice_predictions(phantom_dataset):
    config, dataset = phantom_dataset
    spec = _spec(trial_id="zs-subjects", stage="zero_shot", prompt="box")
    result = run_trial(spec, dataset, config.cache_dir)
    test = dataset.records_for("test")
    assert {r["subject"] for r in result.per_subject} == {r.subject for r in test}
    # The predictions by hand: the same decoder, every test image kept, stacked with numpy.
    backbone = build(spec.backbone, spec.weights, spec.input_size, spec.device)
    backbone.use_official_inference(True)
    cache = EmbeddingCache.for_backbone(config.cache_dir, backbone, dataset.key)
    fine_tune = DecoderFineTune(spec, dataset, backbone, MappedEmbeddings(cache), epochs=0)
    predicted = {}
    fine_tune.evaluate(test, "box", keep=predicted)
    for row in result.per_subject:
        members = sorted((r for r in test if r.subject == row["subject"]), key=lambda r: r.slice_index)
        pred = np.stack([predicted[r.image_id] for r in members])
        truth = np.stack([dataset.load(r)[1] for r in members]).astype(bool)
        by_hand = 2 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())
        assert row["dice_3d"] == pytest.approx(by_hand)
        assert row["slices"] == len(members) and row["voxels"] == truth.sum()
        assert row["seed"] is None and row["prompt"] == "box"
