"""The work of each stage, as plain functions a Ray worker (or a test) calls.

Nothing here imports Ray: study/ray_tune.py wraps these into tasks and the Tune trainable. Every
trial and zero-shot evaluation writes its outputs into its own folder,
`<study>/results/trials/<trial_id>/`, and `result.json` is written last and atomically: it is the
marker that the work is done. A stage that finds it returns the stored result instead of
computing again, which is how a resumed study never re-runs finished work.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from search_spaces.space import trial_id, zero_shot_id
from trainables.result_tables import PER_IMAGE_COLUMNS, PER_SUBJECT_COLUMNS

RESULT_FILE = "result.json"
STOPPED_FILE = "stopped.json"
HISTORY_COLUMNS = ["trial_id", "epoch", "train_loss", "val_loss", "val_dice", "val_iou", "seconds"]


@dataclass(frozen=True)
class StudyContext:
    """What every worker needs besides a trial's own parameters; plain values, picklable.

    `prepared_roots` maps a trial's `target` param to the prepared store it reads: one entry,
    under None, in a one-target study (whose trials have no `target` param); one per target
    when `data.target` is a list (`prepared_for`).
    """

    study_dir: str
    prepared_roots: dict  # target (None with one target) -> prepared store
    cache_root: str
    weights: dict  # backbone -> checkpoint path or "random"
    seed: int
    eval_prompt: object  # "same" or a tuple of prompt names
    prompt_settings: dict = field(default_factory=dict)
    prompts_file: str | None = None
    select_metric: str = "val_dice"
    select_mode: str = "max"
    single_point_multimask: bool = True
    nsd_tolerance: float = 2.0

    def trial_dir(self, name: str) -> Path:
        return Path(self.study_dir) / "results" / "trials" / name

    def prepared_for(self, target: str | None) -> str:
        """The prepared store a trial of `target` reads (None: a one-target study's store)."""
        if target not in self.prepared_roots:
            raise KeyError(f"no prepared store for target {target!r}; the study has {sorted(self.prepared_roots)}")
        return self.prepared_roots[target]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, path)


def read_result(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def mark_stopped(folder: Path, epochs_run: int) -> None:
    """Record that the scheduler stopped a trial after `epochs_run` epochs (it is finalised, not trained on)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / STOPPED_FILE, json.dumps({"epochs_run": epochs_run}))


def read_stopped(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / STOPPED_FILE).read_text())["epochs_run"])
    except (OSError, ValueError, KeyError):
        return None


def encode_shard(backbone_name: str, weights: str, prepared_root: str, cache_root: str,
                 image_ids: list[tuple[str, int]]) -> dict:
    """Fill the embedding cache for some images of one prepared store; returns hit/miss/corrupt counts
    (per distinct image: an image another store holds too is a hit once encoded for either)."""
    from foundation.prepared_store import open_prepared
    from foundation.embedding_cache import EmbeddingCache
    from trainables.decoder import TrialSpec, resident_backbone, retain_freed_memory

    retain_freed_memory()  # as a trial does: large activations without page faults

    dataset = open_prepared(Path(prepared_root))
    wanted = set(map(tuple, image_ids))
    records = [r for r in dataset.records if (r.image_id, r.view) in wanted]
    backbone = resident_backbone(TrialSpec(trial_id="encode", backbone=backbone_name, weights=weights, device=_device()))
    cache = EmbeddingCache.for_backbone(Path(cache_root), backbone, dataset.key)
    return asdict(cache.ensure(backbone, dataset, records, verify=True, progress=False))


def _spec(params: dict, context: StudyContext, name: str, stage: str):
    from trainables.decoder import TrialSpec

    eval_prompts = () if context.eval_prompt == "same" else tuple(context.eval_prompt)
    fields = {k: v for k, v in params.items() if k in TrialSpec.__dataclass_fields__ and k != "seed"}
    return TrialSpec(trial_id=name, stage=stage, weights=context.weights[params["backbone"]],
                     eval_prompts=eval_prompts, seed=context.seed, train_seed=int(params.get("seed", 0)),
                     prompt_settings=context.prompt_settings, prompts_file=context.prompts_file,
                     select_metric=context.select_metric, select_mode=context.select_mode,
                     single_point_multimask=context.single_point_multimask, nsd_tolerance=context.nsd_tolerance,
                     device=_device(), **fields)


def _save_predictions(folder: Path, predictions: dict) -> None:
    """The best and worst test images of a trial as npz (image, mask, pred), for the report's overlays."""
    from analysis.overlays import sanitise_image_id

    folder.mkdir(parents=True, exist_ok=True)
    for image_id, (image, truth, pred) in predictions.items():
        target = folder / f"{sanitise_image_id(image_id)}.npz"
        temp = folder / f".{target.stem}.{os.getpid()}.tmp.npz"
        np.savez_compressed(temp, image=image, mask=truth.astype(bool), pred=pred.astype(bool))
        os.replace(temp, target)


def _save_outputs(folder: Path, result, params: dict, status: str, node: str | None, started: float) -> dict:
    """Write a finished trial's tables and finally result.json (with when its compute ran)."""
    ended = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "per_image.csv", result.per_image, PER_IMAGE_COLUMNS)
    _write_csv(folder / "per_subject.csv", result.per_subject, PER_SUBJECT_COLUMNS)
    _write_csv(folder / "history.csv", [{"trial_id": result.trial_id, **h} for h in result.history], HISTORY_COLUMNS)
    _save_predictions(folder.parent.parent / "predictions" / result.trial_id, result.predictions)
    record = {"trial_id": result.trial_id, "stage": result.stage, "status": status, "reason": None,
              "params": params, "summary": result.summary, "node": node, "started": started, "ended": ended}
    _write_atomic(folder / RESULT_FILE, json.dumps(record, indent=1, default=str))
    return record


