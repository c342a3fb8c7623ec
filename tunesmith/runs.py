"""Use a finished run (or any base model): load it, evaluate it on a file, predict with it."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import RunConfig, load_config, parse_overrides
from tunesmith.data import prepare_data
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import evaluate_model, predict_texts
from tunesmith.methods.bottleneck import load_bottleneck
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
from tunesmith.models.quant import embeddings_in_compute_dtype, is_quantized, quantization_config
from tunesmith.train.runtime import cpu_has_fast_bf16, make_accelerator, resolve_device, resolve_precision


log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    cfg: RunConfig
    labels: list[str] | None
    chat: bool  # prompts go through the tokenizer's chat template


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "run.json").is_file() and (p / "config.yaml").is_file()


def load_base(cfg: RunConfig, labels: list[str] | None, pad_token_id: int | None, quantized: bool = True):
    """The run's base model as it was trained on (quantised again for QLoRA / int8 runs unless
    `quantized=False`, which merging onto the full-precision base wants)."""
    device = resolve_device(cfg.train)
    precision = resolve_precision(cfg.train, device)
    quant = quantization_config(cfg.method, precision) if quantized else None
    model = load_model(resolve_model_path(cfg.model.name_or_path), cfg.task, labels, cfg.model.trust_remote_code,
                       pad_token_id, quantization=quant, device=device)
    if quant is not None:  # the embedding dtype training used, or the evaluation differs from the run's
        embeddings_in_compute_dtype(model, precision)
    return model


def _as_trained(cfg: RunConfig, info: dict) -> RunConfig:
    """The run's config with `precision: auto` pinned to the precision the run itself used, so that
    evaluating a saved run reproduces its report on any machine that runs that precision fast.
    bf16 on a CPU without native bf16 kernels is emulated (about 200x slower), so there the run
    is evaluated in fp32, and the log says so."""
    used = info.get("precision")
    if cfg.train.precision != "auto" or used not in ("fp32", "bf16", "fp16"):
        return cfg
    device = resolve_device(cfg.train)
    if used == "bf16" and device == "cpu" and not cpu_has_fast_bf16():
        log.warning("this run trained in bf16; this CPU has no native bf16, so it is evaluated in fp32 "
                    "(metrics may differ from its report in the third digit)")
        used = "fp32"
    if used == "fp16" and device == "cpu":
        used = "fp32"
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": used})})


def load_run(run_dir: str | Path, quantized: bool = True) -> LoadedModel:
    """Load a run's trained model: base + peft adapter, base + bottleneck adapters, base + its sparse
    diff added into the weights (diff pruning), or the saved model."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise TunesmithError(f"{run_dir}: not a finished tunesmith run (no run.json / config.yaml)")
    info = json.loads((run_dir / "run.json").read_text())
    cfg = _as_trained(load_config(run_dir / "config.yaml"), info)
    labels = info.get("labels")
    if (run_dir / "adapter").is_dir():
        from peft import PeftModel

        tok = load_tokenizer(str(run_dir / "adapter"))
        model = PeftModel.from_pretrained(load_base(cfg, labels, tok.pad_token_id, quantized), str(run_dir / "adapter"))
    elif (run_dir / "bottleneck").is_dir():
        tok = load_tokenizer(str(run_dir / "bottleneck"))
        model = load_bottleneck(load_base(cfg, labels, tok.pad_token_id), run_dir / "bottleneck")
    elif (run_dir / "diff").is_dir():
        from tunesmith.methods.diff_pruning import load_diff

        tok = load_tokenizer(str(run_dir / "diff"))
        model = load_diff(load_base(cfg, labels, tok.pad_token_id, quantized=False), run_dir / "diff")
    else:
        tok = load_tokenizer(str(run_dir / "model"))
        model = load_model(str(run_dir / "model"), cfg.task, labels, cfg.model.trust_remote_code, tok.pad_token_id)
    model.eval()
    return LoadedModel(model, tok, cfg, labels, bool(info.get("chat_template")))


def to_device(model: torch.nn.Module, device) -> torch.nn.Module:
    """Move a model unless bitsandbytes placed it already (quantised models refuse .to())."""
    return model if is_quantized(model) else model.to(device)


def evaluate(run_or_model: str | Path, data: str | Path, config: str | Path | dict | None = None,
             overrides: dict | list[str] | None = None) -> dict:
    """Evaluate a run, or a base model as it is, on a data file.

    A run uses its own config (task, columns, template, labels) unless `config` is given; a base
    model uses `config` (or the defaults) with `task` etc. from `overrides`.
    Returns:
        {"split", "examples", "metrics", "samples"[, "generations"]} as in the run report.
    """
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    # The whole file is the evaluation set: no splitting, no sampling.
    ov.update({"data.train": str(data), "data.validation": None, "data.test": None,
               "data.train_size": None, "data.val_size": 0, "data.test_size": 0})
    model = None
    if is_run_dir(run_or_model):
        loaded = load_run(run_or_model)
        if loaded.labels:
            ov["data.labels"] = loaded.labels  # the trained head's classes, in its order
        cfg = load_config(config or str(Path(run_or_model) / "config.yaml"), ov)
        if cfg.train.precision == "auto":  # the precision the run's own final evaluation used
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": loaded.cfg.train.precision})})
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        ov["model.name_or_path"] = str(run_or_model)
        cfg = load_config(config, ov)
        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    prepared = prepare_data(cfg, tokenizer)
    prepared.splits = {"test": prepared.splits["train"]}
    if model is None:
        model = load_model(resolve_model_path(cfg.model.name_or_path), cfg.task, prepared.labels,
                           cfg.model.trust_remote_code, tokenizer.pad_token_id)
    acc, _ = make_accelerator(cfg.train)
    to_device(model, acc.device)
    return evaluate_model(model, tokenizer, prepared, cfg, acc, "test")


def predict(run: str | Path, texts: list[str], max_new_tokens: int | None = None) -> list[dict]:
    """Classify texts ({'label', 'probability'}) or generate replies ({'output'}) with a trained run."""
    loaded = load_run(run)
    cfg = loaded.cfg
    if max_new_tokens:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": max_new_tokens})})
    acc, _ = make_accelerator(cfg.train)
    to_device(loaded.model, acc.device)
    return predict_texts(loaded.model, loaded.tokenizer, texts, cfg, loaded.chat, loaded.labels, acc)
