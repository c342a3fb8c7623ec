"""Data parallel: what the loop needs to run the same on 1 or N processes.

torchrun (or `accelerate launch`, or `tunesmith train --nproc N`) starts N copies of the run;
accelerate sets up the process group (gloo on CPU, NCCL on GPUs) and wraps the model in DDP,
which averages gradients over the processes in the last micro-batch's backward.

The config's `train.batch_size` is the GLOBAL micro-batch: every process builds the same batch
order, and process r takes its share of each micro-batch (`shard`). Each process's loss is its
share's summed loss over the whole step's item count, times N, so that DDP's average of the
gradients is exactly the one-process gradient of the whole batch. A share that is empty (the
last, short batch of an epoch) still runs forward and backward on one example, with weight 0:
DDP needs every process in every all-reduce.

Everything the processes must decide together (stop for a signal, skip a non-finite step, a
checkpoint that failed to save) goes through `agree`, one small all-reduce per step.
"""
from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def world_size() -> int:
    """Processes in this run, from the launcher's environment (1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: list[T], rank: int, size: int) -> list[T]:
    """Process `rank`'s contiguous share of `items`: sizes differ by at most one, earlier ranks larger."""
    n, extra = divmod(len(items), size)
    start = rank * n + min(rank, extra)
    return items[start: start + n + (1 if rank < extra else 0)]


def sum_across(acc, values: list[float]) -> list[float]:
    """Each value summed over the processes (float64, so that counts stay exact)."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def agree(acc, flag: bool) -> bool:
    """True on every process when `flag` is true on any."""
    return sum_across(acc, [1.0 if flag else 0.0])[0] > 0


def gather(acc, obj: Any) -> list[Any]:
    """Every process's `obj`, by rank (pickled; for small things: RNG states, evaluation sums)."""
    if acc.num_processes == 1:
        return [obj]
    out: list[Any] = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(acc) -> None:
    if acc.num_processes > 1:
        acc.wait_for_everyone()
