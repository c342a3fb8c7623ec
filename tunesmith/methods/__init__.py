"""Which parameters train. `apply_method(model, cfg, task)` returns the model to train; the
loop, checkpoints and evaluation only look at `requires_grad`, so methods live here alone.

  full, head, bitfit, selective -> selective.py   (a subset of the model's own weights)
  lora family, ia3, prefix, prompt, ptuning -> peft_methods.py   (peft adapters)
  adapter -> bottleneck.py   (our Houlsby / Pfeiffer bottleneck adapters)
  diff_pruning -> diff_pruning.py   (a sparse diff over frozen weights; the loop runs its schedule)
Quantised bases (QLoRA, LoRA + int8) are loaded by models/quant.py before a method applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from tunesmith.config import PEFT_METHODS, MethodConfig, Task, task_facts
from tunesmith.errors import TunesmithError
from tunesmith.methods.common import trainable_state, transformer_blocks  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from tunesmith.objectives import LossOut


@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"

    def as_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "percent": round(self.percent, 4)}


def param_report(model: nn.Module) -> ParamReport:
    trainable = total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        # bitsandbytes packs two 4-bit weights per uint8 element: count the real weights.
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return ParamReport(trainable, total)


def saved_as(method: str) -> str:
    """Run sub-folder a method's result is saved in: adapter (peft), bottleneck or diff (ours), or model (transformers)."""
    if method in PEFT_METHODS:
        return "adapter"
    return {"adapter": "bottleneck", "diff_pruning": "diff"}.get(method, "model")


def apply_method(model: nn.Module, cfg: MethodConfig, task: Task, tokenizer_path: str | None = None) -> nn.Module:
    """Freeze / wrap `model` according to the method. Returns the model to train."""
    from tunesmith.methods import selective

    if cfg.name == "full":
        model.requires_grad_(True)
        return model
    if cfg.name == "head":
        return selective.apply_head(model, cfg)
    if cfg.name == "bitfit":
        return selective.apply_bitfit(model, cfg, task)
    if cfg.name == "selective":
        return selective.apply_selective(model, cfg, task)
    if cfg.name == "diff_pruning":
        from tunesmith.methods.diff_pruning import apply_diff_pruning

        return apply_diff_pruning(model, cfg, task)
    if cfg.name == "adapter":
        from tunesmith.methods.bottleneck import add_bottleneck_adapters

        model.requires_grad_(False)
        add_bottleneck_adapters(model, cfg.opt("adapter_size"), cfg.opt("placement"), cfg.opt("dropout"), cfg.layers)
        if task_facts(task).head is not None and cfg.train_head:
            selective.train_head(model)
        return model
    from tunesmith.methods.peft_methods import apply_peft

    return apply_peft(model, cfg, task, tokenizer_path)


def training_schedule(model: nn.Module, cfg: MethodConfig):
    """What a method asks of the loop beyond requires_grad: diff pruning's penalty and mask step; None for others."""
    if cfg.name != "diff_pruning":
        return None
    from tunesmith.methods.diff_pruning import schedule_for

    return schedule_for(model, cfg)


def check_gradients_reach(model: nn.Module, batch: dict[str, torch.Tensor],
                          loss_fn: Callable[[nn.Module, dict], "LossOut"], method: str) -> None:
    """One forward/backward on a real batch: every trainable parameter must get a gradient.

    Catches a method that does not fit a model but would otherwise train nothing in silence
    (e.g. prefixes a model ignores). Gradients are discarded and the RNG is left untouched.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TunesmithError(f"method {method}: no parameter is left to train")
    with torch.random.fork_rng(devices=[]):
        loss_fn(model, batch).loss_sum.backward()
    dead = [n for n, p in trainable if p.grad is None]
    model.zero_grad(set_to_none=True)
    if dead:
        raise TunesmithError(f"method {method} does not reach this model's output: {len(dead)} of {len(trainable)} "
                             f"trainable tensors get no gradient (e.g. {dead[:3]})")
