"""Reader for COCO segmentation exports as Roboflow writes them.

Layout (`valid/` and `val/` both become the `val` split; a single folder without splits works too):

    train/_annotations.coco.json   train/<image files>
    valid/_annotations.coco.json   valid/<image files>
    test/_annotations.coco.json    test/<image files>

Every image is a subject with one slice, named by its file stem; its image id is the file name
(`case_001.png`), prefixed with the split folder where two folders hold the same name
(`train/case_001.png`, `test/case_001.png`; see `study.data.readers.picture_id`). Masks are rasterised with
pycocotools from polygons, uncompressed RLE (`counts` as a list) or compressed RLE; an image
with no annotations has an empty mask. Targets: `all` (every annotation), or a category name,
which also takes the categories filed under it as their supercategory: Roboflow lists the
dataset's own name as category 0 and the real classes as its sub-categories, so that name means
every class. Grey images are repeated into the three channels red, green, blue.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from study.data.readers import is_hidden, picture_id, require_root, unique_subjects
from study.data.readers.folder import is_picture, read_picture
from study.data.regions import split_from_folder
from study.data.volume import SubjectEntry, Volume
from foundation.errors import UserError

ANNOTATION_FILE = "_annotations.coco.json"

LAYOUT = (
    "a Roboflow COCO export: train/, valid/ (or val/) and test/ folders, each holding "
    f"{ANNOTATION_FILE} and the images it lists (or one such folder as the root)."
)


class CocoAnnotations:
    """One `_annotations.coco.json`, parsed once: images, their annotations and the categories."""

    def __init__(self, path: Path):
        self.path = path
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(
                f"Cannot read the COCO annotation file {path}: {error}. Export the dataset again "
                "from Roboflow (COCO Segmentation format) or restore the file."
            ) from error
        if not isinstance(document, dict) or not all(
            isinstance(document.get(k), list) for k in ("images", "categories")
        ):
            raise UserError(
                f"The COCO annotation file {path} lacks the 'images' and 'categories' lists of the COCO "
                "format."
            )
        if not document["categories"]:
            raise UserError(
                f"Empty label set: the COCO annotation file {path} defines no categories, so no "
                "image can have a mask. Export the dataset with its segmentation classes."
            )
        try:
            self.categories = {
                int(c["id"]): (str(c["name"]), str(c.get("supercategory", "")))
                for c in document["categories"]
            }
            self.images = {int(i["id"]): i for i in document["images"]}
            for image in self.images.values():
                image["file_name"], image["height"], image["width"] = (
                    str(image["file_name"]),
                    int(image["height"]),
                    int(image["width"]),
                )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(
                f"The COCO annotation file {path} has an image or category without id, name, file_name, "
                f"height or width ({error!r})."
            ) from error
        self.annotations: dict[int, list[dict]] = {image_id: [] for image_id in self.images}
        for annotation in document.get("annotations") or []:
            image_id = annotation.get("image_id")
            if image_id not in self.images:
                raise UserError(
                    f"The COCO annotation file {path} has annotation {annotation.get('id')} for image id "
                    f"{image_id!r}, which its 'images' list does not hold."
                )
            if annotation.get("category_id") not in self.categories:
                raise UserError(
                    f"The COCO annotation file {path} has annotation {annotation.get('id')} with category "
                    f"id {annotation.get('category_id')!r}, which its 'categories' list does not hold."
                )
            self.annotations[image_id].append(annotation)

    def category_ids(self, target: str) -> set[int] | None:
        """Category ids the target selects (None if `target` names no category)."""
        names = {name for name, _ in self.categories.values()}
        if target not in names:
            folded = [name for name in names if name.lower() == target.lower()]
            if len(folded) != 1:
                return None
            target = folded[0]
        return {
            category_id
            for category_id, (name, supercategory) in self.categories.items()
            if name == target or supercategory == target
        }


def annotation_mask(annotation: dict, height: int, width: int, source: Path) -> np.ndarray:
    """Boolean (H, W) mask of one COCO annotation, via pycocotools (polygons, RLE or compressed RLE).

    Polygon coordinates are in pixel-corner space (pixel (x, y) covers [x, x+1) x [y, y+1)); a
    pixel is inside when pycocotools' rasteriser covers its centre. Polygons with fewer than
    three points cover no area and are skipped.
    """
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            if segmentation:  # only degenerate polygons
                return np.zeros((height, width), dtype=bool)
            raise UserError(
                f"Annotation {annotation.get('id')} in {source} has no segmentation, only a box: "
                "this is an object-detection export. Export the dataset in COCO Segmentation format."
            )
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise UserError(
                f"Annotation {annotation.get('id')} in {source} is an RLE of size {segmentation['size']} "
                f"but its image is {[height, width]} (height, width)."
            )
        if isinstance(segmentation["counts"], list):
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise UserError(
            f"Annotation {annotation.get('id')} in {source} has no usable segmentation (neither "
            "polygons nor RLE). Export the dataset in COCO Segmentation format."
        )
    with warnings.catch_warnings():  # pycocotools 2.0 trips numpy 2's copy-keyword deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


class CocoReader:
    """Roboflow COCO segmentation export: 2D images, one subject each."""

    name = "coco"
    kind = "rgb"
    modalities = ("red", "green", "blue")
    default_modalities = ("red", "green", "blue")
    default_strategy = "stack"
    default_target = "all"
    volumetric = False  # stacks of 2D images: axial slicing only

    def __init__(self) -> None:
        self._parsed: dict[Path, CocoAnnotations] = {}

    def annotations(self, path: Path) -> CocoAnnotations:
        """The parsed annotation file, read once per reader."""
        if path not in self._parsed:
            self._parsed[path] = CocoAnnotations(path)
        return self._parsed[path]

    def index(self, root: Path) -> list[SubjectEntry]:
        """One entry per image listed in each folder's annotation file."""
        root = require_root(root, self.name, LAYOUT)
        folders = [(root, None)] if (root / ANNOTATION_FILE).is_file() else []
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p)):
            if (child / ANNOTATION_FILE).is_file():
                folders.append((child, split_from_folder(child.name)))
        if not folders:
            raise UserError(
                f"No {ANNOTATION_FILE} in {root} or its subfolders. The coco reader expects {LAYOUT}"
            )
        entries = []
        for folder, split in folders:
            entries.extend(self._folder_entries(folder, split))
        if not entries:
            raise UserError(
                f"The dataset at {root} is empty: its annotation files list no images. The coco reader "
                f"expects {LAYOUT}"
            )
        return unique_subjects(entries, lambda e: e.extra['image'].parent.name)

    def _folder_entries(self, folder: Path, split: str | None) -> list[SubjectEntry]:
        annotation_path = folder / ANNOTATION_FILE
        parsed = self.annotations(annotation_path)
        listed = set()
        entries = []
        for image_id, image in sorted(parsed.images.items(), key=lambda item: item[1]["file_name"]):
            path = folder / image["file_name"]
            listed.add(path.name)
            if not path.is_file():
                raise UserError(
                    f"The annotation file {annotation_path} lists the image {image['file_name']}, "
                    f"which is not in {folder}. Restore the image or export the dataset again."
                )
            entries.append(
                SubjectEntry(
                    subject=Path(image["file_name"]).stem,
                    files=(path, annotation_path),
                    split=split,
                    extra={"image": path, "annotations": annotation_path, "image_id": image_id},
                )
            )
        for path in sorted(folder.iterdir()):
            if is_picture(path) and not is_hidden(path) and path.name not in listed:
                raise UserError(
                    f"The image {path} has no label: {annotation_path} does not list it. Remove the "
                    "image or export the dataset again so that its annotation file covers it."
                )
        return entries

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        """`all` and every category name of the annotation files, in category-id order."""
        names: list[str] = []
        for path in dict.fromkeys(entry.extra["annotations"] for entry in entries):
            for _, (name, _) in sorted(self.annotations(path).categories.items()):
                if name not in names:
                    names.append(name)
        return ("all", *names)

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        """(1, H, W) union of the image's annotations in the target categories (empty if none)."""
        parsed = self.annotations(entry.extra["annotations"])
        image = parsed.images[entry.extra["image_id"]]
        selected = None if target == "all" else parsed.category_ids(target)
        if target != "all" and selected is None:
            valid = ", ".join(self.targets([entry]))
            raise UserError(
                f"Unknown target {target!r} for the COCO dataset {parsed.path}. Valid targets: "
                f"{valid}. Set data.target in grid.yaml to one of them."
            )
        height, width = image["height"], image["width"]
        mask = np.zeros((height, width), dtype=bool)
        for annotation in parsed.annotations[entry.extra["image_id"]]:
            if selected is None or annotation["category_id"] in selected:
                mask |= annotation_mask(annotation, height, width, parsed.path)
        return mask[None], [picture_id(entry, image["file_name"])]

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        mask, slice_ids = self.load_mask(entry, target)
        path = entry.extra["image"]
        picture = read_picture(path)
        if picture.shape[:2] != mask.shape[1:]:
            raise UserError(
                f"Shape mismatch: the image {path} is {picture.shape[:2]} pixels (height, width) but "
                f"{entry.extra['annotations']} gives it {mask.shape[1:]}. Export the dataset again."
            )
        values = picture.astype(np.float32)
        if values.ndim == 2:
            values = np.repeat(values[..., None], 3, axis=-1)
        channels = {
            name: np.ascontiguousarray(values[None, ..., c])
            for c, name in enumerate(("red", "green", "blue"))
        }
        kind = "rgb" if picture.dtype == np.uint8 else "mri"
        return Volume(entry.subject, channels, mask, slice_ids, None, kind, volumetric=False)
