"""The one module that talks to Ray: the cluster, the encode and zero-shot tasks, and Ray Tune.

Ray's API moves between releases, so every Ray import of the project is here. The work itself
(study/stages.py) is plain Python; this module only schedules it:

- `ray_session(address)` joins a cluster (`--address`, `ray.address`, `RAY_ADDRESS`) or starts a
  local instance, and always shuts down what it started.
- `stage_workers(gpus_wanted)` starts, on its first call, one actor per GPU (per CPU without GPUs) for the
  stages before the search: `encode` fills the embedding cache one shard per call before any trial starts (trials
  only read the cache, and build no image encoder), `zero_shot` evaluates every backbone x eval
  prompt (x target, with several). The actors are killed when those stages end, so their device
  memory is free for the trials.
- `run_tune` runs the fine-tune trials: grid and random search as the explicit trial list of
  `search_spaces.space.plan_trials` (one Ray trial per params dict, every seed its own trial),
  Optuna TPE within each grid cell through `CellwiseOptunaSearch` (each proposal once per
  seed), FIFO or ASHA scheduling, actor reuse so models and embeddings stay resident in a
  worker between trials (its `Residency`), and a callback that hands every trial event to the
  driver (the ledger's driver-side transitions and MLflow: only the driver writes to MLflow).
  A trial the scheduler stops is tested at once by a task beside the search.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live trial table
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# A failed trial is a row with its reason in trials.csv and MLflow; its traceback is in Tune's
# error.txt in the trial's Tune folder, not printed over the progress table.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
# A trial that fails before its first epoch (a user error, a non-finite loss) ends without the
# search metric; the ledger records it as ERROR, so Tune must not treat that as its own error.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter, Searcher  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402
from ray.tune.stopper import Stopper  # noqa: E402

from foundation.errors import UserError  # noqa: E402
from foundation.files import write_atomic  # noqa: E402
from search_spaces.space import SEED_PARAM, SearchPlan, plan_trials, trial_id, with_seeds  # noqa: E402
from study import stages  # noqa: E402
from study.plan import TrialResources  # noqa: E402

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


# --- encode and zero-shot in stage workers --------------------------------------------------------


def _user_error(error: Exception) -> UserError | None:
    """The UserError a Ray error wraps (a task's or an actor's), or None."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, UserError) else (error if isinstance(error, UserError) else None)


def failure_reason(error: Exception | str | None) -> str:
    """One line for a ledger entry: the original exception's type and message, not Ray's traceback."""
    if error is None:
        return "the trial's worker failed"
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial's worker failed"


@ray.remote(max_restarts=2, max_task_retries=2)
class _StageWorker:
    """One encode and zero-shot worker per GPU (per CPU without GPUs), torn down when those stages end.

    It keeps the backbone it built between shards (a `Residency`); killing it at the end frees
    its device memory, so the trials that follow start on an empty GPU.
    """

    def __init__(self):
        from trainables.residency import Residency

        self.residency = Residency()

    def encode(self, backbone: str, weights: str, prepared_root: str, cache_root: str, image_ids: list,
               full_check: bool, tuned_blocks: int | None) -> dict:
        return stages.encode_shard(backbone, weights, prepared_root, cache_root, image_ids, residency=self.residency,
                                   full_check=full_check, tuned_blocks=tuned_blocks)

    def zero_shot(self, backbone: str, prompt: str, target: str | None, context: stages.StudyContext):
        return stages.zero_shot(backbone, prompt, context, node=_node_id(), target=target, residency=self.residency)


