"""What a worker process keeps between the trials it runs: one `Residency` object, owned by the worker.

The study runs many trials in one worker process (Ray Tune reuses its actors), so a worker keeps
what trials share instead of building it again for every trial:

- the built `Backbone` per (backbone, weights file, input size, device, with or without its
  image encoder), at most `MAX_RESIDENT_BACKBONES` of them; every trial starts by restoring the
  decoder and prompt encoder to the weights the backbone was built with, so no trial starts from
  another's training;
- the cache entries a trial reads, copied into RAM once per (cache namespace, prepared store),
  while they fit in the worker's share of the node's memory budget (else they are read
  memory-mapped per batch);
- the ground-truth masks per prepared store.

The memory budget is per node, not per process: `RESIDENT_NODE_FRACTION` of the node's memory
(the cgroup limit where one is set, as in a container, else physical memory) shared by the
trial workers that run on the node at once, so each worker may keep `budget / workers` bytes.

A process runs one trial at a time (Ray Tune's actors do): trials in parallel threads of one
process would share a backbone and must not.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from foundation.embedding_cache import EmbeddingCache, ResidentEmbeddings
from foundation.prepared_store import PreparedDataset, SliceRecord
from trainables.backbones import Backbone, build_backbone

MAX_RESIDENT_BACKBONES = 2
RESIDENT_NODE_FRACTION = 0.5  # of the node's memory, shared by its trial workers
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_FREED_MEMORY_RETAINED: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB with a fresh `mmap` and unmaps it on
    free, so each training step touches newly zeroed pages for its large activations: measured
    here, a LiteMedSAM decoder step on 8 images took 460,000 page faults and 1 s of kernel time
    (2.0 s wall); with this setting, no faults and 1.3 s. Process-wide and irreversible: all
    allocations then come from the heap (one arena, so threads share it), which keeps its peak
    size. Meant for worker processes that run trials; returns False where it does not apply
    (not Linux/glibc), True when set.
    """
    global _FREED_MEMORY_RETAINED
    if _FREED_MEMORY_RETAINED is None:
        _FREED_MEMORY_RETAINED = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _FREED_MEMORY_RETAINED = all(libc.mallopt(option, value) == 1 for option, value in (
                    (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
            except (OSError, AttributeError):
                pass
    return _FREED_MEMORY_RETAINED


def node_memory_bytes(cgroup_files=CGROUP_LIMITS) -> int:
    """The memory this node (container) may use: its cgroup limit where one is set, else physical memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    for path in cgroup_files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def weights_key(weights: str) -> tuple:
    """A weights file by identity (path, size, mtime), or ("random",)."""
    if weights == "random":
        return ("random",)
    path = Path(weights).expanduser().resolve()
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


class Residency:
    """The backbones, embeddings and masks one worker process keeps for its later trials.

    `workers_per_node` is how many trial workers share this node's memory budget (the study's
    Ray layer computes it from the node's resources and the trial's request).
    """

    def __init__(self, workers_per_node: int = 1, node_bytes: int | None = None):
        self.budget = int(RESIDENT_NODE_FRACTION * (node_bytes or node_memory_bytes()) / max(1, workers_per_node))
        self.backbones: OrderedDict[tuple, tuple[Backbone, dict[str, torch.Tensor]]] = OrderedDict()
        self.embeddings: OrderedDict[tuple[str, str], ResidentEmbeddings] = OrderedDict()
        self.masks: dict[tuple[str, str], dict[tuple[str, int], np.ndarray]] = {}

    def backbone(self, name: str, weights: str, input_size: int | None, device: str,
                 image_encoder: bool = True) -> Backbone:
        """The backbone, built once per process and restored to its built weights.

        Kept per (backbone, weights file identity, input size, device, image encoder or not); the
        least recently used is dropped beyond `MAX_RESIDENT_BACKBONES`. The mask decoder and
        prompt encoder get back the state they had when built, gradients are cleared and the
        model is in eval mode.
        """
        try:
            key = (name, weights_key(weights), input_size, str(device), image_encoder)
        except OSError:
            return build(name, weights, input_size, device, image_encoder)  # a missing file: let the build say so
        if key in self.backbones:
            self.backbones.move_to_end(key)
            backbone, pristine = self.backbones[key]
            backbone.load_trained_state_dict(pristine)
            for parameter in backbone.model.parameters():
                parameter.grad = None
            backbone.model.eval()
            return backbone
        backbone = build(name, weights, input_size, device, image_encoder)
        self.backbones[key] = (backbone, backbone.trained_state_dict())
        while len(self.backbones) > MAX_RESIDENT_BACKBONES:
            self.backbones.popitem(last=False)
        return backbone

    def held_embeddings(self, cache: EmbeddingCache) -> ResidentEmbeddings | None:
        return self.embeddings.get((str(cache.namespace), cache.prepared_key))

    def resident_embeddings(self, cache: EmbeddingCache, records: list[SliceRecord]) -> ResidentEmbeddings | None:
        """The entries of `records` in RAM, loading those not yet resident; None if they would not fit.

        Kept per (cache namespace, prepared-store key); older sets are dropped (least recently used
        first) to stay within this worker's budget. The entries must be in the cache already
        (`EmbeddingCache.ensure`).
        """
        key = (str(cache.namespace), cache.prepared_key)
        held = self.embeddings.pop(key, ResidentEmbeddings({}, {}))
        missing = [r for r in records if (r.image_id, r.view) not in held.rows]
        if missing:
            unique = len({(r.image_id, r.view) for r in missing})
            if held.nbytes + unique * cache.entry_bytes(missing[0]) > self.budget:
                if held.rows:
                    self.embeddings[key] = held
                return None
            held = held.merged(cache.load_resident(missing))
            while self.embeddings and held.nbytes + sum(e.nbytes for e in self.embeddings.values()) > self.budget:
                self.embeddings.popitem(last=False)
        self.embeddings[key] = held
        return held

    def masks_of(self, dataset: PreparedDataset) -> dict[tuple[str, int], np.ndarray]:
        return self.masks.setdefault((str(dataset.root), dataset.key), {})


def build(name: str, weights: str, input_size: int | None, device: str, image_encoder: bool = True) -> Backbone:
    """Build a backbone; without its image encoder when `image_encoder` is False (a trial on cached features)."""
    backbone = build_backbone(name, weights if weights == "random" else Path(weights), input_size=input_size,
                              device=device)
    if not image_encoder:
        backbone.drop_image_encoder()
    return backbone
