"""The embedding cache: each image is passed through a frozen image encoder once, then shared.

An entry holds what the mask decoder needs from the encoder for one prepared image: the image
embedding and, for SAM 2, the two high-resolution feature maps *after* the decoder's frozen
`conv_s0`/`conv_s1` projections (so those two projections stay frozen in every decoder fine-tune; see
trainables/backbones/sam2.py). Entries are

- keyed by content. A namespace folder per (backbone name, weights identity, input size,
  preprocessing id) — the preprocessing id hashes the backbone's input contract (resize rule,
  normalisation, input size) and this module's `CACHE_FORMAT` — and within it one entry per
  distinct image, named by the image's own content hash (`SliceRecord.image_sha256`: SHA-256 of
  the stored image array's dtype, shape and bytes, computed when the prepared store is written).
  An entry is therefore a function of (backbone, weights, input size, preprocessing, image
  pixels) and nothing else: any change of data preprocessing or augmentation changes the pixels
  and so the key, and is never served a stale embedding, while the same image in two prepared
  stores — the same slice, or the same augmented view, in the stores of two `data.target`s,
  whose images do not depend on the target — is one entry, encoded once:

      <root>/embeddings/<backbone>/<weights[:16]>-s<size>-p<prep[:8]>[-prefix<k>]/<h[:2]>/<h[:32]>/
          image_embed.npy  [high_res_0.npy  high_res_1.npy]  meta.json

  A partial-encoder cache (`tuned_blocks` k, for trials that tune the encoder's last k blocks)
  is the same with ``-prefix<k>`` in the namespace and the frozen prefix's output in the entry
  (``tokens.npy`` entering block N - k, and for SAM 2 ``stage_<i>.npy``, the outputs of the
  stages that ended before it, which its FPN neck reads);

- float16 `.npy` files, read memory-mapped (`load`), or copied once into RAM for a process that
  reads them many times (`load_resident`);
- written atomically: an entry is built in a private temp folder and renamed into place, so the
  entry's path holds either nothing or a complete entry, never half of one. When several
  processes write one entry at once, the first rename wins and the others discard their copy. A
  corrupt entry is first renamed away (to a temp name), then deleted, then replaced;
- checked: `meta.json` records each array's shape, file size and SHA-256. `is_valid` always
  checks that every file is there with its recorded size and a readable header of the recorded
  shape (this catches truncation and most damage); with `verify=True` it also makes sure of
  every array's checksum, cheaply where it can (below). `ensure` encodes what is missing or
  invalid, and removes temp folders that a killed writer left behind more than an hour ago;
- verified once, then trusted by their files' size and mtime: an entry whose arrays all passed
  a full check (every SHA-256 recomputed and equal to meta.json's) gets a marker file,
  `verified.json`, holding the size and `st_mtime_ns` of meta.json and of each array file. A
  later `verify=True` check that finds the marker, and every file with the size and mtime the
  marker records, trusts the entry without reading its arrays; any difference, or no marker, or
  an unreadable one, falls back to the full check (which, when it passes, writes the marker
  again). `write` marks its own entries at once, since it has just computed their checksums. So
  an entry is hashed once (when written, or on the first verifying run of a cache made before
  markers), not on every resumed study. What this misses: bytes changed in place with the
  file's size and mtime left as they were (a bit flipped on the disk, or a rewrite whose mtime
  was set back with os.utime). `full_check=True` (in `is_valid` and `ensure`) ignores the markers
  and recomputes every checksum, which catches those too. Truncation, and any rewrite through
  the file system, change the size or the mtime and are caught without it: the files of a new
  entry are dated 2 s back, so that even a rewrite within the same tick of a coarse file-system
  clock (up to 2 s on FAT, 1 s on ext3) gets another mtime. A cache on read-only storage, where
  no marker can be written, is simply hashed on every verifying check, as before.

Array files and meta.json are flushed to disk (fsync) before a marker is written for them, so a
machine crash cannot leave a marker vouching for data that never reached the disk; the marker
itself and the rest are not fsync'ed: a crash may leave a damaged entry or lose a marker, which
`ensure(verify=True)` detects (the damaged entry by its size or mtime, or by the full check that
a missing marker leads to) and recomputes.

`EncodeCounts` tells callers how many entries were hits, misses and corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from foundation.prepared_store import PreparedDataset, SliceRecord

#: Bumped whenever what an entry holds or how it is laid out changes; part of the namespace name.
#: 2: entries keyed by the image's content (`SliceRecord.image_sha256`), not by store, id and view.
CACHE_FORMAT = 2
META_FILE = "meta.json"
#: The marker of an entry that passed a full check: {"format": 1, "files": {name: [bytes, mtime_ns]}}.
VERIFIED_FILE = "verified.json"
VERIFIED_FORMAT = 1
TEMP_PREFIX = ".tmp-"
#: How far back `write` dates a new entry's files (more than the coarsest common mtime step).
BACKDATE_NS = 2_000_000_000

#: Images per encoder call on each device type when `ensure` is not told. On CPU, one image at a
#: time is fastest (measured on the 2-core development machine: LiteMedSAM's TinyViT 0.8 s per
#: image alone vs 1.4 s per image in batches of 8; SAM 2 Hiera-T at 1024 pixels 2.6 s alone vs
#: 3.2 s per image in pairs), as batched activations no longer fit the CPU caches, and SAM's
#: ViT-B at 1024 pixels takes about 3 GB of memory per image in one call. GPUs gain from batching.
DEFAULT_ENCODE_BATCH = {"cpu": 1, "cuda": 8, "mps": 4}


@dataclass
class EncodeCounts:
    """Entries an `ensure` call found valid (hits), absent (misses) or invalid (corrupt).

    Misses and corrupt entries are the ones it encoded (`encoded`).
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0

    @property
    def encoded(self) -> int:
        return self.misses + self.corrupt

    def __add__(self, other: EncodeCounts) -> EncodeCounts:
        return EncodeCounts(self.hits + other.hits, self.misses + other.misses, self.corrupt + other.corrupt)


