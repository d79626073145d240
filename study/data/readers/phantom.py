"""Reader for the synthetic phantom: generates it on first use, then reads its MSD layout.

`index(root)` writes the phantom (8 subjects, seed 0 by default) into `root` when `root` does not
hold one yet, atomically (built in a temporary sibling folder, then renamed), and reads
`root/Task01_BrainTumour` exactly as the msd_brain reader does. This is the embedded default
data set: a study needs no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from study.data.phantom import MSD_FOLDER, ensure_phantom
from study.data.readers.msd_brain import MsdBrainReader
from study.data.volume import SubjectEntry, Volume

PHANTOM_SUBJECTS = 8
PHANTOM_SEED = 0


class PhantomReader:
    """The phantom's MSD Task01 layout, generated into `root` on first use."""

    name = "phantom"
    kind = MsdBrainReader.kind
    modalities = MsdBrainReader.modalities
    default_modalities = MsdBrainReader.default_modalities
    default_strategy = MsdBrainReader.default_strategy
    default_target = MsdBrainReader.default_target
    volumetric = MsdBrainReader.volumetric

    def __init__(self, subjects: int = PHANTOM_SUBJECTS, seed: int = PHANTOM_SEED) -> None:
        self.subjects = subjects
        self.seed = seed
        self._msd = MsdBrainReader()

    def index(self, root: Path) -> list[SubjectEntry]:
        """Generate the phantom into `root` if it is not there yet, then index its MSD layout."""
        root = Path(root).expanduser().absolute()
        ensure_phantom(root, self.subjects, self.seed)
        return self._msd.index(root / MSD_FOLDER)

    def targets(self, entries: Sequence[SubjectEntry]) -> tuple[str, ...]:
        return self._msd.targets(entries)

    def load_mask(self, entry: SubjectEntry, target: str) -> tuple[np.ndarray, list[str]]:
        return self._msd.load_mask(entry, target)

    def load(self, entry: SubjectEntry, target: str) -> Volume:
        return self._msd.load(entry, target)
