"""Turn raw records into canonical examples for a task, reporting every bad record.

Canonical shapes (after `data.columns` renaming):
  text               {"text": str}                              -> cpt
  classification     {"text": str, "label": name | id}          -> classification
  prompt_completion  {"prompt": str, "completion": str}         -> sft
  instruction        {"instruction", "input" (optional), "output"} -> sft (Alpaca layout)
  chat               {"messages": [{"role", "content"}, ...]}   -> sft
SFT records may add "expected": the phrase a correct reply must contain, used by the
exact-match / containment scores instead of the full reference completion.
With `data.template.prompt` set, any columns can be rendered into prompt/completion.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from tunesmith.config import DataConfig
from tunesmith.data.readers import Record
from tunesmith.errors import DataError, Problem, TunesmithError

# The Alpaca layout: the most common instruction-tuning prompt in the literature.
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    """A validated example. Exactly one of the payload groups is set, by format."""

    where: Any  # Location
    text: str | None = None
    label: int | None = None
    prompt: str | None = None  # user turn when a chat template renders it
    plain_prompt: str | None = None  # the prompt text when no chat template is used
    completion: str | None = None
    messages: list[dict[str, str]] | None = None
    expected: str | None = None  # sft eval: the phrase a correct reply must contain (else the completion)


def rename_columns(rec: Record, columns: dict[str, str]) -> dict[str, Any]:
    """Apply data.columns (canonical -> file column) to one record's fields."""
    if not columns:
        return rec.fields
    fields = dict(rec.fields)
    for canonical, col in columns.items():
        if col in rec.fields:
            fields[canonical] = rec.fields[col]
    return fields


def file_columns(records: list[Record], limit: int = 1000) -> list[str]:
    """The column names of a file, in file order (the union over its first `limit` records)."""
    return list(dict.fromkeys(k for r in records[:limit] for k in r.fields))


def check_columns(records: list[Record], cfg: DataConfig, source: str) -> None:
    """Every column named in data.columns must exist in the file; say which columns it has.

    Raises:
        TunesmithError: e.g. "data.columns.label: column 'sentimnt' not found; the file has id, review, sentiment".
    """
    have = file_columns(records)
    missing = [f"data.columns.{canonical}: column '{col}' not found" for canonical, col in cfg.columns.items()
               if col not in have]
    if missing:
        raise TunesmithError(f"{source}: " + "; ".join(missing) + f"; the file has {', '.join(have)}")


def filter_where(records: list[Record], where: dict[str, Any]) -> list[Record]:
    """Keep records whose columns equal the given values (compared as strings, CSV-friendly)."""
    if not where:
        return records
    return [r for r in records if all(str(r.fields.get(k)) == str(v) for k, v in where.items())]


