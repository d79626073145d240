"""The trial list of a study: seeds as trial params, random draws shared by replicates, Optuna replicates."""

from pathlib import Path

import pytest

from search_spaces.space import SearchPlan, SearchRange, plan_trials, trial_id
from study.config import config_from_dict
from study.plan import search_plan


def config(search: dict, factors: dict | None = None, seed: int = 0):
    return config_from_dict({
        "study": {"seed": seed},
        "factors": {"optimizer": ["adam", "sgd"], "prompt": ["box", "center_point"], **(factors or {})},
        "search": search,
    })


RANGES = {"lr": {"loguniform": [1.0e-5, 1.0e-3]}, "iou_loss_weight": {"uniform": [0.0, 0.5]}}


def non_seed(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "seed"}


def test_grid_trials_are_cells_times_seeds_and_every_seed_is_its_own_trial():
    plan = search_plan(config({"seeds": 3}))
    trials = plan_trials(plan)
    assert plan.seeds == 3 and plan.total_configurations == 4 and plan.total_trials == len(trials) == 12
    assert [t["seed"] for t in trials] == [0, 1, 2] * 4
    for start in range(0, 12, 3):  # the replicates of one cell share everything but the seed
        group = trials[start:start + 3]
        assert all(non_seed(t) == non_seed(group[0]) for t in group)
    assert {(t["optimizer"], t["prompt"]) for t in trials} == {(o, p) for o in ("adam", "sgd")
                                                               for p in ("box", "center_point")}
    ids = [trial_id(t) for t in trials]
    assert len(set(ids)) == 12 and all(i.startswith("litemedsam-") for i in ids)


def test_trial_ids_differ_by_seed_and_only_by_the_params():
    params = {"backbone": "sam2_s", "optimizer": "adam", "lr": 1e-4, "seed": 0}
    assert trial_id(params) != trial_id({**params, "seed": 1})
    assert trial_id(params) == trial_id(dict(reversed(list(params.items()))))
    assert trial_id({**params, "seed": 1}).startswith("sam2_s-")


def test_one_seed_gives_seed_zero():
    trials = plan_trials(search_plan(config({})))
    assert len(trials) == 4 and all(t["seed"] == 0 for t in trials)


def test_random_draws_are_shared_by_the_seeds_inside_the_ranges_and_deterministic():
    plan = search_plan(config({"algorithm": "random", "num_samples": 5, "seeds": 2}, RANGES))
    trials = plan_trials(plan)
    assert plan.total_trials == len(trials) == 4 * 5 * 2
    pairs = [trials[i:i + 2] for i in range(0, len(trials), 2)]
    for first, second in pairs:
        assert (first["seed"], second["seed"]) == (0, 1)
        assert non_seed(first) == non_seed(second)  # exactly the same values, not merely close
    draws = [non_seed(first) for first, _ in pairs]
    for params in draws:
        assert 1.0e-5 <= params["lr"] <= 1.0e-3 and 0.0 <= params["iou_loss_weight"] <= 0.5
        assert isinstance(params["lr"], float) and isinstance(params["iou_loss_weight"], float)
    assert len({d["lr"] for d in draws}) == len(draws) == 20  # every cell and sample its own draw
    # the cells still form the full grid, each with num_samples draws
    cells = [(d["optimizer"], d["prompt"]) for d in draws]
    assert {cell: cells.count(cell) for cell in cells} == {(o, p): 5 for o in ("adam", "sgd")
                                                          for p in ("box", "center_point")}
    again = plan_trials(search_plan(config({"algorithm": "random", "num_samples": 5, "seeds": 2}, RANGES)))
    assert again == trials
    other = plan_trials(search_plan(config({"algorithm": "random", "num_samples": 5, "seeds": 2}, RANGES, seed=7)))
    assert [t["lr"] for t in other] != [t["lr"] for t in trials]
    # more seeds repeat the same draws: replicates do not move the sampled configurations
    three = plan_trials(search_plan(config({"algorithm": "random", "num_samples": 5, "seeds": 3}, RANGES)))
    assert [non_seed(t) for t in three if t["seed"] == 0] == draws


def test_loguniform_draws_spread_over_the_decades():
    plan = SearchPlan(algorithm="random", cells=[{"backbone": "b"}],
                      ranges={"lr": SearchRange("loguniform", 1e-6, 1e-2)}, num_samples=400, metric="val_dice", mode="max", scheduler="fifo", grace_period=1,
                      reduction_factor=3, max_epochs=1, seed=0, seeds=1)
    values = [t["lr"] for t in plan_trials(plan)]
    assert all(1e-6 <= v <= 1e-2 for v in values)
    per_decade = [sum(10.0 ** e <= v < 10.0 ** (e + 1) for v in values) for e in range(-6, -2)]
    assert all(60 <= n <= 140 for n in per_decade), per_decade  # about 100 each, not piled at the top


