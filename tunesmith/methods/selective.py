"""Methods that train a chosen subset of the model's own weights: full, head, BitFit, selective."""
from __future__ import annotations

import re

from torch import nn

from tunesmith.config import MethodConfig, Task, task_facts
from tunesmith.errors import TunesmithError
from tunesmith.models.load import head_module_names


def _blocks(model: nn.Module) -> nn.ModuleList:
    from tunesmith.methods.common import transformer_blocks

    return transformer_blocks(model)


def train_head(model: nn.Module, pooler: bool = False) -> None:
    """Unfreeze the task head: the new classifier and, with `pooler`, a BERT-style pooler before it.

    The pooler (dense + tanh on [CLS]) was trained for next-sentence prediction, or not at all:
    on all-MiniLM-L6-v2, a mean-pooling sentence encoder, its outputs vary by about 0.03 across
    reviews, too little signal for a new classifier to read unless the pooler's weights train too
    (measured: BitFit stayed at chance on IMDB with the pooler frozen). The methods that train
    the model's own weights (head, bitfit, selective) count it as part of the head; adapters
    and peft methods change the body in front of it instead and leave it frozen.
    """
    for name in head_module_names(model):
        getattr(model, name).requires_grad_(True)
    if pooler:
        for name, module in model.named_modules():
            if name.endswith("pooler"):
                module.requires_grad_(True)


def apply_head(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    model.requires_grad_(False)
    train_head(model, pooler=True)
    _unfreeze_top(model, cfg.opt("unfreeze_top_layers"))
    return model


def apply_bitfit(model: nn.Module, cfg: MethodConfig, task: Task) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): only the bias terms train."""
    model.requires_grad_(False)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    if not biases:
        raise TunesmithError(f"method bitfit: {type(model).__name__} has no bias terms to train (Llama-style "
                             "models use bias-free layers); use lora, ia3 or selective instead")
    for p in biases:
        p.requires_grad_(True)
    if task_facts(task).head is not None and cfg.train_head:
        train_head(model, pooler=True)
    return model


def apply_selective(model: nn.Module, cfg: MethodConfig, task: Task) -> nn.Module:
    """Train parameters whose names match `modules`, the blocks in `layers` and the top N blocks."""
    model.requires_grad_(False)
    chosen = 0
    for pattern in cfg.modules or []:
        rx = re.compile(pattern)
        hits = [p for n, p in model.named_parameters() if rx.search(n)]
        if not hits:
            sample = [n for n, _ in model.named_parameters()][:8]
            raise TunesmithError(f"method.modules: '{pattern}' matches no parameter of {type(model).__name__} "
                                 f"(names look like {sample})")
        for p in hits:
            p.requires_grad_(True)
        chosen += len(hits)
    if cfg.layers:
        blocks = _blocks(model)
        for i in cfg.layers:
            if not 0 <= i < len(blocks):
                raise TunesmithError(f"method.layers: block {i} out of range; the model has {len(blocks)} blocks")
            blocks[i].requires_grad_(True)
    _unfreeze_top(model, cfg.opt("unfreeze_top_layers"))
    if task_facts(task).head is not None and cfg.train_head:
        train_head(model, pooler=True)
    return model


def _unfreeze_top(model: nn.Module, n: int) -> None:
    if not n:
        return
    blocks = _blocks(model)
    if n > len(blocks):
        raise TunesmithError(f"method.unfreeze_top_layers={n} but the model has {len(blocks)} blocks")
    for block in list(blocks)[-n:]:
        block.requires_grad_(True)
