"""Prompts derived from a ground-truth mask, by the names users write in grid.yaml.

Every prompt is computed in the ORIGINAL image's pixels (the mask's own resolution), from the
ground truth of that image, with a seeded `numpy.random.Generator`; mapping it into a backbone's
input frame (256 or 1024 pixels, padding) is the backbone's job, not this module's.

Coordinates: a point is (x, y) = (column, row) of a pixel; a box is (x0, y0, x1, y1) with the
inclusive pixel extent, x0 = first column, x1 = last column that holds mask, y likewise for
rows. This is the convention of SAM's and MedSAM's data pipelines (`np.where(mask)` min/max).

Empty ground truth: every GT-derived prompt (all names except `file`) returns the `none` prompt
(no points, no boxes). The trainable decides what to do with such an image (the readers drop
most empty slices; those kept on purpose score Dice 1 only for an empty prediction).

One unit for every distance: pixels of the original image. Box jitter and margins and the
negative-point region are stated in that unit (`PromptSettings`) and logged with the run
(`prompt_settings_dict`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from foundation.errors import UserError


@dataclass(frozen=True, eq=False)
class Prompt:
    """One image's prompt in original-image pixels.

    points: (P, 2) float32 (x, y) or None; point_labels: (P,) int32, 1 positive / 0 negative,
    or None; boxes: (B, 4) float32 xyxy (inclusive pixel extent) or None. With several boxes
    (`box_per_component`) the model is run once per box and the caller unites the masks.
    The arrays are read-only.
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        points = None if self.points is None else np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        labels = None if self.point_labels is None else np.asarray(self.point_labels, dtype=np.int32).reshape(-1)
        boxes = None if self.boxes is None else np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if (points is None) != (labels is None) or (points is not None and len(points) != len(labels)):
            raise ValueError("a Prompt needs one label per point (or neither points nor labels)")
        for array in (points, labels, boxes):
            if array is not None:
                array.setflags(write=False)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "point_labels", labels)
        object.__setattr__(self, "boxes", boxes)

    @property
    def is_empty(self) -> bool:
        """True when the prompt holds no point and no box (the `none` prompt)."""
        no_points = self.points is None or len(self.points) == 0
        no_boxes = self.boxes is None or len(self.boxes) == 0
        return no_points and no_boxes

    def with_point(self, x: float, y: float, label: int) -> "Prompt":
        """This prompt with one more point (a corrective click) after its others; boxes kept."""
        points = np.zeros((0, 2), np.float32) if self.points is None else self.points
        labels = np.zeros((0,), np.int32) if self.point_labels is None else self.point_labels
        return Prompt(np.concatenate([points, [[x, y]]]), np.concatenate([labels, [label]]), self.boxes)

    def as_record(self) -> dict:
        """Plain lists, for recording the prompt with the run (JSON-serialisable)."""
        return {
            "points": None if self.points is None else self.points.tolist(),
            "point_labels": None if self.point_labels is None else self.point_labels.tolist(),
            "boxes": None if self.boxes is None else self.boxes.tolist(),
        }


NO_PROMPT = Prompt()


@dataclass(frozen=True)
class PromptSettings:
    """The numbers behind the prompt rules, all in pixels of the original image.

    random_points_k: points drawn by `random_points` (3, as seed 004's "three random points").
    box_margin_px: pixels added on each side by `box_margin` (5, as seed 004's "larger box").
    jitter_px, jitter_frac: `box_jitter` moves each side of the box by a uniform random amount
        in [-(jitter_px + jitter_frac * side_length), +(same)] pixels, where side_length is the
        box's extent along that side's axis (x1 - x0 + 1 for x0 and x1). Defaults 5.0 and 0.0.
    positive_points, negative_points: counts for `points_pos_neg` (1 and 1).
    negative_margin_px: `points_pos_neg` draws negatives outside the mask but inside the mask's
        box enlarged by this many pixels on each side, clipped to the image (20), so negatives
        sit near the lesion, where they carry information, rather than anywhere in the image.
    """

    random_points_k: int = 3
    box_margin_px: int = 5
    jitter_px: float = 5.0
    jitter_frac: float = 0.0
    positive_points: int = 1
    negative_points: int = 1
    negative_margin_px: int = 20

    def __post_init__(self) -> None:
        problems = []
        if self.random_points_k < 1:
            problems.append(f"random_points_k={self.random_points_k} (must be >= 1)")
        for name in ("box_margin_px", "jitter_px", "jitter_frac", "positive_points", "negative_points", "negative_margin_px"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name}={value} (must be >= 0)")
        if self.positive_points + self.negative_points < 1:
            problems.append("positive_points + negative_points must be at least 1")
        if problems:
            raise UserError("Invalid prompt settings: " + "; ".join(problems) + ".")


