"""Optimizers and learning-rate schedules against hand computations."""

import math

import pytest
import torch

from foundation.errors import UserError
from trainables.optimizers import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_registry_names():
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd"}
    assert set(SCHEDULES) == {"constant", "cosine", "step"}


@pytest.mark.parametrize(
    "name, kind, weight_decay",
    [("adam", torch.optim.Adam, 0.0), ("adamw", torch.optim.AdamW, 0.01), ("sgd", torch.optim.SGD, 1e-4)],
)
def test_default_weight_decay_per_optimizer(name, kind, weight_decay):
    optimizer = build_optimizer(name, _params(), lr=0.1)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1
    assert group["weight_decay"] == weight_decay


def test_sgd_defaults_are_seed_004s():
    group = build_optimizer("sgd", _params(), lr=0.1).param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4


def test_explicit_weight_decay_and_momentum_win():
    group = build_optimizer("sgd", _params(), lr=0.1, weight_decay=0.0, momentum=0.5).param_groups[0]
    assert group["momentum"] == 0.5 and group["weight_decay"] == 0.0
    assert build_optimizer("adamw", _params(), lr=1e-4, weight_decay=0.05).param_groups[0]["weight_decay"] == 0.05


def test_sgd_step_by_hand():
    # One SGD step from w = 1 with loss sum(w²): grad = 2w = 2, plus weight decay 1e-4 * w.
    # Momentum buffer starts as the gradient, so w' = 1 - 0.1 * (2 + 1e-4) = 0.79999.
    params = _params()
    optimizer = build_optimizer("sgd", params, lr=0.1)
    (params[0] ** 2).sum().backward()
    optimizer.step()
    assert params[0].detach().tolist() == pytest.approx([0.79999] * 3)


def test_unknown_optimizer_and_bad_numbers():
    with pytest.raises(UserError) as error:
        build_optimizer("adamm", _params(), lr=0.1)
    assert "'adamm'" in str(error.value) and "adam, adamw, sgd" in str(error.value)
    with pytest.raises(UserError, match="positive"):
        build_optimizer("adam", _params(), lr=0.0)
    with pytest.raises(UserError, match="Weight decay"):
        build_optimizer("adam", _params(), lr=0.1, weight_decay=-1.0)


def _learning_rates(name, total_steps, warmup_steps, base_lr=1.0):
    """The lr used at each optimizer step 0..total_steps-1, stepping as a trainer does."""
    optimizer = build_optimizer("sgd", _params(), lr=base_lr)
    schedule = build_schedule(name, optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_constant_with_warmup():
    # Warm-up 4 steps: (s+1)/4 -> 0.25, 0.5, 0.75, 1, then 1.
    assert _learning_rates("constant", 6, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert _learning_rates("constant", 3, 0) == pytest.approx([1.0, 1.0, 1.0])


def test_cosine_with_warmup():
    # Warm-up 2 of 6 steps: 0.5, 1. Then progress p = (s-2)/4 = 0, 1/4, 1/2, 3/4 and
    # factor (1 + cos(pi p))/2 = 1, (1 + √2/2)/2, 1/2, (1 - √2/2)/2.
    want = [0.5, 1.0, 1.0, (1 + math.sqrt(2) / 2) / 2, 0.5, (1 - math.sqrt(2) / 2) / 2]
    assert _learning_rates("cosine", 6, 2) == pytest.approx(want)


def test_cosine_without_warmup_scales_the_base_rate():
    # 4 steps, p = 0, 1/4, 1/2, 3/4, base lr 0.1.
    want = [0.1 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    assert _learning_rates("cosine", 4, 0, base_lr=0.1) == pytest.approx(want)
    assert want[2] == pytest.approx(0.05)


def test_step_drops_tenfold_each_third():
    # 9 steps, no warm-up: floor(3 s / 9) drops -> 1,1,1, 0.1,0.1,0.1, 0.01,0.01,0.01.
    assert _learning_rates("step", 9, 0) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    # Warm-up 3 of 9: 1/3, 2/3, 1; then 6 post-warm-up steps (p = 0, 1/6, ..., 5/6) in thirds of 2.
    assert _learning_rates("step", 9, 3) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_schedule_state_round_trips():
    optimizer = build_optimizer("adamw", _params(), lr=1e-3)
    schedule = build_schedule("cosine", optimizer, total_steps=10, warmup_steps=2)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    assert state["lr_lambdas"][0] == {"decay": "cosine", "total_steps": 10, "warmup_steps": 2}
    restored_optimizer = build_optimizer("adamw", _params(), lr=1e-3)
    restored = build_schedule("cosine", restored_optimizer, total_steps=10, warmup_steps=2)
    restored.load_state_dict(state)
    assert restored.get_last_lr() == pytest.approx(schedule.get_last_lr())


def test_unknown_schedule_and_bad_counts():
    optimizer = build_optimizer("adam", _params(), lr=0.1)
    with pytest.raises(UserError) as error:
        build_schedule("linear", optimizer, total_steps=10)
    assert "'linear'" in str(error.value) and "constant, cosine, step" in str(error.value)
    with pytest.raises(UserError, match="total_steps"):
        build_schedule("constant", optimizer, total_steps=0)
    with pytest.raises(UserError, match="warmup_steps"):
        build_schedule("constant", optimizer, total_steps=5, warmup_steps=-1)
