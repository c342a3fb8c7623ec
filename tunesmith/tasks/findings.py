"""The quality checks of `tunesmith data check`, each turned into findings that name their rows.

A finding is one check's verdict: its severity (an error makes `data check` exit 1; warnings and
notes do not), one line of message, and every row it concerns as {file, line} plus what the check
knows about the row (which row it duplicates, the label a model suggests). `drop` marks the rows
that `tunesmith data clean` leaves out (later copies of a duplicate, rows leaked from the other
side of a split). The checks themselves are in tunesmith/data (dedup, quality, label_issues).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tunesmith.config import RunConfig
from tunesmith.data import dedup, label_issues, quality
from tunesmith.data.formats import Example
from tunesmith.data.readers import Record
from tunesmith.errors import Location

Severity = Literal["error", "warning", "info"]
# Jaccard of word 3-gram sets from which two rows are near-duplicates. bench/data_check.py: at 0.7
# edited copies with 8% of their words changed were found 15% of the time, at 0.6 98% (at 0.5 100%),
# with no more false positives at any of the three; 0.6 keeps some margin for templated texts.
NEAR_THRESHOLD = 0.6
SHINGLE = 3
MIN_ROWS_FOR_LABEL_CHECK = 50
FOLDS = 5


@dataclass
class Finding:
    check: str  # duplicates, near_duplicates, leakage, near_leakage, label_issues, junk, length, balance, size
    severity: Severity
    message: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # {"file", "line", ...details}
    drop: bool = False  # `data clean` leaves these rows out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "count": len(self.rows)}


def row(where: Location, **details: Any) -> dict[str, Any]:
    return {"file": where.path, "line": where.line, "unit": where.unit, **details}


def where_str(r: dict[str, Any]) -> str:
    return str(Location(r["file"], r["line"], r.get("unit", "line")))


def _examples_of(rows: list[dict[str, Any]], k: int = 3) -> str:
    shown = ", ".join(where_str(r) for r in rows[:k])
    return shown + (f" and {len(rows) - k} more" if len(rows) > k else "")


def input_text(e: Example) -> str:
    """What a model reads of an example: its text, its prompt, or a chat's turns before the reply."""
    if e.messages is not None:
        return "\n".join(m.get("content") or "" for m in e.messages[:-1])
    if e.text is not None:
        return e.text
    return e.prompt if e.prompt is not None else (e.plain_prompt or "")


def all_text(e: Example) -> str:
    """Every text field of an example (prompt and answer, every turn), for the junk checks."""
    if e.messages is not None:
        return "\n".join(m.get("content") or "" for m in e.messages)
    parts = [e.text, e.prompt if e.prompt is not None else e.plain_prompt, e.completion]
    return "\n".join(p for p in parts if p is not None)


# ---------------------------------------------------------------- size, balance
def size(n: int, held_out: bool) -> list[Finding]:
    """Too few examples: < 10 training rows is an error, < 50 a warning; a held-out file under 50 a
    warning (its scores move by several points per example)."""
    if held_out:
        return [Finding("size", "warning", f"only {n} held-out example(s): each one moves accuracy by "
                        f"{100 / max(n, 1):.1f} points; use at least {quality.MIN_ROWS_WARNING}")] \
            if n < quality.MIN_ROWS_WARNING else []
    if n < quality.MIN_ROWS_ERROR:
        return [Finding("size", "error", f"only {n} valid training example(s); fine-tuning needs at least "
                        f"{quality.MIN_ROWS_ERROR} (and shows gains from {quality.MIN_ROWS_WARNING}-100)")]
    if n < quality.MIN_ROWS_WARNING:
        return [Finding("size", "warning", f"only {n} training examples; gains usually show from "
                        f"{quality.MIN_ROWS_WARNING}-100 well-chosen examples")]
    return []


def balance(counts: dict[str, int], held_out: bool) -> list[Finding]:
    out = []
    b = quality.balance(counts)
    if b and b["ratio"] >= quality.IMBALANCE_RATIO:
        out.append(Finding("balance", "warning", f"class imbalance: '{b['largest']}' has {b['ratio']}x the rows of "
                           f"'{b['smallest']}'; accuracy will mostly reflect the large class (look at f1_macro), "
                           "and the small one may need more examples"))
    few = [k for k, v in counts.items() if 0 < v < quality.MIN_PER_CLASS]
    if few and not held_out:
        out.append(Finding("balance", "warning", f"class(es) with fewer than {quality.MIN_PER_CLASS} rows: "
                           + ", ".join(f"'{k}' ({counts[k]})" for k in few)))
    return out


