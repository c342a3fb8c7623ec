"""Diff pruning (Guo, Rush and Kim 2021): a sparse task-specific diff added to frozen weights.

Each chosen weight W (the body's linear layers by default) becomes W + delta in the forward pass,
through a torch parametrization (`torch.nn.utils.parametrize`): the module and its forward stay
the model's own, W stays frozen as `parametrizations.weight.original`, and folding the diff in
for good is `remove_parametrizations(..., leave_parametrized=True)`. delta moves through phases:

  dense   (mode magnitude, before the mask)  delta = w
  gated   (mode l0, before the mask)         delta = z * w, z ~ HardConcrete(log_alpha)   (paper eq. 5-7)
  probing (mode fisher, before the mask)     delta = w = 0, held there; each entry sums its squared gradients
  masked  (all, from `mask_at` on)           delta = m * w, m fixed: exactly k entries are 1

The switch keeps exactly k = round(density * n) entries (n = the chosen weights' entries together)
by ONE global threshold over all chosen weights (the paper's section 3.2 uses a global threshold:
layers that need more change get more entries). The score is |delta| (magnitude, l0) or the summed
squared gradient, an empirical Fisher information (fisher: Sung et al. 2021's FISH mask).
The loop drives the phases through `DiffSchedule` (penalty, step, state for checkpoints).

Saved as `diff/diff.safetensors` (per weight: flat int32/int64 `indices` and fp32 `values` of
the k changed entries), `diff/head.safetensors` (the new head) and `diff/diff_config.json`.
A new head (the classifier, and a BERT-style pooler) trains in full, as with BitFit; it is not
part of the budget and is reported beside it. Loading adds the values into the base weights
(a merge), so `predict`/`eval`/`merge` all see the same model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from tunesmith.errors import TunesmithError

CONFIG_FILE = "diff_config.json"
DIFF_FILE = "diff.safetensors"
HEAD_FILE = "head.safetensors"

# Hard-concrete constants (Louizos et al. 2018, section 4; the values the paper uses).
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_INIT = 5.0   # gates start open: z ~ 1, so delta = w and training starts like the dense variant
L0_LAMBDA = 1.25e-7    # penalty per entry's expected L0 (the paper's lambda); the task loss is a per-example mean
GATE_LR = 0.1          # log_alpha's own Adam step. At the run's lr (1e-3) a gate moves 0.2 in 200 steps and
                       # never closes; it must travel from +5 to about -2.4 to be shut at evaluation.


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A stretched, clamped concrete sample (Louizos et al. eq. 9-10) from uniform noise u in (0, 1)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gate at evaluation: the stretched sigmoid of log_alpha, clamped (Louizos et al. eq. 13)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) summed over entries: sigmoid(log_alpha - beta * log(-gamma / zeta)) (Louizos et al. eq. 12)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()


class Diff(nn.Module):
    """The parametrization of one weight: W -> W + delta. Holds the diff `w` (and the gates' log_alpha,
    or the Fisher sums of the probing phase)."""

    def __init__(self, weight: torch.Tensor, gated: bool, fisher: bool = False):
        super().__init__()
        self.diff = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))  # starts at the base model
        # Flat, so the optimizer puts it in the no-weight-decay group (1-D tensors): decay would pull the
        # gates towards log_alpha = 0, i.e. half-open, which means nothing for a gate.
        self.log_alpha = nn.Parameter(torch.full((weight.numel(),), LOG_ALPHA_INIT)) if gated else None
        # Fixed mask once pruned; not part of state_dict (checkpoints keep its indices in their state).
        self.register_buffer("mask", None, persistent=False)
        self.register_buffer("fisher", torch.zeros_like(self.diff) if fisher else None, persistent=False)
        if fisher:
            self.diff.register_hook(self._probe)

    def _probe(self, grad: torch.Tensor) -> torch.Tensor:
        """Mode fisher before the mask: sum each micro-batch's squared gradient, and pass on zeros so the
        optimizer leaves the body at the base model (AdamW moves nothing on a zero gradient: its moments
        and the decoupled decay of w = 0 are all zero) while the new head trains."""
        if self.fisher is None:  # the mask is fixed: the kept entries train
            return grad
        self.fisher.add_(grad.detach().float().square())
        return torch.zeros_like(grad)

    def delta(self) -> torch.Tensor:
        if self.mask is not None:
            return self.diff * self.mask
        if self.log_alpha is None:
            return self.diff
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp_(1e-6, 1 - 1e-6)  # away from log(0)
            z = hard_concrete_sample(self.log_alpha, u)
        else:
            z = hard_concrete_mean(self.log_alpha)
        return self.diff * z.view_as(self.diff)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _head_names(model: nn.Module, task: str) -> list[str]:
    """The new head's modules, with a BERT-style pooler: they train in full, not through a diff.

    As for BitFit and selective (selective.train_head): all-MiniLM-L6-v2's pooler passes on almost
    no signal (outputs vary by ~0.03 across reviews), and a diff over 1% of its entries left the
    loss at 0.692 on IMDB for 40 steps (a new classifier cannot read a constant).
    """
    from tunesmith.config import task_facts
    from tunesmith.models.load import head_module_names

    if task_facts(task).head is None:
        return []
    return head_module_names(model) + [n for n, _ in model.named_modules() if n.endswith("pooler")]


def choose_weights(model: nn.Module, target_modules: list[str] | str, task: str) -> dict[str, nn.Linear]:
    """The linear layers whose weights get a diff: the body's, or those named in target_modules.

    The output layer (lm_head: tied to the embeddings in most small LMs) and a new classification
    head (with a BERT-style pooler) are never chosen: the head trains in full, as with BitFit.
    """
    excluded = tuple(_head_names(model, task)) + ("lm_head",)
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        last = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear" or last in target_modules or any(name.endswith("." + t) for t in target_modules):
            chosen[name] = module
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TunesmithError(f"method diff_pruning: target_modules {target_modules} match no linear layer of "
                             f"{type(model).__name__} (its linear layers are named {names})")
    return chosen


def add_diffs(model: nn.Module, target_modules: list[str] | str, task: str, gated: bool,
              fisher: bool = False) -> dict[str, Diff]:
    """Parametrize each chosen weight as W + delta; freezes nothing (the caller decides)."""
    diffs = {}
    for name, linear in choose_weights(model, target_modules, task).items():
        d = Diff(linear.weight, gated, fisher).to(linear.weight.device)
        parametrize.register_parametrization(linear, "weight", d)
        diffs[name] = d
    return diffs


def diffs_of(model: nn.Module) -> dict[str, Diff]:
    """{linear module name: its Diff} for a model prepared by add_diffs (empty for any other)."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, Diff):
                    out[name] = p
    return out


