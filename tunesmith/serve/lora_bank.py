"""Many LoRA adapters on one base model, for a batch whose rows use different adapters.

peft can route the rows of a batch to different adapters (`adapter_names=[...]`), but it does
so with a loop over the distinct adapters in every adapted layer: a few small ops per adapter
per layer, which on a CPU decoding 8 rows costs more than the base forward itself. Here each
adapted nn.Linear keeps every loaded adapter stacked slot by slot (S-LoRA / Punica's idea, in
plain batched matmuls):

    A  (S, r, in)     the adapters' A matrices, slot s = A_s (zero-padded to rank r)
    Bt (S, r, out)    their B matrices, transposed: slot s = B_s^T
    scale (S,)        each slot's alpha / r for this layer (0 where the adapter leaves it alone)

and a mixed batch x (B, T, in), row b on slot idx[b], gets its update with Punica's BGMV:

    delta = bmm(bmm(x, A[idx]^T) * scale[idx], Bt[idx])     (B, T, out)

each row multiplied by its own adapter only (a row costs r * (in + out) whatever the number of
adapters loaded or in the batch), in the same handful of ops per layer. Slot 0 is the base
(zeros). One adapter alone is folded into a copy of the weight (W + s B A, as methods/folded.py
does for evaluation), so it runs at the base model's cost. Adapter files are read with peft's own
loader and config (no peft model is built); these stacks are the only copy of the weights kept.
"""
from __future__ import annotations

import math
import mmap
import threading
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
    kind: str = "plain"  # plain (base weights only) | folded | one (slot) | mixed (idx)
    slot: int = 0
    idx: torch.Tensor | None = None  # (B,) each row's slot, on the model's device


class _Bank:
    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.weight = linear.weight  # the base weight, kept while a folded copy is in use
        self.a = self.bt = self.scale = None  # (S, r, in), (S, r, out), (S,): allocated by LoraBank._layout


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


# Slots are allocated ahead (torch.empty: pages the OS maps only once written), so loading an
# adapter writes its own slot in place: no copy of the others, and resident memory grows by the
# adapter's own bytes. Once a quarter or fewer of the slots are free, prepare() lays the stacks out
# again at twice the size on a worker thread, so a hot load finds a free slot instead of waiting for
# that copy (about 0.8 s at 16 slots of SmolLM2's r 16 adapters). prepare() also has the OS map the
# next free slot's pages (_populate), so the load itself only copies the adapter in.
INITIAL_SLOTS = 16
# One adapter alone is served folded, but folding copies every adapted weight: worth it for a
# stream of steps, not for one short request. Fold once it has run alone for this many forwards.
FOLD_AFTER = 8


