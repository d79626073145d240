"""Corrective clicks: the rule on hand-made masks, and clicks with mask feedback against SamPredictor."""

import numpy as np
import pytest
import torch

from foundation.errors import UserError
from trainables import fine_tune as fine_tune_module
from trainables.backbones import RANDOM_WEIGHTS, build_backbone
from trainables.clicks import Click, corrective_click, interior_distance


def blank(height=20, width=30):
    return np.zeros((height, width), bool)


def test_the_click_lands_at_the_farthest_interior_point_of_the_largest_error_with_its_label():
    truth = blank()
    truth[2:9, 2:9] = True  # a 7 x 7 square the prediction misses: centre (5, 5), depth 4
    truth[12:15, 20:23] = True  # a 3 x 3 square, found
    prediction = blank()
    prediction[12:15, 20:23] = True
    prediction[14:19, 2:7] = True  # a 5 x 5 false positive: depth 3 < 4
    assert corrective_click(prediction, truth) == Click(x=5.0, y=5.0, label=1)

    prediction[10:19, 10:19] = True  # now a 9 x 9 false positive (depth 5) is the largest error
    assert corrective_click(prediction, truth) == Click(x=14.0, y=14.0, label=0)


def test_a_tie_goes_to_the_false_negative():
    truth, prediction = blank(), blank()
    truth[2:7, 2:7] = True  # missed 5 x 5
    prediction[10:15, 20:25] = True  # extra 5 x 5: the same depth, 3
    assert corrective_click(prediction, truth) == Click(x=4.0, y=4.0, label=1)


def test_the_image_border_counts_as_boundary():
    truth = blank()
    truth[:, :5] = True  # a band along the left edge, all missed
    # Without the border as boundary the deepest pixels would be in column 0 (5 from column 5);
    # with it, column 2 is deepest (3 from both sides). Rows 2-17 tie there; rows 9 and 10 are
    # nearest the centroid (row 9.5) and row 9 comes first in row-major order.
    assert interior_distance(truth)[10].tolist()[:6] == [1.0, 2.0, 3.0, 2.0, 1.0, 0.0]
    assert corrective_click(blank(), truth) == Click(x=2.0, y=9.0, label=1)


def test_a_perfect_prediction_gets_no_click():
    truth = blank()
    truth[3:9, 4:12] = True
    assert corrective_click(truth.copy(), truth) is None
    assert corrective_click(blank(), blank()) is None


def test_the_random_rule_draws_from_the_error_region_reproducibly():
    truth, prediction = blank(), blank()
    truth[2:7, 2:7] = True
    prediction[10:15, 20:25] = True
    clicks = [corrective_click(prediction, truth, "random", np.random.default_rng(seed)) for seed in range(40)]
    assert clicks == [corrective_click(prediction, truth, "random", np.random.default_rng(seed)) for seed in range(40)]
    for click in clicks:
        inside_missed = truth[int(click.y), int(click.x)] and not prediction[int(click.y), int(click.x)]
        inside_extra = prediction[int(click.y), int(click.x)] and not truth[int(click.y), int(click.x)]
        assert inside_missed or inside_extra
        assert click.label == int(inside_missed)
    assert {c.label for c in clicks} == {0, 1}  # both regions are drawn from


def test_an_unknown_rule_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError, match="center, random"):
        corrective_click(blank(), blank(), "centre")


def test_clicks_with_mask_feedback_equal_segment_anythings_predictor_step_by_step():
    """Box, then three corrective clicks, each added to the earlier ones with the previous
    low-resolution logits as mask input: our decode equals SamPredictor.predict(..., mask_input)
    at every step (random-weight SAM at a 64-pixel input)."""
    from segment_anything import SamPredictor

    sam = build_backbone("sam_b", RANDOM_WEIGHTS, input_size=64)
    height, width = 48, 64
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], axis=-1).astype(np.uint8)
    truth = np.zeros((height, width), bool)
    truth[10:30, 15:45] = True
    box = np.array([15.0, 10.0, 44.0, 29.0])

    predictor = SamPredictor(sam.model)
    predictor.set_image(image)
    features = {"image_embed": predictor.features}
    points, labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    theirs_low = ours_low = None
    rounds = 0
    for step in range(4):
        kwargs = {"point_coords": points if len(points) else None, "point_labels": labels if len(points) else None}
        masks, _, low = predictor.predict(box=box, mask_input=theirs_low, multimask_output=False, return_logits=True,
                                          **kwargs)
        with torch.no_grad():
            logits, _ = sam.decode(
                features,
                points=torch.from_numpy(sam.to_input_frame(points, (height, width)))[None] if len(points) else None,
                point_labels=torch.from_numpy(labels)[None] if len(points) else None,
                boxes=torch.from_numpy(sam.to_input_frame(box, (height, width)))[None],
                mask_input=ours_low)
        np.testing.assert_allclose(logits[0].numpy(), low, atol=1e-4)
        ours_mask = sam.postprocess(logits, (height, width))[0, 0].numpy() > 0
        assert (ours_mask == (masks[0] > 0)).mean() > 0.999
        theirs_low, ours_low = low, logits
        click = corrective_click(ours_mask, truth)
        if click is None:
            break
        rounds += 1
        points = np.concatenate([points, [[click.x, click.y]]]).astype(np.float32)
        labels = np.concatenate([labels, [click.label]])
    assert rounds >= 3  # the random model never gets it right: every round added a click


