"""What corrective clicks cost: seconds per evaluated image per click, and per training epoch.

    .venv/bin/python benchmarks/click_cost.py [--backbones litemedsam] [--clicks 3] [--train-clicks 2]
        [--images 16] [--repeats 3] [--prompt box] [--work DIR]

For each backbone, on the synthetic phantom (128 x 128 slices) with the embeddings cached and
held in RAM, as in a trial:

- evaluation: the same images are evaluated with the prompt alone (`DecoderFineTune.evaluate`,
  `prompt_s_per_image`) and with `--clicks` corrective clicks after it (centre rule, previous
  logits as mask input: `click_rows` given). The difference, divided by the clicks actually made
  (an image segmented perfectly gets no more), is `s_per_image_per_click`: one decoder pass for
  the clicked images, the upsampling to the original size, and the click rule (two distance
  transforms per image). `click_to_prompt` = s_per_image_per_click / prompt_s_per_image.
- training: one epoch over the training images with `train_clicks` 0 and `--train-clicks`
  (`train_epoch_s`, `train_epoch_s_with_clicks`, and their ratio `train_clicks_ratio`; each click
  sub-iteration is one more decoder forward and backward).

The two variants alternate `--repeats` times after one unmeasured warm-up of each; every figure is
the median over the repeats. LiteMedSAM uses its packaged weights at its 256-pixel input; other
backbones random weights at their real input size. Progress on stderr; the last stdout line is one
JSON object {"results": [...]} with one entry per backbone; `max_load_average` is the highest
1-minute load average after a measured run (much above 2 on a 2-core machine: other processes
competed for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from foundation.embedding_cache import EmbeddingCache  # noqa: E402
from study.config import config_from_dict  # noqa: E402
from study.data.prepare import prepare_dataset  # noqa: E402
from trainables.backbones import resolve_weights  # noqa: E402
from trainables.fine_tune import DecoderFineTune, TrialSpec  # noqa: E402
from trainables.residency import build, retain_freed_memory  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


LOADS: list[float] = []  # the 1-minute load average after every measured run


def timed(function) -> float:
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    LOADS.append(os.getloadavg()[0])
    return seconds


def measure(name: str, dataset, work: Path, args) -> dict:
    weights = str(resolve_weights(name, None, {})) if name == "litemedsam" else "random"
    backbone = build(name, weights, None, "cpu")
    records = dataset.records_for("test")[: args.images]
    train = dataset.records_for("train")
    cache = EmbeddingCache.for_backbone(work / "cache", backbone, dataset.key)
    log(f"[{name}] encoding {len(records) + len(train)} images")
    cache.ensure(backbone, dataset, records + train, verify=False, progress=False)
    embeddings = cache.load_resident(records + train)
    base = TrialSpec(trial_id=f"clicks-{name}", backbone=name, weights=weights, prompt=args.prompt, epochs=1,
                     batch_size=8, lr=1e-4, clicks=args.clicks)

    evaluation = DecoderFineTune(base, dataset, backbone, embeddings, epochs=0)
    made: list[int] = []

    def with_clicks():
        rows: list[dict] = []
        evaluation.evaluate(records, args.prompt, click_rows=rows)
        made.append(sum(1 for r in rows if r["click"] > 0 and r["click_x"] is not None))

    def prompt_only():
        evaluation.evaluate(records, args.prompt)

    runs = {"plain": [], "clicks": []}
    prompt_only(), with_clicks()  # warm-up
    for repeat in range(args.repeats):
        runs["plain"].append(timed(prompt_only))
        runs["clicks"].append(timed(with_clicks))
        log(f"[{name}] evaluation {repeat + 1}/{args.repeats}: prompt {runs['plain'][-1]:.2f} s, "
            f"with {args.clicks} clicks {runs['clicks'][-1]:.2f} s")
    plain, clicked = statistics.median(runs["plain"]), statistics.median(runs["clicks"])
    clicks_made = made[-1]
    per_click = (clicked - plain) / max(clicks_made, 1)

    trainers = {k: DecoderFineTune(replace(base, train_clicks=k), dataset, build(name, weights, None, "cpu"), embeddings)
                for k in (0, args.train_clicks)}  # a model each: both train from the same weights
    epochs = {k: [] for k in trainers}
    for k, trainer in trainers.items():  # warm-up
        trainer.train_epoch(1)
    for repeat in range(args.repeats):
        for k, trainer in trainers.items():
            epochs[k].append(timed(lambda: trainer.train_epoch(repeat + 2)))
        log(f"[{name}] training {repeat + 1}/{args.repeats}: " + ", ".join(
            f"train_clicks {k}: {v[-1]:.2f} s" for k, v in epochs.items()))
    epoch_plain, epoch_clicks = statistics.median(epochs[0]), statistics.median(epochs[args.train_clicks])
    return {"backbone": name, "images": len(records), "clicks": args.clicks, "clicks_made": clicks_made,
            "prompt_s_per_image": plain / len(records), "s_per_image_per_click": per_click,
            "click_to_prompt": per_click / (plain / len(records)), "train_images": len(train),
            "train_clicks": args.train_clicks, "train_epoch_s": epoch_plain, "train_epoch_s_with_clicks": epoch_clicks,
            "train_clicks_ratio": epoch_clicks / epoch_plain, "max_load_average": max(LOADS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["litemedsam"])
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--train-clicks", type=int, default=2)
    parser.add_argument("--images", type=int, default=16, help="test images evaluated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="box")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    retain_freed_memory()
    with tempfile.TemporaryDirectory(prefix="click-cost-") as scratch:
        work = args.work or Path(scratch)
        config = config_from_dict({
            "study": {"name": "click-cost", "out": str(work / "runs"), "cache_dir": str(work / "cache"), "seed": 0},
            "data": {"reader": "phantom", "root": str(work / "phantom"), "target": "whole_tumor",
                     "slicing": {"axis": "axial", "min_area": 50}, "split": {"val": 0.15, "test": 0.25},
                     "augment": {"views": 0}, "limit": 16}})
        dataset = prepare_dataset(config, progress=False)
        results = [measure(name, dataset, work, args) for name in args.backbones]
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
