"""`tunesmith data check`: what the pipeline will make of a file, before any training."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import load_config, parse_overrides
from tunesmith.data import load_records, resolve_labels
from tunesmith.data.formats import Example, infer_labels, rename_columns
from tunesmith.data.openai_format import MIN_EXAMPLES, detect_kind, validate_objects
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.tasks import get_task, task_for_format, to_examples


def check_data(path: str | Path, config: str | Path | dict | None = None,
               overrides: dict | list[str] | None = None) -> dict[str, Any]:
    """Read, validate and tokenise one file with a run config's data settings, as its task does.

    Without a config (and no --task), the task follows the file's detected format (a chat file
    is checked as SFT data, a text+label file as classification).
    Returns:
        A report: rows, format, labels and balance, token-length stats, how many examples
        truncation cuts, what the task adds (preference pairs, target spread), and `problems`
        (every bad record with file, line and field, and test labels the training data never
        shows) and `warnings` (duplicates, test inputs repeated from training). An unreadable file
        still raises.
    """
    from tunesmith.models.load import load_tokenizer, resolve_model_path

    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    try:  # the config's own data files, for the cross-file checks
        given = load_config(config, ov) if config is not None else None
    except ConfigError:  # e.g. a config without data.train: nothing to compare with
        given = None
    ov["data.train"] = str(path)
    cfg = load_config(config, ov)
    report: dict[str, Any] = {"file": cfg.data.train, "task": cfg.task, "problems": [], "warnings": []}
    read_problems: list = []
    records, src = load_records(cfg.data.train, cfg.data, read_problems)  # malformed lines are collected, not raised
    report["problems"] = [str(p) for p in read_problems]
    n_rows = len(records) + len(read_problems)
    if records and not cfg.data.columns and detect_kind(records[0].fields):
        records = _openai_checks(report, records)
    if not records:
        return report
    if config is None and "task" not in ov:  # follow the file's shape
        cfg = load_config(None, {**ov, "task": task_for_format(rename_columns(records[0], cfg.data.columns), cfg.data)})
        report["task"], report["task_detected"] = cfg.task, True
    task = get_task(cfg.task)
    report["rows"] = n_rows
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
    if examples and isinstance(examples[0], Example):  # text, classification and SFT records (pairs: task.describe)
        _duplicates(report, examples, split_from_file=given is None or not (given.data.test and given.data.validation))
        if given is not None:
            _against_other_files(report, records, examples, cfg, given, labels is not None)
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


def _openai_checks(report: dict[str, Any], records: list) -> list:
    """A file in OpenAI's chat or DPO format gets OpenAI's checks (data/openai_format.py, the same
    code the fine-tuning service runs at upload), each problem with its code and line; the records
    it refuses are left out of the task's own checks so each problem is told once."""
    found = validate_objects([(r.where.line, r.fields) for r in records], detect_kind(records[0].fields),
                             min_examples=0)
    bad = {f.line for f in found.findings}
    report["problems"] += [str(f.problem(records[0].where.path)) for f in found.findings]
    report["openai_format"] = {"format": found.kind, "examples": found.examples, "codes": found.codes()}
    if found.examples < MIN_EXAMPLES:
        report["warnings"].append(f"{found.examples} valid example(s): OpenAI's fine-tuning API (and tunesmith "
                                  f"service) needs at least {MIN_EXAMPLES}")
    return [r for r in records if r.where.line not in bad]


def _input_key(e: Example) -> str:
    """What a model sees of an example: its text, or its prompt (a chat's turns before the reply)."""
    if e.messages is not None:
        return json.dumps(e.messages[:-1])
    return e.text if e.text is not None else str(e.prompt)


