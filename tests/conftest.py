"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest

from study.config import StudyConfig, config_from_dict
from foundation.prepared_store import PreparedDataset
from study.data.prepare import prepare_dataset


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> tuple[StudyConfig, PreparedDataset]:
    """A small prepared phantom, made once per session: (config, PreparedDataset).

    The phantom reader's 8 subjects (generated under the fixture's folder), whole tumour, axial
    slices (128 x 128 pixels), subjects split 4 train / 2 val / 2 test. Train and val: slices with
    at least 50 pixels, 8 per split (limit), one augmented view per training slice. Test: the
    limit takes whole subjects, so one test subject with every slice that holds tumour (12 slices,
    some under 50 pixels). `config.cache_dir` is the
    fixture's own cache folder (prepared store and embeddings); treat the store as read-only.
    """
    base = tmp_path_factory.mktemp("phantom_dataset")
    config = config_from_dict({
        "study": {"name": "fixture", "out": str(base / "runs"), "cache_dir": str(base / "cache"), "seed": 0},
        "data": {
            "reader": "phantom",
            "root": str(base / "phantom"),
            "target": "whole_tumor",
            "slicing": {"axis": "axial", "min_area": 50, "keep_empty": 0},
            "split": {"val": 0.25, "test": 0.25},
            "augment": {"views": 1, "rotate_deg": 20, "elastic": True},
            "limit": 8,
        },
    })
    return config, prepare_dataset(config, progress=False)


@pytest.fixture(scope="session")
def two_target_datasets(phantom_dataset) -> tuple[StudyConfig, dict[str, PreparedDataset]]:
    """The `phantom_dataset` config with `data.target: [whole_tumor, tumor_core]`: (config, target -> store).

    The whole-tumour store is the fixture's own (the same key); the tumour-core store is prepared
    once into the same cache folder. Treat both as read-only.
    """
    config, whole = phantom_dataset
    several = config.model_copy(update={"data": config.data.model_copy(update={"target": ("whole_tumor", "tumor_core")})})
    return several, {"whole_tumor": prepare_dataset(several, progress=False, target="whole_tumor"),
                     "tumor_core": prepare_dataset(several, progress=False, target="tumor_core")}
