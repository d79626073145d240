"""The study runner: prepare -> encode -> zero-shot -> tune -> results -> report, resumably.

`run_study(config)` is what `python -m study.run grid.yaml` does after printing the plan. Each
stage reuses what an earlier run finished (the prepared store, cached embeddings, the trials the
ledger holds as final, `study.ledger`), so running the same command again resumes the study;
`fresh=True` moves the old study folder aside first. The driver (this process) is the only writer
to MLflow, which shows the ledger: a trial's run is opened when it starts and shows its entry's
status once the entry is final.

With several targets (`data.target` a list) every target gets its prepared store, `target` is a
grid axis of the trials, zero-shot runs per backbone x eval prompt x target, and the encode
jobs cover every store, each distinct image once (a slice's images are the same in every
target's store, and the embedding cache is keyed by image content).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from analysis.clicks import click_auc
from analysis.results import format_level
from foundation.embedding_cache import EmbeddingCache
from foundation.errors import UserError
from foundation.files import write_atomic
from search_spaces.space import plan_trials, trial_id, zero_shot_id
from study import stages
from study.config import StudyConfig, config_hash, resolved_dict, write_resolved
from study.data.prepare import prepare_dataset
from study.ledger import RUN_STATUS, TrialEntry, TrialLedger
from study.plan import TrialResources, cached_prefixes, search_plan, study_axes, trial_resources, unet_plan
from study.tracking import StudyTracker, run_name
from trainables.backbones import BACKBONES, get_spec, read_checkpoint, resolve_weights, weights_id
from trainables.prompts import load_prompt_file
from trainables.unet import UNET_BACKBONES

ENCODE_SHARD = 32  # images per encode task
REPORT_STAMP = "report.sha256"  # in results/: what the report was last built and logged from
#: Per-epoch metrics as logged to MLflow (step = epoch). An epoch's duration is `epoch_seconds`: the
#: final `seconds` (the trial's wall time) is logged at step = epochs run, the last epoch's step,
#: where a metric of the same name would be dropped as a duplicate.
EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "val_dice": "val_dice", "val_iou": "val_iou",
                 "seconds": "epoch_seconds"}
FINAL_METRICS = ("val_dice", "test_dice", "test_iou", "test_miou", "test_hd95", "test_hd95_penalised", "test_nsd",
                 "test_subjects", "epochs_run", "best_epoch", "seconds", "model_params",  # model_params: a U-Net's
                 "trainable_params", "workers")  # workers: of a data-parallel trial


@dataclass
class StudyOutcome:
    study_dir: Path
    counts: dict
    report_dir: Path | None
    mlflow_command: str


def _claim_study_dir(config: StudyConfig, fresh: bool) -> Path:
    """Create the study folder, or check it belongs to this config; `fresh` moves an old one aside."""
    study_dir = config.study_dir
    resolved = study_dir / "resolved.yaml"
    if fresh and study_dir.exists():
        aside = study_dir.with_name(f"{study_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        study_dir.rename(aside)
        print(f"--fresh: the previous study folder was moved to {aside}")
    elif resolved.exists():
        first = resolved.read_text().splitlines()[0]
        if config_hash(config) not in first:
            raise UserError(f"{study_dir} holds a study run with a different config ({first.strip('# ')}; "
                            f"now {config_hash(config)}). Resuming would mix two studies: give this one "
                            f"another study.name, or pass --fresh to move the old folder aside and start over.")
    write_resolved(config, study_dir)
    return study_dir


def _model_info() -> dict:
    """Backbone -> its family and parameter counts; the U-Net's count depends on its input size, so
    its trials record it (`model_params`)."""
    return {**{name: {"family": entry.spec.family, **entry.spec.params.as_dict()} for name, entry in BACKBONES.items()},
            **{name: {"family": "unet"} for name in UNET_BACKBONES}}


def _trial_params(config: dict, info: dict) -> dict:
    return {**config, "family": info.get("family"), **{f"{k}_params": v for k, v in info.items() if k != "family"}}


def run_study(config: StudyConfig, plan_text: str, *, fresh: bool = False, address: str | None = None,
              num_cpus: int | None = None, verify_cache: bool = False) -> StudyOutcome:
    # Checkpoints resolve, and are read once, before the study folder is claimed and before any
    # worker starts: a missing or corrupt file is one clear error here (not a Ray traceback per
    # worker), and leaves no resolved.yaml behind, so fixing weights.dir is not refused as "a
    # different config".
    weights = {name: str(resolve_weights(name, config.weights.dir, config.weights.files))
               for name in config.factors.backbone}
    for name, path in weights.items():
        if path != "random":
            read_checkpoint(Path(path), get_spec(name))
    if config.prompts.file:  # the same for a prompts file
        load_prompt_file(Path(config.prompts.file))
    with study_lock(config.study_dir):
        return _run_locked(config, plan_text, weights, fresh=fresh, address=address, num_cpus=num_cpus,
                           verify_cache=verify_cache)


@contextmanager
def study_lock(study_dir: Path):
    """Hold `<out>/.<name>.lock` (an exclusive flock) while a driver runs the study in `study_dir`.

    A second driver on the same study folder stops at once with a UserError instead of
    interleaving its trials, MLflow runs and tables with the first. The lock lives beside the
    folder, not in it, so that `--fresh` (which moves the folder aside) keeps holding it; the
    kernel releases it when the driver exits, also after a kill -9.
    """
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    path = study_dir.parent / f".{study_dir.name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{study_dir} is being run by another driver ({holder}; lock file {path}). Two drivers "
                            f"on one study would interleave its trials and tables: wait for it to finish, stop it, "
                            f"or give this study another study.name.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(config: StudyConfig, plan_text: str, weights: dict, *, fresh: bool, address: str | None,
                num_cpus: int | None, verify_cache: bool) -> StudyOutcome:
    study_dir = _claim_study_dir(config, fresh)
    targets = config.data.targets()
    datasets = [prepare_dataset(config, target=target) for target in targets]
    for target, dataset in zip(targets, datasets):
        label = f" ({target})" if config.data.multi_target else ""
        print(f"Prepared slices{label}: {dataset.root} ({'reused' if dataset.reused else 'written'})", flush=True)
    roots = [str(Path(dataset.root).resolve()) for dataset in datasets]
    context = stages.StudyContext(
        study_dir=str(study_dir.resolve()),
        prepared_roots={(target if config.data.multi_target else None): root for target, root in zip(targets, roots)},
        cache_root=str(config.cache_dir.resolve()), weights=weights, seed=config.study.seed,
        eval_prompt=config.factors.eval_prompt,
        prompt_settings={k: v for k, v in config.prompts.model_dump().items() if k != "file"},
        prompts_file=str(config.prompts.file) if config.prompts.file else None,
        select_metric=config.search.metric, select_mode=config.search.mode,
        single_point_multimask=config.evaluation.single_point_multimask,
        nsd_tolerance=config.evaluation.nsd_tolerance_mm,
        clicks=config.evaluation.clicks, click_rule=config.evaluation.click_rule,
    )
    for dataset in datasets:
        if not dataset.records_for("val"):
            raise UserError(f"The prepared data has no validation slices ({dataset.root}, target "
                            f"{dataset.settings['target']}), so no trial can choose its best epoch. Raise "
                            f"data.split.val, or lower data.slicing.min_area so that the validation subjects "
                            f"keep slices.")
    info = _model_info()
    plan, baseline = search_plan(config), unet_plan(config)
    ledger = TrialLedger(study_dir)
    encode_jobs, cache_hits = _encode_jobs(config, datasets, weights, context.cache_root, verify_cache)
    zero_shot_todo = _zero_shot_todo(config, ledger)
    trials_todo = _trials_todo(plan, ledger)
    unet_todo = baseline is not None and _trials_todo(baseline, ledger)
    work_left = bool(encode_jobs or zero_shot_todo or trials_todo or unet_todo)
    if work_left:
        # Ray is imported only when there is work for it, and before MLflow's thread starts: both
        # imports hold the interpreter lock, while ray.init mostly waits for its processes.
        from study import ray_tune
    with ExitStack() as stack:
        # MLflow's store is opened (on a new study: its SQLite tables created, seconds) while Ray starts.
        background = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        opening = background.submit(_open_tracking, config, study_dir, plan_text, fresh)
        try:
            if work_left:
                resources = stack.enter_context(ray_tune.ray_session(address or config.ray.address, num_cpus=num_cpus))
        finally:  # also when Ray fails to start: the parent run then ends FAILED
            tracker = stack.enter_context(opening.result())
        if work_left:
            warning = idle_gpu_warning(resources, config.resources.most_gpus)
            if warning:
                print(warning, flush=True)
            with ray_tune.stage_workers(gpus_wanted=config.resources.most_gpus > 0) as workers:
                _encode(workers, encode_jobs, cache_hits, context.cache_root, verify_cache)
                _zero_shot(workers, zero_shot_todo, context, tracker, info)
            if trials_todo:
                _tune(ray_tune, config, plan, context, tracker, info, trial_resources(config.resources))
            if unet_todo:  # a whole GPU each by default, none on a cluster without GPUs
                gpus = config.resources.unet.gpus_per_trial if resources.get("GPU", 0) else 0
                _tune(ray_tune, config, baseline, context, tracker, info,
                      TrialResources(config.resources.unet.cpus_per_trial, gpus), folder="tune-unet")
        else:
            _encode(None, [], cache_hits, context.cache_root, verify_cache)
            print("Every trial and zero-shot evaluation of this study is final in its ledger: nothing to run "
                  "(Ray is not started).", flush=True)
        _show_ledger_in_mlflow(context, tracker, info)
        counts = stages.collect_results(study_dir, list(study_axes(config)) + list(plan.ranges), info)
        report_dir = _report(config, study_dir, tracker)
        command = tracker.mlflow_ui_command()
        if not tracker.remote:
            command += f", then open {tracker.experiment_url()}"
        outcome = StudyOutcome(study_dir, counts, report_dir, command)
        tracker.describe_parent(format_summary(outcome))
    return outcome


def _open_tracking(config: StudyConfig, study_dir: Path, plan_text: str, fresh: bool) -> StudyTracker:
    """The study's MLflow tracker with its parent run open (a tracker that fails there is closed FAILED)."""
    varying = [name for name, levels in study_axes(config).items() if len(levels) > 1]
    tracker = StudyTracker(config.tracking.uri, config.experiment_name, study_dir, name_factors=varying)
    with ExitStack() as failing:
        failing.enter_context(tracker)  # closes it FAILED if start_parent raises
        tracker.start_parent(config.study.name, config_hash(config), study_dir / "resolved.yaml", plan_text,
                             resolved_dict(config), fresh=fresh)
        failing.pop_all()  # it opened: the caller owns it now
    return tracker


