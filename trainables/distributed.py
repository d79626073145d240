"""Data-parallel trials: the few collective operations a trial's loop needs, and nothing when a
trial runs in one process.

A trial with several workers (`resources.workers_per_trial`, or more than one GPU per trial) runs
the same loop in every worker of a `torch.distributed` process group (Ray Train's TorchTrainer
sets it up: NCCL on GPUs, gloo on CPU). Every worker holds the whole model and draws the same
batches; each trains on its share of every batch (`shard`: images rank, rank + W, ...), and the
gradients are summed over the workers before each optimizer step (`sum_gradients`). Each worker
scales its loss by its share of the batch, so the sum is the gradient of the whole batch's mean
loss, the gradient a one-worker trial takes (the same numbers up to the order of float sums). That
is what DistributedDataParallel does; it is done here by hand because a step is several module
calls (encoder blocks, prompt encoder, decoder), not one forward of one wrapped module. The
weights therefore stay equal in every worker. Only the first worker (`is_main`) validates each
epoch, tests the best one and writes checkpoints, tables and the ledger; the others train their
shards and report the epochs without validation numbers (Tune gets the first worker's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def shard(batch: list) -> list:
    """This worker's share of a batch: every W-th image from its rank (all of it with one worker)."""
    return batch[rank()::world_size()]


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the workers (a worker without one adds zeros)."""
    if world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def sum_tensor(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the workers (itself with one worker)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def from_main(value):
    """The first worker's `value`, in every worker (a picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