def test_optuna_has_no_list_in_advance():
    plan = search_plan(config({"algorithm": "optuna", "num_samples": 2, "seeds": 2}, RANGES))
    assert plan.total_trials == 4 * 2 * 2
    with pytest.raises(ValueError):
        plan_trials(plan)


# --- Ray: the explicit list and the Optuna replicates ------------------------------------------------


def test_grid_and_random_reach_ray_as_one_trial_per_params_dict(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    from study.ray_tune import _flat_params, _parameter_columns, _searcher_and_space

    plan = search_plan(config({"algorithm": "random", "num_samples": 2, "seeds": 2}, RANGES))
    _, space, samples = _searcher_and_space(plan, tmp_path / "state.pkl", None)
    assert samples == 1
    variants = [_flat_params(spec) for _, spec in generate_variants(space)]
    assert variants == plan_trials(plan)
    columns = _parameter_columns(plan)
    assert columns == {"trial/optimizer": "optimizer", "trial/prompt": "prompt", "trial/lr": "lr",
                       "trial/iou_loss_weight": "iou_loss_weight", "trial/seed": "seed"}
    assert _flat_params(variants[0]) == variants[0]  # Optuna's flat configs pass through


def optuna_search(tmp_path: Path, seeds: int = 2, num_samples: int = 2):
    from study.ray_tune import CellwiseOptunaSearch

    plan = search_plan(config({"algorithm": "optuna", "num_samples": num_samples, "seeds": seeds},
                              {"optimizer": "adam", "prompt": "box", **RANGES}))
    return CellwiseOptunaSearch(plan, tmp_path / "results" / "search_state.pkl")


def test_optuna_runs_each_proposal_once_per_seed_and_tells_the_mean(tmp_path):
    import optuna

    search = optuna_search(tmp_path)
    first, second = search.suggest("t1"), search.suggest("t2")
    assert (first["seed"], second["seed"]) == (0, 1) and non_seed(first) == non_seed(second)
    study = search.studies[0]
    search.on_trial_complete("t1", {"val_dice": 0.4})
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]  # one seed still running
    search.on_trial_complete("t2", {"val_dice": 0.6})
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(study.trials) == len(complete) == 1 and complete[0].value == pytest.approx(0.5)
    assert complete[0].params == {k: first[k] for k in RANGES}

    third, fourth = search.suggest("t3"), search.suggest("t4")
    assert (third["seed"], fourth["seed"]) == (0, 1) and non_seed(third) == non_seed(fourth) != non_seed(first)
    search.on_trial_complete("t4", {"val_dice": 0.7})
    search.on_trial_complete("t3", None, error=True)  # a failed seed fails the proposal
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert search.suggest("t5") == "FINISHED"  # num_samples proposals, each with its seeds


def test_optuna_replicates_survive_a_resume_without_more_or_fewer_trials(tmp_path):
    import optuna

    search = optuna_search(tmp_path, seeds=3, num_samples=2)
    a0, a1 = search.suggest("t1"), search.suggest("t2")  # a2 is still queued
    search.on_trial_complete("t1", {"val_dice": 0.2})  # a1 running at the kill, a0 finished

    resumed = optuna_search(tmp_path, seeds=3, num_samples=2)
    replayed = [resumed.suggest(f"r{i}") for i in range(2)]
    assert replayed == [a1, {**a0, "seed": 2}]  # the running one first, then the queued one; a0 not again
    resumed.on_trial_complete("r0", {"val_dice": 0.4})
    resumed.on_trial_complete("r1", {"val_dice": 0.6})
    study = resumed.studies[0]
    assert len(study.trials) == 1 and study.trials[0].value == pytest.approx(0.4)  # mean of 0.2, 0.4, 0.6

    b = [resumed.suggest(f"b{i}") for i in range(3)]
    assert [t["seed"] for t in b] == [0, 1, 2] and non_seed(b[0]) != non_seed(a0)
    assert resumed.suggest("done") == "FINISHED"
    for i in range(3):
        resumed.on_trial_complete(f"b{i}", {"val_dice": 0.1 * i})
    assert [t.state for t in resumed.studies[0].trials] == [optuna.trial.TrialState.COMPLETE] * 2
    again = optuna_search(tmp_path, seeds=3, num_samples=2)
    assert again.suggest("x") == "FINISHED"  # a finished search resumes with nothing left
