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


def _plain_lora(module: nn.Module, adapter: str) -> bool:
    """A plain LoRA update of an unquantised float nn.Linear: (W + s B A) is exactly the layer."""
    base = module.get_base_layer()
    # type() not isinstance(): bitsandbytes' 8/4-bit layers subclass nn.Linear. Variants (DoRA's
    # magnitude, ...) and LoRA biases do not fold into W alone.
    return (adapter in module.lora_A and type(base) is nn.Linear and base.weight.dtype.is_floating_point
            and adapter not in getattr(module, "lora_variant", {}) and not module.lora_bias.get(adapter, False))


def _foldable(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    return bool(active) and all(_plain_lora(module, a) for a in active)


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


# ---- training: the same fold, with LoRA's own gradients --------------------------------------
#
# In a training step the adapters must get gradients, so the update cannot simply be merged. But
# without LoRA dropout both paths see the same input, and y = (W + s B A) x still holds: one
# matmul forward instead of three plus a scale and an add. Backward needs dx = dy (W + s B A),
# dA = s (dy B)^T x and dB = s dy^T (x A^T): four thin matmuls, as peft's own graph has, but one
# fewer big-activation pass. A profile of a MiniLM LoRA step (16 x 300 tokens, dropout 0) put 20%
# of the time in the 432 thin matmuls of the 36 adapted layers and 8% more in their scale and add.
# W + s B A is recomputed in backward rather than saved: it is as large as the weight itself.

class _FoldedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        folded = torch.addmm(weight, lora_b, lora_a, alpha=scaling)  # (out, in)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return nn.functional.linear(x, folded, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dx = d_bias = d_a = d_b = None
        if ctx.needs_input_grad[0]:
            dx = dy @ torch.addmm(weight, lora_b, lora_a, alpha=s)
        if ctx.needs_input_grad[2]:
            d_bias = dy2.sum(0)
        if ctx.needs_input_grad[3]:
            d_a = (dy2 @ lora_b).t() @ x2 * s  # (r, in)
        if ctx.needs_input_grad[4]:
            d_b = dy2.t() @ (x2 @ lora_a.t()) * s  # (out, r)
        return dx, None, d_bias, d_a, d_b, None


def _folded_train_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Installed on eligible peft LoRA Linear layers: the fold when it is exact and gradients are
    wanted, peft's own forward otherwise (inference, merged or disabled adapters, mixed-adapter
    batches, several active adapters, autocast, mixed dtypes)."""
    active = self.active_adapters
    if (args or kwargs or not torch.is_grad_enabled() or self.merged or self.disable_adapters or len(active) != 1
            or not _train_foldable(self, active[0]) or torch.is_autocast_enabled(x.device.type)):
        return type(self).forward(self, x, *args, **kwargs)
    a = active[0]
    base = self.get_base_layer()
    lora_a, lora_b = self.lora_A[a].weight, self.lora_B[a].weight
    if not (x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    return _FoldedLoRALinear.apply(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[a]))


def _train_foldable(module: nn.Module, adapter: str) -> bool:
    """The fold is exact in training too when both paths see the same input (no LoRA dropout)
    and the base weight is frozen (the function gives it no gradient)."""
    return (_plain_lora(module, adapter) and isinstance(module.lora_dropout[adapter], nn.Identity)
            and not module.get_base_layer().weight.requires_grad)


def install_training_fold(model: nn.Module) -> int:
    """Give every LoRA Linear layer without dropout the folded training forward; returns how many."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and any(_train_foldable(module, a) for a in module.active_adapters):
            module.forward = _folded_train_forward.__get__(module)
            n += 1
    return n
