"""Read data files into records that remember where they came from.

Every record is a plain dict plus a `Location` (file and line), so every later
error can name the exact line and field. Formats: JSON Lines, a JSON array, CSV,
Parquet, plain text (.txt file or a folder of them: one document per file), and
folders written by `datasets.Dataset.save_to_disk`.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError, Location, Problem, TunesmithError


@dataclass
class Record:
    fields: dict[str, Any]
    where: Location


_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
        ".parquet": "parquet", ".txt": "text", ".md": "text"}


def detect_reader(path: Path) -> str:
    """Pick a reader from the extension or folder contents."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "arrow"
        if any(path.glob("*.txt")):
            return "text"
        raise TunesmithError(f"{path}: folder holds neither a saved dataset nor .txt files")
    reader = _EXT.get(path.suffix.lower())
    if reader is None:
        raise TunesmithError(f"{path}: cannot tell the format from extension '{path.suffix}'; "
                             f"set data.reader (jsonl, json, csv, parquet, text, arrow)")
    return reader


def read_records(path: Path, reader: str = "auto", problems: list[Problem] | None = None) -> list[Record]:
    """Read every record of a file or folder.

    Args:
        problems: if given, malformed lines are appended here and the good records returned
            (for reports); otherwise they raise.
    Raises:
        TunesmithError: the path does not exist or the file is empty.
        DataError: malformed lines (all of them, each with its line number).
    """
    if not path.exists():
        raise TunesmithError(f"data file not found: {path}")
    reader = detect_reader(path) if reader == "auto" else reader
    try:
        records = _READERS[reader](path)
    except UnicodeDecodeError:
        raise TunesmithError(_not_utf8(path)) from None
    except csv.Error as e:  # e.g. a NUL byte: csv gives up on the whole file
        raise TunesmithError(f"{path}: not a readable CSV file: {e}") from None
    except DataError as e:
        if problems is None:
            raise
        problems.extend(e.problems)
        records = e.partial
    if not records and not problems:
        raise TunesmithError(f"{path}: no records (empty file)")
    return records


def _not_utf8(path: Path) -> str:
    """Where a file (or a folder's first such file) stops being UTF-8 text, as line and byte."""
    for p in (sorted(path.glob("*.txt")) if path.is_dir() else [path]):
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            return (f"{p}:line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    "save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def _read_jsonl(path: Path) -> list[Record]:
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = Location(str(path), n)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(where, f"malformed JSON: {e.msg} at column {e.colno}"))
                continue
            except RecursionError:
                problems.append(Problem(where, "JSON nested too deeply"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(where, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            records.append(Record(obj, where))
    if problems:
        raise DataError(problems, partial=records)
    return records


def _read_json(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except RecursionError:
        raise TunesmithError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            return _read_jsonl(path)
        raise DataError([Problem(Location(str(path), e.lineno), f"malformed JSON: {e.msg} at column {e.colno}")]) from None
    if isinstance(data, dict):  # {"data": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunesmithError(f"{path}: expected a JSON array of objects (or one list inside an object)")
        data = lists[0]
    if not isinstance(data, list):
        raise TunesmithError(f"{path}: expected a JSON array of objects")
    problems = [Problem(Location(str(path), i, "item"), "expected a JSON object")
                for i, obj in enumerate(data, 1) if not isinstance(obj, dict)]
    if problems:
        raise DataError(problems)
    return [Record(obj, Location(str(path), i, "item")) for i, obj in enumerate(data, 1)]


def _read_csv(path: Path) -> list[Record]:
    csv.field_size_limit(sys.maxsize)  # reviews and documents can exceed the 128 kB default
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    records, problems = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return []
        start = reader.line_num + 1
        for row in reader:
            where = Location(str(path), start)  # the line the record starts on (fields may span lines)
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                problems.append(Problem(where, f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}"))
                continue
            records.append(Record(dict(zip(header, row)), where))
    if problems:
        raise DataError(problems, partial=records)
    return records


def _rows_with_index(path: Path, rows: list[dict]) -> list[Record]:
    return [Record(r, Location(str(path), i, "row")) for i, r in enumerate(rows, 1)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise TunesmithError(f"{path}: cannot read as Parquet: {e}") from None
    return _rows_with_index(path, table.to_pylist())


def _read_arrow(path: Path) -> list[Record]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise TunesmithError(f"{path}: a DatasetDict without a 'train' split; point at one split's folder")
        ds = ds["train"]
    return _rows_with_index(path, ds.to_list())


def _read_text(path: Path) -> list[Record]:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    records = []
    for p in files:
        text = p.read_text(encoding="utf-8")
        if text.strip():
            records.append(Record({"text": text}, Location(str(p))))
    return records


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
            "arrow": _read_arrow, "text": _read_text}
