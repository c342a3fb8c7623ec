"""`tunesmith data check`: what the pipeline will make of a file, before any training."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import load_config, parse_overrides
from tunesmith.data import dedup, load_records, resolve_labels
from tunesmith.data.formats import Example, infer_labels, rename_columns
from tunesmith.data.openai_format import MIN_EXAMPLES, detect_kind, validate_objects
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.tasks import findings, get_task, task_for_format, to_examples
from tunesmith.tasks.check_output import format_report, markdown_report  # noqa: F401 (the API's names)
from tunesmith.tasks.findings import Finding


TOKEN_SAMPLE = 5_000  # IMDB-sized reviews: about 8 CPU-seconds of MiniLM's tokenizer


def check_data(path: str | Path, config: str | Path | dict | None = None,
               overrides: dict | list[str] | None = None, *, label_check: bool = True,
               token_sample: int | None = TOKEN_SAMPLE, near_threshold: float = findings.NEAR_THRESHOLD) -> dict[str, Any]:
    """Read, validate and tokenise one file with a run config's data settings, as its task does,
    then run the quality checks (tasks/findings.py).

    Without a config (and no --task), the task follows the file's detected format (a chat file
    is checked as SFT data, a text+label file as classification).
    Args:
        label_check: look for likely label errors (a cross-validated model).
        token_sample: tokenise at most this many examples, chosen at random (None: all). The
            tokenizer is the slowest stage (about 200,000 tokens per CPU-second for MiniLM's), so
            token statistics and the estimate of a larger file come from a sample; the other checks
            always read every row.
        near_threshold: word 3-gram Jaccard similarity from which two rows are near-duplicates.
    Returns:
        A report: rows, format, labels and balance, token-length stats, how many examples
        truncation cuts, what the task adds (preference pairs, target spread), `findings` (each
        check's verdict with every row it concerns as file and line), `problems` (every bad record
        with file, line and field, and the error findings), `warnings` and `notes` (the other
        findings' messages), an `estimate` of training time and peak memory, and `timings`.
        An unreadable file still raises.
    """
    clock = _Clock()
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    try:  # the config's own data files, for the cross-file checks
        given = load_config(config, ov) if config is not None else None
    except ConfigError:  # e.g. a config without data.train: nothing to compare with
        given = None
    ov["data.train"] = str(path)
    cfg = load_config(config, ov)
    report: dict[str, Any] = {"file": cfg.data.train, "task": cfg.task, "problems": [], "warnings": [], "notes": []}
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
    clock.lap("read")
    report["valid_rows"] = len(examples)
    held_out = given is not None and cfg.data.train in (given.data.validation, given.data.test)
    found: list[Finding] = [f for check in findings.RECORD_CHECKS for f in check(records, cfg)]
    found += findings.size(len(examples), held_out)
    if labels:
        counts = Counter(labels[e.label] for e in examples if e.label is not None)
        report["labels"] = {name: counts.get(name, 0) for name in labels}
        found += findings.balance(report["labels"], held_out)
    # Both cores: the tokenizer (Rust) and the label model (sklearn's SGD loop) release the GIL, and
    # so do the numpy passes of the duplicate and junk checks, so the stages overlap in threads.
    if examples and not held_out:  # the estimate's matmul speed, measured before the threads compete for the CPU
        _measure_speed(cfg)
    with ThreadPoolExecutor(max_workers=2) as pool:
        tokens = pool.submit(_token_report, task, fmt, examples, cfg, token_sample, held_out, labels) \
            if examples else None
        if examples and isinstance(examples[0], Example):  # text, classification and SFT records (pairs: task.describe)
            found += _text_checks(report, examples, cfg, given, records, labels, label_check, near_threshold,
                                  clock, pool)
        if tokens is not None:
            part, problems, laps = tokens.result()
            report["problems"] += problems
            report.update(part)
            clock.laps.update(laps)
    report["findings"] = [f.as_dict() for f in found]
    for f in found:
        report[{"error": "problems", "warning": "warnings", "info": "notes"}[f.severity]].append(f.message)
    report["duplicates"] = sum(f.as_dict()["count"] for f in found if f.check == "duplicates")
    report["timings"] = clock.laps
    return report


def _token_report(task, fmt, examples: list, cfg, token_sample: int | None, held_out: bool,
                  labels: list[str] | None) -> tuple[dict[str, Any], list[str], dict]:
    """Token statistics of a sample (or all) of the examples, what the task makes of them, and the
    estimate of training time and memory. Returns (report entries, problems, timings); runs in its
    own thread (check_data)."""
    from tunesmith.models.load import load_tokenizer, resolve_model_path

    clock, part, problems = _Clock(), {}, []
    tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    sample = _sample(examples, token_sample, cfg.data.seed)
    try:
        feats, stats = task.encode(sample, fmt, cfg, tok, task.chat(cfg, fmt, sample, tok))
    except DataError as e:
        problems += [str(p) for p in e.problems]
        feats, stats = [], None
    clock.lap("tokenize")
    part.update(task.describe(examples, feats))
    if stats is not None and stats.lengths:
        part["tokens"] = _token_stats(stats, cfg.data.max_length, len(feats), len(examples))
        if not held_out:
            lengths = [len(f["input_ids"]) for f in feats if "input_ids" in f] or \
                [min(n, cfg.data.max_length) for n in stats.lengths]  # what trains: truncated, packed
            part["estimate"] = _estimate(cfg, lengths, len(labels or []), len(examples) / len(sample))
            clock.lap("estimate")
    return part, problems, clock.laps


class _Clock:
    """Wall and CPU seconds per stage of the check, for the report (and bench/data_check.py). CPU is
    the calling thread's: stages run in two threads at once (check_data), each with its own clock."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self._t, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        lap = self.laps.setdefault(name, {"wall": 0.0, "cpu": 0.0})
        lap["wall"] = round(lap["wall"] + now - self._t, 3)
        lap["cpu"] = round(lap["cpu"] + cpu - self._cpu, 3)
        self._t, self._cpu = now, cpu


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


def _sample(examples: list, n: int | None, seed: int) -> list:
    """All examples, or a seeded random `n` of them (in file order) when there are more."""
    if not n or len(examples) <= n:
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in keep]


def _text_checks(report: dict[str, Any], examples: list[Example], cfg, given, records, labels, label_check: bool,
                 near: float, clock: _Clock, pool: ThreadPoolExecutor) -> list[Finding]:
    """Duplicates, leakage against the config's other files, junk, length outliers, label errors
    (the last in a thread of `pool` while the others run)."""
    everything = [findings.all_text(e) for e in examples]
    w_all = dedup.words(everything)
    inputs = [findings.input_text(e) for e in examples]
    w_in = w_all if inputs == everything else dedup.words(inputs)
    clock.lap("words")
    label_errors = pool.submit(_label_errors, examples, w_all, labels, cfg.data.seed) \
        if label_check and labels and get_task(cfg.task).head == "labels" else None
    split_from_file = given is None or not (given.data.test and given.data.validation)
    out = findings.duplicates(examples, dedup.shingle(w_in, findings.SHINGLE), split_from_file, near)
    clock.lap("duplicates")
    if given is not None:
        out += _against_other_files(report, records, examples, cfg, given, labels is not None, near)
        clock.lap("leakage")
    out += findings.junk(examples, everything, w_all) + findings.lengths(examples, w_all)
    clock.lap("junk_and_lengths")
    if label_errors is not None:
        found, report["label_check"], laps = label_errors.result()
        out += found
        clock.laps.update(laps)
    return out


def _label_errors(examples: list[Example], w, labels: list[str], seed: int) -> tuple[list[Finding], dict, dict]:
    clock = _Clock()
    found, facts = findings.label_errors(examples, w, labels, seed)
    clock.lap("label_issues")
    return found, facts, clock.laps


def _against_other_files(report: dict[str, Any], records, examples: list[Example], cfg, given,
                         labelled: bool, near: float) -> list[Finding]:
    """The checked file against the config's other data files: labels a held-out file has that
    training never shows (the trained head cannot predict them; `eval` fails on them), and rows
    that repeat, exactly or nearly, a row on the other side of the split."""
    here = cfg.data.train
    trains = [s.path for s in given.data.sources()]
    held_out = [f for f in (given.data.validation, given.data.test) if f and f != here]
    # (training file, held-out file): the checked file is one side of each pair
    pairs = [(here, t) for t in held_out] if here in trains else [(t, here) for t in trains if t != here]
    out: list[Finding] = []
    for train_file, test_file in pairs:
        other_file = test_file if train_file == here else train_file
        try:
            other_recs = load_records(other_file, cfg.data)[0]
            other = _plain_examples(other_recs, cfg) if labelled else to_examples(other_recs, cfg.task, cfg.data, None)[1]
        except TunesmithError as e:
            report["warnings"].append(f"could not compare with {other_file}: {str(e).splitlines()[0]}")
            continue
        train_recs, test_recs = (records, other_recs) if train_file == here else (other_recs, records)
        if labelled:
            seen = set(infer_labels(train_recs, cfg.data))
            for label, n in Counter(v for v in _label_values(test_recs, cfg) if v not in seen).items():
                report["problems"].append(f"{test_file}: label '{label}' ({n} row(s)) never occurs in the training "
                                          f"data ({train_file}); the trained model cannot predict it")
        mine, theirs = {findings.input_text(e) for e in examples}, {findings.input_text(e) for e in other}
        overlap = len(mine & theirs)
        sh = dedup.shingle(dedup.words([findings.input_text(e) for e in examples + other]), findings.SHINGLE)
        leaks = findings.leakage(examples, other, sh, train_file == here, other_file, near)
        for f in leaks:
            if f.check == "leakage":  # the count of distinct inputs, as this message always said
                n_test = len(theirs) if train_file == here else len(mine)
                f.message = (f"{overlap} of {n_test} distinct inputs of {test_file} also appear in the training data "
                             f"({train_file}): held-out scores are inflated; rows of this file: {len(f.rows)} "
                             f"(e.g. {findings.where_str(f.rows[0])} ~ {f.rows[0]['same_as']})")
        out += leaks
    return out


def _plain_examples(records, cfg) -> list[Example]:
    """A labelled file's texts without validating its labels (unseen labels are reported, not raised)."""
    return [Example(r.where, text=str(rename_columns(r, cfg.data.columns).get("text"))) for r in records]


def _estimate(cfg, lengths: list[int], num_labels: int, scale: float) -> dict[str, Any]:
    """Training time and peak memory (models/estimate.py) for the part of the file that trains.

    `lengths` are a sample's (or all) examples' token counts; `scale` = examples / sample size.
    When validation/test are cut from this file, they are taken off at random (as the split does)
    and the evaluation passes are costed on them; else on a tenth of the file (a guess).
    """
    from tunesmith.models.estimate import estimate_run
    from tunesmith.models.load import resolve_model_path

    d = cfg.data
    total = round(len(lengths) * scale)
    held = sum(0 if path else (round(size * total) if isinstance(size, float) else int(size))
               for path, size in ((d.validation, d.val_size), (d.test, d.test_size)))
    n_eval = min(round(held / scale), len(lengths) - 1)
    order = np.random.default_rng(d.seed).permutation(len(lengths))
    train = [lengths[i] for i in order[n_eval:]]
    eval_tokens = sum(lengths[i] for i in order[:n_eval]) if n_eval else sum(lengths) // 10
    return estimate_run(cfg, resolve_model_path(cfg.model.name_or_path), num_labels, train,
                        round(eval_tokens * scale) // 2, scale)


def _measure_speed(cfg) -> None:
    """models/estimate.py's matmul speed of the run's device (cached per process)."""
    from tunesmith.models.device import resolve_device
    from tunesmith.models.estimate import matmul_gflops

    device = resolve_device(cfg.train)
    matmul_gflops(device if device in ("cpu", "cuda") else "cpu")


def _label_values(records, cfg) -> list[str]:
    values = (rename_columns(r, cfg.data.columns).get("label") for r in records)
    return [str(v).strip() for v in values if v is not None]


def _token_stats(stats, max_length: int, features: int, examples: int) -> dict[str, Any]:
    lens = np.array(stats.lengths)
    out = {"min": int(lens.min()), "mean": round(float(lens.mean()), 1), "p50": int(np.percentile(lens, 50)),
           "p95": int(np.percentile(lens, 95)), "max": int(lens.max()), "max_length": max_length,
           "truncated": stats.truncated, "dropped": stats.dropped, "features": features}
    if len(lens) < examples:
        out["sample"] = {"examples": len(lens), "of": examples}
    return out