def _duplicates(report: dict[str, Any], examples: list[Example], split_from_file: bool) -> None:
    """Repeated inputs: wasted steps, and when the test split is cut from this file, test
    examples the model has already trained on."""
    seen: dict[str, list[Example]] = {}
    for e in examples:
        seen.setdefault(_input_key(e), []).append(e)
    repeats = {k: v for k, v in seen.items() if len(v) > 1}
    n = sum(len(v) - 1 for v in repeats.values())
    what = "texts" if examples and examples[0].text is not None else "prompts"
    report["duplicates"] = n
    if n:
        first = next(iter(repeats.values()))
        leak = "; the validation/test splits are cut from this file, so copies can land on both sides and " \
               "inflate the held-out scores" if split_from_file else ""
        report["warnings"].append(f"{n} duplicate {what} (e.g. {first[0].where} and {first[1].where}){leak}")
        conflicts = sum(len({e.label for e in v}) > 1 for v in repeats.values()) if examples[0].label is not None else 0
        if conflicts:
            report["warnings"].append(f"{conflicts} text(s) appear with different labels")


def _against_other_files(report: dict[str, Any], records, examples: list[Example], cfg, given, labelled: bool) -> None:
    """The checked file against the config's other data files: labels a held-out file has that
    training never shows (the trained head cannot predict them; `eval` fails on them), and
    held-out inputs that repeat training ones."""
    here = cfg.data.train
    trains = [given.data.train] if isinstance(given.data.train, str) else list(given.data.train or [])
    held_out = [f for f in (given.data.validation, given.data.test) if f and f != here]
    # (training file, held-out file): the checked file is one side of each pair
    pairs = [(here, t) for t in held_out] if here in trains else [(t, here) for t in trains if t != here]
    for train_file, test_file in pairs:
        other_file = test_file if train_file == here else train_file
        try:
            other_recs = load_records(other_file, cfg.data)[0]
            other = [] if labelled else to_examples(other_recs, cfg.task, cfg.data, None)[1]
        except TunesmithError as e:
            report["warnings"].append(f"could not compare with {other_file}: {str(e).splitlines()[0]}")
            continue
        train_recs, test_recs = (records, other_recs) if train_file == here else (other_recs, records)
        if labelled:
            seen = set(infer_labels(train_recs, cfg.data))
            for label, n in Counter(v for v in _label_values(test_recs, cfg) if v not in seen).items():
                report["problems"].append(f"{test_file}: label '{label}' ({n} row(s)) never occurs in the training "
                                          f"data ({train_file}); the trained model cannot predict it")
            mine = {str(rename_columns(r, cfg.data.columns).get("text")) for r in records}
            theirs = {str(rename_columns(r, cfg.data.columns).get("text")) for r in other_recs}
        else:
            mine, theirs = {_input_key(e) for e in examples}, {_input_key(e) for e in other}
        overlap = len(mine & theirs)
        if overlap:
            n_test = len(theirs) if train_file == here else len(mine)
            report["warnings"].append(f"{overlap} of {n_test} distinct inputs of {test_file} also appear in the "
                                      f"training data ({train_file}): held-out scores are inflated")


def _label_values(records, cfg) -> list[str]:
    values = (rename_columns(r, cfg.data.columns).get("label") for r in records)
    return [str(v).strip() for v in values if v is not None]


def _token_stats(stats, max_length: int, features: int) -> dict[str, Any]:
    lens = np.array(stats.lengths)
    return {"min": int(lens.min()), "mean": round(float(lens.mean()), 1), "p50": int(np.percentile(lens, 50)),
            "p95": int(np.percentile(lens, 95)), "max": int(lens.max()), "max_length": max_length,
            "truncated": stats.truncated, "dropped": stats.dropped, "features": features}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"file: {r['file']}", f"task: {r['task']}" + (" (detected from the file; set one with --config or "
                                                           "--task)" if r.get("task_detected") else "")]
    if "rows" in r:
        lines += [f"rows: {r['rows']} read, {r.get('valid_rows', 0)} valid", f"format: {r['format']}"]
    if r.get("labels"):
        total = max(sum(r["labels"].values()), 1)
        lines.append("labels: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in r["labels"].items()))
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
    if r.get("warnings"):
        lines.append(f"warnings ({len(r['warnings'])}):")
        lines += [f"  - {w}" for w in r["warnings"]]
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}):")
        lines += [f"  - {p}" for p in r["problems"][:50]]
        if len(r["problems"]) > 50:
            lines.append(f"  ... and {len(r['problems']) - 50} more")
    else:
        lines.append("problems: none")
    return "\n".join(lines)