class LoraBank:
    """The adapters of one base model, stacked per layer; `route` decides how a forward applies them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.banks: dict[str, _Bank] = {}
        self.slots: list[str | None] = [None]  # slot -> adapter name; slot 0 is the base
        self.rank = 0
        self.capacity = 0
        self.route = Route()
        self.folded: str | None = None  # adapter whose folded weights are cached
        self._folded_weights: dict[str, nn.Parameter] = {}
        self._solo: tuple[str | None, int] = (None, 0)  # adapter running alone, for how many forwards
        self.param_bytes: dict[str, int] = {}
        # Slot-table changes (attach, remove, prepare) hold this: try_attach and prepare run off the
        # engine thread.
        self._lock = threading.Lock()
        self._layouts = 0  # how many times the stacks were laid out (a growth started before one is dropped)
        self._dirty: set[int] | None = None  # slots written while prepare() copies the stacks

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
        with self._lock:
            rank = max(self.rank, max(a.shape[0] for a, _, _ in weights.values()))
            for module in weights:
                if module not in self.banks:
                    layer = self.model.get_submodule(module)
                    self.banks[module] = bank = _Bank(layer)
                    layer.forward = _banked_forward(layer, bank, self)
            if rank != self.rank or len(self.slots) == self.capacity or any(b.a is None for b in self.banks.values()):
                self._layout(rank, max(INITIAL_SLOTS, self.capacity * (2 if len(self.slots) == self.capacity else 1)))
            self._fill(name, weights)

    def try_attach(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> bool:
        """attach() from any thread while the engine decodes, when the adapter fits a free slot of the
        stacks as laid out (its rank at most the bank's, its layers already banked): the forward in
        progress reads other slots only, and the slot becomes visible once written. Returns False,
        changing nothing, when the stacks must be laid out again: then attach() on the engine thread."""
        with self._lock:
            fits = (len(self.slots) < self.capacity and all(a.shape[0] <= self.rank for a, _, _ in weights.values())
                    and all(m in self.banks and self.banks[m].a is not None for m in weights))
            if fits:
                self._fill(name, weights)
            return fits

    def _fill(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        slot = len(self.slots)
        for module, bank in self.banks.items():
            self._write(bank, slot, weights.get(module))
        if self._dirty is not None:
            self._dirty.add(slot)
        self.param_bytes[name] = sum(a.nbytes + b.nbytes for a, b, _ in weights.values())
        self.slots.append(name)  # last: a route can name the slot only once it is whole

    def _write(self, bank: _Bank, slot: int, w: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        r = 0 if w is None else w[0].shape[0]
        bank.a[slot, r:] = 0.0  # zero rows of A / B^T past its rank add exact zeros
        bank.bt[slot, r:] = 0.0
        bank.scale[slot] = 0.0
        if w is not None:  # each byte written once: a hot load's cost is its own size
            a, b, s = w
            bank.a[slot, :r] = a.to(bank.a.device, bank.a.dtype)
            bank.bt[slot, :r] = b.t().to(bank.bt.device, bank.bt.dtype)
            bank.scale[slot] = s

    def _layout(self, rank: int, capacity: int) -> None:
        """(Re)allocate every layer's stacks for `capacity` slots of rank `rank`, keeping the loaded ones."""
        old_rank, n = self.rank, len(self.slots)
        for bank in self.banks.values():
            w = bank.weight
            a = torch.empty(capacity, rank, w.shape[1], dtype=w.dtype, device=w.device)
            bt = torch.empty(capacity, rank, w.shape[0], dtype=w.dtype, device=w.device)
            scale = torch.zeros(capacity, dtype=w.dtype, device=w.device)
            a[:n], bt[:n] = 0.0, 0.0
            if bank.a is not None:
                a[:n, :old_rank] = bank.a[:n]
                bt[:n, :old_rank] = bank.bt[:n]
                scale[:n] = bank.scale[:n]
            bank.a, bank.bt, bank.scale = a, bt, scale
        self.rank, self.capacity = rank, capacity
        self._layouts += 1

    def prepare(self) -> None:
        """Make the next hot load cheap, off the engine thread (call it after a load, from a worker):
        grow the stacks to twice their slots once a quarter or fewer are free, then map the pages of
        the next free slot. Rows being decoded meanwhile read the loaded slots, which hold the same
        values in the old stacks and the new ones, so the swap needs no pause of the engine."""
        with self._lock:
            if not self.banks or any(b.a is None for b in self.banks.values()):
                return
            layouts, rank, n0, capacity = self._layouts, self.rank, len(self.slots), self.capacity
            grow = capacity - n0 <= capacity // 4
            if grow:
                self._dirty = set()
        if grow:
            self._grow(layouts, rank, n0, capacity * 2)
        slot = len(self.slots)  # any free slot will do; a load racing this one is harmless (see _populate)
        if slot < self.capacity:
            for bank in list(self.banks.values()):
                _populate(bank.a[slot])
                _populate(bank.bt[slot])

    def _grow(self, layouts: int, rank: int, n0: int, capacity: int) -> None:
        """The stacks laid out at `capacity` slots. Slots 0..n0 are copied without the lock while
        try_attach and remove go on (noting the slots they write in _dirty); then, still without it,
        the slots written meanwhile; the lock is held only to copy what was written during that second
        pass (usually nothing) and swap the stacks in: a load never waits for this thread, which runs
        at low priority and may be off the CPU for long on a busy machine."""
        new = {}
        for module, bank in list(self.banks.items()):
            w = bank.weight
            new[module] = (torch.empty(capacity, rank, w.shape[1], dtype=w.dtype, device=w.device),
                           torch.empty(capacity, rank, w.shape[0], dtype=w.dtype, device=w.device),
                           torch.zeros(capacity, dtype=w.dtype, device=w.device))
        slots, seen = set(range(n0)), n0
        for _ in range(2):
            copied = self._copy_slots(new, layouts, slots)
            with self._lock:
                if not copied:
                    self._dirty = None
                    return
                dirty, self._dirty = self._dirty, set()
                seen, slots = max(seen, len(self.slots)), dirty | set(range(seen, len(self.slots)))
        with self._lock:
            slots |= self._dirty | set(range(seen, len(self.slots)))
            self._dirty = None
            if not self._copy_slots(new, layouts, slots):
                return
            for module, (a, bt, scale) in new.items():
                bank = self.banks[module]
                bank.a, bank.bt, bank.scale = a, bt, scale
            self.capacity = capacity
            self._layouts += 1

    def _copy_slots(self, new: dict, layouts: int, slots: set[int]) -> bool:
        """Copy `slots` (those still in use) into the `new` stacks; False when attach() laid the stacks
        out since (a larger rank, new layers: it holds the lock throughout, so a check under the lock
        is final): this growth is stale."""
        try:
            n = len(self.slots)
            for module, (a, bt, scale) in new.items():
                bank = self.banks[module]
                for s in sorted(x for x in slots if x < n):
                    a[s], bt[s], scale[s] = bank.a[s], bank.bt[s], bank.scale[s]
        except RuntimeError:  # a stack of another rank swapped in mid-copy
            return False
        return self._layouts == layouts

    def remove(self, name: str) -> None:
        """Drop an adapter: the last slot moves into its place (the engine thread only)."""
        with self._lock:
            slot, last = self.slots.index(name), len(self.slots) - 1
            if slot != last:
                for bank in self.banks.values():
                    bank.a[slot], bank.bt[slot], bank.scale[slot] = bank.a[last], bank.bt[last], bank.scale[last]
                self.slots[slot] = self.slots[last]
                if self._dirty is not None:
                    self._dirty.add(slot)
            self.slots.pop()
            self.param_bytes.pop(name, None)
        if self.folded == name:
            self.unfold()
            self._folded_weights, self.folded = {}, None

    def slot(self, name: str | None) -> int:
        return self.slots.index(name)

    # ---- routing ------------------------------------------------------------------------------
    def use(self, names: list[str | None]) -> None:
        """Set up the next forward for rows using these adapters (None = the base)."""
        distinct = set(names)
        if distinct == {None} or not self.banks:
            self.unfold()
            self.route = Route("plain")
            self._solo = (None, 0)
        elif len(distinct) == 1:
            name = names[0]
            n = self._solo[1] + 1 if self._solo[0] == name else 1
            self._solo = (name, n)
            if self.folded == name or n >= FOLD_AFTER:
                self.fold(name)
                self.route = Route("folded")
            else:
                self.unfold()
                self.route = Route("one", slot=self.slot(name))
        else:
            self.unfold()
            self._solo = (None, 0)
            a = next(iter(self.banks.values())).a
            idx = torch.tensor([self.slot(n) for n in names], device=a.device)  # (B,)
            self.route = Route("mixed", idx=idx)

    def fold(self, name: str) -> None:
        """Serve adapter `name` alone: W + s B A in a copy of each adapted weight (kept for reuse)."""
        if self.folded != name:
            self.unfold()
            self._folded_weights = {}
            s = self.slot(name)
            with torch.no_grad():
                for module, bank in self.banks.items():
                    scale = float(bank.scale[s])
                    if scale == 0.0:
                        continue  # this adapter does not adapt this layer
                    folded = bank.weight.detach().clone()
                    # the same ops in the same order as peft's get_delta_weight: (B @ A) * scaling
                    folded += ((bank.bt[s].t().contiguous() @ bank.a[s]) * scale).to(folded.dtype)
                    self._folded_weights[module] = nn.Parameter(folded, requires_grad=False)
            self.folded = name
        for module, w in self._folded_weights.items():
            self.banks[module].linear.weight = w

    def unfold(self) -> None:
        for bank in self.banks.values():
            if bank.linear.weight is not bank.weight:
                bank.linear.weight = bank.weight


def _madvise():
    """libc's madvise(addr, length, advice) through ctypes, or None where there is none (not Linux)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map pages writable, contents unchanged (older kernels: EINVAL, ignored)


def _populate(t: torch.Tensor) -> None:
    """Map the whole pages of a CPU tensor's memory now, without changing a byte, so that writing it
    later takes no page faults (a fresh slot of r 16 x 576..1536 fp32 is ~30 pages per layer). Safe
    while another thread writes the same memory, or after it was freed: contents never change."""
    if _MADVISE is None or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.nbytes
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _MADVISE(lo, hi - lo, _MADV_POPULATE_WRITE)


def _banked_forward(layer: nn.Linear, bank: _Bank, owner: LoraBank):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, layer.weight, layer.bias)
        route = owner.route
        if route.kind == "one":
            scale = bank.scale[route.slot]
            if scale != 0:
                out = out + (x @ bank.a[route.slot].t()) @ bank.bt[route.slot] * scale
        elif route.kind == "mixed":
            idx = route.idx
            a = bank.a.index_select(0, idx)  # (B, r, in): each row's own adapter
            bt = bank.bt.index_select(0, idx)  # (B, r, out)
            h = torch.bmm(x, a.transpose(1, 2)) * bank.scale.index_select(0, idx).view(-1, 1, 1)  # (B, T, r)
            out = torch.baddbmm(out, h, bt)  # (B, T, out)
        return out
    return forward
