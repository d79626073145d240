"""The one module that talks to Ray: the cluster, the encode and zero-shot tasks, and Ray Tune.

Ray's API moves between releases, so every Ray import of the project is here. The work itself
(study/stages.py) is plain Python; this module only schedules it:

- `ray_session(address)` joins a cluster (`--address`, `ray.address`, `RAY_ADDRESS`) or starts a
  local instance, and always shuts down what it started.
- `run_encode` fills the embedding cache with one task per (backbone, shard), one GPU each where
  the cluster has GPUs, before any trial starts; trials only read the cache.
- `run_zero_shot` evaluates every backbone x eval prompt (x target, with several) as tasks.
- `run_tune` runs the fine-tune trials: grid and random search as the explicit trial list of
  `search_spaces.space.plan_trials` (one Ray trial per params dict, every seed its own trial),
  Optuna TPE within each grid cell through `CellwiseOptunaSearch` (each proposal once per
  seed), FIFO or ASHA scheduling, actor reuse so models and embeddings stay resident in a
  worker between trials, and a callback that hands every result to the driver's MLflow
  tracker (the only process that writes to MLflow).
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live trial table
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter, Searcher  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from search_spaces.space import SEED_PARAM, SearchPlan, plan_trials, trial_id, with_seeds  # noqa: E402
from study import stages  # noqa: E402
from foundation.errors import UserError  # noqa: E402

TUNE_FOLDER = "tune"
TRIAL_KEY = "trial"  # grid and random trials: the param space is {TRIAL_KEY: grid_search(trials)}


# --- the cluster ------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None):
    """Connect to `address` (a cluster) or start a local Ray instance; yield the cluster's resources."""
    address = address or os.environ.get("RAY_ADDRESS")
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
            started = True
        except ConnectionError as err:
            raise UserError(f"Could not join the Ray cluster at {address!r} ({err}). Start it with "
                            f"`ray start --head` on the head machine, or drop --address/ray.address "
                            f"to run on a local instance.") from None
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


# --- encode and zero-shot as tasks ----------------------------------------------------------------


def _gpu_options() -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


@ray.remote(max_retries=2)
def _encode_task(backbone: str, weights: str, prepared_root: str, cache_root: str, image_ids: list) -> dict:
    return stages.encode_shard(backbone, weights, prepared_root, cache_root, image_ids)


@ray.remote(max_retries=2)
def _zero_shot_task(backbone: str, prompt: str, target: str | None, context: stages.StudyContext) -> dict:
    return stages.zero_shot(backbone, prompt, context, node=_node_id(), target=target)


def _wait_all(refs: list, on_done: Callable[[object, object], None]) -> None:
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            on_done(pending.pop(ref), ray.get(ref))


def run_encode(jobs: list[tuple[str, str, str, list]], cache_root: str,
               progress: Callable[[int, dict], None]) -> None:
    """One task per (backbone, weights, prepared store, shard of image ids); `progress(images_done,
    counts)` after each."""
    options = _gpu_options()
    refs = [_encode_task.options(**options).remote(b, w, root, cache_root, ids) for b, w, root, ids in jobs]
    _wait_all(refs, lambda i, counts: progress(len(jobs[i][3]), counts))


@ray.remote(max_retries=2)
def _finalise_task(params: dict, context: stages.StudyContext) -> dict:
    return stages.finetune(params, context, report=lambda metrics: None, node=_node_id())


def run_finalise(params_list: list[dict], context: stages.StudyContext, on_result: Callable[[dict], None]) -> None:
    """Evaluate on test the best epoch of trials the scheduler stopped early (no more training)."""
    options = _gpu_options()
    refs = [_finalise_task.options(**options).remote(params, context) for params in params_list]
    _wait_all(refs, lambda i, record: on_result(record))


def run_zero_shot(evaluations: list[tuple[str, str, str | None]], context: stages.StudyContext,
                  on_result: Callable[[dict], None]) -> None:
    """One task per (backbone, eval prompt, target or None)."""
    options = _gpu_options()
    refs = [_zero_shot_task.options(**options).remote(b, p, t, context) for b, p, t in evaluations]
    _wait_all(refs, lambda i, record: on_result(record))


