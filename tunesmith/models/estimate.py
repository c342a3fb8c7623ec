"""A rough estimate of a run's training time and peak memory, before any training (`data check`).

Time: the run's matmul FLOPs over this machine's measured matmul speed times a utilisation.
  - FLOPs per token: 6 N for full fine-tuning (forward 2N, backward 4N), 4 N when the base is
    frozen under adapters (the backward still computes activation gradients, 2N, but no weight
    gradients), 2 N for a head on a frozen body; N counts the weights of the model's linear layers
    (with a causal LM's output layer), from the model's config on the meta device (no weights read).
    Attention adds 12 x layers x hidden x length per token (bench/mfu.py's formula).
  - Evaluation passes (each validation and the before/after test) cost 2 N per token.
    SFT's generated answers are not counted.
  - Speed: the best of three fp32 1024^3 matmuls on the training device, times MFU_CPU = 0.38:
    bench/mfu.py measured 31-44% of that peak for MiniLM and SmolLM2 LoRA steps on this 2-core CPU
    (bench/RESULTS.md). On a GPU the same utilisation is assumed, and the estimate says so: no GPU
    run calibrated it.
Memory (peak resident): OVERHEAD_MB + weights + gradients and AdamW state of the trainable
weights + the longest batch's activations, BYTES_PER_LAYER_HIDDEN per token per layer x hidden
(82 with gradient checkpointing) + a causal LM's logits. Calibrated on bench/scaling.py's measured
peak RSS: SmolLM2 LoRA, batch 1, 128 to 4,096 tokens (1,201 MB + 3.63 MB per token) and MiniLM LoRA
256 x 4 (1,090 MB); tests/test_data_check.py checks the model against those rows.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import torch

from tunesmith.config import LORA_FAMILY, RunConfig, task_facts

MFU_CPU = 0.38
OVERHEAD_MB = 660.0  # python, torch, transformers, tokenizer: SmolLM2's 1,201 MB at 0 tokens less its 540 MB of weights
BYTES_PER_LAYER_HIDDEN = 176.0  # activations kept for backward, fp32, per token: (3.63 MB - logits) / (30 x 576)
BYTES_PER_LAYER_HIDDEN_CKPT = 82.0  # with gradient checkpointing: bench/scaling.py's 1,024 -> 2,048 token slope
ADAM_BYTES = {"adamw": 12, "paged_adamw": 12, "adamw_8bit": 6, "paged_adamw_8bit": 6}  # grad + state per weight


def model_shape(path: str, head: str | None, num_labels: int, trust_remote_code: bool = False) -> dict[str, int]:
    """Parameter counts and sizes of a model from its config alone (built on the meta device)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if head is not None:
        config.num_labels = max(num_labels, 1)
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            cls = AutoModelForSequenceClassification if head is not None else AutoModelForCausalLM
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        transformers.logging.set_verbosity(prev)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"params": sum(p.numel() for p in model.parameters()),
            "matmul_params": sum(m.weight.numel() for m in linear),
            "linear_in_out": sum(m.in_features + m.out_features for m in linear),
            "layers": int(getattr(text, "num_hidden_layers", 1)), "hidden": int(getattr(text, "hidden_size", 1)),
            "vocab": int(getattr(text, "vocab_size", 0)) if head is None else 0}


