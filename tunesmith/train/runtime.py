"""Device, precision and threads: decided once per process, explained in the log."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 / AMX).

    Without them bf16 matmuls are emulated: measured 0.8 vs 164 GFLOP/s for fp32 on an
    AVX2-only EPYC, so 'auto' must not pick bf16 there.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TunesmithError("train.device is 'cuda' but no CUDA GPU is available")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise TunesmithError("train.device is 'mps' but this machine has no Apple Silicon GPU (MPS) available to torch")
    return cfg.device


# What `precision: auto` resolves to can be forced for a whole process tree (CLI subprocesses
# included). It exists so that one machine can check both paths: the test suite must pass
# whichever precision `auto` picks on the machine CI lands on (fp32 on AVX2, bf16 on AMX).
AUTO_PRECISION_ENV = "TUNESMITH_AUTO_PRECISION"


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """'auto' -> bf16 where the hardware runs it fast, else fp16 on older GPUs, else fp32
    (or what $TUNESMITH_AUTO_PRECISION says)."""
    precision = cfg.precision
    if precision == "auto":
        forced = os.environ.get(AUTO_PRECISION_ENV, "").strip()
        if forced and forced not in ("fp32", "bf16", "fp16"):
            raise TunesmithError(f"${AUTO_PRECISION_ENV}={forced!r}: expected fp32, bf16 or fp16")
        precision = forced or "auto"
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise TunesmithError("train.precision fp16 needs a GPU; on CPU use bf16 (if supported) or fp32")
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "mps":  # autocast on MPS covers fewer ops; fp32 is the safe default there
        return "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


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