# --- search: Optuna within each grid cell ------------------------------------------------------------


class CellwiseOptunaSearch(Searcher):
    """Optuna TPE over the continuous factors, run separately inside every grid cell.

    Categorical factors stay a full grid (so comparisons between their levels remain paired and
    balanced); each cell gets `num_samples` proposals whose continuous values come from that
    cell's own seeded TPE sampler. Every proposal is run once per replicate seed (`plan.seeds`
    trials with `seed` 0..seeds-1 and otherwise identical values, suggested one after another),
    and is told to Optuna once all its seeds have finished: the mean of their metric, or FAIL
    when any seed failed or reported no metric.

    The state (every cell's Optuna study, the proposals left, the trials queued or running, the
    results of proposals whose seeds are still running) is written to `state_path` after every
    change, so a study resumed after a crash continues the same searches: trials that were
    queued or running are proposed again with the same values (and continue from their
    checkpoints), finished ones are not proposed again, and no proposal is asked for twice.
    """

    STATE_VERSION = 2

    def __init__(self, plan: SearchPlan, state_path: Path):
        super().__init__(metric=plan.metric, mode=plan.mode)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.state_path = state_path
        self.cells = plan.cells
        self.seeds = plan.seeds
        self.queue: list[tuple[int, int, dict]] = []  # (cell, proposal number, trial params) to suggest
        self.live: dict[str, tuple[int, int, dict]] = {}  # Ray trial key -> the same, while it runs
        self.results: dict[tuple[int, int], dict[int, float | None]] = {}  # finished seeds of open proposals
        if state_path.exists():
            self.restore(str(state_path))
            return
        self.distributions = {
            name: optuna.distributions.FloatDistribution(rng.low, rng.high, log=rng.kind == "loguniform")
            for name, rng in plan.ranges.items()
        }
        direction = "maximize" if plan.mode == "max" else "minimize"
        self.studies = [
            optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=plan.seed + index))
            for index in range(len(plan.cells))
        ]
        self.remaining = [plan.num_samples] * len(plan.cells)

    def suggest(self, trial_key: str):
        if not self.queue:
            open_cells = [i for i, left in enumerate(self.remaining) if left > 0]
            if not open_cells:
                return Searcher.FINISHED
            cell = max(open_cells, key=lambda i: (self.remaining[i], -i))
            self.remaining[cell] -= 1
            proposal = self.studies[cell].ask(self.distributions)
            config = {**self.cells[cell], **proposal.params}
            self.queue = [(cell, proposal.number, params) for params in with_seeds(config, self.seeds)]
        cell, number, config = self.queue.pop(0)
        self.live[trial_key] = (cell, number, config)
        self.save(str(self.state_path))
        return config

    def on_trial_complete(self, trial_key: str, result: dict | None = None, error: bool = False):
        import optuna

        if trial_key not in self.live:
            return
        cell, number, config = self.live.pop(trial_key)
        value = None if error or not result else result.get(self.metric)
        finished = self.results.setdefault((cell, number), {})
        finished[int(config[SEED_PARAM])] = None if value is None else float(value)
        if len(finished) == self.seeds:
            del self.results[(cell, number)]
            values = list(finished.values())
            if any(v is None for v in values):
                self.studies[cell].tell(number, state=optuna.trial.TrialState.FAIL)
            else:
                self.studies[cell].tell(number, sum(values) / len(values))
        self.save(str(self.state_path))

    def save(self, checkpoint_path: str):
        Path(checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
        temp = f"{checkpoint_path}.{os.getpid()}.tmp"
        state = {
            "version": self.STATE_VERSION, "cells": self.cells, "seeds": self.seeds,
            "distributions": self.distributions, "studies": self.studies, "remaining": self.remaining,
            # running trials first: after a restore they are proposed again before anything else
            "queue": list(self.live.values()) + self.queue, "results": self.results,
        }
        with open(temp, "wb") as handle:
            pickle.dump(state, handle)
        os.replace(temp, checkpoint_path)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        if not isinstance(state, dict) or state.get("version") != self.STATE_VERSION:
            raise UserError(f"{checkpoint_path}: this Optuna search state was written by an older version "
                            f"of the harness and cannot be resumed. Run again with --fresh to start over.")
        self.cells, self.seeds = state["cells"], state["seeds"]
        self.distributions, self.studies, self.remaining = state["distributions"], state["studies"], state["remaining"]
        self.queue, self.results, self.live = state["queue"], state["results"], {}


def _flat_params(config: dict) -> dict:
    """The flat params of a trial: grid and random trials arrive wrapped as {TRIAL_KEY: params}."""
    return config[TRIAL_KEY] if TRIAL_KEY in config else config


def _searcher_and_space(plan: SearchPlan, state_path: Path, max_concurrent: int | None):
    """(searcher, param space, Ray num_samples). Grid and random: the explicit `plan_trials` list,
    one Ray trial per params dict (a grid search over whole dicts); Optuna: its own proposals."""
    if plan.algorithm == "optuna":
        searcher = CellwiseOptunaSearch(plan, state_path)
        if max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        return searcher, {}, plan.total_trials
    space = {TRIAL_KEY: tune.grid_search(plan_trials(plan))}
    return BasicVariantGenerator(max_concurrent=max_concurrent or 0, random_state=plan.seed), space, 1


def _parameter_columns(plan: SearchPlan) -> dict[str, str]:
    """The CLIReporter's parameter columns: every factor that varies (and the seed), by its name."""
    varying = [n for n in plan.cells[0] if len({c[n] for c in plan.cells}) > 1] + list(plan.ranges)
    if plan.seeds > 1:
        varying.append(SEED_PARAM)
    prefix = "" if plan.algorithm == "optuna" else f"{TRIAL_KEY}/"
    return {f"{prefix}{name}": name for name in varying}


def _scheduler(plan: SearchPlan):
    if plan.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan.max_epochs, grace_period=plan.grace_period,
                             reduction_factor=plan.reduction_factor)
    return FIFOScheduler()


