"""Corrective clicks: the rule on hand-made masks, and clicks with mask feedback against SamPredictor."""

import numpy as np
import pytest
import torch

from foundation.errors import UserError
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