@functools.cache
def matmul_gflops(device: str = "cpu", n: int = 1024, repeats: int = 3) -> float:
    """This machine's fp32 matmul speed: the best of `repeats` n^3 products, in GFLOP/s, measured once
    per process. 1024^3 costs an eighth of bench/mfu.py's 2048^3 but reads lower (0.76x of it in one
    measurement on the shared 2-core CPU), so the time estimate errs on the long side. It is measured
    at check time: a busy machine gives a longer estimate, as training on it would take longer."""
    a = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _trainable(cfg: RunConfig, shape: dict[str, int]) -> int:
    method = cfg.method.name
    if method in ("full", "diff_pruning"):  # diff pruning keeps a dense diff of every weight until it masks
        return shape["params"]
    if method in LORA_FAMILY:
        return (cfg.method.r or 8) * shape["linear_in_out"]
    return max(shape["params"] // 100, 1)  # heads, prompts, IA3, adapters: about 1% or less


def estimate(cfg: RunConfig, shape: dict[str, int], train_lengths: list[int], eval_tokens: int,
             gflops: float, device: str, scale: float = 1.0) -> dict[str, Any]:
    """Training time (s) and peak memory (MB) of `cfg` on `train_lengths` (tokens per example after
    truncation; a sample of them when `scale` = examples / sample size is above 1)."""
    head_only = cfg.method.name == "head"
    frozen = cfg.method.name not in ("full", "diff_pruning")
    n, lh = shape["matmul_params"], shape["layers"] * shape["hidden"]
    factor = 2 if head_only else (4 if frozen else 6)
    tokens = sum(train_lengths) * scale
    n_train = len(train_lengths) * scale
    mean_len = tokens / max(n_train, 1)
    epochs = cfg.train.epochs
    if cfg.train.max_steps is not None:  # max_steps overrides epochs: steps x examples per step
        epochs = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum / max(n_train, 1)
    train_flops = epochs * tokens * (factor * n + (4 if head_only else 12) * lh * mean_len)
    evals = (epochs if cfg.train.eval_every == "epoch" else 1) + (2 if cfg.eval.before else 1)
    eval_flops = evals * eval_tokens * (2 * n + 4 * lh * mean_len)
    seconds = (train_flops + eval_flops) / (gflops * 1e9 * MFU_CPU)

    longest = max(train_lengths) if train_lengths else 0
    batch_tokens = cfg.train.batch_size * longest  # the longest batch sets the peak (group_by_length)
    per_token = 0.0 if head_only else \
        (BYTES_PER_LAYER_HIDDEN_CKPT if cfg.train.gradient_checkpointing else BYTES_PER_LAYER_HIDDEN) * lh
    per_token += 12 * shape["vocab"]  # a causal LM's logits, their log-softmax and gradient, fp32
    quant = cfg.method.quantize or ("4bit" if cfg.method.name == "qlora" else None)
    weight_bytes = {"4bit": 0.6, "8bit": 1.1}.get(str(quant), 4.0) * shape["params"]
    state = _trainable(cfg, shape) * ADAM_BYTES[cfg.train.optimizer]
    peak_mb = OVERHEAD_MB + (weight_bytes + state + batch_tokens * per_token) / 2 ** 20
    return {"train_tokens_per_epoch": round(tokens), "epochs": round(epochs, 3), "eval_tokens": eval_tokens,
            "tflop": round((train_flops + eval_flops) / 1e12, 2), "device": device,
            "matmul_gflops": round(gflops, 1), "assumed_mfu": MFU_CPU, "seconds": float(f"{seconds:.3g}"),  # 3 significant digits: a tiny run is not 0 s
            "peak_memory_mb": round(peak_mb), "longest_batch_tokens": batch_tokens,
            "calibrated": device == "cpu",
            "basis": "FLOPs / (measured matmul GFLOP/s x utilisation); memory: overhead + weights + optimizer "
                     "state + activations of the longest batch (models/estimate.py)"}


def estimate_run(cfg: RunConfig, model_path: str, num_labels: int, train_lengths: list[int],
                 eval_tokens: int, scale: float = 1.0) -> dict[str, Any]:
    """`estimate` for a run config: its model's shape, its device's matmul speed measured now."""
    from tunesmith.models.device import resolve_device

    shape = model_shape(model_path, task_facts(cfg.task).head, num_labels, cfg.model.trust_remote_code)
    device = resolve_device(cfg.train)
    device = device if device in ("cpu", "cuda") else "cpu"
    return {**estimate(cfg, shape, train_lengths, eval_tokens, matmul_gflops(device), device, scale),
            "params": shape["params"], "trainable_params": _trainable(cfg, shape)}