class StageWorkers:
    """A pool of `_StageWorker` actors for the encode and zero-shot stages; `close()` kills them.

    The actors start with the first call (a study whose cache is full and whose zero-shot
    evaluations are done starts none). The cluster's resources are read then (not when the
    driver connected): one actor with one GPU per GPU the cluster has; one per CPU on a cluster
    without GPUs; and one GPU actor when the cluster has no GPU yet but the trials ask for GPUs
    (`gpus_wanted`), so that an autoscaling cluster adds a GPU node instead of encoding
    everything on CPU.
    """

    def __init__(self, gpus_wanted: bool):
        self.gpus_wanted = gpus_wanted
        self.actors: list = []

    def _layout(self) -> tuple[dict, int]:
        """(actor options, actor count) for the cluster as it is now."""
        have = ray.cluster_resources()
        if have.get("GPU") or self.gpus_wanted:
            return {"num_gpus": 1, "num_cpus": 1}, max(int(have.get("GPU", 0)), 1)
        return {"num_cpus": 1}, max(int(have.get("CPU", 1)), 1)

    def size(self) -> int:
        """The number of actors the pool has, or will start with."""
        return len(self.actors) if self.actors else self._layout()[1]

    def _start(self) -> None:
        options, count = self._layout()
        if self.gpus_wanted and not ray.cluster_resources().get("GPU"):
            print("The cluster has no GPU yet and resources.gpus_per_trial asks for GPUs: the encode stage "
                  "waits for a GPU node to join.", flush=True)
        self.actors = [_StageWorker.options(**options).remote() for _ in range(count)]

    def _run(self, calls: list[tuple[str, tuple]], on_done: Callable[[int, object], None]) -> None:
        """Each call (method, args) on the next idle actor; `on_done(index, result)` as they finish.
        A UserError raised in a worker is raised here as it is (one paragraph, no Ray traceback)."""
        if not calls:
            return
        if not self.actors:
            self._start()
        queue = list(enumerate(calls))
        running: dict = {}
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                actor = idle.pop()
                index, (method, args) = queue.pop(0)
                running[getattr(actor, method).remote(*args)] = (index, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index, actor = running.pop(ref)
                idle.append(actor)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    user = _user_error(error)
                    if user is not None:
                        raise user from None
                    raise
                on_done(index, result)

    def encode(self, jobs: list[tuple[str, str, str, list, int | None]], cache_root: str,
               progress: Callable[[int, dict], None], full_check: bool = False) -> None:
        """One call per (backbone, weights, prepared store, shard of image ids, tuned blocks: None for
        the embedding cache, k for a partial-encoder cache); `progress(images_done, counts)` after each;
        `full_check` re-hashes existing entries."""
        self._run([("encode", (b, w, root, cache_root, ids, full_check, k)) for b, w, root, ids, k in jobs],
                  lambda i, counts: progress(len(jobs[i][3]), counts))

    def zero_shot(self, evaluations: list[tuple[str, str, str | None]], context: stages.StudyContext,
                  on_result: Callable[[object], None]) -> None:
        """One evaluation per (backbone, eval prompt, target or None); `on_result(ledger entry)`."""
        self._run([("zero_shot", (b, p, t, context)) for b, p, t in evaluations], lambda i, entry: on_result(entry))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@contextmanager
def stage_workers(gpus_wanted: bool):
    workers = StageWorkers(gpus_wanted)
    try:
        yield workers
    finally:
        workers.close()


@ray.remote(max_retries=2, max_calls=1)  # max_calls=1: the worker process exits after, freeing its memory
def _finalise_task(params: dict, context: stages.StudyContext):
    return stages.finetune(params, context, report=lambda metrics: None, node=_node_id())


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
        state = {
            "version": self.STATE_VERSION, "cells": self.cells, "seeds": self.seeds,
            "distributions": self.distributions, "studies": self.studies, "remaining": self.remaining,
            # running trials first: after a restore they are proposed again before anything else
            "queue": list(self.live.values()) + self.queue, "results": self.results,
        }
        write_atomic(checkpoint_path, pickle.dumps(state))

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

_RESIDENCY = None  # the Residency of this worker process (Ray Tune reuses its actors across trials)


def _worker_residency(cpus: float, gpus: float):
    """This worker process's `Residency`, made on its first trial; its memory budget is the node's
    share for one of the trial workers that fit on this node (by the trial's CPU and GPU request)."""
    global _RESIDENCY
    if _RESIDENCY is None:
        from trainables.residency import Residency

        node = next((n for n in ray.nodes() if n.get("NodeID") == _node_id()), {})
        have = node.get("Resources", {})
        fits = [int(have.get("CPU", 1) // cpus) if cpus else None, int(have.get("GPU", 0) // gpus) if gpus else None]
        _RESIDENCY = Residency(workers_per_node=max(1, min([f for f in fits if f is not None] or [1])))
    return _RESIDENCY


def _trainable(config: dict, context: stages.StudyContext, resources: TrialResources):
    params = _flat_params(config)
    if resources.workers_for(params) > 1:
        _data_parallel_trial(params, context, resources)
        return
    stages.finetune(params, context, report=lambda metrics: tune.report(metrics), node=_node_id(),
                    residency=_worker_residency(resources.cpus, resources.gpus_for(params)))


def _trial_bundle(resources: TrialResources):
    """Tune's resource request per trial: the trial's CPUs and GPUs, or, for a data-parallel trial,
    a token CPU for the trial itself (its Ray Train workers ask for the CPUs and GPUs)."""

    def bundle(config: dict) -> tune.PlacementGroupFactory:
        params = _flat_params(config)
        if resources.workers_for(params) > 1:
            return tune.PlacementGroupFactory([{"CPU": DATA_PARALLEL_DRIVER_CPU}])
        return tune.PlacementGroupFactory([{"CPU": resources.cpus, "GPU": resources.gpus_for(params)}])

    return bundle


DATA_PARALLEL_DRIVER_CPU = 0.01  # what a data-parallel trial's own process asks for: it only waits


def _data_parallel_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: the trial's loop on its shards; every worker
    reports each epoch (Ray Train takes the first worker's metrics to Tune)."""
    from ray import train

    stages.finetune(config["params"], config["context"], report=lambda metrics: train.report(metrics),
                    node=_node_id())


def _data_parallel_trial(params: dict, context: stages.StudyContext, resources: TrialResources) -> None:
    """Run one trial data-parallel with Ray Train's TorchTrainer inside this Tune trial: `workers_for`
    workers, each with its share of the trial's GPUs (NCCL), or on CPU with gloo. Their epoch
    reports reach Tune through `TuneReportCallback`, so the scheduler, the ledger and MLflow see
    one trial, as for a one-worker trial. A worker's failure fails this Tune trial, which Tune
    retries from the trial's checkpoint (`resources.max_failures`)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers, gpus = resources.workers_for(params), resources.gpus_for(params)
    per_worker = {"CPU": resources.cpus / workers, **({"GPU": gpus / workers} if gpus else {})}
    trainer = TorchTrainer(
        _data_parallel_worker,
        train_loop_config={"params": params, "context": context},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(name=trial_id(params), storage_path=str(Path(context.study_dir).resolve() / "train"),
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()


class _UserErrorStop(Stopper):
    """Stops the whole search once a trial ended with a user error (its entry says so): every
    other trial would meet the same mistake."""

    def __init__(self):
        self.stopped = False

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.stopped


class _TrialEvents(tune.Callback):
    """Forwards Tune's trial events to the driver's handlers, and runs the test evaluation of the
    trials the scheduler stops as soon as they stop (`finalise`, a task beside the search)."""

    def __init__(self, handlers: "TrialHandlers", context, resources: TrialResources, stopper: _UserErrorStop):
        self.handlers, self.context, self.resources, self.stopper = handlers, context, resources, stopper
        self.finalising: dict = {}  # task ref -> params

    def on_trial_start(self, iteration, trials, trial, **info):
        self.handlers.on_start(_flat_params(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self.handlers.on_epoch(_flat_params(trial.config), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(_flat_params(trial.config), None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.handlers.on_crash(_flat_params(trial.config), failure_reason(trial.get_pickled_error() or trial.get_error()))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_pickled_error() or trial.get_error()
        user = _user_error(error) if isinstance(error, Exception) else None
        self._ended(_flat_params(trial.config), str(user) if user else failure_reason(error), user_error=user is not None)

    def _ended(self, params: dict, error: str | None, user_error: bool = False) -> None:
        if self.stopper.stopped:  # stopped for another trial's user error: left as it is, resumed next time
            return
        outcome = self.handlers.on_end(params, error, user_error)
        if outcome == "finalise":
            gpus = min(self.resources.gpus_for(params), 1.0)  # testing needs one device, not a worker group
            ref = _finalise_task.options(num_cpus=self.resources.cpus, num_gpus=gpus).remote(params, self.context)
            self.finalising[ref] = params
        elif outcome == "user_error":
            self.stopper.stopped = True

    def on_step_end(self, iteration, trials, **info):
        self.collect(timeout=0)

    def collect(self, timeout: float | None) -> None:
        """Hand finished finalise tasks' entries to the driver (all of them with timeout None)."""
        while self.finalising:
            done, _ = ray.wait(list(self.finalising), num_returns=1, timeout=timeout)
            if not done:
                return
            params = self.finalising.pop(done[0])
            try:
                entry = ray.get(done[0])
            except ray.exceptions.RayError as error:
                self.handlers.on_end(params, failure_reason(error), False, finalised=True)
                continue
            self.handlers.on_finalised(entry)


@dataclass
class TrialHandlers:
    """What the driver does on each trial event (study/runner.py supplies them).

    `on_end(params, error, user_error, finalised=False)` returns "finalise" when the trial still
    needs its test evaluation (the scheduler stopped it), "user_error" when it ended with a mistake
    in the input, else None; `on_finalised(entry)` receives a finalised trial's ledger entry.
    """

    on_start: Callable
    on_epoch: Callable
    on_end: Callable
    on_crash: Callable
    on_finalised: Callable


def run_tune(plan: SearchPlan, context: stages.StudyContext, resources: TrialResources, *,
             max_concurrent: int | None, max_failures: int, handlers: TrialHandlers,
             folder: str = TUNE_FOLDER) -> str | None:
    """Run the plan's trials in the Tune experiment folder `<study>/<folder>`; returns None, or
    "user_error" when the search was stopped because a trial met a user error.

    Every run builds a new Tuner over the same deterministic trials (the explicit `plan_trials`
    list, or the persisted Optuna state) instead of restoring Ray's own experiment snapshot: finished
    trials return their stored results at once, unfinished ones continue from their checkpoints
    in the study folder, so a study killed at any moment resumes without re-running or losing work.
    Trials the scheduler stops are tested right away by a task with the trial's resources.
    """
    storage = Path(context.study_dir).resolve()
    searcher, space, samples = _searcher_and_space(plan, storage / "results" / "search_state.pkl", max_concurrent)
    trainable = tune.with_resources(tune.with_parameters(_trainable, context=context, resources=resources),
                                    _trial_bundle(resources))
    stopper = _UserErrorStop()
    events = _TrialEvents(handlers, context, resources, stopper)
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
            name=folder, storage_path=str(storage), stop=stopper,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[events], verbose=1,
            progress_reporter=tune.CLIReporter(metric_columns=["epoch", "train_loss", "val_dice"],
                                               parameter_columns=_parameter_columns(plan), max_report_frequency=10),
        ),
    )
    tuner.fit()
    events.collect(timeout=None)
    return "user_error" if stopper.stopped else None
