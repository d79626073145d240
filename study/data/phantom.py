"""Synthetic multi-modal brain MRI phantom, written in three real dataset layouts.

    python -m study.data.phantom OUT --subjects 8 [--seed 0]

Each subject is a seeded 3D head: scalp, skull, cerebrospinal fluid, cortex and white matter with
a convoluted boundary (thresholded smooth noise), two lateral ventricles, and one or two tumours
(subjects 1, 4, 7, … get two, in opposite hemispheres at the same height, so some axial slices
hold two separate lesions). A tumour is a noisy ellipsoid of edema around an enhancing rim around
a necrotic core (some second lesions are solid). Four MRI contrasts come from a per-tissue
intensity table (T1-Gd: bright enhancing rim; FLAIR and T2: bright edema; T1: dark tumour; FLAIR
suppresses CSF), then partial-volume blur, tissue texture, a smooth multiplicative bias field per
contrast and Rician noise. Volumes are 128 x 128 voxels in-plane at 1.5 mm with 40-48 slices of
3 mm (about the anisotropy of a clinical 2D acquisition), small enough to be fast on a CPU.

Labels follow MSD Task01 (1 edema, 2 non-enhancing/necrotic core, 3 enhancing). Written as

    OUT/Task01_BrainTumour/   MSD layout: dataset.json, imagesTr/BRATS_001.nii.gz (4D), labelsTr/
    OUT/BraTS2023/            BraTS 2023 names, labels converted (1 NETC, 2 SNFH, 3 ET), a folder per case
    OUT/coco/                 Roboflow COCO export of axial slices (PNG: flair, t1gd, t2w as RGB,
                              0.5/99.5-percentile scaled) with whole-tumour polygons, split
                              train/valid/test by subject
    OUT/phantom.json          what was generated (written last)

Subject i's volumes depend only on (seed, i), not on the number of subjects. The same seed
gives the same bytes: gzip headers carry mtime 0 and nothing written holds a date.
The output folder is built in a temporary sibling and renamed into place, so a crash never
leaves a half-written phantom behind.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import contourpy
import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from foundation.errors import UserError

IN_PLANE = 128
SLICE_RANGE = (40, 48)  # inclusive
SPACING_ZYX = (3.0, 1.5, 1.5)  # mm
MSD_MODALITIES = ("flair", "t1", "t1gd", "t2w")  # MSD channel order
BRATS2023_FILES = {"t2f": "flair", "t1n": "t1", "t1c": "t1gd", "t2w": "t2w"}
MSD_TO_BRATS2023 = np.array([0, 2, 1, 3], dtype=np.uint8)  # MSD label -> BraTS 2023 label
COCO_CHANNELS = ("flair", "t1gd", "t2w")
COCO_MIN_AREA = 16  # pixels of whole tumour for a slice to be exported
COCO_EMPTY_PER_SUBJECT = 2
GZIP_LEVEL = 1  # noisy volumes barely compress further; level 1 keeps generation fast
MANIFEST = "phantom.json"
MSD_FOLDER, BRATS_FOLDER, COCO_FOLDER = "Task01_BrainTumour", "BraTS2023", "coco"
FORMAT_VERSION = 1

# Tissue classes and their mean intensity per contrast (arbitrary scanner units).
AIR, SCALP, BONE, CSF, GREY, WHITE, EDEMA, NECROSIS, ENHANCING = range(9)
TISSUE_INTENSITY = {
    #        air scalp bone  csf  grey white edema necr. enh.
    "t1": (0, 850, 120, 280, 560, 760, 480, 230, 520),
    "t1gd": (0, 880, 120, 300, 580, 770, 500, 240, 1350),
    "t2w": (0, 600, 100, 1500, 950, 700, 1250, 1450, 1000),
    "flair": (0, 500, 90, 140, 760, 600, 1150, 600, 900),
}


@dataclass
class PhantomSubject:
    """One synthetic subject: (Z, Y, X) images per modality and MSD labels (uint8).

    Image values are whole numbers (they are written as int16), so every layout holds the same values.
    """

    index: int
    images: dict[str, np.ndarray]
    labels: np.ndarray
    lesions: int


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_mm: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, smooth over `sigma_mm`."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), [sigma_mm / s for s in SPACING_ZYX], mode="nearest"
    )
    return field / field.std()


def synthesize_subject(index: int, seed: int) -> PhantomSubject:
    """Subject `index` of the phantom with `seed`: anatomy, tumours, four contrasts, labels."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    depth = int(rng.integers(SLICE_RANGE[0], SLICE_RANGE[1] + 1))
    shape = (depth, IN_PLANE, IN_PLANE)
    z, y, x = (axis.astype(np.float32) for axis in np.ogrid[: shape[0], : shape[1], : shape[2]])

    # Head: nested ellipsoidal shells; `head_r` is 1 on the scalp surface.
    cz = (depth - 1) / 2 + rng.uniform(-1, 1)
    cy = (IN_PLANE - 1) / 2 + rng.uniform(-3, 3)
    cx = (IN_PLANE - 1) / 2 + rng.uniform(-3, 3)
    rz, ry, rx = (
        0.46 * depth,
        0.43 * IN_PLANE * rng.uniform(0.95, 1.03),
        0.36 * IN_PLANE * rng.uniform(0.95, 1.05),
    )
    head_r = np.sqrt(((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    brain_r = head_r / 0.80 + 0.025 * smooth_noise(rng, shape, 6.0)
    brain = brain_r < 1.0
    white = brain & (brain_r + 0.12 * smooth_noise(rng, shape, 4.0) < 0.72)

    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[head_r < 1.0] = SCALP
    tissue[head_r < 0.93] = BONE
    tissue[head_r < 0.85] = CSF
    tissue[brain] = GREY
    tissue[white] = WHITE
    ventricles = np.zeros(shape, dtype=bool)
    scale = rng.uniform(0.8, 1.25)
    for side in (-1, 1):
        ventricles |= (
            ((z - cz) / (0.12 * depth)) ** 2
            + ((y - cy + 0.04 * IN_PLANE) / (0.16 * IN_PLANE * scale)) ** 2
            + ((x - cx - side * 0.055 * IN_PLANE) / (0.04 * IN_PLANE * scale)) ** 2
        ) < 1.0
    tissue[ventricles] = CSF

    # Tumours: edema (1) around an enhancing rim (3) around a necrotic core (2).
    labels = np.zeros(shape, dtype=np.uint8)
    count = 2 if index % 3 == 1 else 1
    shape_noise = np.clip(smooth_noise(rng, shape, 5.0), -2.0, 2.0)
    cores, necroses = [], []
    for lesion in plan_lesions(rng, count, (cz, cy, cx), (rz, ry, rx)):
        lz, ly, lx, radius, core_fraction, necrotic_fraction = lesion
        radius_z = radius * SPACING_ZYX[1] / SPACING_ZYX[0]
        distance = np.sqrt(((z - lz) / radius_z) ** 2 + ((y - ly) / radius) ** 2 + ((x - lx) / radius) ** 2)
        distance = distance * (1.0 + 0.15 * shape_noise)
        labels[(distance < 1.0) & brain & ~ventricles] = 1
        cores.append((distance < core_fraction) & brain)
        necroses.append((distance < core_fraction * necrotic_fraction) & brain)
    for core in cores:
        labels[core] = 3
    for necrosis in necroses:
        labels[necrosis] = 2
    tissue[labels == 1] = EDEMA
    tissue[labels == 3] = ENHANCING
    tissue[labels == 2] = NECROSIS

    # Contrasts: tissue means, partial volume, texture, bias field, Rician noise.
    texture = smooth_noise(rng, shape, 2.0)
    texture_strength = np.where(labels > 0, 0.10, 0.04).astype(np.float32)
    zn, yn, xn = (z - cz) / rz, (y - cy) / ry, (x - cx) / rx
    images = {}
    for modality in MSD_MODALITIES:
        jitter = rng.uniform(0.95, 1.05, len(TISSUE_INTENSITY[modality]))  # per-subject contrast
        means = (np.asarray(TISSUE_INTENSITY[modality]) * jitter).astype(np.float32)
        image = ndimage.gaussian_filter(means[tissue], (0.3, 0.6, 0.6))
        image *= 1.0 + texture_strength * texture
        a = rng.uniform(-0.12, 0.12, 5).astype(np.float32)
        image *= np.exp(a[0] * xn + a[1] * yn + a[2] * zn + a[3] * xn * yn + a[4] * (xn**2 + yn**2))
        sigma = 0.02 * means[WHITE]
        real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
        magnitude = np.sqrt(real**2 + imaginary**2)
        whole_numbers = np.rint(np.clip(magnitude, 0, np.iinfo(np.int16).max))  # written as int16
        images[modality] = whole_numbers.astype(np.float32)
    return PhantomSubject(index=index, images=images, labels=labels, lesions=count)


def plan_lesions(rng, count, center, radii):
    """(z, y, x, in-plane radius, core fraction, necrotic fraction) of each lesion, in voxels.

    Two lesions sit in opposite hemispheres within 1.5 slices of each other, their centres at
    least 1.5 x the sum of their radii apart, so that even with the shape noise (radius at most
    1 / 0.7 of nominal) their edemas never touch.
    """
    cz, cy, cx = center
    rz, ry, rx = radii
    if count == 1:
        radius = rng.uniform(11.0, 18.0)
        angle, rho = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.5)
        z = cz + rng.uniform(-0.2, 0.2) * rz
        return [
            (
                z,
                cy + rho * 0.8 * ry * np.sin(angle),
                cx + rho * 0.8 * rx * np.cos(angle),
                radius,
                rng.uniform(0.5, 0.7),
                rng.uniform(0.4, 0.7),
            )
        ]
    first, second = rng.uniform(8.0, 12.0, 2)
    separation = 1.5 * (first + second) + rng.uniform(1.0, 4.0)
    z = cz + rng.uniform(-0.15, 0.15) * rz
    lesions = []
    for side, radius, dz in ((-1, first, 0.0), (1, second, rng.uniform(-1.5, 1.5))):
        necrotic_fraction = rng.uniform(0.4, 0.7) if side < 0 or rng.uniform() < 0.5 else 0.0
        lesions.append(
            (
                z + dz,
                cy + rng.uniform(-0.3, 0.3) * 0.8 * ry,
                cx + side * separation / 2,
                radius,
                rng.uniform(0.5, 0.7),
                necrotic_fraction,
            )
        )
    return lesions


def affine_for(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Voxel (x, y, z) -> mm, voxel sizes from SPACING_ZYX, the volume centred on the origin."""
    spacing_xyz = np.array(SPACING_ZYX[::-1])
    affine = np.diag([*spacing_xyz, 1.0])
    affine[:3, 3] = -spacing_xyz * (np.array(shape_zyx[::-1]) - 1) / 2
    return affine


def write_nifti_gz(path: Path, array_xyz: np.ndarray, affine: np.ndarray) -> None:
    """Write `array_xyz` as .nii.gz with a gzip header that holds no time stamp (mtime 0)."""
    image = nib.Nifti1Image(array_xyz, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0))


def as_int16_xyz(volume_zyx: np.ndarray) -> np.ndarray:
    return volume_zyx.astype(np.int16).transpose(2, 1, 0)


def msd_name(index: int) -> str:
    return f"BRATS_{index + 1:03d}"


def brats_name(index: int) -> str:
    return f"BraTS-GLI-{index:05d}-000"


def write_msd_subject(task: Path, subject: PhantomSubject) -> None:
    name = msd_name(subject.index)
    affine = affine_for(subject.labels.shape)
    stacked = np.stack([as_int16_xyz(subject.images[m]) for m in MSD_MODALITIES], axis=-1)
    write_nifti_gz(task / "imagesTr" / f"{name}.nii.gz", stacked, affine)
    write_nifti_gz(task / "labelsTr" / f"{name}.nii.gz", subject.labels.transpose(2, 1, 0), affine)


def write_msd_description(task: Path, count: int) -> None:
    """dataset.json as the Decathlon ships it (modality order, label names, training list)."""
    description = {
        "name": "BRATS",
        "description": "Synthetic gliomas (sam-study phantom) in the Decathlon Task01 layout",
        "reference": "study.data.phantom",
        "licence": "CC-BY-SA 4.0",
        "release": f"phantom {FORMAT_VERSION}",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": count,
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{msd_name(i)}.nii.gz", "label": f"./labelsTr/{msd_name(i)}.nii.gz"}
            for i in range(count)
        ],
        "test": [],
    }
    (task / "dataset.json").write_text(json.dumps(description, indent=4) + "\n")


def write_brats_subject(root: Path, subject: PhantomSubject) -> None:
    name = brats_name(subject.index)
    case = root / name
    case.mkdir()
    affine = affine_for(subject.labels.shape)
    for suffix, modality in BRATS2023_FILES.items():
        write_nifti_gz(case / f"{name}-{suffix}.nii.gz", as_int16_xyz(subject.images[modality]), affine)
    write_nifti_gz(case / f"{name}-seg.nii.gz", MSD_TO_BRATS2023[subject.labels].transpose(2, 1, 0), affine)


def percentile_to_uint8(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the volume's `low`/`high` percentiles and scale linearly to 0..255 (uint8)."""
    lo, hi = np.percentile(volume, [low, high])
    scaled = np.clip((volume - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return np.rint(scaled * 255).astype(np.uint8)


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (x0, y0, x1, y1, …) outlining `mask`, in pixel-corner coordinates.

    The 0.5 iso-contour of the zero-padded mask (contourpy, marching squares) runs through the
    midpoints between inside and outside pixel centres; shifting by half a pixel puts it in
    COCO's frame, where pixel (x, y) covers [x, x+1) x [y, y+1), so pycocotools' rasteriser
    gives back the mask's pixels (diagonal staircase corners may differ).
    """
    padded = np.pad(mask.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    polygons = []
    for line in generator.lines(0.5):
        points = line[:-1] if len(line) > 1 and np.allclose(line[0], line[-1]) else line
        if len(points) >= 3:
            polygons.append([round(float(v), 2) for v in (points - 0.5).ravel()])
    return polygons


def coco_annotations(mask: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    """One COCO annotation per connected component (8-connected, holes filled) of `mask`."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    annotations = []
    for label in range(1, count + 1):
        component = ndimage.binary_fill_holes(components == label)
        polygons = mask_polygons(component)
        if not polygons:
            continue
        rows, cols = np.nonzero(component)
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": 1,
                "bbox": [
                    int(cols.min()),
                    int(rows.min()),
                    int(cols.max() - cols.min() + 1),
                    int(rows.max() - rows.min() + 1),
                ],
                "area": int(component.sum()),
                "segmentation": polygons,
                "iscrowd": 0,
            }
        )
    return annotations


def coco_slices(subject: PhantomSubject) -> list[int]:
    """Axial slices to export: every slice with >= COCO_MIN_AREA tumour pixels, and a few without.

    The tumour-free slices are spread evenly over the slices that show at least half the
    largest brain cross-section, so they look like the tumour slices apart from the tumour.
    """
    tumour_area = (subject.labels > 0).sum(axis=(1, 2))
    with_tumour = [z for z in range(len(tumour_area)) if tumour_area[z] >= COCO_MIN_AREA]
    head_area = (subject.images["t1"] > 0.3 * np.percentile(subject.images["t1"], 99)).sum(axis=(1, 2))
    candidates = [
        z for z in range(len(tumour_area)) if tumour_area[z] == 0 and head_area[z] >= 0.5 * head_area.max()
    ]
    chosen = (
        [
            candidates[(k + 1) * len(candidates) // (COCO_EMPTY_PER_SUBJECT + 1)]
            for k in range(COCO_EMPTY_PER_SUBJECT)
        ]
        if candidates
        else []
    )
    return sorted(set(with_tumour) | set(chosen))


def coco_split_folders(count: int) -> list[str]:
    """Roboflow split folder of each subject: about 70/10/20 % train/valid/test, by subject."""
    if count < 3:
        return ["train", "test"][:count] if count == 2 else ["train"]
    test = max(1, round(0.2 * count))
    valid = max(1, round(0.1 * count))
    return ["train"] * (count - valid - test) + ["valid"] * valid + ["test"] * test


class CocoExport:
    """Accumulates the Roboflow COCO export, one split folder at a time."""

    CATEGORIES = [
        {"id": 0, "name": "tumors", "supercategory": "none"},
        {"id": 1, "name": "tumor", "supercategory": "tumors"},
    ]

    def __init__(self, root: Path):
        self.root = root
        self.documents: dict[str, dict] = {}

    def add_subject(self, subject: PhantomSubject, split: str) -> None:
        folder = self.root / split
        folder.mkdir(parents=True, exist_ok=True)
        document = self.documents.setdefault(
            split,
            {
                "info": {"description": "sam-study phantom, axial slices", "version": str(FORMAT_VERSION)},
                "licenses": [
                    {"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}
                ],
                "categories": self.CATEGORIES,
                "images": [],
                "annotations": [],
            },
        )
        rgb = np.stack([percentile_to_uint8(subject.images[m]) for m in COCO_CHANNELS], axis=-1)
        whole_tumour = subject.labels > 0
        for z in coco_slices(subject):
            file_name = f"{msd_name(subject.index)}_z{z:03d}.png"
            Image.fromarray(rgb[z]).save(folder / file_name, format="PNG")
            image_id = len(document["images"])
            height, width = whole_tumour.shape[1:]
            document["images"].append(
                {"id": image_id, "license": 1, "file_name": file_name, "height": height, "width": width}
            )
            document["annotations"].extend(
                coco_annotations(whole_tumour[z], image_id, len(document["annotations"]))
            )

    def write(self) -> dict[str, int]:
        """Write each split's `_annotations.coco.json`; return the image count per split."""
        for split, document in self.documents.items():
            (self.root / split / "_annotations.coco.json").write_text(json.dumps(document))
        return {split: len(document["images"]) for split, document in self.documents.items()}


def write_phantom_layouts(out: Path, subjects: int, seed: int) -> dict:
    """Synthesize `subjects` subjects into the three layouts under the existing folder `out`."""
    task, brats, coco = out / MSD_FOLDER, out / BRATS_FOLDER, out / COCO_FOLDER
    for folder in (task / "imagesTr", task / "labelsTr", brats, coco):
        folder.mkdir(parents=True)
    export = CocoExport(coco)
    lesions = []
    for index, split in zip(range(subjects), coco_split_folders(subjects), strict=True):
        subject = synthesize_subject(index, seed)
        write_msd_subject(task, subject)
        write_brats_subject(brats, subject)
        export.add_subject(subject, split)
        lesions.append(subject.lesions)
    write_msd_description(task, subjects)
    manifest = {
        "generator": "study.data.phantom",
        "version": FORMAT_VERSION,
        "subjects": subjects,
        "seed": seed,
        "spacing_zyx_mm": list(SPACING_ZYX),
        "in_plane": IN_PLANE,
        "lesions_per_subject": lesions,
        "layouts": {"msd": MSD_FOLDER, "brats2023": BRATS_FOLDER, "coco": COCO_FOLDER},
        "coco_images": export.write(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_phantom(folder: Path) -> bool:
    """True when `folder` holds a complete phantom (its manifest is written last)."""
    return (folder / MANIFEST).is_file()


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"The phantom output {out} is a file; name a new or empty folder.")
    if out.is_dir() and not is_phantom(out) and any(out.iterdir()):
        raise UserError(
            f"The folder {out} holds other files and no phantom ({MANIFEST}); the phantom is "
            "written only into a new or empty folder (or over an earlier phantom). Name another folder."
        )


def _build_in_temp(out: Path, subjects: int, seed: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_phantom_layouts(temp, subjects, seed)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return temp


def generate_phantom(out: Path, subjects: int, seed: int = 0) -> None:
    """Write a phantom of `subjects` subjects from `seed` to `out`, replacing an earlier phantom.

    Built in a temporary sibling folder and renamed into place; `out` must be new, empty or
    an earlier phantom. UserError otherwise, or for fewer than one subject.
    """
    out = Path(out).expanduser().absolute()
    if subjects < 1:
        raise UserError(f"--subjects must be at least 1, got {subjects}.")
    _check_target(out)
    temp = _build_in_temp(out, subjects, seed)
    if is_phantom(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "phantom")
        os.replace(temp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, out)  # replaces an empty folder atomically


def ensure_phantom(out: Path, subjects: int, seed: int) -> bool:
    """Generate the phantom into `out` unless it already holds one; True when it generated.

    Safe against a concurrent generator: whichever rename lands first wins and the other
    build is discarded.
    """
    out = Path(out).expanduser().absolute()
    if is_phantom(out):
        return False
    _check_target(out)
    temp = _build_in_temp(out, subjects, seed)
    try:
        os.replace(temp, out)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        if is_phantom(out):
            return False
        raise
    return True


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, keyed by its relative path (for determinism checks)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m study.data.phantom",
        description="Write the synthetic brain-tumour phantom in the MSD, BraTS 2023 and COCO layouts.",
    )
    parser.add_argument("out", type=Path, help="output folder (new, empty, or an earlier phantom)")
    parser.add_argument("--subjects", type=int, default=8, help="number of subjects (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        generate_phantom(args.out, args.subjects, args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((args.out / MANIFEST).read_text())
    two = sum(1 for n in manifest["lesions_per_subject"] if n == 2)
    coco = ", ".join(f"{split} {n}" for split, n in manifest["coco_images"].items())
    print(
        f"Phantom: {args.subjects} subjects (seed {args.seed}, {two} with two lesions), "
        f"{IN_PLANE}x{IN_PLANE} voxels in-plane, {SLICE_RANGE[0]}-{SLICE_RANGE[1]} slices, "
        f"spacing {SPACING_ZYX[0]} x {SPACING_ZYX[1]} x {SPACING_ZYX[2]} mm, "
        f"in {time.perf_counter() - started:.1f} s\n"
        f"  {args.out / MSD_FOLDER}   MSD Task01 layout (reader msd_brain)\n"
        f"  {args.out / BRATS_FOLDER}   BraTS 2023 layout (reader brats)\n"
        f"  {args.out / COCO_FOLDER}   COCO export, PNG slices: {coco} (reader coco)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
