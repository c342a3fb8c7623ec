"""FSDP2 (torch's `fully_shard`): each process holds 1/N of every weight, gradient and optimizer state.

Asked for by an accelerate launch with `fsdp_version: 2` (configs/accelerate/fsdp2-*.yaml), which
sets ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 in every process's environment; plain torchrun with
those two variables is the same. tunesmith shards the model itself, on every device: accelerate turns
FSDP on only for GPUs (on CPUs it would silently run plain data parallel), while `fully_shard` itself
runs on CPUs with gloo, which is how the tests check it (tests/test_fsdp.py).

What changes against data parallel (train/distributed.py), and why:
- each transformer block is one FSDP unit and the whole model the root one: a block's weights are
  all-gathered just before its forward and backward and freed after; gradients are reduce-scattered
  and averaged over the processes, as DDP averages them, so the loop's loss scaling is the same;
- every process must run every forward (each all-gathers), so evaluation runs a stand-in batch where
  a process has none of its own (evaluate.objective_sums);
- checkpoints are sharded: every process writes its shard of the trainable weights and of the
  optimizer state with torch.distributed.checkpoint (`sharded/` in the checkpoint folder) and reads
  it back into its own shard; process 0 adds the schedule, RNG states and progress (state.pt);
- the final model is gathered (`materialise`) once, after the final evaluation, for process 0 to
  write in the usual formats.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

SHARDS = "sharded"  # the checkpoint's subfolder that torch.distributed.checkpoint writes


def requested() -> bool:
    """True when this launch asks for FSDP2 (accelerate's fsdp_version: 2, or the same variables by hand)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module) -> nn.Module:
    """fully_shard each transformer block, then the root (which keeps embeddings, head, norms)."""
    from torch.distributed.fsdp import fully_shard

    from tunesmith.methods import transformer_blocks

    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate unreduced gradients (FSDP2's counterpart of DDP's no_sync); reduced on the step's last backward."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process writes its shard of the trainable weights (and of the optimizer state) into
    `folder` (a collective; process 0 also writes the metadata). Frozen weights are not saved: they
    come from the base model, as in a one-process checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = _trainable_names(model)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in names}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(folder))


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read this process's shards back (a collective). The run may have another process count than
    the one that wrote them: torch.distributed.checkpoint reshards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _trainable_names(model)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in names}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def materialise(model: nn.Module, main: bool) -> None:
    """Gather every weight (a collective) and, on process 0, put the whole tensors back into the
    model in place of its shards, so that the usual savers (peft, transformers, ours) write it.
    Afterwards process 0's model must not run forward again (its FSDP hooks remain)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    whole: dict[int, nn.Parameter] = {}  # by the shard's id: a tied weight stays one parameter
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in whole:
                    key = f"{module_name}.{name}" if module_name else name
                    whole[id(p)] = nn.Parameter(full[key], requires_grad=p.requires_grad)
                module._parameters[name] = whole[id(p)]


def move_shards(src: Path, dst: Path) -> None:
    """Move the folder every process wrote its shard into to its place in the checkpoint."""
    shutil.move(str(src), str(dst))