def idle_gpu_warning(resources: dict, gpus_per_trial: float) -> str | None:
    """A warning when the cluster has GPUs that the trials will not use (gpus_per_trial 0)."""
    gpus = resources.get("GPU", 0)
    if gpus and not gpus_per_trial:
        return (f"warning: the cluster has {gpus:g} GPU(s) but resources.gpus_per_trial is 0, so the trials "
                f"train on CPU (only encode and zero-shot use the GPUs). Set resources.gpus_per_trial (e.g. 0.25: "
                f"four trials per GPU) in the study file to train on them.")
    return None


def encode_keys(datasets: list) -> list[tuple[str, list[tuple[str, int]]]]:
    """Per prepared store (root, [(image id, view)]): every distinct image once over all stores.

    An image (by `SliceRecord.image_sha256`, the cache's key) that an earlier store holds is left
    out of a later store's list: the same slice in two targets' stores is encoded once.
    """
    seen: set[str] = set()
    out = []
    for dataset in datasets:
        keys = []
        for record in dataset.records:
            if record.image_sha256 not in seen:
                seen.add(record.image_sha256)
                keys.append((record.image_id, record.view))
        out.append((str(Path(dataset.root).resolve()), keys))
    return out


def _encode_jobs(config: StudyConfig, datasets: list, weights: dict, cache_root: str,
                 full_check: bool) -> tuple[list[tuple[str, str, str, list, int | None]], int]:
    """(encode jobs, entries reused). A job is (backbone, weights, prepared store, [(image id, view)],
    tuned blocks): the embedding cache (None), or the partial-encoder cache of the prefix before
    the last k blocks, for each k the study's late-block and late-LoRA trials read (`cached_prefixes`);
    the jobs cover the entries the cache does not hold verified,
    found here on the driver, every distinct image of the study's stores once (`encode_keys`).

    An entry whose checksums were verified before and whose files kept their size and mtime
    (`EmbeddingCache.is_verified`: a few file stats, no hashing) is reused at once, so a full cache
    starts no encode worker; any other entry goes to a worker, which verifies it by its checksums
    and encodes it again if it is missing or damaged. `full_check` sends every entry to be
    re-hashed."""
    stores = [(root, keys, dataset, {(r.image_id, r.view): r for r in dataset.records})
              for (root, keys), dataset in zip(encode_keys(datasets), datasets)]
    todo: list[tuple[str, str, str, list, int | None]] = []
    hits = 0
    for name in config.factors.backbone:
        spec, identity = get_spec(name), weights_id(weights[name])
        for tuned_blocks in (None, *cached_prefixes(config)):
            for root, keys, dataset, records in stores:
                cache = EmbeddingCache.for_model(Path(cache_root), spec, identity, spec.input_size, dataset.key,
                                                 tuned_blocks)
                missing = [key for key in keys if full_check or not cache.is_verified(records[key])]
                hits += len(keys) - len(missing)
                if missing:
                    todo.append((name, weights[name], root, missing, tuned_blocks))
    return todo, hits


