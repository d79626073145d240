"""Naming conventions that differ between datasets: target regions, modality names, split folders.

Every dataset numbers its labels its own way. A user names a target (``whole_tumor``, ``liver``,
``all``); the tables here say which label values make up that target in each dataset's
convention, so a reader turns a label volume into the binary target mask with
``np.isin(labels, values)``. Modality names are normalised the same way (the MSD ``T1gd``, the
BraTS 2021 ``t1ce`` and the BraTS 2023 ``t1c`` are all ``t1gd``), as are split folder names
(Roboflow's ``valid`` is ``val``).

Sources of the conventions:
- MSD Task01_BrainTumour ``dataset.json``: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
- BraTS 2021 (Baid et al. 2021, arXiv:2107.02314): 1 necrotic and non-enhancing tumour core
  (NCR), 2 peritumoral edema (ED), 4 GD-enhancing tumour (ET).
- BraTS 2023 glioma challenge: 1 non-enhancing tumour core (NETC), 2 surrounding non-enhancing
  FLAIR hyperintensity (SNFH, the edema), 3 enhancing tumour (ET).
- BTCV (Synapse multi-organ, MICCAI 2015 "Beyond the Cranial Vault"): 13 abdominal organs.
The composite regions follow the BraTS definitions: whole tumour = every tumour label, tumour
core = whole tumour without the edema, enhancing = the enhancing label alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from foundation.errors import UserError

#: The brain-tumour regions every brain reader offers, in the order they are listed to users.
BRAIN_REGIONS: tuple[str, ...] = ("whole_tumor", "tumor_core", "enhancing", "edema", "non_enhancing")

#: MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
MSD_BRAIN_LABELS: dict[str, tuple[int, ...]] = {
    "whole_tumor": (1, 2, 3),
    "tumor_core": (2, 3),
    "enhancing": (3,),
    "edema": (1,),
    "non_enhancing": (2,),
}

#: BraTS 2021: 1 NCR (necrotic / non-enhancing core), 2 ED (edema), 4 ET (enhancing).
BRATS2021_LABELS: dict[str, tuple[int, ...]] = {
    "whole_tumor": (1, 2, 4),
    "tumor_core": (1, 4),
    "enhancing": (4,),
    "edema": (2,),
    "non_enhancing": (1,),
}

#: BraTS 2023: 1 NETC (non-enhancing core), 2 SNFH (edema), 3 ET (enhancing).
BRATS2023_LABELS: dict[str, tuple[int, ...]] = {
    "whole_tumor": (1, 2, 3),
    "tumor_core": (1, 3),
    "enhancing": (3,),
    "edema": (2,),
    "non_enhancing": (1,),
}

#: BTCV organ label values, named in snake_case after the challenge's organ list.
BTCV_ORGANS: dict[str, int] = {
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_and_splenic_vein": 10,
    "pancreas": 11,
    "right_adrenal_gland": 12,
    "left_adrenal_gland": 13,
}

#: BTCV targets: every organ alone, and `all` for the union of the 13 organs.
BTCV_LABELS: dict[str, tuple[int, ...]] = {
    "all": tuple(BTCV_ORGANS.values()),
    **{organ: (value,) for organ, value in BTCV_ORGANS.items()},
}

#: How modality names in file names and dataset.json files map to the normalised names.
MODALITY_ALIASES: dict[str, str] = {
    "flair": "flair",
    "t2f": "flair",
    "t2-flair": "flair",
    "t2flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1gd": "t1gd",
    "t1ce": "t1gd",
    "t1c": "t1gd",
    "t1-gd": "t1gd",
    "t1post": "t1gd",
    "t2": "t2w",
    "t2w": "t2w",
    "ct": "ct",
    "red": "red",
    "green": "green",
    "blue": "blue",
    "grey": "grey",
    "gray": "grey",
}

#: MSD Task01 channel order (dataset.json: FLAIR, T1w, t1gd, T2w), normalised.
MSD_MODALITY_ORDER: tuple[str, ...] = ("flair", "t1", "t1gd", "t2w")

#: BraTS 2021 file-name suffixes (`BraTS2021_00000_t1ce.nii.gz`) -> normalised modality.
BRATS2021_SUFFIXES: dict[str, str] = {"flair": "flair", "t1": "t1", "t1ce": "t1gd", "t2": "t2w"}

#: BraTS 2023 file-name suffixes (`BraTS-GLI-00000-000-t1c.nii.gz`) -> normalised modality.
BRATS2023_SUFFIXES: dict[str, str] = {"t2f": "flair", "t1n": "t1", "t1c": "t1gd", "t2w": "t2w"}

#: The three channels of a kaggle_3m LGG slice, in file order: pre-contrast, FLAIR, post-contrast.
LGG_CHANNELS: tuple[str, ...] = ("t1", "flair", "t1gd")

#: Split folder names as datasets spell them -> the harness's split names.
SPLIT_FOLDER_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def normalise_modality(name: str) -> str:
    """The normalised modality name for `name` (case-insensitive), e.g. ``T1ce`` -> ``t1gd``.

    Raises UserError naming the value and the accepted spellings when it is unknown.
    """
    key = name.strip().lower().replace("_", "-")
    if key in MODALITY_ALIASES:
        return MODALITY_ALIASES[key]
    if key.replace("-", "") in MODALITY_ALIASES:
        return MODALITY_ALIASES[key.replace("-", "")]
    raise UserError(
        f"Unknown modality name {name!r}. Accepted names (case-insensitive): "
        f"{', '.join(sorted(MODALITY_ALIASES))}; they normalise to flair, t1, t1gd, t2w, ct, "
        "red, green, blue or grey."
    )


def split_from_folder(name: str) -> str | None:
    """The split (train, val, test) a dataset folder called `name` stands for, or None."""
    return SPLIT_FOLDER_NAMES.get(name.lower())


def target_label_values(target: str, table: Mapping[str, tuple[int, ...]], dataset: str) -> tuple[int, ...]:
    """The label values that make up `target` in `dataset`'s convention `table`.

    Raises UserError naming the target and listing the valid ones when `target` is unknown.
    """
    if target in table:
        return table[target]
    raise UserError(
        f"Unknown target {target!r} for the {dataset} dataset. Valid targets: "
        f"{', '.join(table)}. Set data.target in grid.yaml to one of them."
    )


def target_mask(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of `values` (same shape as `labels`)."""
    return np.isin(labels, values)
