"""The work of each stage, as plain functions a Ray worker (or a test) calls.

Nothing here imports Ray: study/ray_tune.py wraps these into tasks and the Tune trainable. Every
trial and zero-shot evaluation writes its outputs into its own folder,
`<study>/results/trials/<trial_id>/`, and its state into the trial ledger there
(`study.ledger`): a stage starts by marking its trial RUNNING, and its tables are written before
the entry says it is done, so a stage that meets a final entry returns it instead of computing
again, which is how a resumed study never re-runs finished work. `collect_results` turns the
ledger and the trials' tables into the study's tables.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from foundation.embedding_cache import EmbeddingCache
from foundation.errors import UserError
from foundation.files import atomic_path
from foundation.prepared_store import open_prepared
from search_spaces.space import SEED_PARAM, trial_id, zero_shot_id
from study.ledger import TrialEntry, TrialLedger, TrialStatus
from trainables.result_tables import PER_CLICK_COLUMNS, PER_IMAGE_COLUMNS, PER_SUBJECT_COLUMNS

HISTORY_COLUMNS = ["trial_id", "epoch", "train_loss", "val_loss", "val_dice", "val_iou", "seconds"]
UNET_STAGE = "unet"  # the U-Net baseline's trials (trainables/unet.py)


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
    clicks: int = 0
    click_rule: str = "center"

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


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as temp, temp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def encode_shard(backbone_name: str, weights: str, prepared_root: str, cache_root: str,
                 image_ids: list[tuple[str, int]], residency=None, full_check: bool = False,
                 tuned_blocks: int | None = None) -> dict:
    """Fill the embedding cache for some images of one prepared store; returns hit/miss/corrupt counts
    (per distinct image: an image another store holds too is a hit once encoded for either).
    `residency` (a worker's `trainables.residency.Residency`) keeps the built backbone for the next shard;
    `full_check` re-hashes entries that were verified before (`EmbeddingCache.ensure`); `tuned_blocks`
    k fills the partial-encoder cache of the prefix before the last k blocks instead."""
    from trainables.residency import Residency, retain_freed_memory

    retain_freed_memory()  # as a trial does: large activations without page faults
    dataset = open_prepared(Path(prepared_root))
    wanted = set(map(tuple, image_ids))
    records = [r for r in dataset.records if (r.image_id, r.view) in wanted]
    backbone = (residency or Residency()).backbone(backbone_name, weights, None, _device())
    cache = EmbeddingCache.for_backbone(Path(cache_root), backbone, dataset.key, tuned_blocks)
    return asdict(cache.ensure(backbone, dataset, records, verify=True, full_check=full_check, progress=False))


def trial_stage(params: dict) -> str:
    """`unet` for a U-Net baseline trial (backbone unet or unet_box), else `finetune`."""
    from trainables.unet import UNET_BACKBONES

    return UNET_STAGE if params.get("backbone") in UNET_BACKBONES else "finetune"


def _spec(params: dict, context: StudyContext, name: str, stage: str):
    from trainables.fine_tune import TrialSpec
    from trainables.unet import UNET_BOX

    eval_prompts = () if context.eval_prompt == "same" else tuple(context.eval_prompt)
    fields = {k: v for k, v in params.items() if k in TrialSpec.__dataclass_fields__ and k != SEED_PARAM}
    if stage == UNET_STAGE:  # from scratch, no clicks; scored with no prompt, or with the box it is given
        weights, clicks = "random", 0
        fields["prompt"] = "box" if params["backbone"] == UNET_BOX else "none"
        eval_prompts = (fields["prompt"],)
    else:
        weights, clicks = context.weights[params["backbone"]], context.clicks
    return TrialSpec(trial_id=name, stage=stage, weights=weights,
                     eval_prompts=eval_prompts, seed=context.seed, train_seed=int(params.get(SEED_PARAM, 0)),
                     prompt_settings=context.prompt_settings, prompts_file=context.prompts_file,
                     select_metric=context.select_metric, select_mode=context.select_mode,
                     single_point_multimask=context.single_point_multimask, nsd_tolerance=context.nsd_tolerance,
                     clicks=clicks, click_rule=context.click_rule, image_encoder=False, device=_device(), **fields)


def _save_predictions(folder: Path, predictions: dict) -> None:
    """The best and worst test images of a trial as npz (image, mask, pred), for the report's overlays."""
    from analysis.overlays import sanitise_image_id

    for image_id, (image, truth, pred) in predictions.items():
        with atomic_path(folder / f"{sanitise_image_id(image_id)}.npz") as temp, temp.open("wb") as handle:
            np.savez_compressed(handle, image=image, mask=truth.astype(bool), pred=pred.astype(bool))


def _save_outputs(folder: Path, result) -> None:
    """Write a tested trial's tables and its kept predictions (before its ledger entry says it is done)."""
    _write_csv(folder / "per_image.csv", result.per_image, PER_IMAGE_COLUMNS)
    _write_csv(folder / "per_subject.csv", result.per_subject, PER_SUBJECT_COLUMNS)
    _write_csv(folder / "history.csv", [{"trial_id": result.trial_id, **h} for h in result.history], HISTORY_COLUMNS)
    if result.per_click:
        _write_csv(folder / "per_click.csv", result.per_click, PER_CLICK_COLUMNS)
    _save_predictions(folder.parent.parent / "predictions" / result.trial_id, result.predictions)


def _last_epoch(folder: Path) -> dict | None:
    """The last row of a trial's history.csv (its last epoch's metrics), or None."""
    try:
        with (folder / "history.csv").open() as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return None
    return {k: float(v) if k != "trial_id" else v for k, v in rows[-1].items()} if rows else None


def zero_shot_params(backbone: str, prompt: str, target: str | None = None) -> dict:
    """A zero-shot evaluation's params, as its ledger entry and MLflow run hold them."""
    return {"backbone": backbone, "prompt": prompt, **({"target": target} if target else {})}


def zero_shot(backbone_name: str, prompt: str, context: StudyContext, node: str | None = None,
              target: str | None = None, residency=None) -> TrialEntry:
    """Evaluate a backbone with its own decoder on val and test with one prompt; no training.

    `target` (several-target studies only) picks the prepared store and is part of the id and params.
    A user error (say, a corrupt prompts file) ends the evaluation as ERROR with the message.
    """
    from trainables.trial import run_trial

    name = zero_shot_id(backbone_name, prompt, target)
    params = zero_shot_params(backbone_name, prompt, target)
    ledger = TrialLedger(context.study_dir)
    entry = ledger.start(name, "zero_shot", params, node)
    if not entry.to_run:
        return entry
    spec = _spec({**params, "epochs": 0}, StudyContext(**{**asdict(context), "eval_prompt": (prompt,)}), name, "zero_shot")
    try:
        result = run_trial(spec, open_prepared(context.prepared_for(target)), Path(context.cache_root),
                           residency=residency)
    except UserError as error:
        return ledger.fail(name, str(error), user_error=True)
    _save_outputs(ledger.folder(name), result)
    return ledger.finish(name, TrialStatus.TERMINATED, result.summary)


def finetune(params: dict, context: StudyContext, report: Callable[[dict], None], node: str | None = None,
             residency=None) -> TrialEntry | None:
    """One trial: resume from its checkpoint, report every epoch, test, save its outputs.

    A decoder fine-tune (`trainables.trial.run_trial`), or a U-Net baseline trial
    (`trainables.unet.run_unet_trial`, stage `unet`, `trial_stage`); the same life either way.

    The ledger entry says what is left to do: nothing for a final entry (its last epoch is
    reported again, so a scheduler and the tracker see it); test only, for a trial the scheduler
    stopped (`stop_after`: it ends STOPPED_EARLY, or TERMINATED when it had trained all its
    epochs); else train from its checkpoint. The last epoch is reported after the trial is tested
    and its entry says TERMINATED, so a scheduler that stops the trial at that report (ASHA at
    max_t) stops a finished trial. A non-finite loss, or a user error, ends the trial as ERROR
    with the reason.

    In a data-parallel trial every worker calls this (`trainables.distributed`): the first one
    keeps the ledger and writes the outputs, the others follow its ledger entry, train their shards
    and report the same epochs; they return None.
    """
    from trainables import distributed
    from dataclasses import replace

    from trainables.fine_tune import TrialFailed
    from trainables.trial import run_trial
    from trainables.unet import run_unet_trial

    name = trial_id(params)
    stage = trial_stage(params)
    ledger = TrialLedger(context.study_dir)
    main = distributed.is_main()
    entry = distributed.from_main(ledger.start(name, stage, params, node) if main else None)
    folder = ledger.folder(name)
    if not entry.to_run:
        last = _last_epoch(folder) if entry.status != TrialStatus.ERROR else None
        if last:
            report(last)
        return entry
    spec = _spec(params, context, name, stage)
    if entry.stop_after is not None:
        spec = replace(spec, epochs=entry.stop_after)

    def on_epoch(metrics: dict) -> None:
        if metrics["epoch"] < spec.epochs:
            report({**metrics, "trial_id": name})

    dataset = open_prepared(context.prepared_for(params.get("target")))
    try:
        if stage == UNET_STAGE:
            result = run_unet_trial(spec, dataset, checkpoint_dir=folder / "checkpoint", on_epoch=on_epoch)
        else:
            result = run_trial(spec, dataset, Path(context.cache_root), checkpoint_dir=folder / "checkpoint",
                               on_epoch=on_epoch, residency=residency)
    except TrialFailed as failure:
        return ledger.fail(name, str(failure)) if main else None
    except UserError as error:
        return ledger.fail(name, str(error), user_error=True) if main else None
    if main:
        _save_outputs(folder, result)
        stopped = entry.stop_after is not None and result.summary["epochs_run"] < params.get("epochs", spec.epochs)
        entry = ledger.finish(name, TrialStatus.STOPPED_EARLY if stopped else TrialStatus.TERMINATED, result.summary)
    if result.history:
        report({**result.history[-1], "trial_id": name})
    return entry if main else None


# --- the study's tables -------------------------------------------------------------------------

RESULT_COLUMNS = ["trainable_params", "epochs_run", "val_dice", "test_dice", "test_iou", "test_miou", "test_hd95",
                  "test_hd95_penalised", "test_nsd", "test_subjects", "seconds"]


def collect_results(study_dir: Path, factor_names: list[str], model_info: dict) -> dict[str, int]:
    """The ledger and the trials' tables as results/trials.csv, per_image.csv, per_subject.csv,
    history.csv and, when some trial was evaluated with corrective clicks, per_click.csv (each
    written atomically).

    trials.csv has one row per ledger entry, whatever its state (a failed trial is a row with
    status ERROR and its reason); the other tables hold the rows of the trials that were tested.
    `model_info` maps a backbone to its family and parameter counts, which the model-size plot
    needs. Returns the number of rows written per table.
    """
    results = study_dir / "results"
    ledger = TrialLedger(study_dir)
    trials, per_image, per_subject, history, per_click = [], [], [], [], []
    for entry in ledger.entries():
        params, summary = entry.params, entry.summary
        info = model_info.get(params.get("backbone"), {})
        # A U-Net records its own parameter count (it depends on its input size): its whole network
        # stands where an encoder's size does on the model-size plot.
        encoder_params = info.get("image_encoder", summary.get("model_params"))
        trials.append({"trial_id": entry.trial_id, "stage": entry.stage, "status": str(entry.status),
                       "family": info.get("family"), "image_encoder_params": encoder_params,
                       **{name: params.get(name) for name in factor_names}, "seed": params.get(SEED_PARAM),
                       "eval_prompt": params.get("prompt") if entry.stage == "zero_shot" else None,
                       **{name: summary.get(name) for name in RESULT_COLUMNS}, "attempts": entry.attempts,
                       "reason": entry.reason, "node": entry.node})
        if entry.status in (TrialStatus.TERMINATED, TrialStatus.STOPPED_EARLY):
            folder = ledger.folder(entry.trial_id)
            for name, rows in (("per_image.csv", per_image), ("per_subject.csv", per_subject),
                               ("history.csv", history), ("per_click.csv", per_click)):
                if (folder / name).exists():
                    with (folder / name).open() as handle:
                        rows.extend(csv.DictReader(handle))
    columns = ["trial_id", "stage", "status", "family", "image_encoder_params", *factor_names, "seed", "eval_prompt",
               *RESULT_COLUMNS, "attempts", "reason", "node"]
    _write_csv(results / "trials.csv", trials, columns)
    _write_csv(results / "per_image.csv", per_image, PER_IMAGE_COLUMNS)
    _write_csv(results / "per_subject.csv", per_subject, PER_SUBJECT_COLUMNS)
    _write_csv(results / "history.csv", history, HISTORY_COLUMNS)
    if per_click:
        _write_csv(results / "per_click.csv", per_click, PER_CLICK_COLUMNS)
    return {"trials": len(trials), "per_image": len(per_image), "per_subject": len(per_subject),
            "history": len(history), "per_click": len(per_click)}
