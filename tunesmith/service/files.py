"""Uploaded files: streamed to disk, renamed into place when complete, validated, served back.

An upload's multipart body is parsed as it arrives (python-multipart's streaming parser): the
file part goes straight to a temporary name in DATA_DIR/files, counted against the size limit,
and becomes `files/<file-id><ext>` only when the whole body has arrived. Only then is the file
row written. An upload that is interrupted (the client goes away) or too large removes its
temporary file and leaves no row, so nothing half-written is ever listed or trained on.

Validation runs at upload: OpenAI's chat / DPO checks (data/openai_format.py) for files in those
shapes, tunesmith's own readers for the other formats its tasks read (CSV, prompt/completion ...),
and ends in status `processed` or `error` with status_details naming each problem's code and line.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from tunesmith.config import DataConfig
from tunesmith.data.formats import infer_labels
from tunesmith.data.openai_format import MIN_EXAMPLES, Finding, Report, detect_kind, first_object, validate_file
from tunesmith.data.readers import read_records
from tunesmith.errors import DataError, TunesmithError
from tunesmith.serve.app import ApiError
from tunesmith.service.store import Store, new_id

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # OpenAI's per-file limit for fine-tuning uploads is 512 MB
PURPOSES = ("fine-tune",)
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")  # what tunesmith's readers take
MAX_FIELD_BYTES = 4096  # the form's other fields (purpose) are short strings


def inside(root: Path, rel: str | Path) -> Path:
    """root / rel, refused unless it stays inside root (no '..', no absolute path, no symlink out)."""
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ApiError(400, f"path {str(rel)!r} is outside the service's data folder", code="invalid_path")
    return path


def file_object(row: dict) -> dict[str, Any]:
    """A files row as OpenAI's File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


class TokenCounter:
    """The tokenizer that counts example tokens at upload (the service's default base model's),
    loaded on first use, and the per-example limit."""

    def __init__(self, load: Callable[[], Any], max_tokens: int | None) -> None:
        self._load, self.max_tokens = load, max_tokens
        self._tok = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                self._tok = self._load()
            return self._tok