# ---------------------------------------------------------------- duplicates and leakage
def duplicates(examples: list[Example], sh: dedup.Shingles, split_from_file: bool,
               threshold: float = NEAR_THRESHOLD) -> list[Finding]:
    """Exact copies (same input) and near copies (word 3-gram Jaccard >= threshold) within the file,
    and copies with different labels. Each group keeps its first row; the later rows are listed
    (and dropped by `data clean`) with the row they copy."""
    keys = [input_text(e) for e in examples]
    seen: dict[str, int] = {}
    exact_rows, exact_pairs = [], []
    for i, k in enumerate(keys):
        first = seen.setdefault(k, i)
        if first != i:
            exact_rows.append(row(examples[i].where, same_as=str(examples[first].where)))
            exact_pairs.append((first, i))
    out = []
    if exact_rows:
        what = "texts" if examples[0].text is not None else "prompts"
        leak = "; the validation/test splits are cut from this file, so copies can land on both sides and " \
               "inflate the held-out scores" if split_from_file else ""
        out.append(Finding("duplicates", "warning", f"{len(exact_rows)} duplicate {what} (e.g. {exact_rows[0]['same_as']} "
                           f"and {where_str(exact_rows[0])}){leak}", exact_rows, drop=True))
        if examples[0].label is not None:
            conflicted = [g for g in dedup.clusters(len(examples), exact_pairs) if len({examples[i].label for i in g}) > 1]
            if conflicted:
                rows = [row(examples[i].where, group=n) for n, g in enumerate(conflicted) for i in g]
                out.append(Finding("label_conflicts", "warning", f"{len(conflicted)} text(s) appear with different "
                                   f"labels: {_examples_of(rows)}", rows))
    near = [(i, j, jac) for i, j, jac in dedup.near_pairs(sh, threshold) if keys[i] != keys[j]]
    if near:
        # the later rows of each cluster of alike rows go; the cluster's first row stays
        best: dict[int, tuple[float, int]] = {}  # each row's most similar partner, an earlier one on ties
        for i, j, jac in near:
            best[j] = max(best.get(j, (0.0, 0)), (jac, -i))
            best[i] = max(best.get(i, (0.0, 0)), (jac, -j))
        in_exact = {j for _, j in exact_pairs}
        rows = []
        for g in dedup.clusters(len(examples), exact_pairs + [(i, j) for i, j, _ in near]):
            for j in g[1:]:
                if j not in in_exact and j in best:
                    jac, i = best[j]
                    rows.append(row(examples[j].where, same_as=str(examples[-i].where), similarity=round(jac, 3)))
        rows.sort(key=lambda r: (r["file"], r["line"] or 0))
        if rows:
            out.append(Finding("near_duplicates", "warning", f"{len(rows)} near-duplicate row(s) (edited copies: word "
                               f"3-gram Jaccard >= {threshold}), e.g. {where_str(rows[0])} ~ {rows[0]['same_as']} "
                               f"({rows[0]['similarity']})", rows, drop=True))
    return out


def leakage(mine: list[Example], theirs: list[Example], sh: dedup.Shingles, checked_is_train: bool,
            other_file: str, threshold: float = NEAR_THRESHOLD) -> list[Finding]:
    """Rows of the checked file that repeat (exactly or nearly) a row on the other side of the
    train / held-out split: the model is scored on what it trained on. `sh` shingles mine + theirs."""
    keys_mine = [input_text(e) for e in mine]
    theirs_first: dict[str, int] = {}
    for j, e in enumerate(theirs):
        theirs_first.setdefault(input_text(e), j)
    exact, near = [], []
    for i, k in enumerate(keys_mine):
        if k in theirs_first:
            exact.append(row(mine[i].where, same_as=str(theirs[theirs_first[k]].where)))
    exact_idx = {i for i, k in enumerate(keys_mine) if k in theirs_first}
    best: dict[int, tuple[float, int]] = {}
    for i, j, jac in dedup.near_pairs(sh, threshold, split=len(mine)):
        if i < len(mine) <= j and i not in exact_idx:
            best[i] = max(best.get(i, (0.0, j)), (jac, j - len(mine)))
    for i, (jac, j) in sorted(best.items()):
        near.append(row(mine[i].where, same_as=str(theirs[j].where), similarity=round(jac, 3)))
    side = "held-out" if checked_is_train else "training"
    out = []
    for check, rows, what in (("leakage", exact, "exactly"), ("near_leakage", near, f"nearly (Jaccard >= {threshold})")):
        if rows:
            out.append(Finding(check, "warning", f"{len(rows)} row(s) repeat {what} a row of the {side} file {other_file} "
                               f"(e.g. {where_str(rows[0])} ~ {rows[0]['same_as']}): held-out scores are inflated",
                               rows, drop=True))
    return out


