"""Seconds per fine-tuning epoch with cached embeddings vs with the image encoder in the loop.

    .venv/bin/python benchmarks/cache_speedup.py [--images 8] [--val-images 4] [--epochs 2]
        [--backbones litemedsam sam2_t sam_b] [--batch-size 8] [--prompt box] [--work DIR]
        [--in-loop-encode-batch N] [--system-malloc] [--threads N]

For each backbone, one trainable configuration (`trainables.fine_tune.TrialSpec`: AdamW, lr 1e-4,
Dice+BCE, `--prompt`, `--batch-size`) is trained in two ways, side by side:

- cached: what a trial does. The train and validation images are encoded once into an empty
  embedding cache (`encode_once_s`, `EmbeddingCache.ensure` with its default batch size), read
  into RAM, and every epoch is decoder steps only (`DecoderFineTune` on `ResidentEmbeddings`).
- in the loop: what the usual fine-tuning scripts do (MedSAM's and SAM's training scripts): every
  step runs the frozen image encoder on the step's images under `no_grad`, then the decoder step
  (`DecoderFineTune` on `EncoderInTheLoop`, a second copy of the same backbone). By default the
  encoder takes as many images per call as the cache fill does (`DEFAULT_ENCODE_BATCH`: one at a
  time on CPU, where that is fastest and SAM's ViT-B at 1024 would not fit 8 at once in memory),
  so the two ways differ only in how often they encode; `--in-loop-encode-batch 0` encodes each
  training batch in one call, literally as the usual scripts do (slower per image on CPU). The features
  are rounded to float16 like cache entries, so both ways take the same batches, the same
  prompts and the same decoder steps on the same numbers; the script checks that their training
  losses agree (`loss_max_rel_diff`).

An epoch is what a trial's epoch is: one pass over the training images (one optimizer step per
batch) plus the validation pass (Dice, IoU and loss on `--val-images` images; in the loop these
are encoded too). The two ways alternate epoch by epoch (cached 1, in the loop 1, cached 2, ...)
so that other load on the machine touches both alike; `*_s_per_epoch` is the mean over
`--epochs`, after one unmeasured decoder step that brings the process's heap to its working size. speedup = in_loop_s_per_epoch / cached_s_per_epoch.

Backbones: `litemedsam` with its packaged weights at its real 256-pixel input; `sam2_t` and
`sam_b` (and any other registered name) with random weights at their real input size (1024), as
the speed does not depend on the weights. Data: the synthetic phantom (128 x 128 slices),
prepared under `--work` (a temporary folder by default) with no augmented views.
`cache_bytes_per_image` is the size of one cache entry on disk. `max_load_average` is the highest
1-minute load average seen during the epochs: on a 2-core machine anything much above 2 means
other processes competed for the cores and the timings are inflated (small parallel operations
suffer most, so the decoder-only epochs more than the encoder-heavy ones).

By default the process first calls `trainables.residency.retain_freed_memory()`, as `run_trial`
does in a worker; it speeds up both ways (the encoder more than the decoder). `--system-malloc`
measures with glibc's defaults instead.

Progress goes to stderr; the last line on stdout is one JSON object:
{"results": [{"backbone", "images", "encode_once_s", "cached_s_per_epoch", "in_loop_s_per_epoch",
"speedup", "cache_bytes_per_image", ...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from study.config import config_from_dict  # noqa: E402
from study.data.prepare import PreparedDataset, prepare_dataset  # noqa: E402
from foundation.embedding_cache import DEFAULT_ENCODE_BATCH, EmbeddingCache  # noqa: E402
from trainables.backbones import build_backbone, resolve_weights  # noqa: E402
from trainables.fine_tune import DecoderFineTune, EncoderInTheLoop, TrialSpec  # noqa: E402
from trainables.residency import retain_freed_memory  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(work: Path, images: int, val_images: int) -> PreparedDataset:
    config = config_from_dict({
        "study": {"name": "cache-speedup", "out": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": 0},
        "data": {"reader": "phantom", "root": str(work / "phantom"), "target": "whole_tumor",
                 "slicing": {"axis": "axial", "min_area": 50}, "split": {"val": 0.15, "test": 0.25},
                 "augment": {"views": 0}, "limit": images},
    })
    dataset = prepare_dataset(config, progress=False)
    if len(dataset.records_for("train")) < images or len(dataset.records_for("val")) < val_images:
        raise SystemExit(f"the phantom has only {len(dataset.records_for('train'))} training and "
                         f"{len(dataset.records_for('val'))} validation slices; ask for fewer images")
    return dataset


def measure(name: str, dataset: PreparedDataset, work: Path, args) -> dict:
    weights = str(resolve_weights(name, None, {})) if name == "litemedsam" else "random"
    spec = TrialSpec(trial_id=f"speedup-{name}", backbone=name, weights=weights, prompt=args.prompt,
                     batch_size=args.batch_size, epochs=args.epochs, optimizer="adamw", loss="dice_bce", lr=1e-4)
    train = dataset.records_for("train")
    val = dataset.records_for("val")[: args.val_images]
    log(f"[{name}] building two copies ({weights if weights == 'random' else 'packaged weights'})")
    cached_backbone = build_backbone(name, weights)
    in_loop_backbone = build_backbone(name, weights)

    cache = EmbeddingCache.for_backbone(work / "cache" / f"bench-{time.time_ns()}", cached_backbone, dataset.key)
    log(f"[{name}] encoding {len(train) + len(val)} images once")
    started = time.perf_counter()
    counts = cache.ensure(cached_backbone, dataset, train + val, verify=False, progress=False)
    encode_once_s = time.perf_counter() - started
    assert counts.misses == len(train) + len(val)
    resident = cache.load_resident(train + val)

    encode_batch = DEFAULT_ENCODE_BATCH.get(in_loop_backbone.device.type, 1)
    if args.in_loop_encode_batch is not None:
        encode_batch = args.in_loop_encode_batch or None  # 0: the whole batch in one call
    in_loop_source = EncoderInTheLoop(in_loop_backbone, dataset, max_batch=encode_batch)
    runs = {
        "cached": DecoderFineTune(spec, dataset, cached_backbone, resident),
        "in_loop": DecoderFineTune(spec, dataset, in_loop_backbone, in_loop_source),
    }
    # Warm-up, not measured: one decoder forward and backward on a full batch, which grows the
    # heap to its working size once (its page faults would otherwise land in the first epoch).
    warm = runs["cached"]
    logits, _, target, _ = warm.forward(train[: args.batch_size], spec.prompt, 0)
    warm.loss_fn(logits, target).backward()
    warm.optimizer.zero_grad(set_to_none=True)

    seconds = {mode: [] for mode in runs}
    loads = [os.getloadavg()[0]]
    train_seconds = {mode: [] for mode in runs}
    losses = {mode: [] for mode in runs}
    for epoch in range(1, args.epochs + 1):
        for mode, fine_tune in runs.items():
            started = time.perf_counter()
            losses[mode].append(fine_tune.train_epoch(epoch))
            trained = time.perf_counter()
            fine_tune.evaluate(val, spec.primary_eval_prompt, full=False)
            finished = time.perf_counter()
            seconds[mode].append(finished - started)
            train_seconds[mode].append(trained - started)
            loads.append(os.getloadavg()[0])
            log(f"[{name}] epoch {epoch} {mode:8s} {finished - started:7.2f} s "
                f"(train {trained - started:.2f} s, loss {losses[mode][-1]:.5f}; load average {loads[-1]:.2f})")
    mean = {mode: sum(values) / len(values) for mode, values in seconds.items()}
    mean_train = {mode: sum(values) / len(values) for mode, values in train_seconds.items()}
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["cached"], losses["in_loop"]))
    if loss_diff > 0.05:
        log(f"[{name}] WARNING: training losses differ by {loss_diff:.1%} between the two ways")
    result = {
        "backbone": name,
        "images": len(train),
        "val_images": len(val),
        "epochs": args.epochs,
        "input_size": cached_backbone.input_size,
        "weights": "packaged" if weights != "random" else "random",
        "encode_once_s": round(encode_once_s, 2),
        "cached_s_per_epoch": round(mean["cached"], 3),
        "in_loop_s_per_epoch": round(mean["in_loop"], 3),
        "speedup": round(mean["in_loop"] / mean["cached"], 2),
        "cached_train_s_per_epoch": round(mean_train["cached"], 3),
        "in_loop_train_s_per_epoch": round(mean_train["in_loop"], 3),
        "cache_bytes_per_image": cache.entry_bytes(train[0]),
        "in_loop_encode_batch": encode_batch or args.batch_size,
        "loss_max_rel_diff": float(f"{loss_diff:.2e}"),
        "threads": torch.get_num_threads(),
        "max_load_average": round(max(loads), 2),
    }
    log(f"[{name}] {json.dumps(result)}")
    return result


def add_common_arguments(parser: argparse.ArgumentParser, backbones: list[str]) -> None:
    """The options this benchmark shares with benchmarks/adaptation_cost.py."""
    parser.add_argument("--images", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--val-images", type=int, default=4, help="validation images (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per way (default 2)")
    parser.add_argument("--backbones", nargs="+", default=backbones)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="folder for the phantom and caches (default: temp)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core; a Ray trial with "
                             "cpus_per_trial 1 runs with 1)")


def measure_backbones(parser: argparse.ArgumentParser, args, prefix: str, measure) -> int:
    """Check the common options, prepare the phantom sample, `measure(name, dataset, work, args)`
    each backbone and print the results as one JSON line."""
    if not 1 <= args.val_images <= args.images:
        parser.error("--val-images must be between 1 and --images")
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix=prefix) as temp:
        work = args.work or Path(temp)
        dataset = prepare(work, args.images, args.val_images)
        results = [measure(name, dataset, work, args) for name in args.backbones]
    print(json.dumps({"results": results}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ["litemedsam", "sam2_t", "sam_b"])
    parser.add_argument("--prompt", default="box")
    parser.add_argument("--in-loop-encode-batch", type=int, default=None,
                        help="images per encoder call in the loop; 0: the whole batch at once, as the usual "
                             "scripts do (default: the cache's batch size for the device, 1 on CPU)")
    parser.add_argument("--system-malloc", action="store_true", help="do not call retain_freed_memory()")
    args = parser.parse_args(argv)
    if not args.system_malloc:
        log(f"retain_freed_memory: {retain_freed_memory()}")
    return measure_backbones(parser, args, "cache-speedup-", measure)

if __name__ == "__main__":
    sys.exit(main())
