"""`tunesmith data check`: what the pipeline will make of a file, before any training."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import load_config, parse_overrides
from tunesmith.data import load_records, resolve_labels
from tunesmith.data.formats import rename_columns
from tunesmith.errors import DataError
from tunesmith.tasks import get_task


def check_data(path: str | Path, config: str | Path | dict | None = None,
               overrides: dict | list[str] | None = None) -> dict[str, Any]:
    """Read, validate and tokenise one file with a run config's data settings, as its task does.

    Returns:
        A report: rows, format, labels and balance, token-length stats, how many examples
        truncation cuts, what the task adds (preference pairs, target spread), and `problems`
        (every bad record with file, line and field). An unreadable file still raises.
    """
    from tunesmith.models.load import load_tokenizer, resolve_model_path

    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    ov["data.train"] = str(path)
    cfg = load_config(config, ov)
    task = get_task(cfg.task)
    report: dict[str, Any] = {"file": str(path), "task": cfg.task, "problems": []}
    read_problems: list = []
    records, src = load_records(str(path), cfg.data, read_problems)  # malformed lines are collected, not raised
    report["problems"] = [str(p) for p in read_problems]
    if not records:
        return report
    report["rows"] = len(records) + len(read_problems)
    report["format"] = task.detect(rename_columns(records[0], cfg.data.columns), cfg.data)
    labels = resolve_labels(cfg, records, src)
    names = labels or cfg.data.labels or src.get("labels")
    try:
        fmt, examples = task.read(records, cfg, labels, names)
    except DataError as e:
        report["problems"] += [str(p) for p in e.problems]
        bad = {(p.where.path, p.where.line) for p in e.problems}
        good = [r for r in records if (r.where.path, r.where.line) not in bad]
        fmt, examples = task.read(good, cfg, labels, names) if good else (report["format"], [])
    report["valid_rows"] = len(examples)
    if labels:
        counts = Counter(labels[e.label] for e in examples if e.label is not None)
        report["labels"] = {name: counts.get(name, 0) for name in labels}
    texts = [str(rename_columns(r, cfg.data.columns).get("text", "")) for r in records]
    report["duplicates"] = len(texts) - len(set(texts)) if report["format"] in {"text", "classification"} else None
    if examples:
        tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
        try:
            feats, stats = task.encode(examples, fmt, cfg, tok, task.chat(cfg, fmt, examples, tok))
        except DataError as e:
            report["problems"] += [str(p) for p in e.problems]
            feats, stats = [], None
        report.update(task.describe(examples, feats))
        if stats is not None and stats.lengths:
            report["tokens"] = _token_stats(stats, cfg.data.max_length, len(feats))
    return report


def _token_stats(stats, max_length: int, features: int) -> dict[str, Any]:
    lens = np.array(stats.lengths)
    return {"min": int(lens.min()), "mean": round(float(lens.mean()), 1), "p50": int(np.percentile(lens, 50)),
            "p95": int(np.percentile(lens, 95)), "max": int(lens.max()), "max_length": max_length,
            "truncated": stats.truncated, "dropped": stats.dropped, "features": features}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"file: {r['file']}", f"task: {r['task']}"]
    if "rows" in r:
        lines += [f"rows: {r['rows']} read, {r.get('valid_rows', 0)} valid", f"format: {r['format']}"]
    if r.get("labels"):
        total = max(sum(r["labels"].values()), 1)
        lines.append("labels: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in r["labels"].items()))
    if r.get("duplicates"):
        lines.append(f"duplicate texts: {r['duplicates']}")
    if r.get("targets"):
        lines.append("targets: " + ", ".join(f"{k} {v}" for k, v in r["targets"].items()))
    if r.get("preference"):
        p = r["preference"]
        lines.append("preference: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.items()))
        if p.get("chosen_longer_share") is not None and abs(p["chosen_longer_share"] - 0.5) > 0.25:
            lines.append(f"  length bias: the chosen response is longer in {100 * p['chosen_longer_share']:.0f}% of pairs; "
                         "a reward model may learn length instead of quality")
    if "tokens" in r:
        t = r["tokens"]
        lines.append(f"tokens per example: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
        lines.append(f"truncation at max_length={t['max_length']}: {t['truncated']} example(s) cut"
                     + (f", {t['dropped']} left with no answer tokens (dropped)" if t["dropped"] else ""))
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}):")
        lines += [f"  - {p}" for p in r["problems"][:50]]
        if len(r["problems"]) > 50:
            lines.append(f"  ... and {len(r['problems']) - 50} more")
    else:
        lines.append("problems: none")
    return "\n".join(lines)
