"""Objectives, (model, batch) -> summed loss and counts; a task (tunesmith.tasks) picks its own.

Losses are returned as sums with their counts, not means: the loop divides by the count of
the whole accumulated step, so batch 1 x accum 8 gives the same gradient as batch 8 x accum 1
even when sequences have different numbers of target tokens.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunesmith.data.collate import batch_order, collate
from tunesmith.data.tokenize import IGNORE


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar, summed over counted items
    count: int  # examples (classification) or target tokens (LM)
    correct: int  # argmax hits among counted items
    logits: torch.Tensor | None = None  # classification: (B, C) for metrics
    extras: dict[str, float] = field(default_factory=dict)  # other per-item sums to average (e.g. reward margins)
    # per unit of the batch (B,): the sums behind loss_sum/count/correct, for per-example scores
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def classification(model, batch: dict[str, torch.Tensor]) -> LossOut:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    logits = logits.float()
    loss = F.cross_entropy(logits, batch["label"], reduction="sum")
    correct = int((logits.argmax(-1) == batch["label"]).sum())
    return LossOut(loss, int(batch["label"].numel()), correct, logits.detach())


def causal_lm(model, batch: dict[str, torch.Tensor]) -> LossOut:
    """Next-token cross-entropy on positions whose label is not IGNORE (SFT masks the prompt).

    The vocabulary projection is the biggest activation of a small LM (B x T x 49k for SmolLM2),
    so we ask the model for logits only where a loss is taken. transformers models take
    `logits_to_keep`; given a (B, T) boolean mask they gather exactly those hidden states into one
    contiguous (N, H) matrix before `lm_head`. Where only positions are supported (older models,
    or prompt-learning adapters that prepend virtual tokens), we keep the positions from the
    batch's first target on, as an index tensor: a slice would hand `lm_head` a non-contiguous
    view, which torch multiplies as a batched matmul against an expanded weight, about 2x slower
    on CPU (measured on SmolLM2's 576 x 49k head).
    """
    picked, target, keep = target_logits(model, batch)
    picked = picked.float()
    per_token = F.cross_entropy(picked, target, reduction="none")  # (N,)
    hits = picked.argmax(-1) == target  # (N,)
    seq = keep.nonzero()[:, 0]  # (N,) the sequence each target belongs to (row-major, as target)
    per_seq = lambda v: torch.zeros(len(keep), device=v.device).index_add(0, seq, v.detach().float())  # noqa: E731
    rows = {"loss": per_seq(per_token), "tokens": keep.sum(-1).float(), "correct": per_seq(hits.float())}
    return LossOut(per_token.sum(), int(target.numel()), int(hits.sum()), rows=rows)


@torch.no_grad()
def causal_lm_rows(model, feats: list[dict], pad_id: int, batch_size: int, acc) -> dict[str, list[float]]:
    """causal_lm's per-sequence sums (loss, tokens, correct) over features in evaluation batches,
    in the features' order: held-out text scored for its perplexity."""
    was_training = model.training
    model.eval()
    rows: dict[str, list[float]] = {"loss": [0.0] * len(feats), "tokens": [0.0] * len(feats),
                                    "correct": [0.0] * len(feats)}
    for idxs in batch_order([len(f["input_ids"]) for f in feats], batch_size, shuffle=False):
        batch = {k: v.to(acc.device) for k, v in collate([feats[i] for i in idxs], pad_id).items()}
        with acc.autocast():
            out = causal_lm(model, batch)
        for k in rows:
            for i, v in zip(idxs, out.rows[k].tolist()):
                rows[k][i] = v
    model.train(was_training)
    return rows


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict a labelled token, (N, V) in row-major order, their
    target ids (N,), and the (B, T-1) mask of which positions those are (see causal_lm)."""
    ids = batch["input_ids"]
    T = ids.shape[1]
    labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from positions < t
    keep = labels != IGNORE  # (B, T-1)
    target = labels[keep]  # (N,), row-major like the gathered logits below
    how = logits_to_keep_kind(model)
    if how == "mask":
        mask = F.pad(keep, (0, 1))  # (B, T): the last position predicts nothing
        picked = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=mask).logits  # (N, V)
    else:
        wanted = keep.any(0).nonzero()
        k = T - int(wanted[0]) if len(wanted) and how == "positions" else T
        kwargs = {"logits_to_keep": torch.arange(-k, 0, device=ids.device)} if k < T else {}
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], **kwargs).logits  # (B, [P+]T or k, V)
        # Prompt / P-tuning prepend P virtual tokens and return their logits too: keep the last k.
        logits = logits[:, -k:]  # (B, k, V): positions T-k .. T-1
        picked = logits[:, :-1][keep[:, T - k:]]  # (N, V): only positions that carry a loss
    return picked, target, keep


_KEEP_KIND: dict[type, str] = {}


def logits_to_keep_kind(model) -> str:
    """How the model's forward can limit its logits: "mask" (a (B, T) boolean mask, flattened
    output), "positions" (a 1-D index tensor), or "none"."""
    base = getattr(model, "module", model)  # DDP wraps the peft model, which wraps the transformers one
    peft_cfg = getattr(base, "active_peft_config", None)
    prompt_learning = bool(getattr(peft_cfg, "is_prompt_learning", False))  # virtual tokens shift positions
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if type(base) not in _KEEP_KIND:
        kind = "none"
        if "logits_to_keep" in inspect.signature(base.forward).parameters:
            # the shared helper in transformers' modeling_utils takes a boolean mask (5.x); models
            # with their own slicing code take positions only
            slicer = getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None)
            kind = "mask" if slicer is not None and _takes_mask(slicer) else "positions"
        _KEEP_KIND[type(base)] = kind
    kind = _KEEP_KIND[type(base)]
    return "positions" if kind == "mask" and prompt_learning else kind


def _takes_mask(slicer) -> bool:
    try:
        return tuple(slicer(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape) == (1, 1)
    except (IndexError, RuntimeError, TypeError):  # an older helper that rejects a mask
        return False


def count_examples(batch: dict[str, torch.Tensor]) -> float:
    """Loss denominator of a per-example objective (known before the forward pass)."""
    return int(batch["label"].numel())


def count_targets(batch: dict[str, torch.Tensor]) -> float:
    """Loss denominator of a language-model objective: the target tokens."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
