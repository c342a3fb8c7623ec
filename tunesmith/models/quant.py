"""Quantised bases for QLoRA (4-bit NF4/FP4, optional double quantisation) and LoRA + int8.

bitsandbytes does the quantisation (it has CPU kernels as well as CUDA ones); we build its
config from ours, pick the compute dtype from the run's precision, and prepare the model the
way the QLoRA recipe does (norms and head in fp32, input gradients on for adapters).
"""
from __future__ import annotations

import sys
import warnings

import torch

from tunesmith.config import MethodConfig
from tunesmith.errors import TunesmithError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunesmithError("a quantised base needs bitsandbytes: pip install bitsandbytes") from None
    # bitsandbytes' int8 matmul casts fp32 inputs to fp16 on every call and says so each time.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    from tunesmith import _QuantKernelNote

    if _QuantKernelNote.held:  # held back at import (tunesmith/__init__.py): it matters now
        print(f"note: {_QuantKernelNote.held}", file=sys.stderr)
        _QuantKernelNote.held = None


# Kept in full precision: output layers, and a classifier's new head, which starts random and
# trains in full (bitsandbytes cannot quantise a layer created after loading).
SKIP_MODULES = ["lm_head", "classifier", "score", "classification_head", "pooler"]


def quantization_config(cfg: MethodConfig, precision: str):
    """transformers BitsAndBytesConfig for the method, or None for a full-precision base."""
    kind = cfg.opt("quantize")
    if cfg.name not in ("lora", "dora", "qlora") or kind == "none":
        return None
    _require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=cfg.opt("double_quant"),
                              bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision], llm_int8_skip_modules=SKIP_MODULES)


def keep_one_cpu_4bit_path(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their portable CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout
    the first time the layer runs without gradients (our evaluations do). That layout rejects
    any layer that is not a multiple of 32 x 64 with a reshape traceback, its training path then
    fails (an in-place bias add on a tensor autograd needs), and it makes a run's numbers depend
    on which CPU it met. With the repack off every CPU runs the same kernel on every shape.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)


def prepare_for_training(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """QLoRA preparation, minus gradient checkpointing (train.gradient_checkpointing decides that).

    peft's preparation upcasts every non-quantised weight to fp32. With bf16/fp16 compute we keep
    the frozen embedding matrix in the compute dtype instead, as the QLoRA recipe does: for a
    model with a large vocabulary (SmolLM2: 49k x 576, a fifth of its weights) that halves the
    biggest part of the model that 4-bit quantisation does not touch.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    embeddings_in_compute_dtype(model, precision, frozen_only=True)
    return model


def embeddings_in_compute_dtype(model: torch.nn.Module, precision: str, frozen_only: bool = False) -> None:
    """Store a quantised base's embedding matrices in the compute dtype (see prepare_for_training).
    Loading a trained run for evaluation does the same, so it computes what training evaluated."""
    dtype = COMPUTE_DTYPES[precision]
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and not (frozen_only and module.weight.requires_grad):
            module.weight.data = module.weight.data.to(dtype)  # a tied output layer shares it


def make_optimizer_class(name: str, device: str):
    """The optimizer class for train.optimizer, and a note when the choice had to change."""
    if name == "adamw":
        return torch.optim.AdamW, None
    _require_bitsandbytes()
    import bitsandbytes as bnb

    note = None
    if name.startswith("paged_") and device != "cuda":
        # Paging moves optimizer state between GPU and CPU memory on GPU memory pressure; on a
        # CPU there is nothing to page to, so use the same optimizer unpaged.
        note = f"train.optimizer {name}: paging needs a CUDA GPU; using {name.removeprefix('paged_')} on {device}"
        name = name.removeprefix("paged_")
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw": torch.optim.AdamW}[name]
    return cls, note
