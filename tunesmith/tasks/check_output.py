"""What `data check` prints and writes: a terminal summary, Markdown, JSON (tasks/check.py builds the report)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import Location
from tunesmith.utils import atomic_file

ROWS_IN_TERMINAL = 5  # per finding; the JSON and Markdown files list every row
ROWS_IN_MARKDOWN = 2000
CHECK_NAMES = {"duplicates": "duplicates", "near_duplicates": "near-duplicates", "leakage": "leaked rows",
               "near_leakage": "near-leaked rows", "label_issues": "likely label errors", "label_conflicts":
               "conflicting labels", "junk": "junk rows", "length": "length outliers", "balance": "balance",
               "size": "size"}


def _where(r: dict[str, Any]) -> str:
    return str(Location(r["file"], r["line"], r.get("unit", "line")))


def _summary_lines(r: dict[str, Any]) -> list[str]:
    """The report's facts (task, rows, labels, tokens, estimate), one line each, shared by both formats."""
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
        s = t.get("sample")
        of = f" (a random {s['examples']} of {s['of']} examples)" if s else ""
        lines.append(f"tokens per example{of}: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
        lines.append(f"truncation at max_length={t['max_length']}: {t['truncated']} example(s) cut"
                     + (f" in the sample (~{round(t['truncated'] * s['of'] / s['examples'])} in the file)" if s else "")
                     + (f", {t['dropped']} left with no answer tokens (dropped)" if t["dropped"] else ""))
    if r.get("findings") is not None:
        counts = {}
        for f in r["findings"]:
            if f["count"]:
                counts[f["check"]] = counts.get(f["check"], 0) + f["count"]
        label = r.get("label_check", {})
        model = f" (model accuracy {label['model_accuracy']:.3f})" if "model_accuracy" in label else ""
        parts = [f"{n} {CHECK_NAMES.get(c, c)}" + (model if c == "label_issues" else "") for c, n in counts.items()]
        if "skipped" in label:
            parts.append(f"label errors not checked ({label['skipped']})")
        lines.append("checks: " + (", ".join(parts) if parts else "no duplicates, leaks, junk, outliers or label errors found"))
    if r.get("estimate"):
        e = r["estimate"]
        note = "" if e["calibrated"] else "; utilisation not calibrated on this device"
        lines.append(f"estimate: ~{_duration(e['seconds'])} of training on {e['device']} ({e['epochs']} epoch(s) of "
                     f"{e['train_tokens_per_epoch']} tokens, {e['tflop']} TFLOP at {e['matmul_gflops']} GFLOP/s x "
                     f"{e['assumed_mfu']}{note}), peak memory ~{e['peak_memory_mb']} MB")
    return lines


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


def format_report(r: dict[str, Any]) -> str:
    """The terminal summary: facts, then every problem, warning and note, each with its first rows."""
    lines = _summary_lines(r)
    by_message = {f["message"]: f for f in r.get("findings", [])}

    def block(title: str, messages: list[str], limit: int | None = None) -> None:
        lines.append(f"{title} ({len(messages)}):")
        for m in messages[:limit]:
            lines.append(f"  - {m}")
            rows = by_message.get(m, {}).get("rows", [])
            if len(rows) > 1:
                more = f" ... ({len(rows)} rows; all in --json/--markdown)" if len(rows) > ROWS_IN_TERMINAL else ""
                lines.append("      rows: " + ", ".join(_where(x) for x in rows[:ROWS_IN_TERMINAL]) + more)
        if limit is not None and len(messages) > limit:
            lines.append(f"  ... and {len(messages) - limit} more")

    if r.get("warnings"):
        block("warnings", r["warnings"])
    if r.get("notes"):
        block("notes", r["notes"])
    if r["problems"]:
        block("problems", r["problems"], 50)
    else:
        lines.append("problems: none")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_report(r: dict[str, Any]) -> str:
    """The whole report as Markdown: the facts, then one section per finding with a table of its rows."""
    out = [f"# Data check: `{r['file']}`", ""]
    out += [f"- {line}" for line in _summary_lines(r)[1:]]
    out += ["", f"## Problems ({len(r['problems'])})", ""]
    out += [f"- {_cell(p)}" for p in r["problems"]] or ["none"]
    finding_messages = {f["message"] for f in r.get("findings", [])}
    other = [w for w in r.get("warnings", []) if w not in finding_messages]
    if other:
        out += ["", "## Other warnings", ""] + [f"- {_cell(w)}" for w in other]
    for f in r.get("findings", []):
        out += ["", f"## {f['severity']}: {CHECK_NAMES.get(f['check'], f['check'])} ({f['count']} row(s))", "",
                _cell(f["message"]) + (" `data clean` drops these rows." if f["drop"] else ""), ""]
        if not f["rows"]:
            continue
        extra = [k for k in dict.fromkeys(k for row in f["rows"] for k in row) if k not in ("file", "line", "unit")]
        out.append("| row | " + " | ".join(extra) + " |")
        out.append("|---" * (len(extra) + 1) + "|")
        for row in f["rows"][:ROWS_IN_MARKDOWN]:
            out.append(f"| {_cell(_where(row))} | " + " | ".join(_cell(row.get(k, "")) for k in extra) + " |")
        if f["count"] > ROWS_IN_MARKDOWN:
            out.append(f"\n... {f['count'] - ROWS_IN_MARKDOWN} more rows in the JSON report")
    return "\n".join(out) + "\n"


def write_text(path: str | Path, text: str) -> None:
    """Write a report file whole or not at all (temp file + rename)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_reports(r: dict[str, Any], json_out: str | None, markdown_out: str | None) -> None:
    if json_out:
        write_text(json_out, json.dumps(r, indent=2, default=str) + "\n")
    if markdown_out:
        write_text(markdown_out, markdown_report(r))
