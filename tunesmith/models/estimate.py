"""A run's training time and peak memory, estimated before any training (`data check`, `tunesmith estimate`).

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
Memory (peak resident; `peak_memory`, shown by part by `tunesmith estimate`): the larger of
loading (base + LOAD_FACTOR x weights: the weight file's pages and the tensors they become) and
training, the sum of
  - base: Python, torch, transformers and the tokenised data, before the model loads. `tunesmith
    estimate` measures it in its own process (it imports and tokenises what training does);
    elsewhere OVERHEAD_MB;
  - weights: fp32 (models/load.py loads the base in fp32), or the linear layers at 4/8 bits when
    quantised;
  - gradients and optimizer state of the trainable weights (ADAM_BYTES), for full fine-tuning also
    the optimizer step's temporary copy and autocast's cached half-precision copies; gradients are
    counted alongside the activations only under accumulation (else the larger of the two: see
    `peak_memory`);
  - activations of the largest piece (batch x longest example, or train.max_batch_tokens' piece):
    per block ACT_BYTES x (10 x hidden + 2 or 4 x intermediate) per token, a term in heads x length
    for batches of several examples (SCORE_BYTES: fitted, its cause not pinned down), LoRA dropout's
    copy of each adapted input (5 B per element); with gradient checkpointing
    (CKPT_BYTES + CKPT_LENGTH_BYTES x length) per layer x hidden, plus one layer's dropout copies;
  - a causal LM's logits (LOGIT_BYTES per token per vocabulary entry).
Calibration. fp32 activations: bench/scaling.py's step bench (SmolLM2 LoRA, batch 1, 128 to 4,096
tokens: 1,201 MB + 3.63 MB per token; tests/test_data_check.py keeps the model on those rows) and
MiniLM's 16 x 512 run of bench/memory.py (4,866 MB) for SCORE_BYTES. bf16: ACT_BYTES from the
MiniLM LoRA 16 x 512 case of bench/estimate.py (SCORE_BYTES halved, not fitted). Full fine-tuning:
its SmolLM2 full case showed gradients and activations do not add up (their lifetimes, above); no
constant was fitted to it. The cases bench/estimate.py marks held out chose nothing (bench/RESULTS.md).
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
# bytes per activation element kept for backward (with the allocator's slack and backward's transients):
# fp32 from SmolLM2's 176 B per layer x hidden over its 10 x 576 + 4 x 1,536 elements; bf16: see bench/estimate.py
# (SmolLM2's step bench had LoRA's dropout 0.05: its 5 x 4,992 B per layer, below, are taken off first)
ACT_BYTES = {"fp32": (176.0 * 576 - 5 * 4992) / (10 * 576 + 4 * 1536), "bf16": 3.27, "fp16": 3.27}
# per layer, token and head, x the padded length: a term that grows with the length, fitted to MiniLM's
# 16 x 512 fp32 run (bench/memory.py, 4,866 MB) as what the rest of the model leaves unexplained; half
# precision halved. Score matrices would fit its shape, but bench/memory.py found the CPU SDPA kernel
# does not keep them at dropout 0, so its cause is not pinned down. Counted for batches of more than
# one example (SmolLM2's batch-1 step bench, the fp32 calibration, has no room for it).
SCORE_BYTES = {"fp32": 4.2, "bf16": 2.1, "fp16": 2.1}
LOGIT_BYTES = 12.0  # per token per vocabulary entry: logits, log-softmax and their gradient, fp32
STEP_BYTES_FULL = 4.0  # full fine-tuning: AdamW's foreach step makes a temporary copy of the weights
LOAD_FACTOR = 2.0  # loading: the weight file's pages and the tensors they become
# With gradient checkpointing, bytes kept per token per layer x hidden: CKPT_BYTES + CKPT_LENGTH_BYTES x the padded
# length (a cost per token that grows with the length, so a total that grows with its square). Fitted to
# bench/scaling.py's two checkpointed runs (SmolLM2 LoRA, dropout 0.05, batch 1, fp32: 2,828 MB at 1,024 tokens,
# 4,864 MB at 2,048) as the rest of this model leaves them. The slope between those two points (82 B, the constant
# before) is the cost of one more token at ~1,500 tokens, which counted twice what short examples keep
# (bench/estimate.py's batch 16 x 57 case: 1.246x). What the length term is was not pinned down.
CKPT_BYTES = 49.6
CKPT_LENGTH_BYTES = 0.0115
GATED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")
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
    head_names = ("lm_head", "classifier", "score")  # the output layer or a new head: never a default LoRA target
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    act = str(getattr(text, "hidden_act", getattr(text, "hidden_activation", "")))
    return {"params": sum(p.numel() for p in model.parameters()),
            "matmul_params": sum(m.weight.numel() for _, m in linear),
            "linear_in_out": sum(m.in_features + m.out_features for _, m in linear),
            # per body linear layer: (its name's last part, in_features, out_features), for LoRA's targets
            "body_linears": [(name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in linear
                             if not name.split(".")[0] in head_names and name.rsplit(".", 1)[-1] not in head_names],
            "layers": int(getattr(text, "num_hidden_layers", 1)), "hidden": int(getattr(text, "hidden_size", 1)),
            "heads": int(getattr(text, "num_attention_heads", 1) or 1),
            "intermediate": int(getattr(text, "intermediate_size", 0) or 4 * getattr(text, "hidden_size", 1)),
            # a gated MLP (SwiGLU: Llama, Qwen, Mistral) keeps gate, up, act(gate) and their product per token
            "gated_mlp": int(act in ("silu", "swish") or getattr(text, "model_type", "") in GATED_TYPES),
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


def lora_targets(cfg: RunConfig, shape: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The body's linear layers a LoRA-family method adapts: (name, in, out), one per layer instance."""
    targets = cfg.method.opt("target_modules")
    linears = shape.get("body_linears", [])
    if isinstance(targets, list):
        linears = [t for t in linears if t[0] in targets]
    # else 'all-linear', the default, or a regex pattern (counted as every body linear layer: an upper bound)
    layers = cfg.method.layers
    return linears if not layers else linears[: round(len(linears) * len(layers) / max(shape["layers"], 1))]


