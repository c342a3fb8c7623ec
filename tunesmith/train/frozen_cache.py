"""Compute the frozen bottom of the model once per example, not once per epoch.

When only the top of a model trains (method head; selective with unfreeze_top_layers or
layers; LoRA, IA3 or adapters with `method.layers` that leave out the lowest blocks), the
embeddings and the blocks below the lowest trainable one compute the same function of the same
tokens in every epoch: none of their weights change and, with the model's dropout off, nothing
random happens in them. So the first time an example goes through, the input of the lowest
trainable block is kept (its real tokens only); from then on those blocks are swapped for
stand-ins that hand the kept tensor on, and the model runs from there. Backward never reached
the frozen blocks, so what is saved is their forward pass: for the head method, every block
after the first epoch.

It is exact, not an approximation: the kept tensor is what those blocks return (under the same
autocast), and real tokens never attend to padding, so the zeros put at padded positions
change nothing. Batches are right-padded (data/collate.py), so a token's position, and with it
any position embedding, is the same in every batch it lands in.

Applies only where all of that holds; `plan()` says why not otherwise, and the run goes on
without it. The memory is the hidden size x 4 bytes per token of the training and validation
data (all-MiniLM-L6-v2, 1,000 IMDB reviews: about 0.4 GB), capped by `train.frozen_cache_gb`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from tunesmith.config import PROMPT_METHODS, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.load import ATTENTION_DROPOUT_KEYS, HIDDEN_DROPOUT_KEYS


class _Stop(Exception):
    """Raised from a hook once the frozen bottom has run: the rest of the forward is not needed."""


class _Skip(nn.Module):
    """Stands in for a frozen block: passes its input on, or (the last one) the kept tensor.
    Other attributes read from it (Mistral-style loops read `layer.attention_type`) come from
    the block it replaces."""

    def __init__(self, block: nn.Module, out: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple
        self.__dict__["_block"] = block  # not registered: no parameters of its own

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        h = hidden_states if self.out is None else self.out
        return (h,) if self.as_tuple else h


class FrozenBottom:
    """The kept inputs of block `k` (the lowest trainable one) for each example seen so far."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, k: int):
        self.model, self.blocks, self.k = model, blocks, k
        self.store: dict[int, torch.Tensor] = {}  # id(feature) -> (n_tokens, H)
        self._alive: list[dict] = []  # the features themselves, so their ids stay theirs
        self.as_tuple = False

    @contextmanager
    def use(self, feats: list[dict], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside, a forward pass of the model on `batch` (the collated `feats`) starts at block k."""
        mask = batch["attention_mask"].bool()  # (B, T)
        if any(id(f) not in self.store for f in feats):
            self._fill(feats, batch, mask)
        first = self.store[id(feats[0])]
        hidden = first.new_zeros(*mask.shape, first.shape[-1])  # (B, T, H); padding stays zero
        for row, f in enumerate(feats):
            hidden[row, mask[row]] = self.store[id(f)]
        originals = [self.blocks[i] for i in range(self.k)]
        for i in range(self.k):
            self.blocks[i] = _Skip(originals[i], hidden if i == self.k - 1 else None, self.as_tuple)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    @torch.no_grad()
    def _fill(self, feats: list[dict], batch: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        out = bottom_output(self.model, self.blocks[self.k - 1], batch["input_ids"], batch["attention_mask"])
        self.as_tuple = isinstance(out, tuple)
        h = out[0] if self.as_tuple else out  # (B, T, H)
        for row, f in enumerate(feats):
            if id(f) not in self.store:
                self.store[id(f)] = h[row, mask[row]].clone()
                self._alive.append(f)


def bottom_output(model: nn.Module, last: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """What block `last` returns when the model runs on these tokens; the blocks above it do not run."""
    got: list[Any] = []

    def grab(module, args, output):
        got.append(output)
        raise _Stop

    hook = last.register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        hook.remove()
    return got[0]


def plan(model: nn.Module, cfg: RunConfig, feature_lists: list[list[dict]]) -> tuple[FrozenBottom | None, str]:
    """A FrozenBottom for `model` (unwrapped) if the bottom is frozen and deterministic and the
    cache fits; else None and the reason, for the run's log."""
    from tunesmith.methods import transformer_blocks

    if cfg.train.frozen_cache_gb <= 0:
        return None, "frozen-bottom cache: off (train.frozen_cache_gb 0)"
    if cfg.method.name in PROMPT_METHODS:
        return None, ""  # virtual tokens enter before the first block: nothing below is frozen
    if any("rows" in f for feats in feature_lists for f in feats[:1]):
        return None, ""  # preference pairs: several sequences per example (not yet supported)
    try:
        blocks = transformer_blocks(model)
    except TunesmithError:  # a model without a block stack simply runs whole
        return None, ""
    trainable = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    k = min(trainable) if trainable else len(blocks)
    if k == 0 or not any(p.requires_grad for p in model.parameters()):
        return None, ""
    # Does anything that trains feed the bottom (embeddings, a position table, a hook)? Ask
    # autograd: run the bottom on one short example and see whether its output needs a gradient.
    sample = next(f for feats in feature_lists for f in feats)
    ids = torch.tensor([sample["input_ids"][:16]], device=next(model.parameters()).device)
    with torch.enable_grad():
        out = bottom_output(model, blocks[k - 1], ids, torch.ones_like(ids))
    out = out[0] if isinstance(out, tuple) else out
    if out.requires_grad:
        return None, ""
    config = getattr(model, "config", None)
    random_in = [key for key in (*ATTENTION_DROPOUT_KEYS, *HIDDEN_DROPOUT_KEYS)
                 if isinstance(getattr(config, key, None), float) and getattr(config, key) > 0]
    random_in += [n for i in range(k) for n, m in blocks[i].named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if random_in:
        return None, (f"frozen-bottom cache: not used, the frozen blocks 0-{k - 1} are not deterministic "
                      f"(dropout: {', '.join(random_in)}; set model.dropout and model.attention_dropout to 0 to use it)")
    hidden = out.shape[-1]
    tokens = sum(len(f["input_ids"]) for feats in feature_lists for f in feats)
    need_gb = tokens * hidden * 4 / 2**30
    if need_gb > cfg.train.frozen_cache_gb:
        return None, (f"frozen-bottom cache: not used, it would take {need_gb:.1f} GB "
                      f"(train.frozen_cache_gb {cfg.train.frozen_cache_gb})")
    skipped = "the embeddings" + (f" and blocks 0-{k - 1}" if k > 1 else " and block 0")
    return FrozenBottom(model, blocks, k), (f"frozen-bottom cache: {skipped} run once per example "
                                            f"(up to {need_gb:.2f} GB), then are skipped")