# --- the click loop of a trial ---------------------------------------------------------------------


def _sam_fine_tune(phantom_dataset, **overrides):
    """A random-weight SAM ViT-B at a 64-pixel input on the fixture, its features from the encoder
    (rounded to float16 as cache entries are)."""
    from trainables.fine_tune import DecoderFineTune, EncoderInTheLoop, TrialSpec

    _, dataset = phantom_dataset
    torch.manual_seed(0)
    backbone = build_backbone("sam_b", RANDOM_WEIGHTS, input_size=64)
    values = dict(trial_id="clicks", backbone="sam_b", weights=RANDOM_WEIGHTS, input_size=64, stage="zero_shot",
                  prompt="box", clicks=3, epochs=0)
    spec = TrialSpec(**{**values, **overrides})
    source = EncoderInTheLoop(backbone, dataset)
    return DecoderFineTune(spec, dataset, backbone, source, epochs=spec.epochs), source


def test_the_trials_click_loop_equals_sam_predictor_with_mask_input_step_by_step(phantom_dataset):
    """`evaluate` with click rows (box, then 3 centre-rule clicks, each with the previous logits as
    mask input) gives the same clicks and Dice per step as driving SamPredictor.predict with the
    accumulated points and its own previous low-resolution logits, image by image."""
    from segment_anything import SamPredictor

    fine_tune, source = _sam_fine_tune(phantom_dataset)
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:3]
    curve: list[dict] = []
    rows, _ = fine_tune.evaluate(records, "box", click_rows=curve)
    assert len(curve) == len(records) * 4 and [r["click"] for r in curve[::len(records)]] == [0, 1, 2, 3]
    assert [r["dice"] for r in curve[:len(records)]] == [r["dice"] for r in rows]  # click 0 is the scored prediction

    predictor = SamPredictor(fine_tune.backbone.model)
    for index, record in enumerate(records):
        image, truth = dataset.load(record)
        predictor.set_image(image)
        predictor.features = source.batch([record], "cpu")["image_embed"]  # the trial's (float16-rounded) features
        box = fine_tune.prompts([record], "box", None)[0].boxes[0]
        ours = [r for r in curve if r["image_id"] == record.image_id]
        points, labels, low = np.zeros((0, 2)), np.zeros((0,), int), None
        for step in range(4):
            kwargs = dict(point_coords=points, point_labels=labels) if len(points) else {}
            masks, _, low = predictor.predict(box=box, mask_input=low, multimask_output=False, return_logits=True,
                                              **kwargs)
            theirs = masks[0] > 0
            assert ours[step]["dice"] == pytest.approx(2 * (theirs & truth).sum() / (theirs.sum() + truth.sum()), abs=2e-3)
            if step == 3:
                break
            click = corrective_click(theirs, truth)
            assert click is not None  # a random-weight model never gets the tumour right
            assert (ours[step + 1]["click_x"], ours[step + 1]["click_y"], ours[step + 1]["click_label"]) == (
                click.x, click.y, click.label)
            points = np.concatenate([points, [[click.x, click.y]]])
            labels = np.concatenate([labels, [click.label]])