def budget(diffs: dict[str, Diff], density: float) -> tuple[int, int]:
    """(k, n): entries the diff may change, of n entries of the chosen weights together."""
    n = sum(d.diff.numel() for d in diffs.values())
    return max(1, round(density * n)), n


def _score(d: Diff) -> torch.Tensor:
    """What the mask ranks: the probing phase's Fisher sums, or |delta| (for l0 with the gates' mean)."""
    if d.fisher is None:
        return d.delta().detach().abs().flatten().float()
    score = d.fisher.flatten()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Each process summed its own micro-batches' gradients: every process must pick the same mask.
        score = score.clone()
        torch.distributed.all_reduce(score)
    return score


@torch.no_grad()
def fix_mask(diffs: dict[str, Diff], density: float) -> dict[str, torch.Tensor]:
    """Prune delta to the budget: keep the k highest-scoring entries over all weights (one global threshold).

    torch.topk returns exactly k entries (ties broken by position), so the budget holds exactly.
    Returns the kept flat indices per weight; the gates and the Fisher sums are dropped (their job is done).
    """
    k, _ = budget(diffs, density)
    for d in diffs.values():
        d.eval()  # the gates' deterministic value: the same delta evaluation saw
    flat = torch.cat([_score(d) for d in diffs.values()])
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kept[torch.topk(flat, k, sorted=False).indices] = True
    indices, start = {}, 0
    for name, d in diffs.items():
        n = d.diff.numel()
        idx = kept[start:start + n].nonzero().flatten()
        start += n
        indices[name] = idx
        _apply_mask(d, idx)
    return indices


