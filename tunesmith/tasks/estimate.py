"""`tunesmith estimate CONFIG`: a run's peak memory before training, and what to change when it will
not fit this machine.

The data is read and tokenised exactly as `train` does (the longest training example sets the
largest batch); the model's shape comes from its config on the meta device (no weights read); the
parts are models/estimate.py's `peak_memory`. The memory this process holds once its imports and
the tokenised data are in (the base a training process also has before its model loads) is
measured here rather than assumed. On a GPU, memory means the GPU's: the base is then CUDA's own
(not counted, as torch's peak counter does not), and no GPU run calibrated the constants.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig, check_inputs_exist, load_config, parse_overrides, task_facts
from tunesmith.data.collate import feature_length
from tunesmith.errors import DataError
from tunesmith.models.estimate import model_shape, peak_memory
from tunesmith.tasks import get_task

HEADROOM = 0.9  # advise when the peak is above 90% of what is free: other processes and the estimate's own error


def estimate_config(config: str | Path | dict, overrides: dict | list[str] | None = None,
                    available_mb: float | None = None) -> dict[str, Any]:
    """Peak memory of training `config`, by part, against the memory free on its device.

    Args:
        overrides: {'train.batch_size': 4} or ['--train.batch_size=4'].
        available_mb: plan for this much memory instead of what is free now (RAM, or the GPU's).
    Returns:
        {config, model, device, precision, params, trainable_params, longest_example, memory (parts in MB,
        peak_mb, load_peak_mb, batch_tokens), available_mb, available_from, fits, advice: [{overrides,
        peak_mb, note}] (empty when it fits)}.
    Raises:
        ConfigError, DataError for a bad config or data (as `train` would).
    """
    import accelerate  # noqa: F401  (training imports them: their memory belongs to the measured base)
    import peft  # noqa: F401

    from tunesmith.models.device import resolve_device, resolve_precision
    from tunesmith.models.load import load_tokenizer, resolve_model_path
    from tunesmith.utils import current_rss_mb

    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    cfg = load_config(config, ov)
    check_inputs_exist(cfg)
    task = get_task(cfg.task)
    base_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    data = task.prepare(cfg, tokenizer)
    lengths = [feature_length(f) for f in data.splits["train"].features]
    if not lengths:
        raise DataError(f"{cfg.data.train}: no training examples to estimate with")
    longest = max(lengths)
    shape = model_shape(base_path, task_facts(cfg.task).head, len(data.labels or []), cfg.model.trust_remote_code)
    device = resolve_device(cfg.train)
    device = device if device in ("cpu", "cuda") else "cpu"
    precision = resolve_precision(cfg.train, device)
    base_mb = current_rss_mb() if device == "cpu" else 0.0
    mem = peak_memory(cfg, shape, longest, precision, base_mb)
    if available_mb is not None:
        free, source = float(available_mb), "given"
    else:
        free, source = free_memory_mb(device, base_mb)
    fits = mem["peak_mb"] <= HEADROOM * free
    trainable = mem.pop("trainable")
    return {"config": str(config) if not isinstance(config, dict) else "(dict)", "model": cfg.model.name_or_path,
            "task": cfg.task, "method": cfg.method.name, "device": device, "precision": precision,
            "params": shape["params"], "trainable_params": trainable, "longest_example": longest,
            "batch_size": cfg.train.batch_size, "memory": mem, "available_mb": round(free), "available_from": source,
            "fits": fits, "calibrated": device == "cpu",
            "advice": [] if fits else advise(config, ov, shape, longest, precision, base_mb, free, device)}


def free_memory_mb(device: str, base_mb: float) -> tuple[float, str]:
    """Memory a training process could use now: free GPU memory, or available RAM plus this process's
    base (a training process needs the same base; this one's goes when it exits)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] / 2 ** 20, "free GPU memory"
    import psutil  # an accelerate dependency

    return psutil.virtual_memory().available / 2 ** 20 + base_mb, "available RAM"


def _try(config, ov: dict, change: dict, shape, longest, precision, base_mb) -> tuple[RunConfig, dict]:
    cfg = load_config(config, {**ov, **change})
    return cfg, peak_memory(cfg, shape, longest, precision, base_mb)


def advise(config, ov: dict, shape: dict, longest: int, precision: str, base_mb: float, free: float,
           device: str) -> list[dict[str, Any]]:
    """Changes that bring the peak under the memory free, each with its estimated peak: smaller
    micro-batches at the same effective batch, train.max_batch_tokens, gradient checkpointing, then
    a lighter method. A change that alone does not fit is still listed (with its peak) when it helps,
    and the activation-side changes are also tried together."""
    cfg = load_config(config, ov)
    t = cfg.train
    limit = HEADROOM * free
    out: list[dict[str, Any]] = []

    def add(change: dict, note: str) -> dict | None:
        _, mem = _try(config, ov, change, shape, longest, precision, base_mb)
        row = {"overrides": change, "peak_mb": mem["peak_mb"], "fits": mem["peak_mb"] <= limit, "note": note}
        out.append(row)
        return row

    if t.batch_size > 1:  # the largest micro-batch that fits, with accumulation keeping the effective batch
        b = t.batch_size
        while b > 1:
            b //= 2
            k = -(-t.batch_size // b)
            _, mem = _try(config, ov, {"train.batch_size": b, "train.grad_accum": t.grad_accum * k},
                          shape, longest, precision, base_mb)
            if mem["peak_mb"] <= limit or b == 1:
                add({"train.batch_size": b, "train.grad_accum": t.grad_accum * k},
                    f"the same effective batch ({t.batch_size * t.grad_accum}) in smaller micro-batches")
                break
        pieces = [k * longest for k in range(t.batch_size - 1, 0, -1)]
        budget = next((p for p in pieces if _try(config, ov, {"train.max_batch_tokens": p}, shape, longest,
                                                 precision, base_mb)[1]["peak_mb"] <= limit), longest)
        add({"train.max_batch_tokens": budget}, "the same update, the micro-batch cut into pieces of at most "
            f"{budget} padded tokens (slower per token)")
    if not t.gradient_checkpointing and cfg.method.name != "head":
        add({"train.gradient_checkpointing": True}, "recompute activations in backward (about a third more compute)")
    if cfg.method.name in ("full", "diff_pruning"):
        add({"method.name": "lora"}, "train LoRA adapters instead of every weight (no gradients or optimizer state "
            "for the base)")
    if device == "cuda" and cfg.method.name in ("lora", "full"):
        add({"method.name": "qlora"}, "a 4-bit base under LoRA adapters (bitsandbytes)")
    # on the CPU QLoRA does not lower the peak: bitsandbytes dequantises each weight to fp32 per matmul
    # (bench/RESULTS.md: 1,945 MB against LoRA's 1,849), so it is not offered there
    if not any(r["fits"] for r in out) and t.batch_size > 1:
        both = {"train.batch_size": 1, "train.grad_accum": t.batch_size * t.grad_accum}
        if not t.gradient_checkpointing and cfg.method.name != "head":
            both["train.gradient_checkpointing"] = True
        add(both, "the smallest micro-batch with gradient checkpointing")
    if not any(r["fits"] for r in out) and cfg.data.max_length > 64:
        add({"data.max_length": cfg.data.max_length // 2}, "shorter examples (truncates more of the data)")
    return out


def format_estimate(r: dict[str, Any]) -> str:
    m = r["memory"]
    lines = [f"estimate for {r['config']}: {r['task']} {r['method']} on {r['model']}, {r['device']} ({r['precision']})",
             f"parameters {r['params']:,}, trainable {r['trainable_params']:,}; largest piece {m['batch_tokens']:,} "
             f"padded tokens (batch {r['batch_size']} x longest example {r['longest_example']})",
             f"peak memory ~{m['peak_mb']:,} MB, set by {m['bound_by']}:"]
    names = {"base": "base: Python, libraries, data" + (" (measured)" if r["device"] == "cpu" else ""),
             "weights": "model weights", "gradients_optimizer": "gradients + optimizer state",
             "activations": "activations kept for backward", "logits": "output logits and their gradient"}
    lines += [f"  {names[k]:<44} {m[k]:>8,} MB" for k in names]
    lines.append(f"  {'peak while loading the weights':<44} {m['load_peak_mb']:>8,} MB")
    verdict = "fits" if r["fits"] else "will NOT fit"
    lines.append(f"{r['available_from']}: {r['available_mb']:,} MB -> {verdict} "
                 f"(peak at {m['peak_mb'] / max(r['available_mb'], 1):.0%}; advice above {HEADROOM:.0%})")
    if not r["calibrated"]:
        lines.append("note: the constants were calibrated on CPU runs; on a GPU treat this as a rough guide")
    if r["advice"]:
        lines.append("to fit, change (each alone; peak estimated with it):")
        for a in r["advice"]:
            flags = " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in a["overrides"].items())
            lines.append(f"  {flags:<58} ~{a['peak_mb']:,} MB{'' if a['fits'] else ' (still too much)'}: {a['note']}")
    return "\n".join(lines)
