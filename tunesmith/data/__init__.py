"""Data pipeline: read -> filter -> validate -> split -> tokenise. A task (tunesmith.tasks) says how its
records become examples and features; `split_examples` does the reading and splitting they share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith import assets
from tunesmith.config import DataConfig, RunConfig, task_facts
from tunesmith.data.formats import check_columns, file_columns, filter_where, infer_labels
from tunesmith.data.readers import Record, read_records
from tunesmith.data.splits import take
from tunesmith.data.tokenize import TokenStats
from tunesmith.errors import TunesmithError

# A task's reader: (records, run config, labels, label names) -> (format, examples); raises DataError.
ReadFn = Callable[[list[Record], RunConfig, "list[str] | None", "list[str] | None"], tuple[str, list[Any]]]


@dataclass
class Split:
    examples: list[Any]  # data.formats.Example, pref.data.PrefExample, ... as the task reads them
    features: list[dict[str, Any]] = field(default_factory=list)
    stats: TokenStats = field(default_factory=TokenStats)


@dataclass
class PreparedData:
    fmt: str
    labels: list[str] | None
    chat: bool  # prompts rendered with the tokenizer's chat template
    splits: dict[str, Split]  # "train", and "validation" / "test" when present


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
        raise TunesmithError(f"{_source_name(cfg)}: classification needs a label column, but column '{col}' is "
                             f"{'empty' if col in have else 'not found'}; the file has {', '.join(have)}. Map your "
                             "columns with data.columns (e.g. --data.columns.label=sentiment), or set task for "
                             "other data (sft: prompt/completion or chat, cpt: text)")
    if len(labels) < 2:
        raise TunesmithError(f"{_source_name(cfg)}: classification needs at least 2 labels, found {labels}")
    return list(labels)


def _source_name(cfg: RunConfig) -> str:
    return cfg.data.train if isinstance(cfg.data.train, str) else ", ".join(cfg.data.train or [])


def split_examples(cfg: RunConfig, read: ReadFn) -> tuple[str, list[str] | None, dict[str, list[Any]]]:
    """Read, filter, validate (with the task's `read`) and split; no tokenizer needed.

    Splits are taken per record, before a task expands one (a ranking's pairs never straddle splits).
    Returns (format, labels, splits).
    """
    d = cfg.data
    train_recs: list[Record] = []
    src: dict[str, Any] = {}
    for source in [d.train] if isinstance(d.train, str) else d.train:
        recs, s = load_records(source, d)
        train_recs += recs
        src = src or s  # the first source's builtin defaults (labels) apply
    labels = resolve_labels(cfg, train_recs, src)
    names = labels or d.labels or src.get("labels")  # lets a template say {label_name} for 0/1 labels
    fmt, pool = read(train_recs, cfg, labels, names)
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
    out["train"] = pool + out.pop("validation", []) if d.train_on_validation else pool
    return fmt, labels, out


def _smaller(size: int | float, n: int) -> bool:
    return (size < 1.0) if isinstance(size, float) else size < n
