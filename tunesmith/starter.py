"""`tunesmith init FILE`: a starter run config for a user's own data file.

It reads the file the way training will, detects what the columns are for (the text, the label,
a question and its answer, chat messages) and writes a short commented YAML with the task,
`data.columns` for the user's own column names, and the defaults a first run needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import DEFAULT_MODEL, DataConfig, load_config
from tunesmith.data.formats import file_columns
from tunesmith.data.readers import Record, read_records
from tunesmith.errors import TunesmithError
from tunesmith.tasks import get_task, task_for_format

# Column names people use, most telling first.
_LABEL_NAMES = ("label", "labels", "sentiment", "class", "category", "target", "y", "rating", "intent", "topic")
_PROMPT_NAMES = ("prompt", "question", "query", "input", "instruction", "q", "source")
_ANSWER_NAMES = ("completion", "answer", "response", "output", "reply", "target", "a")


def detect_columns(records: list[Record]) -> tuple[str, dict[str, str]]:
    """(task, data.columns) for a file's records.

    A file already in a canonical shape (text+label, prompt+completion, messages, chosen+rejected)
    needs no mapping. Otherwise: a label is a short column with few distinct values (preferring
    names like sentiment or category), the text is the longest string column; two text columns
    named like question/answer make SFT data; one text column alone is continued pre-training.
    """
    cols = file_columns(records)
    sample = [r.fields for r in records[:2000]]
    strings = [c for c in cols if all(isinstance(f.get(c), str) or f.get(c) is None for f in sample)]
    mean_len = {c: sum(len(f.get(c) or "") for f in sample) / max(len(sample), 1) for c in strings}
    canonical = {"messages", "prompt", "completion", "instruction", "chosen", "rejected", "responses"}
    if canonical & set(cols) or {"text", "label"} <= set(cols):

        return task_for_format(sample[0], DataConfig()), {}
    prompt = _named(strings, _PROMPT_NAMES)
    answer = _named([c for c in strings if c != prompt], _ANSWER_NAMES)
    if prompt and answer and mean_len[prompt] > 0 and mean_len[answer] > 0:
        return "sft", {"prompt": prompt, "completion": answer}
    label = _label_column(cols, sample)
    text_candidates = sorted((c for c in strings if c != label), key=lambda c: -mean_len[c])
    if not text_candidates:
        raise TunesmithError(f"cannot tell which column holds the text; the file has {', '.join(cols)}. "
                             "Write the config by hand (see examples/reviews.yaml)")
    text = "text" if "text" in text_candidates else text_candidates[0]
    mapping = {k: v for k, v in (("text", text), ("label", label)) if v and k != v}
    return ("classification" if label else "cpt"), mapping


def _named(cols: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in cols}
    return next((lower[n] for n in names if n in lower), None)


def _label_column(cols: list[str], sample: list[dict[str, Any]]) -> str | None:
    def distinct(c: str) -> int:
        return len({str(f.get(c)).strip() for f in sample if f.get(c) not in (None, "")})

    def short(c: str) -> bool:
        return all(len(str(f.get(c) or "")) <= 40 for f in sample)

    n = len(sample)
    fits = [c for c in cols if 2 <= distinct(c) <= max(2, min(50, n // 2)) and short(c)]
    return _named(fits, _LABEL_NAMES) or (fits[0] if len(fits) == 1 else None)


def starter_config(data: str | Path, out: str | Path | None = None, model: str | None = None,
                   overwrite: bool = False) -> str:
    """Write (or return, when `out` is None) a starter config for `data`.

    Returns:
        The YAML text. It is checked with load_config before it is written.
    Raises:
        TunesmithError: the file is missing or unreadable, its columns cannot be told apart, or
            `out` exists (without `overwrite`).
    """
    data = Path(data)
    if not data.exists():
        raise TunesmithError(f"data file not found: {data.absolute()}")
    records = read_records(data)
    task, columns = detect_columns(records)
    out_path = Path(out) if out else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise TunesmithError(f"{out_path} already exists; choose another --out or pass --overwrite")
    # The data path relative to the config's folder, so the pair can move together.
    train = os.path.relpath(data.absolute(), out_path.absolute().parent) if out_path else str(data.absolute())
    model = model or DEFAULT_MODEL["head" if get_task(task).head is not None else "generate"]
    tree = {"task": task, "model": {"name_or_path": model},
            "data": {"train": train, **({"columns": columns} if columns else {}), "val_size": 0.1, "test_size": 0.1,
                     "max_length": 256},
            "method": {"name": "lora", "r": 8}, "train": {"epochs": 3, "batch_size": 16},
            "output": {"name": data.stem}}
    seen = ", ".join(file_columns(records))
    mapped = ", ".join(f"{k} <- column '{v}'" for k, v in columns.items()) or "the file's own column names"
    text = (f"# tunesmith train {out_path or 'CONFIG.yaml'}\n#\n"
            f"# Starter config written by `tunesmith init {data}`: {len(records)} records with columns {seen};\n"
            f"# detected task {task} ({mapped}). Check it first with:\n"
            f"#   tunesmith data check {data} --config {out_path or 'CONFIG.yaml'}\n"
            "# Relative paths here are relative to this file's folder. Every field: tunesmith config --doc\n"
            + yaml.safe_dump(tree, sort_keys=False))
    load_config(yaml.safe_load(text) | {"data": {**tree["data"], "train": str(data.absolute())}})  # it must load
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
    return text
