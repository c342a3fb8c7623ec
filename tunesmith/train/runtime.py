"""Device, precision and threads: decided once per process, explained in the log."""
from __future__ import annotations

import torch
from accelerate import Accelerator

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.device import (  # noqa: F401 (re-exported)
    AUTO_PRECISION_ENV,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_precision,
)


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, str]:
    """An Accelerator for this run and the precision it uses ('bf16', 'fp16' or 'fp32')."""
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