def prompt_settings_dict(settings: PromptSettings) -> dict:
    """The settings as a flat dict `{field: value}`, for logging as run parameters."""
    return dataclasses.asdict(settings)


# ---------------------------------------------------------------------------------------------
# Geometry shared by several rules


def _mask_extent(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1): first/last column and row that hold mask (mask must be non-empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def _sample_pixels(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` pixels (x, y) drawn uniformly from a boolean map of candidates.

    Without replacement when there are enough candidates, with replacement otherwise (so the
    caller always gets `count` points); an empty map gives no points.
    """
    rows, cols = np.nonzero(candidates)
    if count == 0 or len(rows) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    chosen = rng.choice(len(rows), size=count, replace=len(rows) < count)
    return np.stack([cols[chosen], rows[chosen]], axis=1).astype(np.float32)


def _clip_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    x0, y0, x1, y1 = box
    return np.array(
        [np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1), np.clip(x1, 0, width - 1), np.clip(y1, 0, height - 1)],
        dtype=np.float32,
    )


def _positive(points: np.ndarray) -> Prompt:
    return Prompt(points=points, point_labels=np.ones(len(points), dtype=np.int32))


# ---------------------------------------------------------------------------------------------
# The rules. Each takes the boolean mask and keyword arguments (rng, settings, image_id,
# external) and ignores those it does not need, so the registry can call them alike.


def center_point_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """One positive point at the pixel farthest from the background (seed 004).

    Seed 004 used `cv2.distanceTransform`: each mask pixel's Euclidean distance to the nearest
    background pixel; the point is where it is largest. Here the same with
    `scipy.ndimage.distance_transform_edt`; as in OpenCV, the image border does not count as
    background. Ties (a plateau, e.g. in a rectangle) go to the tied pixel nearest the mask's
    centroid, then the first in row-major order, so the result is deterministic and central.
    Not random: `rng` is unused.
    """
    if not mask.any():
        return NO_PROMPT
    if mask.all():  # no background at all: every pixel ties, the centroid rule decides
        distance = np.ones(mask.shape)
    else:
        distance = ndimage.distance_transform_edt(mask)
    tied = np.argwhere(distance == distance.max())  # (row, col), row-major order
    centroid = np.argwhere(mask).mean(axis=0)
    best = tied[np.argmin(((tied - centroid) ** 2).sum(axis=1))]
    return _positive(np.array([[best[1], best[0]]], dtype=np.float32))


def random_point_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """One positive point drawn uniformly from the mask's pixels (seed 004's "one random point")."""
    if not mask.any():
        return NO_PROMPT
    return _positive(_sample_pixels(mask, 1, rng))


def random_points_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """`settings.random_points_k` positive points drawn uniformly from the mask (seed 004, k=3).

    Distinct pixels when the mask has at least k of them; with replacement otherwise, so there
    are always k points.
    """
    if not mask.any():
        return NO_PROMPT
    return _positive(_sample_pixels(mask, settings.random_points_k, rng))


def box_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """The tight bounding box of the whole mask, inclusive pixel extent (seed 004 "bound box")."""
    if not mask.any():
        return NO_PROMPT
    return Prompt(boxes=_mask_extent(mask)[None])


def box_margin_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """The tight box enlarged by `settings.box_margin_px` on every side, clipped to the image.

    Seed 004's "larger box" (5 pixels). Not random.
    """
    if not mask.any():
        return NO_PROMPT
    margin = settings.box_margin_px
    box = _mask_extent(mask) + np.array([-margin, -margin, margin, margin], dtype=np.float32)
    return Prompt(boxes=_clip_box(box, mask.shape)[None])


def box_jitter_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """The tight box with each side moved independently by a uniform random amount.

    Side x0 and x1 move by U(-m_x, +m_x) with m_x = jitter_px + jitter_frac * (x1 - x0 + 1),
    y0 and y1 likewise with the box height; all in original-image pixels. This mimics an
    imperfect detector or annotator (SAM and MedSAM train with such perturbed boxes). The result
    is clipped to the image, and if two sides cross they are swapped; neither step moves a side
    farther than the stated maximum from where it started.
    """
    if not mask.any():
        return NO_PROMPT
    x0, y0, x1, y1 = _mask_extent(mask)
    max_x = settings.jitter_px + settings.jitter_frac * (x1 - x0 + 1)
    max_y = settings.jitter_px + settings.jitter_frac * (y1 - y0 + 1)
    shift = rng.uniform(-1.0, 1.0, size=4) * np.array([max_x, max_y, max_x, max_y])
    jx0, jy0, jx1, jy1 = np.array([x0, y0, x1, y1], dtype=np.float64) + shift
    box = np.array([min(jx0, jx1), min(jy0, jy1), max(jx0, jx1), max(jy0, jy1)], dtype=np.float32)
    return Prompt(boxes=_clip_box(box, mask.shape)[None])


def points_pos_neg_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """Positive points inside the mask and negative points just outside it.

    `settings.positive_points` points drawn uniformly from the mask (label 1), then
    `settings.negative_points` drawn uniformly from the background pixels inside the mask's box
    enlarged by `settings.negative_margin_px` on each side and clipped to the image (label 0).
    If that region holds no background, negatives are drawn from all background pixels; if the
    mask covers the whole image there are no negatives. Positives come first.
    """
    if not mask.any():
        return NO_PROMPT
    positives = _sample_pixels(mask, settings.positive_points, rng)
    margin = settings.negative_margin_px
    x0, y0, x1, y1 = _clip_box(_mask_extent(mask) + np.array([-margin, -margin, margin, margin]), mask.shape).astype(int)
    near = np.zeros_like(mask)
    near[y0 : y1 + 1, x0 : x1 + 1] = True
    candidates = near & ~mask
    if not candidates.any():
        candidates = ~mask
    negatives = _sample_pixels(candidates, settings.negative_points, rng)
    labels = np.concatenate([np.ones(len(positives), np.int32), np.zeros(len(negatives), np.int32)])
    return Prompt(points=np.concatenate([positives, negatives]), point_labels=labels)


def box_per_component_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """One tight box per 8-connected component of the mask, in label (row-major scan) order.

    For images with separated lesions, where one box around all of them takes in mostly
    background (seed 001's failure cases). The model is run once per box and the caller unites
    the predicted masks. Every component counts, however small.
    """
    if not mask.any():
        return NO_PROMPT
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for rows, cols in ndimage.find_objects(labelled, max_label=count):
        boxes.append([cols.start, rows.start, cols.stop - 1, rows.stop - 1])
    return Prompt(boxes=np.array(boxes, dtype=np.float32))


def no_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """No points and no boxes: the model segments from the image alone."""
    return NO_PROMPT


def file_prompt(mask: np.ndarray, *, rng, settings, image_id=None, external=None) -> Prompt:
    """The prompt given for `image_id` in an external file (see `load_prompt_file`).

    For prompts from elsewhere, e.g. a detector's boxes as in seed 003. An image the file does
    not list gets the `none` prompt (a detector that found nothing writes no row); a prompt that
    lies outside the image is an error, since it means the file is in another frame or scale.
    """
    if external is None:
        raise UserError("Prompt 'file' needs a prompt file: load it with load_prompt_file() and pass it as external=.")
    if image_id is None:
        raise UserError("Prompt 'file' needs the image id to look up its prompt in the prompt file.")
    prompt = external.get(image_id)
    if prompt is None:
        return NO_PROMPT
    height, width = mask.shape
    coords = []
    if prompt.points is not None:
        coords.append(prompt.points)
    if prompt.boxes is not None:
        coords.append(prompt.boxes.reshape(-1, 2))
    for xy in coords:
        if len(xy) and (xy[:, 0].min() < 0 or xy[:, 1].min() < 0 or xy[:, 0].max() > width or xy[:, 1].max() > height):
            raise UserError(
                f"The prompt file's prompt for image {image_id!r} lies outside the image "
                f"({width}x{height} pixels): {prompt.as_record()}. Prompt files hold coordinates in "
                "the original image's pixels; rescale the file to that frame."
            )
    return prompt


PromptRule = Callable[..., Prompt]

PROMPTS: dict[str, PromptRule] = {
    "center_point": center_point_prompt,
    "random_point": random_point_prompt,
    "random_points": random_points_prompt,
    "box": box_prompt,
    "box_margin": box_margin_prompt,
    "box_jitter": box_jitter_prompt,
    "points_pos_neg": points_pos_neg_prompt,
    "box_per_component": box_per_component_prompt,
    "none": no_prompt,
    "file": file_prompt,
}


def make_prompt(
    name: str,
    mask: np.ndarray,
    *,
    rng: np.random.Generator,
    settings: PromptSettings,
    image_id: str | None = None,
    external: dict[str, Prompt] | None = None,
) -> Prompt:
    """The prompt `name` for one image, from its 2D ground-truth `mask` (original pixels)."""
    if name not in PROMPTS:
        raise UserError(
            f"Unknown prompt {name!r} (factors.prompt / factors.eval_prompt in grid.yaml). "
            f"Valid prompts: {', '.join(PROMPTS)}."
        )
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"prompts are derived from a 2D mask; got shape {mask.shape}")
    return PROMPTS[name](mask, rng=rng, settings=settings, image_id=image_id, external=external)


# ---------------------------------------------------------------------------------------------
# External prompt files

BOX_COLUMNS = ("image_id", "x0", "y0", "x1", "y1")
POINT_COLUMNS = ("image_id", "x", "y", "label")


def load_prompt_file(path: str | Path) -> dict[str, Prompt]:
    """Read external prompts keyed by image id from a CSV or JSON file (by its suffix).

    Coordinates are in the original image's pixels, with this module's conventions (points
    (x, y) = (column, row); boxes x0, y0, x1, y1 inclusive, x0 <= x1, y0 <= y1).

    CSV (`.csv`): a header row, then one row per box or per point; several rows may share an
    image id. The header holds either the box columns `image_id,x0,y0,x1,y1` or the point
    columns `image_id,x,y,label` (label 1 positive, 0 negative); other columns (a detector's
    `score`, say) are ignored. Example::

        image_id,x0,y0,x1,y1
        BRATS_001:z077,40,52,88,97
        BRATS_001:z077,120,30,140,45

    JSON (`.json`): an object mapping each image id to an object with any of `boxes` (list of
    [x0, y0, x1, y1]), `points` (list of [x, y]) and `point_labels` (list of 0/1, one per
    point; required with `points`). Example::

        {"img_0001.png": {"boxes": [[40, 52, 88, 97]]},
         "img_0002.png": {"points": [[60, 70], [10, 10]], "point_labels": [1, 0]}}

    Errors (UserError) name the file and the line (CSV) or key (JSON) at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Prompt file {path} does not exist (or is not a file).")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_prompt_csv(path)
    if suffix == ".json":
        return _load_prompt_json(path)
    raise UserError(f"Prompt file {path}: unknown format {suffix!r}; use a .csv or .json file (see load_prompt_file).")


def _number(text: Any, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {text!r} is not a finite number.")
    return value


def _check_box(box: list[float], where: str) -> None:
    x0, y0, x1, y1 = box
    if x0 > x1 or y0 > y1:
        raise UserError(f"{where}: box {box} has x0 > x1 or y0 > y1; boxes are x0, y0, x1, y1 with x0 <= x1, y0 <= y1.")


def _check_label(value: float, where: str) -> int:
    if value not in (0.0, 1.0):
        raise UserError(f"{where}: point label {value!r} must be 1 (positive) or 0 (negative).")
    return int(value)


def _load_prompt_csv(path: Path) -> dict[str, Prompt]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate an Excel BOM
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = header
        if set(BOX_COLUMNS) <= set(header):
            kind, columns = "boxes", BOX_COLUMNS
        elif set(POINT_COLUMNS) <= set(header):
            kind, columns = "points", POINT_COLUMNS
        else:
            raise UserError(
                f"Prompt file {path}, line 1: header {','.join(header) or '(empty)'} has neither the box "
                f"columns {','.join(BOX_COLUMNS)} nor the point columns {','.join(POINT_COLUMNS)}."
            )
        boxes: dict[str, list[list[float]]] = {}
        points: dict[str, list[list[float]]] = {}
        labels: dict[str, list[int]] = {}
        for row in reader:
            where = f"Prompt file {path}, line {reader.line_num}"
            if any(row.get(column) in (None, "") for column in columns):
                raise UserError(f"{where}: a value is missing; every row needs {','.join(columns)}.")
            image_id = row["image_id"].strip()
            if kind == "boxes":
                box = [_number(row[c], f"{where}, column {c}") for c in ("x0", "y0", "x1", "y1")]
                _check_box(box, where)
                boxes.setdefault(image_id, []).append(box)
            else:
                points.setdefault(image_id, []).append([_number(row[c], f"{where}, column {c}") for c in ("x", "y")])
                labels.setdefault(image_id, []).append(_check_label(_number(row["label"], f"{where}, column label"), where))
    if kind == "boxes":
        prompts = {image_id: Prompt(boxes=np.array(b)) for image_id, b in boxes.items()}
    else:
        prompts = {image_id: Prompt(points=np.array(points[image_id]), point_labels=np.array(labels[image_id])) for image_id in points}
    if not prompts:
        raise UserError(f"Prompt file {path} has a header but no prompt rows.")
    return prompts


def _load_prompt_json(path: Path) -> dict[str, Prompt]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"Prompt file {path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"Prompt file {path}: expected a non-empty JSON object mapping image ids to prompts.")
    prompts: dict[str, Prompt] = {}
    for image_id, entry in data.items():
        where = f"Prompt file {path}, key {image_id!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object with 'boxes' and/or 'points' and 'point_labels'.")
        unknown = set(entry) - {"boxes", "points", "point_labels"}
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)}; allowed: boxes, points, point_labels.")
        boxes = _json_rows(entry.get("boxes"), 4, f"{where}.boxes")
        for box in boxes or []:
            _check_box(box, f"{where}.boxes")
        points = _json_rows(entry.get("points"), 2, f"{where}.points")
        labels = entry.get("point_labels")
        if points is not None:
            if not isinstance(labels, list) or len(labels) != len(points):
                raise UserError(f"{where}: 'point_labels' must be a list with one 0/1 label per point ({len(points)}).")
            labels = [_check_label(_number(v, f"{where}.point_labels"), f"{where}.point_labels") for v in labels]
        elif labels is not None:
            raise UserError(f"{where}: 'point_labels' given without 'points'.")
        prompts[str(image_id)] = Prompt(
            points=None if points is None else np.array(points),
            point_labels=None if points is None else np.array(labels),
            boxes=None if boxes is None else np.array(boxes),
        )
    return prompts


def _json_rows(value: Any, width: int, where: str) -> list[list[float]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(row, list) and len(row) == width for row in value):
        raise UserError(f"{where}: expected a list of [{', '.join(['number'] * width)}] rows.")
    return [[_number(v, where) for v in row] for row in value]
