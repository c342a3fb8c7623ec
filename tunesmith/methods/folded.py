"""Evaluate LoRA models at the base model's speed: fold each update into a temporary weight.

Unmerged, every adapted linear layer computes `W x + s * B (A x)`: two extra thin matmuls, an
add and a scale over the whole activation, each a full pass over memory. A profile of
evaluating all-MiniLM-L6-v2 with LoRA on all 36 of its linear layers (1,000 IMDB reviews, 2-core
CPU) put about a fifth of the time there (mm 10%, mul 6%, and part of add). For a forward pass
without gradients, `(W + s B A) x` gives the same function with one matmul.

peft's own `merge_adapter()` adds the update into W in place and `unmerge_adapter()` subtracts it
again, which leaves W off by float rounding after every evaluation: over a run of many
evaluations the "frozen" base drifts. Here the folded weight is a new tensor and the original
one is put back untouched, so training resumes on bit-identical base weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _foldable(module: nn.Module) -> bool:
    """A plain LoRA linear layer on an unquantised float weight: the update folds exactly."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; keep the evaluator usable without it anyway
        return False
    if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
        return False
    base = module.get_base_layer()
    # type() not isinstance(): bitsandbytes' 8/4-bit layers subclass nn.Linear
    if type(base) is not nn.Linear or not base.weight.dtype.is_floating_point:
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    # variants (DoRA's magnitude, aLoRA's ...) and LoRA biases do not fold into W alone
    return bool(active) and not any(a in getattr(module, "lora_variant", {}) or module.lora_bias.get(a, False)
                                    for a in active)


# The folded copies live beside the originals while the context is open. Small models gain the
# most (their LoRA matmuls are memory-bound next to small base matmuls) and the copies cost them
# little; a 7B model with LoRA on every linear layer would need a second copy of nearly all its
# weights, so past this much it runs unfolded.
MAX_FOLD_BYTES = 1 << 30


@contextmanager
def lora_folded(model: nn.Module, max_bytes: int | None = None) -> Iterator[int]:
    """`with lora_folded(model) as n:` runs the model with each foldable LoRA layer's update
    folded into a fresh copy of its base weight (n layers). For evaluation only: nothing inside
    may need gradients. Layers that do not fold (DoRA, quantised bases) run as they are; if the
    copies would take more than `max_bytes` (default MAX_FOLD_BYTES), nothing is folded (n = 0)."""
    swaps: list[tuple[nn.Module, nn.Linear, nn.Parameter]] = []
    layers = [m for m in model.modules() if _foldable(m)]
    if sum(m.get_base_layer().weight.nbytes for m in layers) > (MAX_FOLD_BYTES if max_bytes is None else max_bytes):
        layers = []
    try:
        with torch.no_grad():
            for module in layers:
                base = module.get_base_layer()
                folded = base.weight.detach().clone()
                for a in module.active_adapters:
                    if a in module.lora_A:
                        folded += module.get_delta_weight(a).to(folded.dtype)
                swaps.append((module, base, base.weight))
                base.weight = nn.Parameter(folded, requires_grad=False)
                # peft's forward then calls the base layer alone, as for an adapter merged in place
                module.merged_adapters = [a for a in module.active_adapters if a in module.lora_A]
        yield len(swaps)
    finally:
        for module, base, original in swaps:
            base.weight = original
            module.merged_adapters = []
