"""LoRA dropout that keeps a 1-byte mask for backward instead of two float copies of the input.

peft computes an adapted layer as `W x + s B(A(dropout(x)))`. On the CPU, torch's dropout is
`x * noise` with `noise` a float tensor of 0 and 1/(1-p), and autograd keeps that noise for the
backward of the product; `A` then keeps its own input, the dropped copy. So every adapted layer
holds two tensors the size of its input, and query, key and value each hold two of the same input.
For the main job (all-MiniLM-L6-v2, LoRA on all 36 linear layers, dropout 0.1) that was about 18
of the ~29 input-sized tensors a block keeps for backward.

Here `A(dropout(x))` is one autograd function that keeps `x` itself (one copy, shared by the layers
that read the same input) and the mask as bools, and rebuilds `x * noise` in backward. The forward
runs the same torch ops on the same random stream (the noise is torch's own dropout of a tensor
of ones), so the masks, outputs and updates are the same as peft's; tests/test_lean_dropout.py
checks they match bit for bit in fp32 and under bf16 autocast.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class _DroppedA(torch.autograd.Function):
    """`F.linear(dropout(x), weight)`, keeping x, a bool mask and the weight for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        # torch's dropout of ones is its noise: 0 or 1/(1-p), from the same random draws that
        # dropout(x) would take; x * noise is then the op dropout(x) itself runs on the CPU.
        noise = F.dropout(torch.ones_like(x), p, True)  # (..., in)
        y = F.linear(x * noise, weight)  # (..., r); under autocast, in its dtype, as lora_A(dropout(x))
        ctx.save_for_backward(x, noise.ne(0), weight)
        ctx.p = p
        ctx.cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, mask, weight = ctx.saved_tensors
        noise = mask.to(x.dtype).div_(1 - ctx.p)  # the forward's noise, value for value
        w = weight if ctx.cast is None else weight.to(ctx.cast)  # what F.linear used under autocast
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, r)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # as autograd's: (dy W) through the autocast cast, times the noise
            dx = (dy2.mm(w).to(x.dtype) * noise.reshape(-1, noise.shape[-1])).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dropped = x * noise
            if ctx.cast is not None:
                dropped = dropped.to(ctx.cast)
            dw = dy2.t().mm(dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)  # (r, in)
        return dx, dw, None


def _lean(module: nn.Module, adapter: str) -> bool:
    """Plain LoRA on a float nn.Linear with nn.Dropout(p > 0) and a bias-free A: exactly what
    `_DroppedA` computes."""
    from tunesmith.methods.folded import _plain_lora

    drop, a = module.lora_dropout[adapter], module.lora_A[adapter]
    return (_plain_lora(module, adapter) and type(drop) is nn.Dropout and 0 < drop.p < 1
            and type(a) is nn.Linear and a.bias is None)


def _lean_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Installed on eligible peft LoRA Linear layers: peft's vanilla LoRA forward with
    `lora_A(dropout(x))` as one `_DroppedA`; peft's own forward whenever that would not be exact
    (inference, eval mode, merged or disabled adapters, several adapters, extra arguments)."""
    active = self.active_adapters
    if (args or kwargs or not torch.is_grad_enabled() or self.merged or self.disable_adapters or len(active) != 1
            or not _lean(self, active[0]) or not self.lora_dropout[active[0]].training):
        return type(self).forward(self, x, *args, **kwargs)
    a = active[0]
    result = self.base_layer(x)
    dtype = result.dtype
    lora_a, lora_b = self.lora_A[a], self.lora_B[a]
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    result = result + lora_b(_DroppedA.apply(x, lora_a.weight, self.lora_dropout[a].p)) * self.scaling[a]
    return result.to(dtype)


def install_lean_dropout(model: nn.Module) -> int:
    """Give every LoRA Linear layer with dropout the mask-keeping forward; returns how many."""
    from peft.tuners.lora import Linear

    n = 0
    for module in model.modules():
        if type(module) is Linear and any(_lean(module, a) for a in module.active_adapters):
            module.forward = _lean_forward.__get__(module)
            n += 1
    return n