def detect_format(fields: dict[str, Any], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.template.prompt:
        return "prompt_completion"
    keys = list(fields)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= set(keys):
        return "instruction"
    if {"prompt", "completion"} <= set(keys):
        return "prompt_completion"
    if {"text", "label"} <= set(keys):
        return "classification"
    if "text" in keys:
        return "text"
    raise TunesmithError(
        f"cannot detect the data format from columns {', '.join(keys)}: expected text (+label), prompt+completion, "
        "instruction+output or messages. Map your columns with data.columns (e.g. {text: review}) or set data.format; "
        "`tunesmith init FILE` writes a config with the mapping."
    )


def _render(template: str, fields: dict[str, Any], where, problems: list[Problem]) -> str | None:
    """Fill a format string from a record; a missing field is a problem naming that field."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [n for n in names if n not in fields or fields[n] is None]
    for n in missing:
        problems.append(Problem(where, "template references a field this record does not have", field=n))
    if missing:
        return None
    return template.format_map({k: "" if v is None else v for k, v in fields.items()})


def _with_label_name(fields: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """Add {label_name}: the class name of an integer label id (data.labels or a builtin's labels)."""
    label = fields.get("label")
    if names and label is not None and str(label).isdigit() and int(label) < len(names):
        return {**fields, "label_name": names[int(label)]}
    return fields if label is None else {**fields, "label_name": str(label)}


def need_str(fields: dict, key: str, where, problems: list[Problem], allow_empty: bool = False) -> str | None:
    if key not in fields or fields[key] is None:
        problems.append(Problem(where, "missing", field=key))
        return None
    v = fields[key]
    if not isinstance(v, str):
        problems.append(Problem(where, f"expected a string, got {type(v).__name__}", field=key))
        return None
    if not allow_empty and not v.strip():
        problems.append(Problem(where, "empty", field=key))
        return None
    return v


def _messages(fields: dict, where, problems: list[Problem]) -> list[dict[str, str]] | None:
    msgs = fields.get("messages")
    if not isinstance(msgs, list) or not msgs:
        problems.append(Problem(where, "expected a non-empty list of {role, content}", field="messages"))
        return None
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            problems.append(Problem(where, f"message {i} must be {{role: system|user|assistant, content: str}}",
                                    field="messages"))
            return None
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        problems.append(Problem(where, "the last message must be the assistant's (the target)", field="messages"))
        return None
    return out


def _label_id(value: Any, labels: list[str], where, problems: list[Problem]) -> int | None:
    s = str(value).strip()
    if s in labels:
        return labels.index(s)
    if s.lstrip("-").isdigit() and 0 <= int(s) < len(labels) and not any(l.lstrip("-").isdigit() for l in labels):
        return int(s)  # integer ids with named classes, e.g. 0/1 with [negative, positive]
    problems.append(Problem(where, f"unknown label '{value}'; expected one of {labels}"
                            + (" or an id 0..%d" % (len(labels) - 1) if labels else ""), field="label"))
    return None


def infer_labels(records: list[Record], cfg: DataConfig) -> list[str]:
    """Distinct training labels, sorted numerically when they are all integers."""
    values = {str(rename_columns(r, cfg.columns).get("label")).strip() for r in records}
    values.discard("None")
    if values and all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def read_examples(records: list[Record], task: str, formats: frozenset[str], cfg: DataConfig, labels: list[str] | None,
                  label_names: list[str] | None = None) -> tuple[str, list[Example]]:
    """Validate records for a task that reads `formats` and convert them to Examples. With `labels`,
    a classification record's label becomes its class id; without, only its text is read.

    Returns:
        (detected format, examples)
    Raises:
        DataError listing every bad record (file, line, field).
    """
    try:
        fmt = detect_format(rename_columns(records[0], cfg.columns), cfg)
    except TunesmithError as e:
        raise TunesmithError(f"{records[0].where.path}: {e}") from None
    if fmt not in formats:
        raise TunesmithError(f"{records[0].where.path}: data looks like '{fmt}', which task '{task}' cannot use "
                             f"(it needs {' or '.join(sorted(formats))}); set data.format or data.columns")
    problems: list[Problem] = []
    examples = []
    for rec in records:
        f = rename_columns(rec, cfg.columns)
        w = rec.where
        n_before = len(problems)
        ex = Example(where=w)
        if fmt == "text":
            ex.text = need_str(f, "text", w, problems)
        elif fmt == "classification":
            ex.text = need_str(f, "text", w, problems)
            if labels is not None:
                if f.get("label") is None or str(f.get("label")).strip() == "":
                    problems.append(Problem(w, "missing", field="label"))
                else:
                    ex.label = _label_id(f["label"], labels or [], w, problems)
        elif fmt == "chat":
            ex.messages = _messages(f, w, problems)
        elif cfg.template.prompt:
            g = _with_label_name(f, label_names)
            ex.prompt = _render(cfg.template.prompt, g, w, problems)
            ex.completion = _render(cfg.template.completion or "{completion}", g, w, problems)
            ex.plain_prompt = ex.prompt
        elif fmt == "instruction":
            instr = need_str(f, "instruction", w, problems)
            inp = f.get("input") or ""
            ex.completion = need_str(f, "output", w, problems)
            if instr is not None:
                ex.prompt = instr + ("\n\n" + inp if inp else "")
                ex.plain_prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if inp else "",
                                               instruction=instr, input_block=f"### Input:\n{inp}\n\n" if inp else "")
        else:  # prompt_completion
            ex.prompt = ex.plain_prompt = need_str(f, "prompt", w, problems, allow_empty=True)
            ex.completion = need_str(f, "completion", w, problems)
        if fmt not in ("text", "classification") and f.get("expected") is not None:  # an answer's key phrase
            ex.expected = need_str(f, "expected", w, problems)
        if len(problems) == n_before:
            examples.append(ex)
    if problems:  # name the user's own columns, not our canonical fields
        raise DataError([Problem(p.where, p.message, cfg.columns.get(p.field, p.field) if p.field else None)
                         for p in problems])
    return fmt, examples
