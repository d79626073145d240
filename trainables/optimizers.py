"""Optimizers and learning-rate schedules, by the names users write in grid.yaml.

Optimizers: `adam`, `adamw`, `sgd`. A `weight_decay` of None means the optimizer's own default:
adam 0.0 and adamw 0.01 (PyTorch's defaults), sgd 1e-4 with momentum 0.9 (seed 004's SGD:
momentum 0.9, weight decay 1e-4). `momentum` is used by sgd only.

Schedules: `constant`, `cosine`, `step`, each with a linear warm-up, built as a
`torch.optim.lr_scheduler.LambdaLR` that the caller steps once per optimizer step (after
`optimizer.step()`, so with gradient accumulation once per accumulated batch, not per
micro-batch). The learning rate used at optimizer step s (0-based) is base_lr · factor(s):

- warm-up, s < warmup_steps: factor = (s + 1) / warmup_steps (the first step is not wasted at
  lr 0, and step warmup_steps - 1 reaches the full rate);
- after it, with progress p = (s - warmup_steps) / (total_steps - warmup_steps) in [0, 1):
  - `constant`: 1;
  - `cosine`: (1 + cos(π p)) / 2, from 1 down towards 0 at the end of training;
  - `step`: 0.1 ** floor(3 p), i.e. ×0.1 after each third of the post-warm-up steps
    (1, 0.1, 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from foundation.errors import UserError

SGD_DEFAULT_WEIGHT_DECAY = 1e-4
ADAMW_DEFAULT_WEIGHT_DECAY = 0.01
ADAM_DEFAULT_WEIGHT_DECAY = 0.0
STEP_DECAY_GAMMA = 0.1


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"Learning rate {lr!r} (factors.lr in grid.yaml) must be a positive number.")


def adam_optimizer(params: Iterable, lr: float, weight_decay: float | None = None, momentum: float = 0.9) -> torch.optim.Optimizer:
    """Adam (L2 penalty added to the gradient); weight decay default 0.0; `momentum` unused."""
    _check_lr(lr)
    decay = ADAM_DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def adamw_optimizer(params: Iterable, lr: float, weight_decay: float | None = None, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); weight decay default 0.01; `momentum` unused."""
    _check_lr(lr)
    decay = ADAMW_DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def sgd_optimizer(params: Iterable, lr: float, weight_decay: float | None = None, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with momentum (default 0.9) and weight decay (default 1e-4), as seed 004."""
    _check_lr(lr)
    decay = SGD_DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": adam_optimizer,
    "adamw": adamw_optimizer,
    "sgd": sgd_optimizer,
}


def build_optimizer(
    name: str, params: Iterable, lr: float, weight_decay: float | None = None, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """The optimizer registered as `name` over `params`."""
    if name not in OPTIMIZERS:
        raise UserError(
            f"Unknown optimizer {name!r} (factors.optimizer in grid.yaml). Valid optimizers: "
            f"{', '.join(sorted(OPTIMIZERS))}."
        )
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"Weight decay {weight_decay!r} (factors.weight_decay) must be a number >= 0.")
    return OPTIMIZERS[name](params, lr, weight_decay=weight_decay, momentum=momentum)


def constant_decay(progress: float) -> float:
    """Factor 1 throughout."""
    return 1.0


def cosine_decay(progress: float) -> float:
    """Half-cosine from 1 at progress 0 towards 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_decay(progress: float) -> float:
    """×0.1 after each third of the post-warm-up steps: 1, then 0.1, then 0.01."""
    # The tiny epsilon keeps an exact third (e.g. 2/6 steps) from landing just below it.
    drops = min(math.floor(3 * progress + 1e-9), 2)
    return STEP_DECAY_GAMMA**drops


SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": constant_decay,
    "cosine": cosine_decay,
    "step": step_decay,
}


@dataclass(frozen=True)
class WarmupThenDecay:
    """The LambdaLR factor: linear warm-up, then the named decay of the post-warm-up progress.

    A small picklable object (not a closure) so the scheduler's state_dict keeps it and a
    checkpointed trial restores the same schedule.
    """

    decay: str
    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / remaining, 0.0), 1.0)
        return SCHEDULES[self.decay](progress)


def build_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """A LambdaLR for schedule `name` over `total_steps` optimizer steps (module docstring).

    Step it once after every `optimizer.step()`. A warm-up as long as training or longer is
    allowed (the rate then only rises); negative counts and `total_steps` < 1 are errors.
    """
    if name not in SCHEDULES:
        raise UserError(
            f"Unknown learning-rate schedule {name!r}. Valid schedules: {', '.join(sorted(SCHEDULES))}."
        )
    if int(total_steps) < 1:
        raise UserError(f"A schedule needs at least one optimizer step; got total_steps={total_steps}.")
    if int(warmup_steps) < 0:
        raise UserError(f"warmup_steps must be >= 0; got {warmup_steps}.")
    return LambdaLR(optimizer, lr_lambda=WarmupThenDecay(name, int(total_steps), int(warmup_steps)))


def resume_schedule(schedule: LambdaLR, steps: int) -> None:
    """Put `schedule` (and its optimizer's learning rates) at optimizer step `steps`, as a resumed
    trial continues: the rates follow the schedule of the current run's length."""
    schedule.last_epoch = steps
    for group, base_lr, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base_lr * factor(steps)
