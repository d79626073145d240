"""Prompt rules: geometry against the mask, bounds, seeding, and external prompt files."""

import json

import numpy as np
import pytest
from scipy import ndimage

from foundation.errors import UserError
from trainables.prompts import (
    PROMPTS,
    Prompt,
    PromptSettings,
    load_prompt_file,
    make_prompt,
    prompt_settings_dict,
)

SETTINGS = PromptSettings()
GT_DERIVED = [name for name in PROMPTS if name not in ("none", "file")]


def _prompt(name, mask, seed=0, settings=SETTINGS, **kwargs):
    return make_prompt(name, mask, rng=np.random.default_rng(seed), settings=settings, **kwargs)


def _lesion(shape=(40, 50)):
    """An irregular lesion: an ellipse with a rectangular arm, off-centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = ((yy - 18) / 9.0) ** 2 + ((xx - 20) / 13.0) ** 2 < 1
    mask[20:24, 30:44] = True
    return mask


def _extent(mask):
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max(), rows.max()]


def test_registry_names():
    assert list(PROMPTS) == [
        "center_point", "random_point", "random_points", "box", "box_margin", "box_jitter",
        "points_pos_neg", "box_per_component", "none", "file",
    ]


def test_center_point_is_inside_at_the_distance_maximum():
    mask = _lesion()
    prompt = _prompt("center_point", mask)
    (x, y), = prompt.points
    assert prompt.points.dtype == np.float32 and prompt.point_labels.tolist() == [1]
    assert mask[int(y), int(x)]
    distance = ndimage.distance_transform_edt(mask)
    assert distance[int(y), int(x)] == distance.max()


def test_center_point_by_hand():
    # 5x5 square at rows 1-5, cols 1-5 of 7x7: the unique maximum (distance 3) is its centre (3, 3).
    square = np.zeros((7, 7), bool)
    square[1:6, 1:6] = True
    assert _prompt("center_point", square).points.tolist() == [[3.0, 3.0]]
    # 3x8 bar at rows 2-4, cols 1-8 of 7x10: distance 2 on row 3, cols 2..7 (a plateau). The
    # centroid is at col 4.5, so cols 4 and 5 tie; the first in row-major order wins: (x, y) = (4, 3).
    bar = np.zeros((7, 10), bool)
    bar[2:5, 1:9] = True
    assert _prompt("center_point", bar).points.tolist() == [[4.0, 3.0]]
    # A mask covering the whole image has no background: the pixel nearest the centroid.
    assert _prompt("center_point", np.ones((5, 5), bool)).points.tolist() == [[2.0, 2.0]]


def test_random_points_lie_inside_and_are_distinct():
    mask = _lesion()
    for seed in range(20):
        one = _prompt("random_point", mask, seed)
        assert one.points.shape == (1, 2) and mask[int(one.points[0, 1]), int(one.points[0, 0])]
        many = _prompt("random_points", mask, seed)
        assert many.points.shape == (3, 2) and many.point_labels.tolist() == [1, 1, 1]
        assert all(mask[int(y), int(x)] for x, y in many.points)
        assert len({tuple(p) for p in many.points.tolist()}) == 3


def test_random_points_on_a_mask_smaller_than_k_still_gives_k():
    tiny = np.zeros((6, 6), bool)
    tiny[2, 3] = tiny[4, 1] = True
    prompt = _prompt("random_points", tiny, settings=PromptSettings(random_points_k=5))
    assert prompt.points.shape == (5, 2)
    assert {tuple(p) for p in prompt.points.tolist()} <= {(3.0, 2.0), (1.0, 4.0)}


def test_box_equals_the_mask_extent():
    mask = _lesion()
    prompt = _prompt("box", mask)
    assert prompt.boxes.dtype == np.float32 and prompt.boxes.shape == (1, 4)
    assert prompt.boxes[0].tolist() == _extent(mask)
    assert prompt.points is None
    # By hand: pixels (row 2, col 3) and (row 5, col 7) -> x0=3, y0=2, x1=7, y1=5.
    two = np.zeros((8, 9), bool)
    two[2, 3] = two[5, 7] = True
    assert _prompt("box", two).boxes.tolist() == [[3.0, 2.0, 7.0, 5.0]]


def test_box_margin_adds_pixels_and_clips_to_the_image():
    mask = np.zeros((30, 40), bool)
    mask[10:15, 12:20] = True  # extent x 12..19, y 10..14
    assert _prompt("box_margin", mask).boxes.tolist() == [[7.0, 5.0, 24.0, 19.0]]
    corner = np.zeros((30, 40), bool)
    corner[1:4, 36:39] = True  # extent x 36..38, y 1..3: the margin runs off the top and right
    assert _prompt("box_margin", corner).boxes.tolist() == [[31.0, 0.0, 39.0, 8.0]]


@pytest.mark.parametrize("jitter_px, jitter_frac", [(5.0, 0.0), (2.0, 0.25), (0.0, 0.5)])
def test_box_jitter_stays_in_bounds_and_within_the_stated_shift(jitter_px, jitter_frac):
    settings = PromptSettings(jitter_px=jitter_px, jitter_frac=jitter_frac)
    for mask in (_lesion(), np.pad(np.ones((3, 4), bool), ((0, 37), (46, 0)))):  # the second touches a corner
        height, width = mask.shape
        x0, y0, x1, y1 = _extent(mask)
        max_x = jitter_px + jitter_frac * (x1 - x0 + 1)
        max_y = jitter_px + jitter_frac * (y1 - y0 + 1)
        shifts = []
        for seed in range(200):
            box = _prompt("box_jitter", mask, seed, settings).boxes[0]
            assert 0 <= box[0] <= box[2] <= width - 1 and 0 <= box[1] <= box[3] <= height - 1
            shift = box - np.array([x0, y0, x1, y1])
            assert np.all(np.abs(shift[[0, 2]]) <= max_x + 1e-4)
            assert np.all(np.abs(shift[[1, 3]]) <= max_y + 1e-4)
            shifts.append(np.abs(shift))
        # The jitter really moves the box, by up to (nearly) the stated maximum.
        assert np.max(np.array(shifts)[:, [0, 2]]) > 0.8 * max_x


def test_points_pos_neg():
    mask = _lesion()
    settings = PromptSettings(positive_points=2, negative_points=3, negative_margin_px=4)
    x0, y0, x1, y1 = _extent(mask)
    for seed in range(20):
        prompt = _prompt("points_pos_neg", mask, seed, settings)
        assert prompt.point_labels.tolist() == [1, 1, 0, 0, 0]
        for (x, y), label in zip(prompt.points.astype(int), prompt.point_labels):
            assert mask[y, x] == bool(label)
            if not label:  # negatives lie near the lesion: inside its box enlarged by 4 px
                assert x0 - 4 <= x <= x1 + 4 and y0 - 4 <= y <= y1 + 4


def test_box_per_component_gives_one_box_per_blob():
    mask = np.zeros((30, 30), bool)
    mask[2:6, 3:9] = True  # blob A: x 3..8, y 2..5
    mask[15:25, 18:22] = True  # blob B: x 18..21, y 15..24
    prompt = _prompt("box_per_component", mask)
    assert prompt.boxes.tolist() == [[3.0, 2.0, 8.0, 5.0], [18.0, 15.0, 21.0, 24.0]]
    # Diagonal neighbours are one component under 8-connectivity.
    mask[6, 9] = True
    assert len(_prompt("box_per_component", mask).boxes) == 2
    mask[7, 10] = True
    mask[8:15, 11:18] = np.eye(7, dtype=bool)  # a diagonal chain joining A to B
    assert _prompt("box_per_component", mask).boxes.tolist() == [_extent(mask)]


def test_seeded_determinism():
    mask = _lesion()
    for name in ("random_point", "random_points", "box_jitter", "points_pos_neg"):
        first = _prompt(name, mask, seed=7).as_record()
        assert _prompt(name, mask, seed=7).as_record() == first
        assert any(_prompt(name, mask, seed=s).as_record() != first for s in range(8, 12))


def test_empty_mask_gives_no_prompt():
    empty = np.zeros((10, 10), bool)
    for name in GT_DERIVED + ["none"]:
        prompt = _prompt(name, empty)
        assert prompt.is_empty and prompt.points is None and prompt.boxes is None


def test_none_prompt_ignores_the_mask():
    assert _prompt("none", _lesion()).is_empty


def test_unknown_prompt_lists_the_valid_names():
    with pytest.raises(UserError) as error:
        _prompt("centre_point", _lesion())
    assert "'centre_point'" in str(error.value)
    for name in PROMPTS:
        assert name in str(error.value)


def test_settings_dict_and_validation():
    assert prompt_settings_dict(SETTINGS) == {
        "random_points_k": 3, "box_margin_px": 5, "jitter_px": 5.0, "jitter_frac": 0.0,
        "positive_points": 1, "negative_points": 1, "negative_margin_px": 20,
    }
    with pytest.raises(UserError, match="jitter_px"):
        PromptSettings(jitter_px=-1.0)
    with pytest.raises(UserError, match="random_points_k"):
        PromptSettings(random_points_k=0)


def test_prompt_arrays_are_typed_and_read_only():
    prompt = Prompt(points=[[1, 2]], point_labels=[1], boxes=[[0, 0, 3, 3]])
    assert prompt.points.dtype == np.float32 and prompt.point_labels.dtype == np.int32
    with pytest.raises(ValueError):
        prompt.boxes[0, 0] = 5
    with pytest.raises(ValueError, match="one label per point"):
        Prompt(points=[[1, 2], [3, 4]], point_labels=[1])


# ---------------------------------------------------------------------------------------------
# External prompt files


def test_csv_boxes(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image_id,x0,y0,x1,y1,score\na.png,1,2,10,12,0.9\nb.png,0,0,4,4,0.5\na.png,20,21,25,30,0.7\n")
    prompts = load_prompt_file(path)
    assert prompts["a.png"].boxes.tolist() == [[1, 2, 10, 12], [20, 21, 25, 30]]
    assert prompts["b.png"].boxes.tolist() == [[0, 0, 4, 4]] and prompts["b.png"].points is None
    mask = np.zeros((40, 40), bool)
    got = _prompt("file", mask, image_id="a.png", external=prompts)
    assert got.boxes.tolist() == [[1, 2, 10, 12], [20, 21, 25, 30]]
    # An image the file does not list (a detector found nothing) gets no prompt.
    assert _prompt("file", mask, image_id="c.png", external=prompts).is_empty


def test_csv_points(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("image_id,x,y,label\nBRATS_001:z077,5,6,1\nBRATS_001:z077,30,31,0\n")
    prompt = load_prompt_file(path)["BRATS_001:z077"]
    assert prompt.points.tolist() == [[5, 6], [30, 31]] and prompt.point_labels.tolist() == [1, 0]


def test_json_prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({
        "img_0001.png": {"boxes": [[40, 52, 88, 97]]},
        "img_0002.png": {"points": [[60, 70], [10, 10]], "point_labels": [1, 0]},
    }))
    prompts = load_prompt_file(path)
    assert prompts["img_0001.png"].boxes.tolist() == [[40, 52, 88, 97]]
    assert prompts["img_0002.png"].point_labels.tolist() == [1, 0]
    assert prompts["img_0002.png"].boxes is None


def test_file_prompt_outside_the_image_is_an_error(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image_id,x0,y0,x1,y1\na.png,100,100,900,900\n")
    with pytest.raises(UserError, match="'a.png'.*outside the image"):
        _prompt("file", np.zeros((256, 256), bool), image_id="a.png", external=load_prompt_file(path))


def test_file_prompt_needs_a_file_and_an_image_id():
    with pytest.raises(UserError, match="prompt file"):
        _prompt("file", np.zeros((4, 4), bool), image_id="a.png")
    with pytest.raises(UserError, match="image id"):
        _prompt("file", np.zeros((4, 4), bool), external={})


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("bad_header.csv", "id,x0,y0,x1,y1\na,1,2,3,4\n", r"line 1: header id,x0,y0,x1,y1 has neither"),
        ("not_a_number.csv", "image_id,x0,y0,x1,y1\na,1,2,3,4\nb,1,two,3,4\n", r"line 3, column y0: 'two' is not a number"),
        ("missing_value.csv", "image_id,x,y,label\na,1,2\n", r"line 2: a value is missing"),
        ("crossed_box.csv", "image_id,x0,y0,x1,y1\na,9,2,3,4\n", r"line 2: box .* x0 > x1"),
        ("bad_label.csv", "image_id,x,y,label\na,1,2,3\n", r"line 2: point label 3.0 must be 1"),
        ("no_rows.csv", "image_id,x0,y0,x1,y1\n", r"no prompt rows"),
        ("broken.json", '{"a": {"boxes": [[1, 2, 3, 4]]},\n "b": }', r"line 2: not valid JSON"),
        ("labels.json", '{"a": {"points": [[1, 2]], "point_labels": [1, 0]}}', r"key 'a': 'point_labels' must be a list"),
        ("unknown_key.json", '{"a": {"box": [[1, 2, 3, 4]]}}', r"key 'a': unknown keys \['box'\]"),
        ("short_box.json", '{"a": {"boxes": [[1, 2, 3]]}}', r"key 'a'.boxes: expected a list"),
        ("list.json", "[1, 2]", r"expected a non-empty JSON object"),
        ("prompts.txt", "a,1,2,3,4\n", r"unknown format '.txt'"),
    ],
)
def test_bad_prompt_files_name_the_file_and_place(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=expected) as error:
        load_prompt_file(path)
    assert str(path) in str(error.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.csv")
