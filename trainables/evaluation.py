"""A trial's test evaluation: per-image and per-subject metrics, and the predictions it keeps.

`evaluate_on_test(fine_tune, test)` scores the current decoder of a `DecoderFineTune` on the test
records with every evaluation prompt of its spec. Metrics are computed at the mask's original
resolution (`trainables.metrics`); per subject, 3D metrics over its stacked slices
(`subject_rows`). The summary's test numbers are means over the test images with the primary
evaluation prompt (the first of `eval_prompts`, else the training prompt). With `spec.clicks`,
every test image also gets its corrective-click curve (`DecoderFineTune.click_curve`), and the
summary its mean over the images per click (`test_dice_by_click`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from foundation.prepared_store import SliceRecord
from trainables.fine_tune import DecoderFineTune, mean_metric
from trainables.metrics import subject_metrics

KEPT_PREDICTIONS = 4  # best and worst test images whose predictions a trial returns


@dataclass
class HeldOutScores:
    per_image: list[dict]
    per_subject: list[dict]
    summary: dict  # test_dice, test_iou, test_miou, test_hd95, test_nsd, test_hd95_penalised, test_images,
    # test_subjects, and with clicks test_dice_by_click (mean Dice per click 0..N, primary prompt)
    #: image_id -> (image, truth, prediction) for the best and worst test images with the primary
    #: evaluation prompt (`KEPT_PREDICTIONS` of each), for overlays in the report.
    predictions: dict
    per_click: list[dict]  # one row per test image, prompt and click 0..spec.clicks; empty without clicks


def evaluate_on_test(fine_tune: DecoderFineTune, test: list[SliceRecord]) -> HeldOutScores:
    """Score the model as it is now on `test`, with each evaluation prompt of the trial's spec.
    `fine_tune` is a `DecoderFineTune` or anything with its `spec`, `dataset`, `mask` and
    `evaluate` (the U-Net baseline's `trainables.unet.UNetTrainer`)."""
    spec = fine_tune.spec
    eval_prompt = spec.primary_eval_prompt
    seed = None if spec.stage == "zero_shot" else spec.train_seed  # a zero-shot run is trained by no seed
    per_image: list[dict] = []
    per_subject: list[dict] = []
    per_click: list[dict] = []
    kept: dict = {}
    for prompt_name in (spec.eval_prompts or (spec.prompt,)):
        predicted: dict = {}
        curves: list[dict] | None = [] if spec.clicks else None
        rows, _ = fine_tune.evaluate(test, prompt_name, keep=predicted, click_rows=curves)
        per_image += [{"trial_id": spec.trial_id, "stage": spec.stage, "seed": seed, **row} for row in rows]
        per_click += [{"trial_id": spec.trial_id, "stage": spec.stage, "seed": seed, **row} for row in curves or ()]
        per_subject += [{"trial_id": spec.trial_id, "stage": spec.stage, "seed": seed, "prompt": prompt_name, **row}
                        for row in subject_rows(test, predicted, fine_tune.mask, spec.nsd_tolerance)]
        if prompt_name == eval_prompt:
            kept = predicted
    primary = [r for r in per_image if r["prompt"] == eval_prompt]
    ranked = sorted(primary, key=lambda r: r["dice"])
    chosen = {r["image_id"] for r in ranked[:KEPT_PREDICTIONS] + ranked[-KEPT_PREDICTIONS:]}
    by_id = {r.image_id: r for r in test}
    predictions = {image_id: (*fine_tune.dataset.load(by_id[image_id]), kept[image_id]) for image_id in sorted(chosen)}
    summary = {
        "test_dice": mean_metric(primary, "dice"), "test_iou": mean_metric(primary, "iou"),
        "test_miou": mean_metric(primary, "miou"), "test_hd95": mean_metric(primary, "hd95"),
        "test_nsd": mean_metric(primary, "nsd"),
        "test_hd95_penalised": sum(r["hd95_penalised"] for r in primary),
        "test_images": len(primary), "test_subjects": len({r["subject"] for r in primary}),
    }
    if per_click:
        summary["test_dice_by_click"] = [mean_metric([r for r in per_click if r["prompt"] == eval_prompt
                                                      and r["click"] == k], "dice") for k in range(spec.clicks + 1)]
    return HeldOutScores(per_image, per_subject, summary, predictions, per_click)


def subject_rows(records: list[SliceRecord], predicted: dict[str, np.ndarray], truth_of,
                 nsd_tolerance: float) -> list[dict]:
    """Per test subject, 3D metrics (`trainables.metrics.subject_metrics`) over its stacked slices.

    A subject's scored slices are placed at their slice index in a (Z, H, W) stack from its
    lowest to its highest index; a slice in between that was not scored (it holds no target, so
    no ground-truth prompt exists for it) is empty in truth and prediction. Spacing (slice,
    row, col) in mm where the records know it, so HD95 and NSD are in mm. A 2D image that is its
    own subject gives a one-slice stack: its 3D values are its 2D values.
    """
    by_subject: dict[str, list[SliceRecord]] = defaultdict(list)
    for record in records:
        by_subject[record.subject].append(record)
    rows = []
    for subject, members in by_subject.items():
        low = min(r.slice_index for r in members)
        depth = max(r.slice_index for r in members) - low + 1
        shape = (depth, members[0].height, members[0].width)
        pred_stack, truth_stack = np.zeros(shape, bool), np.zeros(shape, bool)
        for r in members:
            pred_stack[r.slice_index - low] = predicted[r.image_id]
            truth_stack[r.slice_index - low] = truth_of(r)
        first = members[0]
        spacing = None
        if first.spacing is not None:
            spacing = (first.slice_spacing or 1.0, *first.spacing)
        metrics = subject_metrics(pred_stack, truth_stack, spacing, nsd_tolerance=nsd_tolerance)
        rows.append({"subject": subject, **metrics, "hd95_3d_penalised": int(metrics["hd95_3d_penalised"]),
                     "slices": len(members)})
    return rows
