"""Seconds to verify a filled embedding cache: re-hashing every entry vs trusting verified markers.

    .venv/bin/python benchmarks/cache_verify.py [--entries 200] [--shape 256 64 64] [--repeats 3] [--work DIR]

Builds a cache of `--entries` entries the way the tests' concurrent-writer helper does: arrays
written straight through `EmbeddingCache.write` under a fake backbone name, no encoder, one
`image_embed` array per entry of `--shape` (default SAM ViT-B's 256 x 64 x 64 at 1024 pixels,
2 MiB in float16; filled with random values). `write` marks each entry as verified. Then it
times what the study's encode stage calls on every run, `ensure(verify=True)` over all records
(every entry a hit, so nothing is encoded), two ways:

- `full_check_s`: `ensure(verify=True, full_check=True)`, which recomputes every SHA-256 (what
  every verifying run did before markers, and what `--verify-cache` asks for);
- `trusted_s`: `ensure(verify=True)`, which trusts each entry's marker (size and mtime of its files).

Each is the median of `--repeats` passes, alternating. The files were just written, so the full
check reads them from the page cache: on a cold cache (after a reboot, or larger than RAM) it
is slower still, so `speedup` = full_check_s / trusted_s is a lower bound. `write_s` is the time
to write all entries (including flushing each to disk before its marker is written).

The last stdout line is one JSON object:
{"entries", "entry_bytes", "write_s", "full_check_s", "trusted_s", "speedup"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from foundation.embedding_cache import EmbeddingCache, EncodeCounts  # noqa: E402


def fake_records(count: int) -> list[SimpleNamespace]:
    """What `ensure` and `write` read of a SliceRecord, for `count` distinct images."""
    return [SimpleNamespace(image_sha256=hashlib.sha256(f"image-{i}".encode()).hexdigest(), image_id=f"img{i:05d}",
                            view=0, height=128, width=128) for i in range(count)]


def fake_backbone() -> SimpleNamespace:
    """What `ensure` reads of a backbone when every entry is a hit (it never encodes here)."""
    return SimpleNamespace(device="cpu", spec=SimpleNamespace(name="fake"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 64, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the cache (a temporary one by default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        cache = EmbeddingCache(Path(work), "fake", "w" * 16, 1024, "benchmark")
        records = fake_records(args.entries)
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for record in records:
            cache.write(record, {"image_embed": rng.standard_normal(args.shape, dtype=np.float32)})
        write_s = time.perf_counter() - started
        print(f"wrote {args.entries} entries in {write_s:.2f} s", file=sys.stderr)

        backbone, timings = fake_backbone(), {"full_check_s": [], "trusted_s": []}
        for _ in range(args.repeats):
            for key, full_check in (("full_check_s", True), ("trusted_s", False)):
                started = time.perf_counter()
                counts = cache.ensure(backbone, None, records, verify=True, full_check=full_check, progress=False)
                timings[key].append(time.perf_counter() - started)
                assert counts == EncodeCounts(hits=args.entries), counts
                print(f"{key[:-2]}: {timings[key][-1]:.3f} s", file=sys.stderr)
        full_check_s = statistics.median(timings["full_check_s"])
        trusted_s = statistics.median(timings["trusted_s"])
        print(json.dumps({"entries": args.entries, "entry_bytes": cache.entry_bytes(records[0]),
                          "write_s": round(write_s, 3), "full_check_s": round(full_check_s, 4),
                          "trusted_s": round(trusted_s, 4), "speedup": round(full_check_s / trusted_s, 1)}))


if __name__ == "__main__":
    main()
