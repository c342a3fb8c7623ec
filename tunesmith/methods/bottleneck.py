"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), a small module of our own.

The maintained `adapters` library pins transformers 4.x, so we insert the adapters ourselves:
each chosen sublayer's output projection is wrapped so its output h becomes
h + up(relu(down(h))), before the block's residual connection and normalisation, exactly where
the papers put them. `up` starts at zero, so training starts from the unchanged base model.
Pfeiffer placement adapts only the feed-forward sublayer; Houlsby adapts attention too.

Saved as `bottleneck/adapter_model.safetensors` + `bottleneck/tunesmith_adapter.json`
(peft has no bottleneck adapters, so this one format is ours). Not mergeable: the adapter is
non-linear, so it cannot be folded into the base weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import TunesmithError

# Output projection of each sublayer, relative to a block, for the common architectures.
ATTENTION_OUT = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj", "self_attn.out_proj",
                 "attn.out_proj", "attention.dense", "self_attention.dense", "attn.o_proj")
FEEDFORWARD_OUT = ("output.dense", "mlp.down_proj", "mlp.c_proj", "mlp.fc2", "fc2", "mlp.dense_4h_to_h",
                   "feed_forward.w2", "ffn.lin2")
CONFIG_FILE = "tunesmith_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class Bottleneck(nn.Module):
    def __init__(self, dim: int, size: int, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)  # identity at the start: the base model's behaviour is kept
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(torch.relu(self.down(h))))


class AdaptedProjection(nn.Module):
    """A sublayer's output projection followed by its bottleneck adapter."""

    def __init__(self, proj: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.proj = proj
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.proj(*args, **kwargs))


def _out_features(proj: nn.Module) -> int:
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return int(proj.weight.shape[-1])  # transformers Conv1D keeps its weight as (in, out)


def _find(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for rel in candidates:
        try:
            block.get_submodule(rel)
            return rel
        except AttributeError:
            continue
    return None


def add_bottleneck_adapters(model: nn.Module, size: int, placement: str, dropout: float,
                            layers: list[int] | None = None) -> list[str]:
    """Insert adapters in place; freezes nothing (the caller decides). Returns the wrapped module names."""
    from tunesmith.methods.common import transformer_blocks

    blocks = transformer_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    chosen = range(len(blocks)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise TunesmithError(f"method.layers: {bad} out of range; the model has {len(blocks)} blocks")
    wrapped = []
    for i in chosen:
        block = blocks[i]
        for kind, candidates in (("attention", ATTENTION_OUT), ("feed-forward", FEEDFORWARD_OUT)):
            if kind == "attention" and placement == "pfeiffer":
                continue
            rel = _find(block, candidates)
            if rel is None:
                names = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                raise TunesmithError(f"method adapter: cannot find the {kind} output projection in "
                                     f"{type(block).__name__} (block {i}); its layers are {names}")
            parent_name, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            proj = getattr(parent, child)
            adapter = Bottleneck(_out_features(proj), size, dropout).to(proj.weight.device)
            setattr(parent, child, AdaptedProjection(proj, adapter))
            wrapped.append(f"{prefix}.{i}.{rel}")
    return wrapped


def save_bottleneck(model: nn.Module, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    from tunesmith.methods.common import trainable_state

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_bottleneck(model: nn.Module, folder: Path) -> nn.Module:
    """Insert adapters as recorded in `folder` and load their (and the head's) weights."""
    from safetensors.torch import load_file

    meta = json.loads((folder / CONFIG_FILE).read_text())
    add_bottleneck_adapters(model, meta["adapter_size"], meta["placement"], 0.0, meta.get("layers"))
    state = load_file(str(folder / WEIGHTS_FILE))
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise TunesmithError(f"{folder}: adapter weights do not fit this base model: {sorted(unknown)[:3]} ...")
    model.load_state_dict(state, strict=False)
    return model