def _encode(workers, todo: list[tuple[str, str, str, list, int | None]], hits: int, cache_root: str,
            full_check: bool) -> None:
    """Encode what the driver's check left (`_encode_jobs`): one worker call per shard of at most
    ENCODE_SHARD images, at least one shard per worker."""
    totals = {"hits": hits, "misses": 0, "corrupt": 0}
    if todo:
        images = sum(len(job[3]) for job in todo)
        size = max(1, min(ENCODE_SHARD, -(-images // workers.size())))
        jobs = [(name, weights, root, keys[i:i + size], tuned) for name, weights, root, keys, tuned in todo
                for i in range(0, len(keys), size)]
        with tqdm(total=images, desc="encode", unit="img") as bar:
            def progress(images: int, counts: dict) -> None:
                bar.update(images)
                for key in totals:
                    totals[key] += counts[key]

            workers.encode(jobs, cache_root, progress, full_check)
    print(f"Embedding cache: {totals['misses']} encoded, {totals['hits']} reused, "
          f"{totals['corrupt']} corrupt entries re-encoded", flush=True)


def epoch_metrics(result: dict) -> dict[str, float]:
    """One epoch's report as the MLflow metrics of that step (`EPOCH_METRICS` names them)."""
    return {logged: float(result[key]) for key, logged in EPOCH_METRICS.items() if key in result}


def _finish(tracker: StudyTracker, entry: TrialEntry, info: dict) -> None:
    """Show a final ledger entry in MLflow: its metrics, tables and checkpoint, and its status
    (nothing to do when its run shows that status already: a resumed study's finished trial)."""
    shown = tracker.trial_status(entry.trial_id)
    if shown == str(entry.status):
        return
    if shown is None:  # no run yet (its driver was killed before it opened one)
        _open_run(tracker, entry.trial_id, entry.stage, entry.params, info)
    folder = TrialLedger(tracker.study_dir).folder(entry.trial_id)
    artifacts = {name: folder / name for name in ("per_image.csv", "per_subject.csv", "history.csv", "per_click.csv")
                 if (folder / name).exists()}
    for best in sorted((folder / "checkpoint").glob("best_*.pt")):  # best_decoder.pt, or a U-Net's best_unet.pt
        artifacts[f"checkpoint/{best.name}"] = best
    final = {k: entry.summary[k] for k in FINAL_METRICS if entry.summary.get(k) is not None}
    curve = entry.summary.get("test_dice_by_click")
    if curve:  # corrective clicks: the mean test Dice per click (step = click) and its normalised AUC
        tracker.log_curve(entry.trial_id, "test_dice_click", curve)
        final["test_click_auc"] = click_auc(curve)
    tracker.finish_trial(entry.trial_id, RUN_STATUS[entry.status], final, artifacts=artifacts, reason=entry.reason,
                         trial_status=str(entry.status))


def _open_run(tracker: StudyTracker, name: str, stage: str, params: dict, info: dict) -> None:
    """The trial's MLflow run, created or reopened (RUNNING), with its params and configuration name."""
    tracker.trial_run(name, stage, _trial_params(params, info[params["backbone"]]), run_name=run_name(params, stage, tracker.name_factors))


def _show_ledger_in_mlflow(context, tracker: StudyTracker, info: dict) -> None:
    """MLflow as a view of the ledger: every final entry whose run does not show its status yet
    (a driver killed between the two writes, say) is shown now."""
    for entry in TrialLedger(context.study_dir).entries():
        if entry.final:
            _finish(tracker, entry, info)


def zero_shot_runs(config: StudyConfig) -> list[tuple[str, str, str | None]]:
    """(backbone, eval prompt, target) of every zero-shot evaluation; target None with one target."""
    targets = config.data.targets() if config.data.multi_target else (None,)
    return [(b, p, t) for t in targets for b in config.factors.backbone for p in config.factors.eval_prompts()]


def _zero_shot_todo(config: StudyConfig, ledger: TrialLedger) -> list[tuple[str, str, str | None]]:
    """The zero-shot evaluations (`zero_shot_runs`) still to run; every one gets its PENDING entry."""
    if not config.baseline.zero_shot:
        return []
    todo = []
    for backbone, prompt, target in zero_shot_runs(config):
        params = stages.zero_shot_params(backbone, prompt, target)
        if ledger.plan(zero_shot_id(backbone, prompt, target), "zero_shot", params).to_run:
            todo.append((backbone, prompt, target))
    return todo


def _zero_shot(workers, todo: list[tuple[str, str, str | None]], context, tracker: StudyTracker, info: dict) -> None:
    if not todo:
        return
    for backbone, prompt, target in todo:
        _open_run(tracker, zero_shot_id(backbone, prompt, target), "zero_shot",
                  stages.zero_shot_params(backbone, prompt, target), info)
    errors: list[TrialEntry] = []
    with tqdm(total=len(todo), desc="zero-shot", unit="eval") as bar:
        def on_result(entry: TrialEntry) -> None:
            _finish(tracker, entry, info)
            if entry.user_error:
                errors.append(entry)
            bar.update(1)

        workers.zero_shot(todo, context, on_result)
    if errors:
        raise UserError(errors[0].reason)


def _trials_todo(plan, ledger: TrialLedger) -> bool:
    """Whether any fine-tune trial is still to run: one of the planned trials (grid, random) is not
    final in the ledger, or (Optuna, whose trials are proposed as it goes) fewer than the plan's
    trials are."""
    if plan.algorithm == "optuna":
        done = [e for e in ledger.entries() if e.stage == "finetune" and not e.to_run]
        return len(done) < plan.total_trials
    for params in plan_trials(plan):
        entry = ledger.read(trial_id(params))
        if entry is None or entry.to_run:
            return True
    return False


def _tune(ray_tune, config: StudyConfig, plan, context, tracker: StudyTracker, info: dict, resources,
          folder: str = "tune") -> None:
    """Run `plan`'s trials (the fine-tunes, or the U-Net baseline's) in Ray Tune with `resources`
    (`study.plan.TrialResources`), in the Tune folder `<study>/<folder>`, with the ledger and MLflow
    kept up to date."""
    ledger = TrialLedger(context.study_dir)
    last_epoch: dict[str, int] = {}
    if plan.algorithm != "optuna":  # the whole trial list is known: every trial starts PENDING
        for params in plan_trials(plan):
            ledger.plan(trial_id(params), stages.trial_stage(params), params)

    def on_start(params: dict) -> None:
        entry = ledger.read(trial_id(params))
        if entry is None or entry.to_run:  # a finished trial's run stays as it is
            _open_run(tracker, trial_id(params), stages.trial_stage(params), params, info)

    def on_epoch(params: dict, result: dict) -> None:
        name = trial_id(params)
        last_epoch[name] = int(result["epoch"])
        tracker.log_epoch(name, epoch_metrics(result), step=int(result["epoch"]))

    def on_crash(params: dict, reason: str) -> None:
        ledger.crashed(trial_id(params), reason)

    def on_end(params: dict, error: str | None, user_error: bool, finalised: bool = False) -> str | None:
        name = trial_id(params)
        entry = ledger.read(name)
        if error and not (entry and entry.final):  # its worker failed on every attempt
            entry = ledger.fail(name, error, user_error=user_error, stage=stages.trial_stage(params), params=params)
        if entry is None or not entry.final:  # the scheduler stopped it: test its best epoch now
            ledger.stopped(name, last_epoch.get(name) or (entry.stop_after if entry else 0) or 0)
            return "finalise"
        _finish(tracker, entry, info)
        return "user_error" if entry.user_error else None

    handlers = ray_tune.TrialHandlers(on_start=on_start, on_epoch=on_epoch, on_end=on_end, on_crash=on_crash,
                                      on_finalised=lambda entry: _finish(tracker, entry, info))
    outcome = ray_tune.run_tune(plan, context, resources, folder=folder,
                                max_concurrent=config.resources.max_concurrent,
                                max_failures=config.resources.max_failures, handlers=handlers)
    if outcome == "user_error":
        failed = next(e for e in ledger.entries() if e.user_error)
        raise UserError(failed.reason)


def _report(config: StudyConfig, study_dir: Path, tracker: StudyTracker) -> Path | None:
    """Build the report and log it on the parent run, unless it was built and logged from the same
    result tables before (`REPORT_STAMP`: the SHA-256 of resolved.yaml and results/*.csv, written
    after the upload): a finished study rerun neither rebuilds nor re-uploads it."""
    if not config.report.enabled:
        return None
    try:
        from analysis.report import build_report
        from analysis.results import ResultsError, load_study
    except ImportError:
        return None
    report_dir = study_dir / "report"
    stamp = study_dir / "results" / REPORT_STAMP
    digest = hashlib.sha256()
    for path in [study_dir / "resolved.yaml", *sorted((study_dir / "results").glob("*.csv"))]:
        digest.update(path.name.encode() + path.read_bytes())
    if (report_dir / "report.html").exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        print("Report: up to date (built from these result tables before); not rebuilt.", flush=True)
        return report_dir
    try:
        build_report(load_study(study_dir), study_dir, report_dir, source=str(study_dir), seed=config.study.seed)
    except ResultsError as err:
        print(f"The report could not be written: {err}")
        return None
    tracker.log_parent_artifacts(report_dir, "report")
    write_atomic(stamp, digest.hexdigest())
    return report_dir


def format_summary(outcome: StudyOutcome) -> str:
    """The one-screen end of a study: best configuration, best level per factor, where things are.

    A configuration is a trial's factors without its replicate seed; its numbers are the means
    over its seeds.
    """
    import pandas as pd

    trials = pd.read_csv(outcome.study_dir / "results" / "trials.csv")
    tuned = trials[(trials["stage"] == "finetune") & trials["test_dice"].notna()]
    lines = [f"Study finished: {outcome.counts['trials']} trial rows, {outcome.counts['per_image']} per-image rows, "
             f"{outcome.counts.get('per_subject', 0)} per-subject rows."]
    if len(tuned):
        resolved = yaml.safe_load((outcome.study_dir / "resolved.yaml").read_text())
        axes = {**({"target": resolved["data"]["target"]} if isinstance(resolved["data"].get("target"), list)
                   else {}), **resolved["factors"]}
        factors = [f for f, v in axes.items()  # grid factors; searched ranges have no levels
                   if isinstance(v, list) and f in tuned and tuned[f].nunique(dropna=False) > 1]
        searched = [f for f, v in resolved["factors"].items() if isinstance(v, dict)]
        keys = [f for f in factors + searched if f in tuned]
        groups = tuned.groupby(keys, dropna=False) if keys else tuned.groupby(lambda _: 0)
        configs = groups.agg(val_dice=("val_dice", "mean"), test_dice=("test_dice", "mean"),
                             seeds=("trial_id", "size")).reset_index()
        best = configs.sort_values("val_dice", ascending=False).iloc[0]
        lines.append("Best configuration (by val Dice): "
                     + (", ".join(f"{f}={format_level(best[f])}" for f in keys) or "the one run")
                     + f"; val Dice {best['val_dice']:.3f}, test Dice {best['test_dice']:.3f}"
                     + (f" (means over {int(best['seeds'])} seeds)" if best["seeds"] > 1 else ""))
        for factor in factors:
            means = tuned.groupby(factor)["test_dice"].mean().sort_values(ascending=False)
            lines.append(f"  best {factor}: {format_level(means.index[0])} (mean test Dice {means.iloc[0]:.3f} over "
                         f"{int((tuned[factor] == means.index[0]).sum())} trials)")
    unets = trials[(trials["stage"] == stages.UNET_STAGE) & trials["test_dice"].notna()]
    for backbone, runs in unets.groupby("backbone"):
        lines.append(f"U-Net baseline {backbone}: test Dice {runs['test_dice'].mean():.3f} (mean over {len(runs)} "
                     f"trial(s)); the report pairs it with the best SAM configuration")
    failed = trials[trials["status"] == "ERROR"]
    if len(failed):
        lines.append(f"{len(failed)} trial(s) failed; reasons are in results/trials.csv.")
    lines.append(f"Results: {outcome.study_dir / 'results'}")
    if outcome.report_dir:
        lines.append(f"Report: {outcome.report_dir / 'report.html'}")
    lines.append(f"MLflow: {outcome.mlflow_command}")
    return "\n".join(lines)