def _trainable(cfg: RunConfig, shape: dict[str, Any]) -> int:
    method = cfg.method.name
    if method in ("full", "diff_pruning"):  # diff pruning keeps a dense diff of every weight until it masks
        return shape["params"]
    if method in LORA_FAMILY:
        targets = lora_targets(cfg, shape) if "body_linears" in shape else None
        in_out = sum(i + o for _, i, o in targets) if targets is not None else shape["linear_in_out"]
        return (cfg.method.r or 8) * in_out
    return max(shape["params"] // 100, 1)  # heads, prompts, IA3, adapters: about 1% or less


def piece_tokens(batch_size: int, longest: int, max_batch_tokens: int | None) -> int:
    """Padded tokens of the largest piece the loop puts through the model at once: the whole micro-batch
    of the longest examples, or with train.max_batch_tokens as many of them as fit the budget (at least
    one; data/collate.py's split_by_tokens)."""
    if max_batch_tokens is None:
        return batch_size * longest
    return max(1, min(batch_size, max_batch_tokens // max(longest, 1))) * longest


def peak_memory(cfg: RunConfig, shape: dict[str, Any], longest: int, precision: str = "fp32",
                base_mb: float | None = None) -> dict[str, Any]:
    """Peak resident memory of one training process, in MB, by part (module docstring).

    Args:
        longest: the longest training example in tokens, after truncation (it sets the largest batch).
        precision: what train.precision resolves to ('bf16' autocast keeps matmul outputs in bf16).
        base_mb: memory before the model loads (Python, torch, transformers, the tokenised data);
            `tunesmith estimate` measures its own, else OVERHEAD_MB.
    """
    t, m = cfg.train, cfg.method
    method = m.name
    head_only = method == "head"
    full = method in ("full", "diff_pruning")
    tokens = piece_tokens(t.batch_size, longest, t.max_batch_tokens)
    layers, hidden = shape["layers"], shape["hidden"]
    inter = shape.get("intermediate", 4 * hidden)
    # elements one block keeps per token for its backward: residual stream, norms, q/k/v, attention output,
    # projections (about 10 x hidden) and the MLP (up and activation; a gated MLP also gate and product)
    elems = 10 * hidden + (4 if shape.get("gated_mlp") else 2) * inter
    per_layer = ACT_BYTES.get(precision, ACT_BYTES["fp32"]) * elems
    if t.batch_size > 1:  # see SCORE_BYTES
        per_layer += SCORE_BYTES.get(precision, SCORE_BYTES["fp32"]) * shape.get("heads", 1) * longest
    dropout_bytes = 0.0
    if method in LORA_FAMILY and (m.opt("dropout") or 0) > 0:
        # peft applies LoRA's dropout to a copy of each adapted layer's input and keeps it and its mask
        # (5 bytes per input element); train.lean_lora_dropout keeps the 1-byte mask alone
        # (methods/lean_dropout.py: saved activations 522 -> 359 MB for MiniLM's 4 x 512 in fp32)
        per_elem = 1.0 if t.lean_lora_dropout else 5.0
        dropout_bytes = per_elem * sum(i for _, i, _ in lora_targets(cfg, shape))
    if head_only:
        per_token = 0.0
    elif t.gradient_checkpointing:  # only block inputs are kept; a block's activations are rebuilt in backward
        per_token = (CKPT_BYTES + CKPT_LENGTH_BYTES * longest) * layers * hidden + dropout_bytes / max(layers, 1)
    else:
        per_token = layers * per_layer + dropout_bytes
    logits = LOGIT_BYTES * shape.get("vocab", 0)  # a causal LM's logits, their log-softmax and gradient
    quant = str(m.opt("quantize"))
    if quant in ("nf4", "fp4", "int8"):  # bitsandbytes quantises the linear layers' weights, not embeddings or norms
        q = 0.53 if quant != "int8" else 1.06  # 4 or 8 bits, plus the blocks' scales
        weights = q * shape["matmul_params"] + 4.0 * (shape["params"] - shape["matmul_params"])
    else:
        weights = 4.0 * shape["params"]  # fp32: models/load.py loads the base in fp32; autocast casts per op
    trainable = _trainable(cfg, shape)
    # Lifetimes (the loop zeroes gradients with set_to_none): the optimizer's moments (and an EMA copy)
    # live throughout; gradients appear during backward as activations are freed, and the optimizer
    # step's temporaries once they are gone. So a step peaks at the larger of activations and gradients,
    # unless gradients are kept across micro-batches or pieces (accumulation): then at their sum.
    moments = trainable * (ADAM_BYTES[t.optimizer] - 4 + (4 if t.ema_decay else 0))
    grads = trainable * (4 + (STEP_BYTES_FULL if full else 0))
    forward = tokens * (per_token + logits)
    if full and precision in ("bf16", "fp16"):
        forward += 2 * trainable  # autocast's cached half-precision copies of trainable weights, for the forward
    accumulating = t.grad_accum > 1 or tokens < t.batch_size * longest
    mb = 2.0 ** 20
    parts = {"base": float(OVERHEAD_MB if base_mb is None else base_mb), "weights": weights / mb,
             "gradients_optimizer": (moments + grads) / mb, "activations": tokens * per_token / mb,
             "logits": tokens * logits / mb}
    train_peak = parts["base"] + parts["weights"] + (moments + (forward + grads if accumulating
                                                                 else max(forward, grads))) / mb
    # loading: transformers reads the weight file (its pages count as resident) into fresh tensors
    load_peak = parts["base"] + LOAD_FACTOR * parts["weights"]
    return {**{k: round(v) for k, v in parts.items()}, "batch_tokens": tokens, "precision": precision,
            "trainable": trainable,
            "load_peak_mb": round(load_peak), "peak_mb": round(max(train_peak, load_peak)),
            "bound_by": "loading" if load_peak > train_peak else "training"}


def estimate(cfg: RunConfig, shape: dict[str, Any], train_lengths: list[int], eval_tokens: int,
             gflops: float, device: str, scale: float = 1.0, precision: str = "fp32") -> dict[str, Any]:
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
    mem = peak_memory(cfg, shape, longest, precision)
    return {"train_tokens_per_epoch": round(tokens), "epochs": round(epochs, 3), "eval_tokens": eval_tokens,
            "tflop": round((train_flops + eval_flops) / 1e12, 2), "device": device,
            "matmul_gflops": round(gflops, 1), "assumed_mfu": MFU_CPU, "seconds": float(f"{seconds:.3g}"),  # 3 significant digits: a tiny run is not 0 s
            "peak_memory_mb": mem["peak_mb"], "longest_batch_tokens": mem["batch_tokens"], "memory": mem,
            "calibrated": device == "cpu",
            "basis": "FLOPs / (measured matmul GFLOP/s x utilisation); memory: overhead + weights + optimizer "
                     "state + activations of the longest batch (models/estimate.py)"}


def estimate_run(cfg: RunConfig, model_path: str, num_labels: int, train_lengths: list[int],
                 eval_tokens: int, scale: float = 1.0) -> dict[str, Any]:
    """`estimate` for a run config: its model's shape, its device's matmul speed measured now."""
    from tunesmith.models.device import resolve_device, resolve_precision

    shape = model_shape(model_path, task_facts(cfg.task).head, num_labels, cfg.model.trust_remote_code)
    device = resolve_device(cfg.train)
    device = device if device in ("cpu", "cuda") else "cpu"
    precision = resolve_precision(cfg.train, device)
    return {**estimate(cfg, shape, train_lengths, eval_tokens, matmul_gflops(device), device, scale, precision),
            "params": shape["params"], "trainable_params": _trainable(cfg, shape)}