def test_a_perfect_prediction_gets_no_click_and_a_flat_curve(phantom_dataset, monkeypatch):
    fine_tune, source = _sam_fine_tune(phantom_dataset)
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:2]
    truths = [fine_tune.mask(r) for r in records]
    monkeypatch.setattr(fine_tune, "forward", lambda *a, **k: pytest.fail("no image needs another decoder pass"))
    rows = fine_tune.click_curve(records, "box", fine_tune.prompts(records, "box", None), source.batch(records, "cpu"),
                                 torch.zeros(2, 1, 16, 16), [t.astype(bool) for t in truths])
    assert [(r["click"], r["dice"], r["click_x"], r["click_label"]) for r in rows if r["image_id"] == records[0].image_id] \
        == [(k, 1.0, None, None) for k in range(4)]


def _click_training(phantom_dataset):
    """A fine-tune with train_clicks: 2 from centre points, and a batch of 3 training slices."""
    fine_tune, _ = _sam_fine_tune(phantom_dataset, stage="finetune", epochs=1, train_clicks=2, clicks=0,
                                  prompt="center_point")
    return fine_tune, phantom_dataset[1].records_for("train")[:3]


def test_click_training_adds_one_click_per_pass_and_feeds_the_trained_mask_back(phantom_dataset, monkeypatch):
    """train_clicks: 2 runs 3 decoder passes per batch; each later pass has one more point per image
    (inside that image's error region of the pass before) and, as mask input, the previous pass's
    low-resolution logits of the mask it trained, detached; the loss is the mean of the passes."""
    fine_tune, batch = _click_training(phantom_dataset)
    passes = []
    real_forward = fine_tune.forward

    def forward(records, name, epoch, **kwargs):
        out = real_forward(records, name, epoch, **kwargs)
        passes.append({"prompts": list(kwargs["prompts"]), "mask_input": kwargs.get("mask_input"), "out": out,
                       "loss": fine_tune.step_loss(out)})
        return out

    monkeypatch.setattr(fine_tune, "forward", forward)
    loss = fine_tune.training_loss(batch, 1)
    assert len(passes) == 3
    assert passes[0]["mask_input"] is None
    torch.testing.assert_close(loss, sum(p["loss"][0] for p in passes) / 3)
    for before, after in zip(passes, passes[1:]):
        picks = before["loss"][1]
        expected = before["out"].low[torch.arange(len(batch)), picks].unsqueeze(1)
        assert not after["mask_input"].requires_grad
        torch.testing.assert_close(after["mask_input"], expected.detach())
        for i, record in enumerate(batch):
            old, new = before["prompts"][i], after["prompts"][i]
            assert len(new.points) == len(old.points) + 1 and np.array_equal(new.points[:-1], old.points)
            x, y = new.points[-1].astype(int)
            predicted = (before["out"].logits[i, picks[i]] > 0).numpy()
            truth = fine_tune.mask(record).astype(bool)
            assert predicted[y, x] != truth[y, x] and new.point_labels[-1] == int(truth[y, x])


def test_a_training_clicks_draw_depends_on_its_image_not_on_its_batch(phantom_dataset, monkeypatch):
    """What a data-parallel worker needs to draw what a one-worker trial draws: the generator each
    corrective click is drawn with is the same for an image trained alone (a worker's shard) as
    within the whole batch, and differs between images and between passes."""
    fine_tune, batch = _click_training(phantom_dataset)
    draws = []
    real_click = fine_tune_module.corrective_click

    def corrective_click(prediction, truth, rule, rng):
        draws.append(rng.bit_generator.state["state"]["state"])
        return real_click(prediction, truth, rule, rng)

    monkeypatch.setattr(fine_tune_module, "corrective_click", corrective_click)
    fine_tune.training_loss(batch, 1)
    whole = draws[:]  # pass 1: images 0, 1, 2; pass 2: images 0, 1, 2
    draws.clear()
    fine_tune.training_loss(batch[2:], 1)
    assert draws == [whole[2], whole[5]]
    assert len(set(whole)) == 6


def test_without_train_clicks_the_training_loss_is_one_pass(phantom_dataset, monkeypatch):
    fine_tune, _ = _sam_fine_tune(phantom_dataset, stage="finetune", epochs=1, train_clicks=0, clicks=0)
    _, dataset = phantom_dataset
    batch = dataset.records_for("train")[:2]
    calls = []
    real_forward = fine_tune.forward
    monkeypatch.setattr(fine_tune, "forward", lambda *a, **k: calls.append(k) or real_forward(*a, **k))
    loss = fine_tune.training_loss(batch, 1)
    assert len(calls) == 1
    torch.testing.assert_close(loss, fine_tune.step_loss(real_forward(batch, "box", 1))[0])