def zero_shot(backbone_name: str, prompt: str, context: StudyContext, node: str | None = None,
              target: str | None = None) -> dict:
    """Evaluate a backbone with its own decoder on val and test with one prompt; no training.

    `target` (several-target studies only) picks the prepared store and is part of the id and params.
    """
    from trainables.decoder import run_trial

    name = zero_shot_id(backbone_name, prompt, target)
    folder = context.trial_dir(name)
    done = read_result(folder)
    if done:
        return done
    params = {"backbone": backbone_name, "prompt": prompt, **({"target": target} if target else {})}
    spec = _spec({**params, "epochs": 0}, StudyContext(**{**asdict(context), "eval_prompt": (prompt,)}), name, "zero_shot")
    started = time.time()
    result = run_trial(spec, Path(context.prepared_for(target)), Path(context.cache_root))
    return _save_outputs(folder, result, params, "TERMINATED", node, started)


def finetune(params: dict, context: StudyContext, report: Callable[[dict], None], node: str | None = None,
             stop_after: int | None = None) -> dict:
    """One fine-tune trial: resume from its checkpoint, report every epoch, save its outputs.

    `stop_after` finalises a trial a scheduler stopped early: no more training, the best epoch so
    far is evaluated on test. A non-finite loss ends the trial as FAILED with the reason recorded.
    """
    from dataclasses import replace

    from trainables.decoder import TrialFailed, run_trial

    name = trial_id(params)
    folder = context.trial_dir(name)
    done = read_result(folder)
    if done:
        if (folder / "history.csv").exists():
            with (folder / "history.csv").open() as handle:
                rows = list(csv.DictReader(handle))
            if rows:  # one report, so the scheduler and the tracker see the trial's last epoch
                report({k: float(v) if k != "trial_id" else v for k, v in rows[-1].items()})
        return done
    spec = _spec(params, context, name, "finetune")
    stopped = read_stopped(folder)
    stop_after = stop_after if stop_after is not None else stopped
    if stop_after is not None:
        spec = replace(spec, epochs=stop_after)

    def on_epoch(metrics: dict, _checkpoint_dir) -> None:
        report({**metrics, "trial_id": name})

    started = time.time()
    try:
        result = run_trial(spec, Path(context.prepared_for(params.get("target"))), Path(context.cache_root),
                           checkpoint_dir=folder / "checkpoint", on_epoch=on_epoch)
    except TrialFailed as failure:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"trial_id": name, "stage": "finetune", "status": "ERROR", "reason": str(failure),
                  "params": params, "summary": {}, "node": node}
        _write_atomic(folder / RESULT_FILE, json.dumps(record, indent=1, default=str))
        return record
    status = "STOPPED_EARLY" if stop_after is not None and stop_after < params.get("epochs", stop_after) else "TERMINATED"
    return _save_outputs(folder, result, params, status, node, started)


# --- the study's tables -------------------------------------------------------------------------

RESULT_COLUMNS = ["epochs_run", "val_dice", "test_dice", "test_iou", "test_miou", "test_hd95", "test_hd95_penalised",
                  "test_nsd", "test_subjects", "seconds"]


def collect_results(study_dir: Path, factor_names: list[str], model_info: dict) -> dict[str, int]:
    """Gather every trial folder into results/trials.csv, per_image.csv, per_subject.csv and history.csv
    (each written atomically).

    `model_info` maps a backbone to its family and parameter counts, which the model-size plot
    needs. Returns the number of rows written per table.
    """
    results = study_dir / "results"
    trials, per_image, per_subject, history = [], [], [], []
    for folder in sorted((results / "trials").glob("*")):
        record = read_result(folder)
        if record is None:
            continue
        params, summary = record["params"], record.get("summary", {})
        info = model_info.get(params["backbone"], {})
        trials.append({"trial_id": record["trial_id"], "stage": record["stage"], "status": record["status"],
                       "family": info.get("family"), "image_encoder_params": info.get("image_encoder"),
                       **{name: params.get(name) for name in factor_names}, "seed": params.get("seed"),
                       "eval_prompt": params.get("prompt") if record["stage"] == "zero_shot" else None,
                       **{name: summary.get(name) for name in RESULT_COLUMNS}, "reason": record.get("reason"),
                       "node": record.get("node")})
        for name, target in (("per_image.csv", per_image), ("per_subject.csv", per_subject), ("history.csv", history)):
            if (folder / name).exists():
                with (folder / name).open() as handle:
                    target.extend(csv.DictReader(handle))
    columns = ["trial_id", "stage", "status", "family", "image_encoder_params", *factor_names, "seed", "eval_prompt",
               *RESULT_COLUMNS, "reason", "node"]
    _write_csv(results / "trials.csv", trials, columns)
    _write_csv(results / "per_image.csv", per_image, PER_IMAGE_COLUMNS)
    _write_csv(results / "per_subject.csv", per_subject, PER_SUBJECT_COLUMNS)
    _write_csv(results / "history.csv", history, HISTORY_COLUMNS)
    return {"trials": len(trials), "per_image": len(per_image), "per_subject": len(per_subject),
            "history": len(history)}