def _apply_mask(d: Diff, idx: torch.Tensor) -> None:
    mask = torch.zeros(d.diff.numel(), dtype=d.diff.dtype, device=d.diff.device)
    mask[idx.to(d.diff.device)] = 1.0
    if d.log_alpha is not None:  # the paper's recipe: delta = z * w before, the kept entries of it go on alone
        d.diff.mul_(hard_concrete_mean(d.log_alpha).view_as(d.diff))
        d.log_alpha.requires_grad_(False)
    d.mask = mask.view_as(d.diff)
    d.fisher = None


class DiffSchedule:
    """What the training loop does for diff pruning: add the L0 penalty, and fix the mask at one step.

    The loop calls `penalty()` for each micro-batch and `step(step, total)` after each optimizer
    step; `step` returns True on the step that fixes the mask, after which earlier evaluations
    (of an unpruned diff) no longer count for keep-best. `state_dict` goes into checkpoints so a
    run resumed after the switch gets its mask back.
    """

    def __init__(self, diffs: dict[str, Diff], density: float, mask_at: float):
        self.diffs, self.density, self.mask_at = diffs, density, mask_at
        self.indices: dict[str, torch.Tensor] | None = None
        self.gated = any(d.log_alpha is not None for d in diffs.values())

    def mask_step(self, total_steps: int) -> int:
        return min(total_steps, max(1, round(self.mask_at * total_steps)))

    def penalty(self) -> torch.Tensor | float:
        """lambda * expected L0 of the gates (paper eq. 8); nothing once the mask is fixed."""
        if not self.gated or self.indices is not None:
            return 0.0
        return L0_LAMBDA * sum(expected_l0(d.log_alpha) for d in self.diffs.values())

    def step(self, step: int, total_steps: int) -> bool:
        if self.indices is not None or step < self.mask_step(total_steps):
            return False
        training = [d.training for d in self.diffs.values()]
        self.indices = fix_mask(self.diffs, self.density)
        for d, t in zip(self.diffs.values(), training):
            d.train(t)
        return True

    def describe(self) -> str:
        k, n = budget(self.diffs, self.density)
        return f"diff pruning: mask fixed, {k:,} of {n:,} entries ({100 * k / n:.3f}%) train from here on"

    def state_dict(self) -> dict:
        # Mode fisher before the mask: the sums so far, so a resumed run ranks the same entries.
        fisher = {k: d.fisher.cpu() for k, d in self.diffs.items() if d.fisher is not None}
        return {"indices": None if self.indices is None else {k: v.cpu() for k, v in self.indices.items()},
                **({"fisher": fisher} if fisher else {})}

    def load_state_dict(self, state: dict) -> None:
        for name, f in state.get("fisher", {}).items():
            self.diffs[name].fisher.copy_(f)
        if state["indices"] is None:
            return
        self.indices = state["indices"]
        for name, d in self.diffs.items():
            if d.log_alpha is not None:  # the gates were folded into diff before that checkpoint was saved
                d.log_alpha.requires_grad_(False)
            d.fisher = None
            mask = torch.zeros(d.diff.numel(), dtype=d.diff.dtype, device=d.diff.device)
            mask[self.indices[name].to(d.diff.device)] = 1.0
            d.mask = mask.view_as(d.diff)


def apply_diff_pruning(model: nn.Module, cfg, task: str) -> nn.Module:
    """Freeze the model, parametrize the chosen weights with a trainable diff, train a new head fully."""
    from tunesmith.config import task_facts
    from tunesmith.methods.selective import train_head

    model.requires_grad_(False)
    add_diffs(model, cfg.opt("target_modules"), task, gated=cfg.opt("mode") == "l0", fisher=cfg.opt("mode") == "fisher")
    if task_facts(task).head is not None and cfg.train_head:
        train_head(model, pooler=True)  # see _head_names
    return model