# --- the trainable and the driver-side callback -------------------------------------------------------


def _trainable(config: dict, context: stages.StudyContext):
    stages.finetune(_flat_params(config), context, report=lambda metrics: tune.report(metrics), node=_node_id())


class _TrialEvents(tune.Callback):
    """Forwards Tune's trial events to the driver's handlers (MLflow, the result tables)."""

    def __init__(self, on_start, on_epoch, on_end):
        self.on_start, self.on_epoch, self.on_end = on_start, on_epoch, on_end

    def on_trial_start(self, iteration, trials, trial, **info):
        self.on_start(_flat_params(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self.on_epoch(_flat_params(trial.config), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.on_end(_flat_params(trial.config), None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_end(_flat_params(trial.config), str(getattr(trial, "error_message", None) or "the trial's worker failed"))


def run_tune(plan: SearchPlan, context: stages.StudyContext, *, cpus: float, gpus: float,
             max_concurrent: int | None, max_failures: int, on_start, on_epoch, on_end) -> None:
    """Run the study's trials in the Tune experiment folder `<study>/tune`.

    Every run builds a new Tuner over the same deterministic trials (the explicit `plan_trials`
    list, or the persisted Optuna state) instead of restoring Ray's own experiment snapshot: finished
    trials return their stored results at once, unfinished ones continue from their checkpoints
    in the study folder, so a study killed at any moment resumes without re-running or losing work.
    """
    storage = Path(context.study_dir).resolve()
    searcher, space, samples = _searcher_and_space(plan, storage / "results" / "search_state.pkl", max_concurrent)
    trainable = tune.with_resources(tune.with_parameters(_trainable, context=context), {"cpu": cpus, "gpu": gpus})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=plan.metric, mode=plan.mode, search_alg=searcher, scheduler=_scheduler(plan),
            num_samples=samples, reuse_actors=True,
            trial_name_creator=lambda trial: trial_id(_flat_params(trial.config)),
            trial_dirname_creator=lambda trial: trial_id(_flat_params(trial.config)),
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER, storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[_TrialEvents(on_start, on_epoch, on_end)], verbose=1,
            progress_reporter=tune.CLIReporter(metric_columns=["epoch", "train_loss", "val_dice"],
                                               parameter_columns=_parameter_columns(plan), max_report_frequency=10),
        ),
    )
    tuner.fit()
