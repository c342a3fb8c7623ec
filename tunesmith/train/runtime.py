"""Device, precision and threads: decided once per process, explained in the log."""
from __future__ import annotations

import torch
from accelerate import Accelerator

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.device import resolve_device, resolve_precision


# What an `accelerate launch --config_file configs/accelerate/...` asks for, read from the environment it sets.
SHARDED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed ZeRO", "ACCELERATE_USE_FSDP": "FSDP"}


def check_engine() -> None:
    """Refuse, with what to do, the engines tunesmith's loop does not drive yet.

    DDP (torchrun, `--nproc`, `accelerate launch` with ddp*.yaml) is verified. FSDP and DeepSpeed
    shard what process 0 writes (trainable weights, optimizer state, the final model) and, for
    DeepSpeed, step the optimizer inside backward, before tunesmith's accumulation and non-finite
    check; until the gathered-checkpoint path is written and run on GPUs they stop here rather than
    write checkpoints that do not resume. docs/DISTRIBUTED.md has the state of each.
    """
    import importlib.util
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and importlib.util.find_spec("deepspeed") is None:
        raise TunesmithError("this launch asks for DeepSpeed (an accelerate config with distributed_type: DEEPSPEED), "
                             "which is not installed: install deepspeed with pip install 'tunesmith[deepspeed]', or "
                             "launch with configs/accelerate/ddp.yaml")
    from tunesmith.train import sharded

    if sharded.requested():
        return  # FSDP2: tunesmith shards the model itself (train/sharded.py)
    for env, name in SHARDED_ENGINES.items():
        if os.environ.get(env, "false").lower() == "true":
            what = "FSDP version 1" if name == "FSDP" else name
            raise TunesmithError(f"{what} launches are not supported by tunesmith yet: its checkpoints and final model "
                                 "are written by process 0 from whole weights, which this engine shards, so they would "
                                 "not resume. Use FSDP2 (fsdp_version: 2, configs/accelerate/fsdp2-*.yaml) or data "
                                 "parallel (configs/accelerate/ddp.yaml, or tunesmith train --nproc N); "
                                 "docs/DISTRIBUTED.md says what is verified and what remains")


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, str]:
    """An Accelerator for this run and the precision it uses ('bf16', 'fp16' or 'fp32')."""
    check_engine()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    # accelerate keeps one precision per process in a global state; a worker that runs an fp32 job
    # and then a bf16 one must clear it (the distributed PartialState is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=device == "cpu")
    return acc, precision


def enable_gradient_checkpointing(model) -> None:
    """Recompute block activations in backward (transformers' own checkpointing of each layer).

    The non-reentrant variant works with frozen inputs (adapters, quantised bases) without
    peft's enable_input_require_grads trick, and with keyword arguments to the blocks.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TunesmithError(f"train.gradient_checkpointing: {type(base).__name__} does not support it")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
