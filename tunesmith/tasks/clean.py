"""`tunesmith data clean`: a copy of a data file without the rows `data check` marks to drop.

Dropped: the later copies of exact and near-duplicates (each group keeps its first row), and rows
that repeat, exactly or nearly, a row on the other side of the config's train / held-out split.
Every other line is copied byte for byte (JSON Lines, CSV/TSV: a record spanning several lines
goes whole), so malformed rows, which `data check` reports, stay for the user to fix. JSON arrays
and Parquet files are rewritten without the dropped items. The copy is written beside its
destination and renamed into place: a crash never leaves half a file.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from tunesmith import assets
from tunesmith.data.readers import detect_reader
from tunesmith.errors import TunesmithError
from tunesmith.tasks.check import check_data
from tunesmith.utils import atomic_file

WRITES = ("jsonl", "csv", "json", "parquet")


def clean_data(path: str | Path, config: str | Path | dict | None, out: str | Path,
               overrides: dict | list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write `out`: the file at `path` without its duplicate and leaked rows.

    Returns:
        {"file", "out", "rows" (records read), "kept", "dropped": [{file, line, check, same_as, ...}],
         "by_check": {check: rows dropped}}
    Raises:
        TunesmithError: `out` exists (without overwrite), a format it cannot write, or a different
            extension than the input's.
    """
    source = Path(assets.data_source(str(path))["path"])
    out = Path(out)
    if source.is_dir():
        raise TunesmithError(f"{path}: data clean writes single files ({', '.join(WRITES)}), not folders")
    reader = detect_reader(source)
    if reader not in WRITES:
        raise TunesmithError(f"{path}: data clean cannot write '{reader}' files; it writes {', '.join(WRITES)}")
    if out.suffix.lower() != source.suffix.lower():
        raise TunesmithError(f"--out {out}: use the input's extension ({source.suffix}) so the copy keeps its format")
    if out.exists() and not overwrite:
        raise TunesmithError(f"{out} already exists; choose another --out or pass --overwrite")
    report = check_data(path, config, overrides, label_check=False)
    dropped: dict[int, dict[str, Any]] = {}
    here = source.resolve()
    for f in report.get("findings", []):
        for r in f["rows"] if f["drop"] else []:
            if r["line"] is not None and Path(r["file"]).resolve() == here:
                dropped.setdefault(r["line"], {**r, "check": f["check"]})
    with atomic_file(out) as tmp:
        kept = _WRITERS[reader](source, tmp, set(dropped))
    by_check: dict[str, int] = {}
    for r in dropped.values():
        by_check[r["check"]] = by_check.get(r["check"], 0) + 1
    return {"file": str(source), "out": str(out), "rows": report.get("rows", 0), "kept": kept,
            "dropped": [dropped[k] for k in sorted(dropped)], "by_check": by_check}


def _copy_jsonl(src: Path, dst: Path, drop: set[int]) -> int:
    kept = 0
    with src.open(encoding="utf-8", newline="") as f, dst.open("w", encoding="utf-8", newline="") as g:
        for n, line in enumerate(f, start=1):
            if n in drop:
                continue
            g.write(line)
            kept += bool(line.strip())
    return kept


def _copy_csv(src: Path, dst: Path, drop: set[int]) -> int:
    """Copy the header and every record not dropped, each record's physical lines whole (a quoted
    field may span lines); the line numbers are the ones readers.py gives records."""
    csv.field_size_limit(sys.maxsize)
    with io.open(src, encoding="utf-8", newline="") as f:  # lines split as the csv reader counts them
        lines = f.readlines()
    reader = csv.reader(lines, delimiter="\t" if src.suffix.lower() == ".tsv" else ",")
    next(reader, None)
    starts = [reader.line_num + 1]  # 1-based first line of each record, then the end
    for _ in reader:
        starts.append(reader.line_num + 1)
    kept = 0
    with dst.open("w", encoding="utf-8", newline="") as g:
        g.writelines(lines[: starts[0] - 1])  # the header
        for begin, end in zip(starts, starts[1:]):
            if begin in drop:
                continue
            chunk = lines[begin - 1: end - 1]
            g.writelines(chunk)
            kept += any(c.strip() for c in chunk)
    return kept


def _copy_json(src: Path, dst: Path, drop: set[int]) -> int:
    data = json.loads(src.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"data": [...]}: the one list inside (readers.py)
        key = next(k for k, v in data.items() if isinstance(v, list))
        items = [x for i, x in enumerate(data[key], 1) if i not in drop]
        data = {**data, key: items}
    else:
        items = data = [x for i, x in enumerate(data, 1) if i not in drop]
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(items)


def _copy_parquet(src: Path, dst: Path, drop: set[int]) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    keep = [i for i in range(table.num_rows) if i + 1 not in drop]
    pq.write_table(table.take(keep), dst)
    return len(keep)


_WRITERS = {"jsonl": _copy_jsonl, "csv": _copy_csv, "json": _copy_json, "parquet": _copy_parquet}


def format_clean(summary: dict[str, Any], limit: int = 20) -> str:
    n = len(summary["dropped"])
    what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary["by_check"].items()) or "nothing to drop"
    lines = [f"dropped {n} of {summary['rows']} rows of {summary['file']} ({what}); "
             f"wrote {summary['kept']} rows to {summary['out']}"]
    for r in summary["dropped"][:limit]:
        sim = f", similarity {r['similarity']}" if "similarity" in r else ""
        lines.append(f"  - line {r['line']}: {r['check'].replace('_', ' ')} of {r.get('same_as', '?')}{sim}")
    if n > limit:
        lines.append(f"  ... and {n - limit} more (tunesmith data check FILE --json OUT lists them all)")
    return "\n".join(lines)
