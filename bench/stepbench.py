"""Shared pieces of the step-level benchmarks (bench/mfu.py, bench/scaling.py).

- `matmul_peak()`: the machine's achieved matrix-multiply FLOP/s, the denominator of MFU.
- `measure_step()`: build a model the way `tunesmith train` does (loader, method, optimizer),
  run training steps on a fixed random batch, and report seconds per step, the FLOPs of one
  step (counted by torch's FlopCounterMode, forward and backward, so a frozen base's missing
  weight gradients are not counted; attention's matmuls added by formula on every device), and
  the process's peak RSS.
- `run_point()`: the same in a fresh subprocess, so each point's peak memory is its own.

Random token ids make the timing independent of any dataset: every position is a real token and
carries a loss, which is the worst case for memory (no padding, no prompt masking).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent

# A larger causal LM built from scratch (random weights; nothing to download): SmolLM2-360M's shape.
SCRATCH = {"scratch:360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                            "num_attention_heads": 15, "num_key_value_heads": 5}}


def machine() -> tuple[str, str]:
    """(device in words, the precision `precision: auto` trains in here): the header of every table."""
    import torch

    from tunesmith.config import TrainConfig
    from tunesmith.train.runtime import resolve_precision

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    return device, resolve_precision(TrainConfig(), "cuda" if gpu else "cpu")


def matmul_peak(dtype: str = "fp32", n: int = 2048, reps: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul on this process's threads (the MFU denominator)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _build(model_name: str, seq: int, batch: int, gc: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.methods import apply_method
    from tunesmith.models.load import load_model, resolve_model_path
    from tunesmith.tasks import get_task
    from tunesmith.train.loop import make_optimizer
    from tunesmith.train.runtime import enable_gradient_checkpointing, make_accelerator

    encoder = "MiniLM" in model_name
    task = "classification" if encoder else "cpt"
    method = ({"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]} if encoder
              else {"name": "lora", "r": 16, "alpha": 32})
    cfg = load_config({"task": task, "model": {"name_or_path": model_name, "dropout": 0.0, "attention_dropout": 0.0},
                       "data": {"train": "unused.jsonl", "max_length": seq}, "method": method,
                       "train": {"batch_size": batch, "gradient_checkpointing": gc}})
    acc, precision = make_accelerator(cfg.train)
    if model_name in SCRATCH:
        config = AutoConfig.from_pretrained(resolve_model_path("builtin:SmolLM2-135M-Instruct"))
        for k, v in SCRATCH[model_name].items():
            setattr(config, k, v)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = load_model(resolve_model_path(model_name), task, ["negative", "positive"] if encoder else None,
                           dropout=0.0, attention_dropout=0.0)
    model = apply_method(model, cfg.method, task).to(acc.device)
    if gc:
        enable_gradient_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    data |= {"label": torch.randint(0, 2, (batch,), generator=g)} if encoder else {"labels": ids.clone()}
    data = {k: v.to(acc.device) for k, v in data.items()}
    optimizer = make_optimizer(model, cfg, acc.device.type)
    model, optimizer = acc.prepare(model, optimizer)
    return model, data, get_task(task).objective(cfg), optimizer, acc, precision


def measure_step(model_name: str, seq: int, batch: int, steps: int = 3, gc: bool = False) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tunesmith.utils import current_rss_mb, peak_rss_mb

    t_load = time.perf_counter()
    model, data, objective, optimizer, acc, precision = _build(model_name, seq, batch, gc)
    rss_loaded, load_s = current_rss_mb(), time.perf_counter() - t_load
    model.train()

    def step() -> float:
        with acc.autocast():
            out = objective(model, data)
            loss = out.loss_sum / max(out.count, 1)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return float(loss.detach())

    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = median(times)
    peak_rss = peak_rss_mb()  # before the counted step: the counter's bookkeeping is not training's memory
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None
    # Attention is counted by formula on every device. FlopCounterMode counts the GPU SDPA kernels
    # but not the CPU one (0 FLOPs), and its GPU formula asserts on grouped-query shapes (SmolLM2's
    # 9 query heads over 3 key/value heads), so the counter is told to skip the fused kernels.
    counter = FlopCounterMode(display=False, custom_mapping={op: _no_flops for op in _fused_attention_ops()})
    with counter:
        step()
    counted = counter.get_total_flops()
    attention = attention_flops(acc.unwrap_model(model).config, seq, batch)
    flops = counted + attention
    return {"model": model_name, "seq": seq, "batch": batch, "gc": gc, "precision": precision,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "step_s": step_s, "tokens_per_s": batch * seq / step_s, "flops_per_step": flops,
            "flops_counted": counted, "flops_attention_added": attention, "achieved_flops": flops / step_s, "load_s": load_s,
            "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss, "peak_gpu_mb": peak_gpu}


def _no_flops(*args, **kwargs) -> int:
    return 0


def _fused_attention_ops() -> list:
    from torch.utils.flop_counter import flop_registry

    return [op for op in flop_registry if str(op).startswith("aten.") and "attention" in str(op)]


def attention_flops(config, seq: int, batch: int) -> int:
    """Attention score and mix matmuls of one training step, forward + backward."""
    return 12 * config.num_hidden_layers * config.hidden_size * seq * seq * batch


def run_point(**kw) -> dict:
    """measure_step(**kw) in a fresh process (its own peak memory); raises if the worker fails."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); from stepbench import measure_step; "
                f"open({f.name!r}, 'w').write(json.dumps(measure_step(**{kw!r})))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        return json.loads(Path(f.name).read_text())


def mfu(point: dict, peak: float) -> float:
    return point["achieved_flops"] / peak
