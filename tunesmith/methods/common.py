"""What every method shares: the model's block stack and its trainable weights."""
from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import TunesmithError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a transformer (BERT encoder.layer, Llama model.layers, GPT-2 h ...)."""
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TunesmithError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights that train: what checkpoints need (a LoRA checkpoint is a few MB)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