# ---------------------------------------------------------------- text quality
def junk(examples: list[Example], texts: list[str], w: dedup.Words) -> list[Finding]:
    out = []
    for reason, idx in quality.junk(texts, w).items():
        rows = [row(examples[i].where) for i in idx]
        severity: Severity = "info" if reason in quality.NOTE_REASONS else "warning"
        out.append(Finding("junk", severity, f"{len(rows)} row(s) with {quality.JUNK_REASONS[reason]}: "
                           f"{_examples_of(rows)}", rows))
    return out


def lengths(examples: list[Example], w: dedup.Words) -> list[Finding]:
    short, long, (lo, hi) = quality.length_outliers(w.counts)
    out = []
    for idx, what in ((short, f"fewer than {lo:.0f}"), (long, f"more than {hi:.0f}")):
        if idx:
            rows = [row(examples[i].where, words=int(w.counts[i])) for i in idx]
            out.append(Finding("length", "info", f"{len(rows)} length outlier(s) with {what} words (far outside "
                               f"the file's spread: Tukey fences, k={quality.OUTLIER_K}, on log length): "
                               f"{_examples_of(rows)}", rows))
    return out


# ---------------------------------------------------------------- label errors
def label_errors(examples: list[Example], w: dedup.Words, names: list[str], seed: int) -> tuple[list[Finding], dict]:
    """Likely mislabelled rows by confident learning over 5-fold out-of-sample probabilities of a
    TF-IDF + logistic-regression model. Returns (findings, facts: the model's cross-validated accuracy)."""
    y = np.array([e.label for e in examples])
    counts = np.bincount(y, minlength=len(names))
    present = counts[counts > 0]
    if len(examples) < MIN_ROWS_FOR_LABEL_CHECK or len(present) < 2 or present.min() < 2:
        return [], {"skipped": f"needs >= {MIN_ROWS_FOR_LABEL_CHECK} rows and >= 2 per class"}
    classes = np.flatnonzero(counts)  # the model sees only classes present; map back afterwards
    y_local = np.searchsorted(classes, y)
    x = label_issues.features(w)
    probs = label_issues.out_of_sample_probs(x, y_local, folds=int(min(FOLDS, present.min())), seed=seed)
    idx = label_issues.find_label_issues(y_local, probs)
    facts = {"model_accuracy": round(float((probs.argmax(1) == y_local).mean()), 4), "flagged": len(idx)}
    rows = [row(examples[i].where, label=names[y[i]], suggested=names[classes[probs[i].argmax()]],
                p_suggested=round(float(probs[i].max()), 3), p_label=round(float(probs[i, y_local[i]]), 3)) for i in idx]
    if not rows:
        return [], facts
    r = rows[0]
    return [Finding("label_issues", "warning", f"{len(rows)} likely label error(s) (confident learning over a "
                    f"cross-validated TF-IDF model, accuracy {facts['model_accuracy']:.3f}); most confident first: "
                    f"{where_str(r)} labelled '{r['label']}', the model says '{r['suggested']}' (p={r['p_suggested']})",
                    rows)], facts


# Checks over the raw records, each (records, run config) -> findings: the hook for record-shape
# checks that need no tokenizer. Issue 22's OpenAI chat-format error classes
# (tunesmith/data/openai_format.py, on its own branch) belong here as one more entry.
RecordCheck = Callable[[list[Record], RunConfig], list[Finding]]
RECORD_CHECKS: list[RecordCheck] = []
