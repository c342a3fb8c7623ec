"""Device and precision: decided once per process (below train/, so loading a finished run can ask too)."""
from __future__ import annotations

import os

import torch

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
