"""Many LoRA adapters on one base model, for a batch whose rows use different adapters.

peft can route the rows of a batch to different adapters (`adapter_names=[...]`), but it does
so with a loop over the distinct adapters in every adapted layer: a few small ops per adapter
per layer, which on a CPU decoding 8 rows costs more than the base forward itself. Here each
adapted nn.Linear keeps every loaded adapter stacked side by side (S-LoRA / Punica's idea, in
plain matmuls):

    A_cat (S*r, in)    the adapters' A matrices, slot s in rows s*r:(s+1)*r (zero-padded to r)
    B_cat (out, S*r)   their B matrices, slot s in columns s*r:(s+1)*r

and a mixed batch x (B, T, in) gets its updates as

    delta = ((x @ A_cat^T) * M) @ B_cat^T      M (B, 1, S*r): row b's slot block = its scaling

three ops per layer whatever the number of adapters. Slot 0 is the base (zeros). One adapter
alone is folded into a copy of the weight (W + s B A, as methods/folded.py does for evaluation),
so it runs at the base model's cost. The adapter files are read with peft's own loader and
config; these stacks are the only copy of the adapter weights kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError

_PREFIX = "base_model.model."


@dataclass
class Route:
    """How the next forward pass applies the adapters (set by the engine before each call)."""
    kind: str = "plain"  # plain (base weights only) | folded | one (slot) | mixed (mask)
    slot: int = 0
    onehot: torch.Tensor | None = None  # (B, 1, S*r) 1.0 on each row's slot block


class _Bank:
    def __init__(self, linear: nn.Linear, rank: int) -> None:
        self.linear = linear
        self.weight = linear.weight  # the base weight, kept while a folded copy is in use
        w = linear.weight
        self.a = torch.zeros(rank, w.shape[1], dtype=w.dtype)  # slot 0: the base
        self.b = torch.zeros(w.shape[0], rank, dtype=w.dtype)
        self.scale = torch.zeros(rank, dtype=w.dtype)  # scaling of each slot, repeated over its r columns


def _lora_weights(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], object]:
    """{module path: (A (r, in), B (out, r), scaling)} of a peft LoRA adapter folder, checked for what
    this server can batch."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    cfg = PeftConfig.from_pretrained(str(path))
    if str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type) != "LORA":
        raise TunesmithError(f"{path}: a {cfg.peft_type} adapter; the server batches LoRA adapters only "
                             "(use tunesmith predict for this run)")
    for opt, bad in (("use_dora", True), ("lora_bias", True)):
        if getattr(cfg, opt, False) == bad:
            raise TunesmithError(f"{path}: LoRA with {opt}; the server batches plain LoRA only "
                                 "(merge it: tunesmith merge RUN --out DIR, and serve DIR)")
    state = load_peft_weights(str(path), device="cpu")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise TunesmithError(f"{path}: weight '{key}' is not a LoRA matrix of a linear layer "
                                     "(modules_to_save / embeddings); the server batches plain LoRA only")
            continue
        module = key[len(_PREFIX):-len(".lora_A.weight")] if key.startswith(_PREFIX) else key[:-len(".lora_A.weight")]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha) \
            if cfg.alpha_pattern else cfg.lora_alpha
        out[module] = (a, b, alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
    if not out:
        raise TunesmithError(f"{path}: no LoRA weights found")
    return out, cfg


class LoraBank:
    """The adapters of one base model, stacked per layer; `route` decides how a forward applies them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.banks: dict[str, _Bank] = {}
        self.slots: list[str | None] = [None]  # slot -> adapter name; slot 0 is the base
        self.rank = 0
        self.route = Route()
        self.folded: str | None = None  # adapter whose folded weights are cached
        self._folded_weights: dict[str, nn.Parameter] = {}
        self.param_bytes: dict[str, int] = {}

    # ---- loading ------------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> None:
        """Read adapter `name` from a peft folder into a new slot of every layer it adapts."""
        self.attach(name, self.read(path))

    def read(self, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """An adapter's weights, checked against this base (no change to the bank: any thread)."""
        weights, _ = _lora_weights(path)
        for module in weights:
            try:
                layer = self.model.get_submodule(module)
            except AttributeError:
                raise TunesmithError(f"{path}: adapts '{module}', which this base model does not have "
                                     "(an adapter trained on another base)") from None
            if type(layer) is not nn.Linear:
                raise TunesmithError(f"{path}: adapts '{module}', a {type(layer).__name__}; the server "
                                     "batches LoRA on plain nn.Linear layers only")
            a, b, _ = weights[module]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise TunesmithError(f"{path}: '{module}' has LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} "
                                     f"but the base layer is {layer.in_features} -> {layer.out_features} "
                                     "(an adapter trained on another base)")
        return weights

    def attach(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Add read weights as a new slot (the engine thread only: the next forward sees it)."""
        r_new = max(a.shape[0] for a, _, _ in weights.values())
        if r_new > self.rank:
            self._grow_rank(r_new)
        self.slots.append(name)
        for module, bank in list(self.banks.items()) + [(m, None) for m in weights if m not in self.banks]:
            if bank is None:
                bank = self._new_bank(module)
            w = bank.linear.weight
            a_s = torch.zeros(self.rank, w.shape[1], dtype=w.dtype)
            b_s = torch.zeros(w.shape[0], self.rank, dtype=w.dtype)
            s = 0.0
            if module in weights:
                a, b, s = weights[module]
                a_s[: a.shape[0]] = a.to(w.dtype)
                b_s[:, : b.shape[1]] = b.to(w.dtype)
            bank.a = torch.cat([bank.a, a_s])
            bank.b = torch.cat([bank.b, b_s], dim=1)
            bank.scale = torch.cat([bank.scale, torch.full((self.rank,), s, dtype=w.dtype)])
        self.param_bytes[name] = sum(a.nbytes + b.nbytes for a, b, _ in weights.values())

    def _new_bank(self, module: str) -> _Bank:
        layer = self.model.get_submodule(module)
        bank = _Bank(layer, self.rank * len(self.slots[:-1]))
        self.banks[module] = bank
        layer.forward = _banked_forward(layer, bank, self)
        return bank

    def _grow_rank(self, rank: int) -> None:
        """Zero-pad every slot to the new largest rank (zero rows of A / columns of B add exact zeros)."""
        old, n = self.rank, len(self.slots)
        for bank in self.banks.values():
            a = bank.a.view(n, old, -1)
            bank.a = F.pad(a, (0, 0, 0, rank - old)).reshape(n * rank, -1)
            b = bank.b.view(bank.b.shape[0], n, old)
            bank.b = F.pad(b, (0, rank - old)).reshape(bank.b.shape[0], n * rank)
            bank.scale = F.pad(bank.scale.view(n, old), (0, rank - old), value=0.0).reshape(-1)
            bank.scale.view(n, rank)[:] = bank.scale.view(n, rank).max(dim=1, keepdim=True).values
        self.rank = rank

    def remove(self, name: str) -> None:
        slot = self.slots.index(name)
        keep = [i for i in range(len(self.slots)) if i != slot]
        cols = torch.tensor([i * self.rank + j for i in keep for j in range(self.rank)], dtype=torch.long)
        for bank in self.banks.values():
            bank.a = bank.a.index_select(0, cols)
            bank.b = bank.b.index_select(1, cols)
            bank.scale = bank.scale.index_select(0, cols)
        self.slots.pop(slot)
        self.param_bytes.pop(name, None)
        if self.folded == name:
            self.unfold()
            self._folded_weights = {}
            self.folded = None

    def slot(self, name: str | None) -> int:
        return self.slots.index(name)

    # ---- routing ------------------------------------------------------------------------------
    def use(self, names: list[str | None]) -> None:
        """Set up the next forward for rows using these adapters (None = the base)."""
        distinct = set(names)
        if distinct == {None} or not self.banks:
            self.unfold()
            self.route = Route("plain")
        elif len(distinct) == 1:
            self.fold(names[0])
            self.route = Route("folded")
        else:
            self.unfold()
            idx = torch.tensor([self.slot(n) for n in names])  # (B,)
            onehot = torch.zeros(len(names), len(self.slots), self.rank)
            onehot[torch.arange(len(names)), idx] = 1.0
            dtype = next(iter(self.banks.values())).a.dtype
            self.route = Route("mixed", onehot=onehot.view(len(names), 1, -1).to(dtype))  # (B, 1, S*r)

    def fold(self, name: str) -> None:
        """Serve adapter `name` alone: W + s B A in a copy of each adapted weight (kept for reuse)."""
        if self.folded != name:
            self.unfold()
            self._folded_weights = {}
            s = self.slot(name)
            lo, hi = s * self.rank, (s + 1) * self.rank
            with torch.no_grad():
                for module, bank in self.banks.items():
                    scale = float(bank.scale[lo])
                    if scale == 0.0:
                        continue  # this adapter does not adapt this layer
                    folded = bank.weight.detach().clone()
                    # the same ops in the same order as peft's get_delta_weight: (B @ A) * scaling
                    folded += ((bank.b[:, lo:hi].contiguous() @ bank.a[lo:hi]) * scale).to(folded.dtype)
                    self._folded_weights[module] = nn.Parameter(folded, requires_grad=False)
            self.folded = name
        for module, w in self._folded_weights.items():
            self.banks[module].linear.weight = w

    def unfold(self) -> None:
        for bank in self.banks.values():
            if bank.linear.weight is not bank.weight:
                bank.linear.weight = bank.weight


def _banked_forward(layer: nn.Linear, bank: _Bank, owner: LoraBank):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, layer.weight, layer.bias)
        route = owner.route
        if route.kind == "one":
            lo, hi = route.slot * owner.rank, (route.slot + 1) * owner.rank
            scale = bank.scale[lo]
            if scale != 0:
                out = out + (x @ bank.a[lo:hi].t()) @ bank.b[:, lo:hi].t() * scale
        elif route.kind == "mixed":
            h = (x @ bank.a.t()) * (route.onehot * bank.scale)  # (B, T, S*r): each row's own slot only
            out = out + h @ bank.b.t()  # (B, T, out)
        return out
    return forward
