"""The shape of a task, and the helpers several tasks share (greedy generation, a head's outputs).

A task is one frozen dataclass of functions: no base class to subclass, nothing to override.
The core (data, train, evaluate, runs, cli) calls these functions and never compares names.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator

from tunesmith.config import DataConfig, RunConfig
from tunesmith.data import Meta, PreparedData, Split, split_with_meta
from tunesmith.data.collate import batch_order, left_pad
from tunesmith.data.formats import detect_format
from tunesmith.data.readers import Record
from tunesmith.data.tokenize import TokenStats, render_prompt
from tunesmith.methods.folded import lora_folded
from tunesmith.errors import TunesmithError
from tunesmith.objectives import LossOut

Predicts = Literal["classify", "score", "generate"]
# What a server may offer for a model: OpenAI's chat/completions for generative tasks,
# /classify and /v1/embeddings for encoder classifiers, scoring for reward models.
Endpoint = Literal["chat", "completions", "classify", "score", "embeddings"]
Head = Literal["labels", "scalar"]
Batch = dict[str, torch.Tensor]
Objective = Callable[[Any, Batch], LossOut]
GENERATE = frozenset({"chat", "completions"})


@dataclass
class Sums:
    """What evaluation adds up over the objective's batches; a task's `summarise` makes metrics of it."""

    loss: float = 0.0  # summed loss
    count: int = 0  # items the objective counted (examples, target tokens, pairs)
    items: float = 0.0  # the loss denominator (the task's count_items: e.g. pair weights)
    correct: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)  # per batch: the head's outputs (B, C)
    targets: list[torch.Tensor] = field(default_factory=list)  # per batch: batch["label"] (B,)
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per batch: the objective's per-unit sums (B,)
    order: list[int] = field(default_factory=list)  # the features' indices in the order they were added

    def add(self, out: LossOut, batch: Batch, items: float, idxs: list[int] | None = None) -> None:
        self.loss += float(out.loss_sum)
        self.count += out.count
        self.items += items
        self.correct += out.correct
        for k, v in out.extras.items():
            self.extras[k] = self.extras.get(k, 0.0) + v
        if out.logits is not None:
            self.outputs.append(out.logits.float().cpu())
            self.targets.append(batch["label"].cpu())
        for k, v in out.rows.items():
            self.rows.setdefault(k, []).append(v.detach().cpu().double())  # to the CPU first: mps has no float64
        self.order += idxs or []

    def row_columns(self) -> dict[str, list[float]]:
        """The objective's per-unit rows, in the order the features were added."""
        return {k: torch.cat(v).tolist() for k, v in self.rows.items()}

    @classmethod
    def merged(cls, parts: list["Sums"]) -> "Sums":
        """The sums of several processes' shares of one evaluation (every metric is order-free)."""
        out = cls()
        for p in parts:
            out.loss += p.loss
            out.count += p.count
            out.items += p.items
            out.correct += p.correct
            for k, v in p.extras.items():
                out.extras[k] = out.extras.get(k, 0.0) + v
            out.outputs += p.outputs
            out.targets += p.targets
            for k, v in p.rows.items():  # per-unit rows and their feature indices, in the same order
                out.rows.setdefault(k, []).extend(v)
            out.order += p.order
        return out


# A row group: per-unit scores from which a metric can be recomputed on any resample of the units
# (evaluate/stats.py: intervals, paired tests). {"name", "unit", "keys": one id per unit (equal
# ids = the same input, so two evaluations of the same data pair up), "columns": {name: [float]},
# "metrics": {metric: [reducer, column names or numbers...]}}; reducers are listed in evaluate/stats.py
# ("share" for the mean of a 0/1 column, whose change McNemar's test takes; "mean" for any number).
RowGroup = dict[str, Any]