def preprocessing_id(spec, input_size: int) -> str:
    """A hash of what turns a prepared image into encoder input (a backbone's spec at `input_size`),
    and of CACHE_FORMAT."""
    normalisation = spec.normalisation
    described = {
        "format": CACHE_FORMAT,
        "family": spec.family,
        "resize": spec.resize,
        "input_size": int(input_size),
        "normalisation": [normalisation.kind, normalisation.value_scale, normalisation.mean, normalisation.std],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _file_stats(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """{file name: [size in bytes, st_mtime_ns]} of the files `names` in `folder`: what a marker records."""
    stats = {}
    for name in names:
        stat = os.stat(folder / name)
        stats[name] = [stat.st_size, stat.st_mtime_ns]
    return stats


def _flush_to_disk(paths: list[Path]) -> None:
    """fsync each file (cheap for a file whose data is on disk already); raises OSError if one fails."""
    for path in paths:
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _read_marker(folder: Path) -> dict | None:
    """The file stats an entry's marker records, or None when it has none or it cannot be read."""
    try:
        marker = json.loads((folder / VERIFIED_FILE).read_text())
        return marker["files"] if marker.get("format") == VERIFIED_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_marker(folder: Path, stats: dict[str, list[int]]) -> bool:
    """Write `folder`'s marker atomically (a temp file renamed over it); False if it could not be.

    Not `foundation.files.write_atomic`: that creates a missing folder, and an entry discarded by
    another process meanwhile must not come back as a folder holding only a marker (here the
    write then just fails). The marker is not fsync'ed: one lost in a crash only costs a re-hash.
    """
    temp = folder / f"{TEMP_PREFIX}{VERIFIED_FILE}.{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(temp, "x") as handle:
            json.dump({"format": VERIFIED_FORMAT, "files": stats}, handle)
        os.replace(temp, folder / VERIFIED_FILE)
        return True
    except OSError:  # the folder is gone (discarded) or read-only
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        return False


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header, without reading or mapping the data."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"{path} has .npy format version {version}, which this cache does not write")
    if fortran:
        raise ValueError(f"{path} is stored in Fortran order")
    return tuple(shape), dtype


class EmbeddingCache:
    """The cache entries of one backbone (name, weights, input size, preprocessing), read for one
    prepared store; `prepared_key` names that store (the entries themselves are shared by every
    store that holds the same image)."""

    def __init__(self, root: Path, backbone_name: str, weights_id: str, input_size: int, prepared_key: str,
                 *, preprocessing: str = "", tuned_blocks: int | None = None):
        prep = f"-p{preprocessing[:8]}" if preprocessing else ""
        prefix = "" if tuned_blocks is None else f"-prefix{int(tuned_blocks)}"
        self.root = Path(root)
        self.namespace = self.root / "embeddings" / backbone_name / f"{weights_id[:16]}-s{input_size}{prep}{prefix}"
        self.prepared_key = prepared_key
        self.tuned_blocks = tuned_blocks
        self.counts = EncodeCounts()

    @classmethod
    def for_backbone(cls, root: Path, backbone, prepared_key: str, tuned_blocks: int | None = None) -> EmbeddingCache:
        return cls.for_model(root, backbone.spec, backbone.weights_id, backbone.input_size, prepared_key, tuned_blocks)

    @classmethod
    def for_model(cls, root: Path, spec, weights_id: str, input_size: int, prepared_key: str,
                  tuned_blocks: int | None = None) -> EmbeddingCache:
        """The cache of a model named by its spec, weights id and input size, without building it
        (what the driver checks before it starts any encode worker). With `tuned_blocks` k, the
        partial-encoder cache: the frozen prefix's output before the encoder's last k blocks
        (`Backbone.cache_features`), in a namespace of its own beside the embeddings'."""
        return cls(root, spec.name, weights_id, input_size, prepared_key,
                   preprocessing=preprocessing_id(spec, input_size), tuned_blocks=tuned_blocks)

    # --- one entry ------------------------------------------------------------------------------

    def entry_dir(self, record: SliceRecord) -> Path:
        """The entry of `record`'s image: named by its content hash, whichever store it is from."""
        digest = record.image_sha256
        if len(digest) != 64:
            raise ValueError(f"the record of image {record.image_id!r} (view {record.view}) has no image_sha256; "
                             f"it comes from a prepared store older than this cache (prepare the data again)")
        return self.namespace / digest[:2] / digest[:32]

    def is_valid(self, record: SliceRecord, verify: bool = False, *, full_check: bool = False) -> bool:
        """Whether the entry is complete: every array file present with its recorded size, and a
        float16 header of the recorded shape.

        With `verify`, also whether every array's SHA-256 is the recorded one: trusted without
        hashing when the entry's marker records every file's current size and mtime, otherwise
        recomputed (and, when all match, the marker written, so that the next check is cheap).
        `full_check` (implies `verify`) ignores the marker and always recomputes the checksums:
        the only check that catches bytes changed in place with the file's size and mtime kept.
        A failed checksum removes the marker.
        """
        folder = self.entry_dir(record)
        try:
            meta_stat = os.stat(folder / META_FILE)  # before reading: a marker must not vouch for a later meta.json
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("format") != CACHE_FORMAT or not meta["arrays"]:
                return False
            stats = {META_FILE: [meta_stat.st_size, meta_stat.st_mtime_ns]}
            for name, info in meta["arrays"].items():
                path = folder / f"{name}.npy"
                stat = os.stat(path)
                if stat.st_size != info["bytes"]:
                    return False
                shape, dtype = _read_npy_header(path)
                if list(shape) != info["shape"] or dtype != np.float16:
                    return False
                stats[path.name] = [stat.st_size, stat.st_mtime_ns]
            if not (verify or full_check):
                return True
            if not full_check and _read_marker(folder) == stats:
                return True  # verified before, and no file changed since
            for name, info in meta["arrays"].items():
                if _sha256(np.load(folder / f"{name}.npy", mmap_mode="r")) != info["sha256"]:
                    (folder / VERIFIED_FILE).unlink(missing_ok=True)
                    return False
            if _file_stats(folder, list(stats)) == stats:  # nothing changed while hashing
                self._mark(folder, stats)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            return False
        return True

    def is_verified(self, record: SliceRecord) -> bool:
        """Whether the entry passed a full check before and none of its files changed since: its
        marker records meta.json's and every array file's current size and mtime. Reads the
        marker and stats the files only, so it answers for a whole cache in a moment (the driver's
        check before it starts any encode worker); False means "ask `is_valid`", not "invalid"."""
        folder = self.entry_dir(record)
        marker = _read_marker(folder)
        if not marker or META_FILE not in marker:
            return False
        try:
            return _file_stats(folder, list(marker)) == marker
        except OSError:
            return False

    def write(self, record: SliceRecord, arrays: dict[str, np.ndarray]) -> bool:
        """Store one entry atomically as float16; if another writer got there first, keep theirs.

        Returns True when this call's entry was put in place, False when a valid entry was there
        (or arrived) first. Values beyond float16's range are an error (they would come back as
        infinities).
        """
        final = self.entry_dir(record)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent))
        try:
            # image_id, view and prepared_key say which record was encoded first (others may share it)
            meta = {"format": CACHE_FORMAT, "image_sha256": record.image_sha256, "image_id": record.image_id,
                    "view": record.view, "prepared_key": self.prepared_key, "arrays": {}}
            for name, array in arrays.items():
                with np.errstate(over="ignore", invalid="ignore"):
                    half = np.ascontiguousarray(array, dtype=np.float16)
                if not np.isfinite(half).all():
                    raise ValueError(f"the {name} features of image {record.image_id!r} (view {record.view}) hold "
                                     f"values that are not finite in float16; they cannot be cached")
                path = temp / f"{name}.npy"
                np.save(path, half)
                meta["arrays"][name] = {"shape": list(half.shape), "bytes": os.stat(path).st_size,
                                        "sha256": _sha256(half)}
            (temp / META_FILE).write_text(json.dumps(meta))
            self._mark_new_entry(temp, [META_FILE] + [f"{name}.npy" for name in meta["arrays"]])
            if final.exists() and not self.is_valid(record, full_check=True):
                self._discard(final)  # a corrupt entry is replaced (one whose marker is fooled, too)
            try:
                os.rename(temp, final)
                return True
            except OSError:
                # The path is taken: a concurrent writer renamed a complete entry first.
                if not self.is_valid(record):
                    raise
                return False
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    @staticmethod
    def _mark(folder: Path, stats: dict[str, list[int]]) -> None:
        """Write the marker of an entry whose checksums all matched, once its files are on disk.
        If they cannot be flushed (or the marker written), the entry stays unmarked: hashed when
        next verified, and valid all the same."""
        try:
            _flush_to_disk([folder / name for name in stats])
        except OSError:
            return
        _write_marker(folder, stats)

    @classmethod
    def _mark_new_entry(cls, folder: Path, names: list[str]) -> None:
        """Mark an entry just written (its checksums just computed): date its files back
        (`BACKDATE_NS`, so that any later rewrite changes their mtime), then `_mark` it."""
        for name in names:
            back = os.stat(folder / name).st_mtime_ns - BACKDATE_NS
            os.utime(folder / name, ns=(back, back))
        cls._mark(folder, _file_stats(folder, names))

    @staticmethod
    def _discard(folder: Path) -> None:
        """Remove an entry by renaming it away first, so its path never holds a half-deleted entry."""
        trash = folder.parent / f"{TEMP_PREFIX}{folder.name}.discard-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.rename(folder, trash)
        except OSError:
            return  # another process moved it already
        shutil.rmtree(trash, ignore_errors=True)

    def load(self, record: SliceRecord) -> dict[str, np.ndarray]:
        """One entry's arrays, memory-mapped read-only (float16)."""
        folder = self.entry_dir(record)
        meta = json.loads((folder / META_FILE).read_text())
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}

    def load_batch(self, records: list[SliceRecord], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Entries of several records stacked into float32 tensors (N, C, h, w) on `device`."""
        entries = [self.load(r) for r in records]
        return {name: torch.from_numpy(np.stack([e[name] for e in entries])).to(device=device, dtype=torch.float32)
                for name in entries[0]}

    def load_resident(self, records: list[SliceRecord]) -> ResidentEmbeddings:
        """Copy the entries of `records` into RAM, one float16 tensor per array name."""
        unique = list({(r.image_id, r.view): r for r in records}.values())
        if not unique:
            return ResidentEmbeddings({}, {})
        first = self.load(unique[0])
        arrays = {name: torch.empty((len(unique), *value.shape), dtype=torch.float16) for name, value in first.items()}
        for row, record in enumerate(unique):
            entry = first if row == 0 else self.load(record)
            for name, value in entry.items():
                arrays[name][row].numpy()[...] = value
        return ResidentEmbeddings({(r.image_id, r.view): row for row, r in enumerate(unique)}, arrays)

    def entry_bytes(self, record: SliceRecord) -> int:
        """Bytes one entry takes on disk (its array files, meta.json and its marker)."""
        return sum(path.stat().st_size for path in self.entry_dir(record).iterdir())

    def remove_stale_temp_folders(self, older_than_s: float = 3600.0) -> int:
        """Delete temp folders a killed writer left in this namespace (untouched for `older_than_s`);
        younger ones may belong to a writer still at work. Returns how many were deleted."""
        removed = 0
        now = time.time()
        for temp in self.namespace.glob(f"*/{TEMP_PREFIX}*"):
            try:
                if now - temp.stat().st_mtime > older_than_s:
                    shutil.rmtree(temp, ignore_errors=True)
                    removed += 1
            except OSError:
                pass
        return removed

    # --- filling ----------------------------------------------------------------------------------

    def ensure(self, backbone, dataset: PreparedDataset, records: list[SliceRecord], *, batch_size: int | None = None,
               verify: bool = True, full_check: bool = False, progress: bool = True) -> EncodeCounts:
        """Encode every record not yet validly cached, in batches of images of equal size.

        `batch_size` None takes `DEFAULT_ENCODE_BATCH` for the backbone's device type. Returns the
        counts of this call (also added to `self.counts`), one per distinct image (entry): hits
        were already cached (by this store or by another holding the same image), misses were
        encoded now, corrupt ones failed `is_valid(verify=verify, full_check=full_check)` and were
        encoded again. With `verify`, entries verified before are trusted by their files' size and
        mtime (see the module docstring); `full_check` re-hashes every entry regardless (slow on a
        large cache, but it also catches damage that kept a file's size and mtime).
        Safe to run in several processes at once (each entry is written atomically); it can run
        inside a Ray task, as it takes and returns plain objects.
        """
        if batch_size is None:
            batch_size = DEFAULT_ENCODE_BATCH.get(torch.device(backbone.device).type, 1)
        self.remove_stale_temp_folders()
        counts = EncodeCounts()
        pending: dict[tuple[int, int], list[SliceRecord]] = defaultdict(list)
        seen: set[str] = set()
        for record in records:
            if record.image_sha256 in seen:  # one entry per distinct image
                continue
            seen.add(record.image_sha256)
            if self.is_valid(record, verify=verify, full_check=full_check):
                counts.hits += 1
                continue
            if self.entry_dir(record).exists():
                counts.corrupt += 1
            else:
                counts.misses += 1
            pending[(record.height, record.width)].append(record)
        todo = counts.encoded
        bar = tqdm(total=todo, desc=f"encode {backbone.spec.name}", unit="img", disable=not progress or todo == 0)
        for group in pending.values():
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                images = np.stack([dataset.load(r)[0] for r in batch])
                with torch.no_grad():
                    features = backbone.cache_features(backbone.preprocess(images), self.tuned_blocks)
                features = {name: value.to("cpu", torch.float32).numpy() for name, value in features.items()}
                for row, record in enumerate(batch):
                    self.write(record, {name: value[row] for name, value in features.items()})
                bar.update(len(batch))
        bar.close()
        self.counts = self.counts + counts
        return counts


class ResidentEmbeddings:
    """Cache entries held in RAM: one float16 tensor (N, C, h, w) per array name, and the row of
    each (image id, view). Made by `EmbeddingCache.load_resident`."""

    def __init__(self, rows: dict[tuple[str, int], int], arrays: dict[str, torch.Tensor]):
        self.rows = rows
        self.arrays = arrays

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    def covers(self, records: list[SliceRecord]) -> bool:
        return all((r.image_id, r.view) in self.rows for r in records)

    def merged(self, other: ResidentEmbeddings) -> ResidentEmbeddings:
        """This set plus the entries of `other` that it lacks."""
        if not self.rows:
            return other
        extra = [key for key in other.rows if key not in self.rows]
        if not extra:
            return self
        index = torch.tensor([other.rows[key] for key in extra])
        arrays = {name: torch.cat([value, other.arrays[name].index_select(0, index)]) for name, value in self.arrays.items()}
        rows = dict(self.rows)
        rows.update({key: len(self.rows) + i for i, key in enumerate(extra)})
        return ResidentEmbeddings(rows, arrays)

    def batch(self, records: list[SliceRecord], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The entries of `records`, stacked as float32 tensors (N, C, h, w) on `device`."""
        index = torch.tensor([self.rows[(r.image_id, r.view)] for r in records])
        return {name: value.index_select(0, index).to(device=device, non_blocking=True).float()
                for name, value in self.arrays.items()}