def schedule_for(model: nn.Module, cfg) -> DiffSchedule | None:
    diffs = diffs_of(model)
    if not diffs:
        return None
    return DiffSchedule(diffs, cfg.opt("density"), cfg.opt("mask_at"))


def _plain_name(name: str) -> str:
    """A parameter's name as the unparametrized model has it."""
    return name.replace(".parametrizations.weight.original", ".weight")


def save_diff(model: nn.Module, out: Path, meta: dict) -> dict:
    """Write the kept entries of each diff, the trained head and the config; returns the config."""
    from safetensors.torch import save_file

    diffs = diffs_of(model)
    if any(d.mask is None for d in diffs.values()):
        raise TunesmithError("diff pruning: the mask was never fixed; nothing within the budget to save")
    tensors, n, k = {}, 0, 0
    for name, d in diffs.items():
        idx = d.mask.flatten().nonzero().flatten()
        dtype = torch.int32 if d.diff.numel() < 2**31 else torch.int64  # half the size where it fits
        tensors[f"{name}.weight.indices"] = idx.to(dtype).cpu().contiguous()
        tensors[f"{name}.weight.values"] = d.diff.detach().flatten()[idx].float().cpu().contiguous()
        n += d.diff.numel()
        k += idx.numel()
    head = {_plain_name(name): p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad and ".parametrizations." not in name}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / DIFF_FILE))
    if head:
        save_file(head, str(out / HEAD_FILE))
    body = sum(p.numel() for name, p in model.named_parameters()
               if ".parametrizations.weight.0." not in name and _plain_name(name) not in head)
    meta = {**meta, "changed_entries": k, "chosen_entries": n, "body_params": body,
            "changed_fraction_of_body": k / body, "weights": sorted(diffs), "head": sorted(head)}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return meta


@torch.no_grad()
def load_diff(model: nn.Module, folder: Path) -> nn.Module:
    """Add a saved diff into `model`'s weights in place (W[idx] += values) and load the head.

    The same fp32 sums the training forward computed (W + m * w is W + w where m = 1, W + 0 = W
    elsewhere), so the loaded model's outputs equal the trained one's.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(folder / DIFF_FILE))
    params = dict(model.named_parameters())
    for key in [k for k in tensors if k.endswith(".indices")]:
        name = key.removesuffix(".indices")
        if name not in params:
            raise TunesmithError(f"{folder}: the diff does not fit this base model: it has no weight '{name}'")
        w = params[name]
        idx, values = tensors[key].long(), tensors[name + ".values"]
        if idx.numel() and int(idx.max()) >= w.numel():
            raise TunesmithError(f"{folder}: diff indices of '{name}' exceed its {w.numel()} entries")
        flat = w.data.view(-1)
        flat[idx.to(flat.device)] += values.to(flat.device, flat.dtype)
    if (folder / HEAD_FILE).is_file():
        head = load_file(str(folder / HEAD_FILE))
        unknown = set(head) - set(model.state_dict())
        if unknown:
            raise TunesmithError(f"{folder}: head weights do not fit this base model: {sorted(unknown)[:3]}")
        model.load_state_dict(head, strict=False)
    return model


def diff_info(folder: Path) -> dict:
    meta = json.loads((folder / CONFIG_FILE).read_text())
    return {"kind": "sparse diff (tunesmith format)", "method": "diff_pruning", "mergeable": True,
            "base_model": meta["base_model_name_or_path"], "task": meta["task"], "mode": meta["mode"],
            "density": meta["density"], "changed_entries": meta["changed_entries"],
            "chosen_entries": meta["chosen_entries"], "body_params": meta["body_params"],
            "diff_bytes": (folder / DIFF_FILE).stat().st_size}