def unit_key(item: Any) -> str:
    """A short, stable id of an example or feature (its content, without its file location)."""
    if is_dataclass(item):
        item = {k: v for k, v in asdict(item).items() if k != "where"}
    text = json.dumps(item, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def row_keys(split: Any, n: int) -> list[str]:
    """Ids of a split's first n evaluated units: its examples when its features are one per
    example (the same data read through another tokenizer pairs up), else the features themselves
    (packed text blocks, or examples the tokenizer dropped)."""
    if len(split.examples) == len(split.features):
        return [unit_key(e) for e in split.examples[:n]]
    return [unit_key({"input_ids": f["input_ids"]}) for f in split.features[:n]]


def lm_rows(s: Sums, labels) -> RowGroup:
    """Per sequence: summed next-token loss, target tokens and argmax hits (objectives.causal_lm)."""
    return {"columns": s.row_columns(), "metrics": {
        "loss": ["ratio", "loss", "tokens"], "perplexity": ["exp_ratio", "loss", "tokens"],
        "token_accuracy": ["ratio", "correct", "tokens"]}}


@dataclass(frozen=True)
class Task:
    """Everything the rest of tunesmith asks of a task. See docs/TASKS.md for how to add one."""

    name: str
    predicts: Predicts  # how a trained run answers: labels + probabilities, a number, or text
    serves: frozenset[str]  # the Endpoints a served model of this task offers
    head: Head | None  # models/load.py: a sequence classifier (a label head, or one scalar), or a causal LM
    formats: frozenset[str]  # record shapes it reads (data/formats.py, pref/data.py)
    metrics: dict[str, bool]  # metric -> greater is better (train.metric may name any of them)
    best_metric: str  # the default for keep-best and early stopping
    # (records, cfg, labels, label names) -> (format, examples); raises DataError naming file, line, field
    read: Callable[[list[Record], RunConfig, list[str] | None, list[str] | None], tuple[str, list[Any]]]
    # (examples, format, cfg, tokenizer, chat) -> (features, token stats); collate pads the features
    encode: Callable[[list[Any], str, RunConfig, Any, bool], tuple[list[dict], TokenStats]]
    objective: Callable[[RunConfig], Objective]  # (model, batch) -> loss as a sum, with its counts
    count_items: Callable[[Batch], float]  # the loss denominator of a batch, known before the forward pass
    summarise: Callable[[Sums, list[str] | None], dict[str, Any]]  # metrics from the objective's sums
    sample_inputs: Callable[[RunConfig, list[Any]], list[str]]  # the before/after table's inputs from examples
    # (model, tokenizer, texts, cfg, chat, labels, acc) -> one dict per text, as `tunesmith predict` prints
    predict: Callable[..., list[dict]]
    # trains by rollouts (train/online.py), not in the ordinary loop: "critic" learns a value head
    # (PPO), "group" compares samples of the same prompt (GRPO)
    online: Literal["critic", "group"] | None = None
    chat: Callable[[RunConfig, str, list[Any], Any], bool] = lambda cfg, fmt, exs, tok: False  # chat template?
    detect: Callable[[dict[str, Any], DataConfig], str] = detect_format  # the format a record looks like
    check: Callable[[RunConfig], list[str]] = lambda cfg: []  # the task's own config problems
    # (result, model, tokenizer, data, cfg, acc, split): metrics beyond the objective's (generations, policy reward)
    evaluate_more: Callable[..., None] = lambda *args: None
    # (model, tokenizer, data, cfg, acc, say): once before the first step (DPO/KTO: reference log-probs)
    before_fit: Callable[..., None] = lambda *args: None
    probe: Callable[[list[dict]], list[dict]] = lambda feats: feats  # what the pre-training gradient check runs
    describe: Callable[[list[Any], list[dict]], dict[str, Any]] = lambda exs, feats: {}  # `data check` extras
    # (sums, labels) -> {"columns", "metrics"} of a RowGroup, units in the order of sums.order:
    # the per-example scores behind summarise's metrics, for intervals and paired tests (None: none)
    per_example: Callable[[Sums, list[str] | None], RowGroup | None] = lambda sums, labels: None

    def prepare(self, cfg: RunConfig, tokenizer) -> PreparedData:
        """The whole data pipeline for a run: read, validate, split, tokenise.

        Raises:
            TunesmithError / DataError naming file, line and field for any bad input.
        """
        fmt, labels, split_exs, meta = split_with_meta(cfg, self.read)
        chat = self.chat(cfg, fmt, [e for exs in split_exs.values() for e in exs], tokenizer)
        mixed = len(cfg.data.sources()) > 1
        splits = {name: self._encode(exs, meta[name], mixed, fmt, cfg, tokenizer, chat) for name, exs in split_exs.items()}
        names = [s.path for s in cfg.data.sources()] if mixed else None
        return PreparedData(fmt=fmt, labels=labels, chat=chat, splits=splits, source_names=names)

    def _encode(self, exs: list[Any], meta: Meta, mixed: bool, fmt: str, cfg: RunConfig, tokenizer, chat: bool) -> Split:
        """Encode a split; with several sources, one source at a time (a CPT block never spans two), so
        each feature knows its source; with data.order: score, each source's examples by score."""
        if not mixed and meta.scores is None:
            return Split(exs, *self.encode(exs, fmt, cfg, tokenizer, chat))
        out = Split([], [], TokenStats(), [] if mixed else None, [] if meta.scores is not None else None)
        for k in sorted(set(meta.sources)):
            idx = [i for i, s in enumerate(meta.sources) if s == k]
            if meta.scores is not None:
                idx.sort(key=lambda i: meta.scores[i])
            group = [exs[i] for i in idx]
            feats, stats = self.encode(group, fmt, cfg, tokenizer, chat)
            if meta.scores is not None:
                if len(feats) != len(group):
                    raise TunesmithError(f"data.order: score needs one feature per example, but {len(group)} examples "
                                         f"of {cfg.data.sources()[k].path} made {len(feats)} (packed or dropped); use "
                                         "data.order: short_to_long, or data.packing: false")
                out.scores += [meta.scores[i] for i in idx]
            out.examples += group
            out.features += feats
            out.stats.lengths += stats.lengths
            out.stats.truncated += stats.truncated
            out.stats.dropped += stats.dropped
            if mixed:
                out.sources += [k] * len(feats)
        return out


# ---------------------------------------------------------------- shared by several tasks
@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], acc: Accelerator, max_new_tokens: int,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; returns only new text."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    with lora_folded(model):
        for idxs in batch_order([len(p) for p in prompts], batch_size, shuffle=False):
            ids, mask = left_pad([prompts[i] for i in idxs], pad)  # (B, T) each
            width = ids.shape[1]
            with acc.autocast():
                gen = model.generate(input_ids=ids.to(acc.device), attention_mask=mask.to(acc.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for row, i in enumerate(idxs):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def generate_replies(model, tokenizer, texts: list[str], cfg: RunConfig, chat: bool, labels, acc) -> list[dict]:
    """`predict` for generative tasks: each text is a prompt, rendered as in training."""
    prompts = [tokenizer(render_prompt(t, cfg.data, tokenizer, chat), add_special_tokens=not chat)["input_ids"]
               for t in texts]
    gens = generate(model, tokenizer, prompts, acc, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    return [{"input": t, "output": g} for t, g in zip(texts, gens)]


@torch.no_grad()
def head_outputs(model, tokenizer, texts: list[str], cfg: RunConfig, acc: Accelerator, batch_size: int) -> torch.Tensor:
    """A sequence classifier's outputs for raw texts, (N, C) float, cut as in training."""
    was_training = model.training
    model.eval()
    tokenizer.truncation_side = cfg.data.truncation_side
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i: i + batch_size], truncation=True, max_length=cfg.data.max_length, padding=True,
                        return_tensors="pt")
        with acc.autocast():
            out.append(model(input_ids=enc["input_ids"].to(acc.device),
                             attention_mask=enc["attention_mask"].to(acc.device)).logits.float())  # (B, C)
    model.train(was_training)
    return torch.cat(out)


def first_words(text: str | None, n: int = 12) -> str:
    return " ".join((text or "").split()[:n])
