"""Subject-level train/val/test splits, so that slices of one patient never fall into two splits.

`split_subjects` assigns every subject one split:

1. A dataset's own split folders win (`SubjectEntry.split`, e.g. Roboflow's train/valid/test).
   When a dataset has split folders, a subject found outside them counts as training data.
2. Subjects without folders are shuffled with `seed` (in sorted-name order first, so the result
   does not depend on the order the reader listed them) and cut: the first n_test go to test,
   the next n_val to val, the rest to train.
3. A split the folders leave empty (e.g. only train and test folders, so no val) is carved out
   of the training subjects by its own fraction of them, the same way.

Rounding: n_val = round(val * n) and n_test = round(test * n), rounding halves up, where n is
the number of subjects being divided. A non-zero fraction gets at least one subject, and at
least one subject always stays in train; when both cannot hold, the larger of val/test gives
one up first (val on a tie). With 8 subjects and val 0.1, test 0.2: 1 val, 2 test, 5 train.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from study.data.volume import SubjectEntry
from foundation.errors import UserError


#: Split names as readers or folders may spell them -> the harness's names.
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "test": "test", "testing": "test"}


def split_counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(n_val, n_test) for n subjects, by the rounding rule in the module docstring."""

    def count(fraction: float) -> int:
        if fraction <= 0:
            return 0
        return max(1, math.floor(fraction * n + 0.5))

    n_val, n_test = count(val), count(test)
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _shuffled(subjects: Sequence[str], seed: int, purpose: str) -> list[str]:
    """`subjects` sorted, then permuted by a generator seeded from (seed, purpose)."""
    ordered = sorted(subjects)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode())])
    return [ordered[i] for i in rng.permutation(len(ordered))]


def _divide(subjects: Sequence[str], val: float, test: float, seed: int, purpose: str) -> dict[str, str]:
    n_val, n_test = split_counts(len(subjects), val, test)
    order = _shuffled(subjects, seed, purpose)
    return {s: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, s in enumerate(order)}


def split_subjects(entries: Sequence[SubjectEntry], val: float, test: float, seed: int) -> dict[str, str]:
    """subject -> "train" | "val" | "test" for every entry (see the module docstring for the rules)."""
    folder_split: dict[str, str] = {}
    for entry in entries:
        split = None if entry.split is None else _SPLIT_NAMES.get(str(entry.split).lower())
        if entry.split is not None and split is None:
            raise UserError(
                f"Subject {entry.subject} comes from a split folder called {entry.split!r}, which is not "
                f"train, val (valid) or test. Rename the folder to one of those."
            )
        previous = folder_split.get(entry.subject)
        if previous is not None and split is not None and previous != split:
            raise UserError(
                f"Subject {entry.subject} appears in both the {previous} and the {split} split folders "
                f"({', '.join(map(str, entry.files))}), so its slices would leak between splits. "
                f"Remove one copy."
            )
        if split is not None:
            folder_split[entry.subject] = split
    subjects = sorted({entry.subject for entry in entries})
    if not folder_split:
        return _divide(subjects, val, test, seed, "subjects")

    assigned = {s: folder_split.get(s, "train") for s in subjects}
    train = [s for s in subjects if assigned[s] == "train"]
    missing_val = val > 0 and "val" not in assigned.values()
    missing_test = test > 0 and "test" not in assigned.values()
    if missing_val or missing_test:
        carved = _divide(train, val if missing_val else 0.0, test if missing_test else 0.0, seed, "carve")
        assigned.update(carved)
    return assigned
