"""Data pipeline: read -> filter -> validate -> split -> tokenise. A task (tunesmith.tasks) says how its
records become examples and features; `split_examples` does the reading and splitting they share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith import assets
from tunesmith.config import DataConfig, RunConfig, task_facts
from tunesmith.data.formats import Example, check_columns, file_columns, filter_where, infer_labels
from tunesmith.data.readers import Record, read_records
from tunesmith.data.splits import take
from tunesmith.data.tokenize import TokenStats, tokenize_cpt
from tunesmith.errors import DataError, Problem, TunesmithError

# A task's reader: (records, run config, labels, label names) -> (format, examples); raises DataError.
ReadFn = Callable[[list[Record], RunConfig, "list[str] | None", "list[str] | None"], tuple[str, list[Any]]]


@dataclass
class Split:
    examples: list[Any]  # data.formats.Example, pref.data.PrefExample, ... as the task reads them
    features: list[dict[str, Any]] = field(default_factory=list)
    stats: TokenStats = field(default_factory=TokenStats)
    sources: list[int] | None = None  # per feature: its data.train source (several sources only)
    scores: list[float] | None = None  # per feature: data.score_column (data.order: score only)


@dataclass
class Meta:
    """Per example of a split, before encoding: its source and its score (data.order: score)."""

    sources: list[int]
    scores: list[float] | None


@dataclass
class PreparedData:
    fmt: str
    labels: list[str] | None
    chat: bool  # prompts rendered with the tokenizer's chat template
    splits: dict[str, Split]  # "train", and "validation" / "test" when present
    source_names: list[str] | None = None  # data.train's sources, when there are several


def load_records(source: str, cfg: DataConfig, problems: list | None = None) -> tuple[list[Record], dict[str, Any]]:
    """Read one data source (path or builtin alias), applying builtin and configured filters.

    `problems`: collect malformed lines there instead of raising (see read_records).
    """
    src = assets.data_source(source)
    records = read_records(Path(src["path"]), cfg.reader, problems)
    if records:
        check_columns(records, cfg, source)
    where = {**src.get("where", {}), **cfg.where}
    kept = filter_where(records, where)
    if not kept:
        raise TunesmithError(f"{source}: no records match data.where={where} (of {len(records)} read)")
    return kept, src


def resolve_labels(cfg: RunConfig, train_records: list[Record], src: dict[str, Any]) -> list[str] | None:
    if task_facts(cfg.task).head != "labels":
        return None
    labels = cfg.data.labels or src.get("labels") or infer_labels(train_records, cfg.data)
    if not labels:
        col, have = cfg.data.columns.get("label", "label"), file_columns(train_records)
        raise TunesmithError(f"{cfg.data.train_name()}: classification needs a label column, but column '{col}' is "
                             f"{'empty' if col in have else 'not found'}; the file has {', '.join(have)}. Map your "
                             "columns with data.columns (e.g. --data.columns.label=sentiment), or set task for "
                             "other data (sft: prompt/completion or chat, cpt: text)")
    if len(labels) < 2:
        raise TunesmithError(f"{cfg.data.train_name()}: classification needs at least 2 labels, found {labels}")
    return list(labels)


def split_examples(cfg: RunConfig, read: ReadFn) -> tuple[str, list[str] | None, dict[str, list[Any]]]:
    """Read, filter, validate (with the task's `read`) and split; no tokenizer needed.

    Splits are taken per record, before a task expands one (a ranking's pairs never straddle splits).
    Returns (format, labels, splits).
    """
    fmt, labels, out, _ = split_with_meta(cfg, read)
    return fmt, labels, out


def split_with_meta(cfg: RunConfig, read: ReadFn) -> tuple[str, list[str] | None, dict[str, list[Any]], dict[str, Meta]]:
    """split_examples, plus each example's source (data.train's list) and score (data.order: score).

    Each source is read on its own (so every example knows its source); held-out splits cut from the
    training data are cut from the pooled sources, so they hold every source in proportion.
    """
    d = cfg.data
    per_source: list[list[Record]] = []
    src: dict[str, Any] = {}
    for source in d.sources():
        recs, s = load_records(source.path, d)
        per_source.append(recs)
        src = src or s  # the first source's builtin defaults (labels) apply
    train_recs = [r for recs in per_source for r in recs]
    labels = resolve_labels(cfg, train_recs, src)
    names = labels or d.labels or src.get("labels")  # lets a template say {label_name} for 0/1 labels
    pool, tag, problems = [], {}, []
    fmt = ""
    for k, recs in enumerate(per_source if len(per_source) > 1 else [train_recs]):
        try:
            fmt, exs = read(recs, cfg, labels, names)
        except DataError as e:  # every source's problems together
            problems += e.problems
            continue
        pool += exs
        tag.update((id(e), k) for e in exs)
    if problems:
        raise DataError(problems)
    score = _scores(pool, train_recs, d) if d.order == "score" else None
    out: dict[str, list[Any]] = {}
    strat = (lambda xs: [e.label for e in xs]) if (labels and d.stratify) else (lambda xs: None)
    for name, path, size, key in (("test", d.test, d.test_size, "data.test_size"),
                                  ("validation", d.validation, d.val_size, "data.val_size")):
        if path:
            out[name] = read(load_records(path, d)[0], cfg, labels, names)[1]
        else:
            taken, pool = take(pool, size, d.seed, strat(pool), key)
            if taken:
                out[name] = taken
    if d.train_size is not None and _smaller(d.train_size, len(pool)):
        pool, _ = take(pool, d.train_size, d.seed + 1, strat(pool), "data.train_size")
    if d.train_on_validation:  # search's final retrain: the validation examples train too
        held = out.pop("validation", [])
        if score is not None and any(id(x) not in score for x in held):
            raise TunesmithError("data.order: score with data.train_on_validation needs the validation examples "
                                 "cut from the training file (a separate data.validation file has no score read)")
        pool = pool + held
    out["train"] = pool
    meta = {name: Meta([tag.get(id(e), 0) for e in exs], [score[id(e)] for e in exs] if score and name == "train"
                       else None) for name, exs in out.items()}
    return fmt, labels, out, meta


def _scores(pool: list[Any], records: list[Record], d: DataConfig) -> dict[int, float]:
    """data.score_column of each example's record, as a number (a clear error names file, line, field)."""
    fields = {(r.where.path, r.where.line): r.fields for r in records}
    col, out, problems = d.score_column, {}, []
    for e in pool:
        value = fields.get((e.where.path, e.where.line), {}).get(col)
        try:
            out[id(e)] = float(value)
        except (TypeError, ValueError):
            problems.append(Problem(e.where, "missing" if value is None else f"not a number: {value!r}", col))
    if problems:
        raise DataError(problems)
    return out


def _smaller(size: int | float, n: int) -> bool:
    return (size < 1.0) if isinstance(size, float) else size < n


_BLOCKS: dict[tuple, list[dict]] = {}


def text_blocks(source: str, blocks: int, cfg: RunConfig, tokenizer, setting: str) -> list[dict]:
    """The first `blocks` packed blocks of data.max_length tokens of a text source (a file or
    builtin: alias with a `text` column, read for `setting`), tokenised as CPT does; cached per process."""
    key = (source, blocks, cfg.data.max_length, tokenizer.name_or_path, len(tokenizer))
    if key not in _BLOCKS:
        records, _ = load_records(source, cfg.data.model_copy(update={"where": {}, "columns": {}}))
        data_cfg = cfg.data.model_copy(update={"packing": True})
        exs: list[Example] = []
        feats: list[dict] = []
        for rec in records:  # enough documents for the blocks, not the whole corpus
            text = rec.fields.get("text")
            if isinstance(text, str) and text.strip():
                exs.append(Example(where=rec.where, text=text))
                if len(exs) % 200 == 0:
                    feats, _ = tokenize_cpt(exs, data_cfg, tokenizer)
                    if len(feats) > blocks:  # the last block may be short: keep only full ones
                        break
        if len(feats) <= blocks:
            feats, _ = tokenize_cpt(exs, data_cfg, tokenizer)
        if not feats:
            raise TunesmithError(f"{setting}: {source} has no 'text' column with text in it")
        _BLOCKS[key] = feats[:blocks]
    return _BLOCKS[key]
