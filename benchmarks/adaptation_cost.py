"""Seconds per epoch of a late-block trial on the partial-encoder cache vs computing the prefix in the loop.

    .venv/bin/python benchmarks/adaptation_cost.py [--images 8] [--val-images 4] [--epochs 2]
        [--backbones litemedsam] [--blocks 2] [--batch-size 8] [--work DIR] [--threads N]

For each backbone, one configuration (AdamW, lr 1e-4, Dice+BCE, box prompts) is trained three ways,
each on its own copy of the backbone, epoch by epoch in turn (so other load on the machine touches
all alike):

- `late_cached`: the `late_blocks` arm as a trial runs it: the frozen prefix (every block but the
  last `--blocks`) is computed once per image into the partial-encoder cache (`cache_fill_s`),
  read into RAM, and every step runs the tuned blocks, the neck and the decoder.
- `late_in_loop`: the same trial computing the prefix for every batch under `no_grad`
  (`EncoderInTheLoop` with `tuned_blocks`), rounded to float16 like a cache entry, so the two take
  the same steps on the same numbers (`loss_max_rel_diff` checks it).
- `decoder`: the decoder arm on the cached embeddings, for scale.

An epoch is a trial's epoch: the training pass over `--images` slices plus the validation pass on
`--val-images`. `*_s_per_epoch` is the mean over `--epochs` after one unmeasured step per way;
speedup = late_in_loop_s_per_epoch / late_cached_s_per_epoch. `cache_bytes_per_image` is one
partial-cache entry on disk (`embedding_bytes_per_image` one embedding entry). LiteMedSAM runs
with its packaged weights; any other backbone with random weights at its real input size.
`max_load_average` is the highest 1-minute load average seen (much above 2 on this 2-core
machine means other processes competed and the timings are inflated).

The last line on stdout is one JSON object: {"results": [{...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from benchmarks.cache_speedup import add_common_arguments, log, measure_backbones  # noqa: E402
from foundation.embedding_cache import EmbeddingCache  # noqa: E402
from trainables.backbones import build_backbone, resolve_weights  # noqa: E402
from trainables.fine_tune import DecoderFineTune, EncoderInTheLoop, TrialSpec  # noqa: E402
from trainables.residency import retain_freed_memory  # noqa: E402


def measure(name: str, dataset, work: Path, args) -> dict:
    weights = str(resolve_weights(name, None, {})) if name == "litemedsam" else "random"
    train = dataset.records_for("train")
    val = dataset.records_for("val")[: args.val_images]
    root = work / "cache" / f"bench-{time.time_ns()}"
    runs, cache_fill_s, sizes = {}, None, {}
    for way in ("late_cached", "late_in_loop", "decoder"):
        kind = "decoder" if way == "decoder" else "late_blocks"
        spec = TrialSpec(trial_id=f"{way}-{name}", backbone=name, weights=weights, prompt="box", epochs=args.epochs,
                         batch_size=args.batch_size, optimizer="adamw", loss="dice_bce", lr=1e-4, adaptation=kind,
                         adapt_blocks=args.blocks)
        backbone = build_backbone(name, weights)
        backbone.adapt(spec.adaptation_arm)
        if way == "late_in_loop":
            source = EncoderInTheLoop(backbone, dataset, max_batch=1, tuned_blocks=args.blocks)
        else:
            tuned = args.blocks if way == "late_cached" else None
            cache = EmbeddingCache.for_backbone(root, backbone, dataset.key, tuned)
            started = time.perf_counter()
            cache.ensure(backbone, dataset, train + val, verify=False, progress=False)
            if way == "late_cached":
                cache_fill_s = time.perf_counter() - started
            sizes[way] = cache.entry_bytes(train[0])
            source = cache.load_resident(train + val)
        runs[way] = (spec, DecoderFineTune(spec, dataset, backbone, source))
        log(f"[{name}] {way}: {runs[way][1].trainable_params:,} trainable parameters")

    for spec, fine_tune in runs.values():  # warm-up, not measured: one step grows the heap to its working size
        batch = train[: args.batch_size]
        out = fine_tune.forward(batch, spec.prompt, 0)
        fine_tune.loss_fn(out.logits, out.target).backward()
        fine_tune.optimizer.zero_grad(set_to_none=True)

    seconds = {way: [] for way in runs}
    losses = {way: [] for way in runs}
    loads = [os.getloadavg()[0]]
    for epoch in range(1, args.epochs + 1):
        for way, (spec, fine_tune) in runs.items():
            started = time.perf_counter()
            losses[way].append(fine_tune.train_epoch(epoch))
            fine_tune.evaluate(val, spec.primary_eval_prompt, full=False)
            seconds[way].append(time.perf_counter() - started)
            loads.append(os.getloadavg()[0])
            log(f"[{name}] epoch {epoch} {way:12s} {seconds[way][-1]:7.2f} s (loss {losses[way][-1]:.5f}, "
                f"load average {loads[-1]:.2f})")
    mean = {way: sum(values) / len(values) for way, values in seconds.items()}
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["late_cached"], losses["late_in_loop"]))
    result = {
        "backbone": name,
        "weights": "packaged" if weights != "random" else "random",
        "tuned_blocks": args.blocks,
        "encoder_blocks": runs["decoder"][1].backbone.encoder_depth,
        "images": len(train),
        "val_images": len(val),
        "epochs": args.epochs,
        "late_cached_s_per_epoch": round(mean["late_cached"], 3),
        "late_in_loop_s_per_epoch": round(mean["late_in_loop"], 3),
        "speedup": round(mean["late_in_loop"] / mean["late_cached"], 2),
        "decoder_s_per_epoch": round(mean["decoder"], 3),
        "cache_fill_s": round(cache_fill_s, 2),
        "cache_bytes_per_image": sizes["late_cached"],
        "embedding_bytes_per_image": sizes["decoder"],
        "trainable_params": {way: fine_tune.trainable_params for way, (_, fine_tune) in runs.items()},
        "loss_max_rel_diff": float(f"{loss_diff:.2e}"),
        "threads": torch.get_num_threads(),
        "max_load_average": round(max(loads), 2),
    }
    log(f"[{name}] {json.dumps(result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ["litemedsam"])
    parser.add_argument("--blocks", type=int, default=2, help="tuned encoder blocks (default 2)")
    args = parser.parse_args(argv)
    log(f"retain_freed_memory: {retain_freed_memory()}")
    return measure_backbones(parser, args, "adaptation-cost-", measure)

if __name__ == "__main__":
    sys.exit(main())
