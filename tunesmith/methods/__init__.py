"""Which parameters train: full, head (transfer learning), or LoRA via peft.

`apply_method` returns the model to train; everything else in tunesmith only looks at
`requires_grad`, so new methods (issue: every PEFT method) slot in here alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.config import MethodConfig, Task
from tunesmith.errors import TunesmithError
from tunesmith.models.load import head_module_names


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
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamReport(trainable, total)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a transformer (BERT encoder.layer, Llama model.layers, GPT-2 h ...)."""
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TunesmithError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def apply_method(model: nn.Module, cfg: MethodConfig, task: Task) -> nn.Module:
    """Freeze / wrap `model` according to the method. Returns the model to train."""
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name == "head":
        model.requires_grad_(False)
        for name in head_module_names(model):
            getattr(model, name).requires_grad_(True)
        for name, module in model.named_modules():
            # BERT-style poolers (dense + tanh on [CLS]) were trained for next-sentence prediction
            # and sit between the body and the new classifier: they belong to the task head.
            if name.endswith("pooler"):
                module.requires_grad_(True)
        if cfg.unfreeze_top_layers:
            blocks = transformer_blocks(model)
            if cfg.unfreeze_top_layers > len(blocks):
                raise TunesmithError(f"method.unfreeze_top_layers={cfg.unfreeze_top_layers} but the model has {len(blocks)} blocks")
            for block in list(blocks)[-cfg.unfreeze_top_layers:]:
                block.requires_grad_(True)
        return model
    return _apply_lora(model, cfg, task)


def _apply_lora(model: nn.Module, cfg: MethodConfig, task: Task) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    modules_to_save = head_module_names(model) if (task == "classification" and cfg.train_head) else None
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        layers_to_transform=cfg.layers,
        modules_to_save=modules_to_save,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # peft reports unknown target modules this way
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TunesmithError(f"LoRA cannot wrap this model: {str(e).splitlines()[0]}\n"
                             f"  linear layer names in {type(model).__name__}: {names}") from None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights that train: what checkpoints need (a LoRA checkpoint is a few MB)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