# ---------------------------------------------------------------- the streaming multipart body
class _Form:
    """python-multipart callbacks: the part with a filename goes to `sink`, other fields to memory."""

    def __init__(self, sink, max_bytes: int) -> None:
        self.sink, self.max_bytes = sink, max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_field: str | None = None
        self.size = 0
        self._header, self._value, self._headers = b"", b"", {}
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()

    def on_part_begin(self) -> None:
        self._headers, self._buf, self._is_file, self._name = {}, bytearray(), False, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            if self.filename is not None:
                raise ApiError(400, "send one file per upload", param="file")
            self._is_file = True
            self.file_field = self._name
            self.filename = opts[b"filename"].decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise ApiError(413, f"the file is larger than this service's limit of {self.max_bytes} bytes "
                               "(tunesmith service --max-file-bytes)", param="file", code="file_too_large")
            self.sink.write(data[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > MAX_FIELD_BYTES:
                raise ApiError(400, f"form field {self._name!r} is too long", param=self._name)

    def on_part_end(self) -> None:
        if not self._is_file and self._name:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")


async def _receive(request: Request, tmp: Path, max_bytes: int) -> _Form:
    """Stream the request's multipart body; the file part is written to `tmp` and fsynced."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise ApiError(400, "upload a file as multipart/form-data with fields 'file' and 'purpose'", param="file")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 64 * 1024:  # the form's own bytes on top
        raise ApiError(413, f"the upload ({length} bytes) is larger than this service's limit of {max_bytes} bytes "
                       "(tunesmith service --max-file-bytes)", param="file", code="file_too_large")
    with open(tmp, "xb") as sink:
        form = _Form(sink, max_bytes)
        parser = MultipartParser(opts[b"boundary"], {k: getattr(form, k) for k in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end")})
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        sink.flush()
        # off the event loop: an fsync takes 4-8 ms here, during which no other request was answered
        await asyncio.to_thread(os.fsync, sink.fileno())
    return form


# ---------------------------------------------------------------- the file service
class Files:
    """Uploads, listing, content and deletion of a project's files under DATA_DIR/files."""

    def __init__(self, store: Store, data_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 counter: TokenCounter | None = None) -> None:
        self.store, self.data_dir, self.max_bytes, self.counter = store, Path(data_dir), max_bytes, counter
        self.dir = self.data_dir / "files"
        self.dir.mkdir(parents=True, exist_ok=True)

    def sweep(self, idle_s: float = 600) -> int:
        """Remove the temporary files of uploads a killed process left behind: those not written to
        for `idle_s` (a live upload writes every few milliseconds; another service process may share
        this folder). Returns how many were removed."""
        cutoff = time.time() - idle_s
        removed = 0
        for p in self.dir.glob(".upload-*.part"):
            if p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    async def upload(self, request: Request, project_id: str) -> dict:
        tmp = self.dir / f".upload-{secrets.token_hex(8)}.part"
        final: Path | None = None
        row = None
        try:
            form = await _receive(request, tmp, self.max_bytes)
            purpose = form.fields.get("purpose")
            if form.filename is None or form.file_field != "file":
                raise ApiError(400, "the upload has no 'file' part", param="file")
            if purpose not in PURPOSES:
                raise ApiError(400, f"purpose must be one of {', '.join(PURPOSES)} on this service, got {purpose!r}",
                               param="purpose")
            ext = Path(form.filename).suffix.lower()
            if ext not in EXTENSIONS:
                raise ApiError(400, f"{form.filename!r}: a fine-tuning file is .jsonl (OpenAI's chat or DPO format), "
                               f"or another format tunesmith reads ({', '.join(EXTENSIONS)})", param="file",
                               code="invalid_file_format")
            file_id = new_id("file-")
            final = self.dir / f"{file_id}{ext}"
            os.replace(tmp, final)  # complete: only now does it get its name, then its row
            status, details, info = await asyncio.to_thread(self.validate, final)
            # One write, with the verdict, in a thread: a write on the event loop stalled every other
            # request while it waited for SQLite's write lock (a worker writing events holds it).
            row = await asyncio.to_thread(
                self.store.add_file, project_id, Path(form.filename).name[:1000] or "upload", purpose, form.size,
                str(final.relative_to(self.data_dir)), id=file_id, status=status, status_details=details, info=info)
        except BaseException:  # interrupted (ClientDisconnect, cancellation), too large, refused, a validator bug
            tmp.unlink(missing_ok=True)
            if final is not None and row is None:  # renamed, but no row: no file object is left half made
                final.unlink(missing_ok=True)
            raise
        return file_object(row)

    def validate(self, path: Path) -> tuple[str, str | None, dict]:
        """(status, status_details, info) for an uploaded file; see the module docstring."""
        first = first_object(path) if path.suffix in (".jsonl", ".ndjson") else None
        kind = detect_kind(first)
        if kind is not None:
            from tunesmith.tasks import task_for_format

            tok = self.counter.tokenizer() if self.counter else None
            rep = validate_file(path, kind, tok, self.counter.max_tokens if self.counter else None)
            info = rep.as_dict() | {"task": task_for_format(first, DataConfig())}  # sft for chat, dpo for DPO
        else:
            rep, info = _validate_tunesmith(path)
        if not rep.ok:
            return "error", rep.summary(), info
        return "processed", None, info

    def get(self, project_id: str, file_id: str) -> dict:
        row = self.store.get_file(project_id, file_id)
        if row is None:
            raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="not_found")
        return row

    def path(self, row: dict) -> Path:
        return inside(self.data_dir, row["path"])

    def delete(self, project_id: str, file_id: str) -> dict:
        row = self.get(project_id, file_id)
        path = self.path(row)
        if not self.store.delete_file(project_id, file_id):
            raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="not_found")
        path.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _validate_tunesmith(path: Path) -> tuple[Report, dict]:
    """A file in one of tunesmith's own formats: read it, detect its task, read every record as that
    task would (labels included); each problem becomes a finding with its line."""
    from tunesmith.tasks import get_task, task_for_format, to_examples

    rep = Report()
    problems: list = []
    try:
        records = read_records(path, problems=problems)
        task = task_for_format(records[0].fields, DataConfig()) if records else None
    except TunesmithError as e:
        rep.findings.append(Finding("invalid_file_format", str(e).replace(str(path), path.name)))
        return rep, {"format": None, "task": None, "n_examples": 0}
    fmt = None
    n = 0
    if records:
        data = DataConfig()
        labels = infer_labels(records, data) if get_task(task).head == "labels" else None
        try:
            fmt, examples = to_examples(records, task, data, labels)
            n = len(examples)
        except DataError as e:
            problems += e.problems
            n = len(records) - len({p.where.line for p in e.problems})
        except TunesmithError as e:
            rep.findings.append(Finding("invalid_file_format", str(e).replace(str(path), path.name)))
    rep.findings += [Finding("invalid_record", p.message, p.where.line, p.field) for p in problems]
    rep.examples = n
    if not rep.findings and n < MIN_EXAMPLES:
        rep.findings.append(Finding("insufficient_examples", f"{n} example(s); a training file needs at least "
                                    f"{MIN_EXAMPLES}"))
    return rep, {"format": fmt, "task": task, "n_examples": n, "codes": rep.codes(),
                 "findings": [{"code": f.code, "message": f.message, "line": f.line, "field": f.field}
                              for f in rep.findings[:100]]}

