"""Load a finished run's model: its base plus the peft adapter, our bottleneck adapters, or the saved
model. Below tasks and train so that a reward model run can be loaded while another run trains."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import RunConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods.bottleneck import load_bottleneck
from tunesmith.models.device import cpu_has_fast_bf16, resolve_device, resolve_precision
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
from tunesmith.models.quant import embeddings_in_compute_dtype, is_quantized, quantization_config

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


# Written by `tunesmith merge` beside the merged weights: the run's config (task, columns, template),
# so a merged folder predicts and evaluates the way its run did.
MERGED_CONFIG = "tunesmith_config.yaml"


def load_run(run_dir: str | Path, quantized: bool = True) -> LoadedModel:
    """Load a run's trained model: base + peft adapter, base + bottleneck adapters, base + its sparse
    diff added into the weights (diff pruning), or the saved model."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise TunesmithError(f"not found: {run_dir.absolute()}")
    if not is_run_dir(run_dir):
        if (run_dir / "config.json").is_file():
            return load_model_folder(run_dir)
        raise TunesmithError(f"{run_dir}: neither a finished tunesmith run (run.json + config.yaml) nor a model "
                             "folder (config.json)")
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


def load_model_folder(folder: Path) -> LoadedModel:
    """A plain transformers folder: a merged run (its tunesmith_config.yaml says the task and data
    settings) or any model whose architecture says what it does (a sequence classifier with its
    id2label names, or a causal LM)."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(folder)
    arch = " ".join(getattr(mc, "architectures", None) or [])
    labels = [mc.id2label[i] for i in sorted(mc.id2label)] if "ForSequenceClassification" in arch else None
    if (folder / MERGED_CONFIG).is_file():
        cfg = load_config(folder / MERGED_CONFIG, {"model.name_or_path": str(folder.absolute())})
    elif labels or "ForCausalLM" in arch:
        cfg = load_config({"task": "classification" if labels else "sft", "data": {"train": "-"},
                           "model": {"name_or_path": str(folder.absolute())}})
    else:
        raise TunesmithError(f"{folder}: a {arch or 'model'} folder is neither a sequence classifier nor a causal LM; "
                             "predict needs a trained run or one of those")
    tok = load_tokenizer(str(folder), cfg.model.trust_remote_code)
    model = load_model(str(folder), cfg.task, labels, cfg.model.trust_remote_code, tok.pad_token_id)
    model.eval()
    chat = cfg.data.chat_template is not False and bool(getattr(tok, "chat_template", None)) and labels is None
    return LoadedModel(model, tok, cfg, labels, chat)


def to_device(model: torch.nn.Module, device) -> torch.nn.Module:
    """Move a model unless bitsandbytes placed it already (quantised models refuse .to())."""
    return model if is_quantized(model) else model.to(device)
