"""The fine-tuning API: OpenAI's files and fine_tuning.jobs endpoints, in the shapes the official
`openai` SDK parses (types/file_object.py, types/fine_tuning/*.py), over the Store.

Every handler works inside the caller's project (request.state.project, set by the service's
auth middleware from the Bearer key): an id of another project's file, job or checkpoint is a 404,
exactly as an unknown id. Errors leave in OpenAI's envelope with `param` (serve/app.py's ApiError).
Ids and file names from a request are never joined into a filesystem path: files and runs are
found through their rows, and every stored path is checked to stay inside the data folder.
"""
from __future__ import annotations

import asyncio
import functools
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from tunesmith.errors import TunesmithError
from tunesmith.serve.app import ApiError
from tunesmith.service import jobs as jobmod
from tunesmith.service.files import Files, file_object, inside
from tunesmith.service.store import Store, StoreError

def store_error(e: StoreError) -> ApiError:
    """A StoreError as an OpenAI error: unknown ids are 404, the rest 400, with the field in `param`."""
    return ApiError(404 if e.code == "not_found" else 400, str(e), param=e.param, code=e.code)


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}", param=name, code="invalid_value") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")
    return value


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's `metadata[k]=v` query filter (every pair must match); `metadata=null`: jobs without metadata."""
    out = {k[len("metadata["):-1]: v for k, v in request.query_params.multi_items()
           if k.startswith("metadata[") and k.endswith("]")}
    if request.query_params.get("metadata") == "null":
        if out:
            raise ApiError(400, "metadata=null cannot be combined with metadata[key] filters", param="metadata")
        return {}
    return out or None


def page(data: list[dict], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _as_json(endpoint):
    """The endpoint's dict answers as a JSONResponse as they are (plain JSON types already):
    FastAPI's jsonable_encoder walk costs more than the database query on a list."""
    @functools.wraps(endpoint)
    async def wrapped(*args, **kwargs):
        out = await endpoint(*args, **kwargs)
        return JSONResponse(out) if isinstance(out, dict) else out
    return wrapped


class ServiceApi:
    """The job API's endpoints (one method each, registered in ROUTES)."""

    ROUTES = [("POST", "/v1/files", "upload_file"), ("GET", "/v1/files", "list_files"),
              ("GET", "/v1/files/{file_id}", "retrieve_file"), ("DELETE", "/v1/files/{file_id}", "delete_file"),
              ("GET", "/v1/files/{file_id}/content", "file_content"),
              ("POST", "/v1/fine_tuning/jobs", "create_job"), ("GET", "/v1/fine_tuning/jobs", "list_jobs"),
              ("GET", "/v1/fine_tuning/jobs/{job_id}", "retrieve_job"),
              ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", "cancel_job"),
              ("POST", "/v1/fine_tuning/jobs/{job_id}/pause", "pause_job"),
              ("POST", "/v1/fine_tuning/jobs/{job_id}/resume", "resume_job"),
              ("GET", "/v1/fine_tuning/jobs/{job_id}/events", "list_events"),
              ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "list_checkpoints"),
              ("GET", "/v1/fine_tuning/jobs/{job_id}/download", "download")]

    def __init__(self, store: Store, files: Files, data_dir: Path, models: dict[str, str]) -> None:
        self.store, self.files, self.data_dir, self.models = store, files, Path(data_dir), models
        self._export_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._validating: set[asyncio.Task] = set()  # held here: the loop keeps only weak references

    def validate_later(self, job: dict) -> None:
        """Validate a job's files after the answer has gone (validating_files -> queued | failed)."""
        task = asyncio.create_task(self._validate(job))
        self._validating.add(task)
        task.add_done_callback(self._validating.discard)

    async def _validate(self, job: dict) -> None:
        try:
            await asyncio.to_thread(jobmod.validate_job, self.store, job, self.data_dir)
        except Exception as e:  # noqa: BLE001 - the job stays validating_files; the next start retries it
            print(f"tunesmith service: validating {job['id']} failed: {type(e).__name__}: {e} "
                  "(retried at the next start)", flush=True)

    async def validate_leftovers(self) -> None:
        """Jobs a stopped service left in validating_files: validate them now."""
        for job in await asyncio.to_thread(self.store.jobs_validating):
            self.validate_later(job)

    def install(self, app) -> None:
        for method, path, endpoint in self.ROUTES:
            app.add_api_route(path, _as_json(getattr(self, endpoint)), methods=[method])

    @staticmethod
    def project(request: Request) -> str:
        return request.state.project["id"]

    async def call(self, fn, *args, **kw):
        """A Store write off the event loop (it may wait for the database's write lock, and a job's
        create checks its config), its StoreError as an OpenAI error."""
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except StoreError as e:
            raise store_error(e) from None

    async def read(self, fn, *args, **kw):
        """A Store read. On SQLite, on the event loop: one indexed query (~1 ms; WAL readers never
        wait for a writer), and a thread hop per read cost more than the read under load (the GIL
        handoff between the loop and the pool's threads, ~3 ms a call on the 2-core machine). On
        PostgreSQL, in a thread: a query is a round trip to another process, and the loop answered
        no other request while it waited (every endpoint's p95 followed the slowest query's)."""
        try:
            if self.store.postgres:
                return await asyncio.to_thread(fn, *args, **kw)
            return fn(*args, **kw)
        except StoreError as e:
            raise store_error(e) from None

    # ---- files ------------------------------------------------------------------------------------
    async def upload_file(self, request: Request):
        try:
            return await self.files.upload(request, self.project(request))
        except ClientDisconnect:  # the client went away mid-upload: nothing was kept, nobody to answer
            return Response(status_code=499)

    async def list_files(self, request: Request):
        limit = _int(request, "limit", 10000, 1, 10000)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        rows = await self.read(self.store.list_files, self.project(request), request.query_params.get("purpose"),
                               request.query_params.get("after"), limit + 1, order)
        return page([file_object(r) for r in rows[:limit]], len(rows) > limit)

    async def retrieve_file(self, request: Request, file_id: str):
        return file_object(await self.read(self.files.get, self.project(request), file_id))

    async def delete_file(self, request: Request, file_id: str):
        return await asyncio.to_thread(self.files.delete, self.project(request), file_id)

    async def file_content(self, request: Request, file_id: str):
        row = await self.read(self.files.get, self.project(request), file_id)
        return FileResponse(self.files.path(row), media_type="application/octet-stream", filename=row["filename"])

    # ---- jobs -------------------------------------------------------------------------------------
    async def job_row(self, request: Request, job_id: str) -> dict:
        row = await self.read(self.store.get_job, self.project(request), job_id)
        if row is None:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="not_found")
        return row

    async def create_job(self, request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            row = await self.call(jobmod.create_job, self.store, self.project(request), body, self.data_dir,
                                  self.models, validate=False)
        except TunesmithError as e:  # a tunesmith config error the job's settings cause
            raise ApiError(400, str(e), param=getattr(e, "param", None), code="invalid_request") from None
        self.validate_later(row)  # reading the files can take a while on a large file: not in the request
        return jobmod.job_object(row)

    async def list_jobs(self, request: Request):
        limit = _int(request, "limit", 20, 1, 100)
        meta = _metadata_filter(request)
        after = request.query_params.get("after")
        if meta == {}:  # jobs created without metadata: filtered here, the store filters by key/value
            rows, _ = await self.read(self.store.list_jobs, self.project(request), after, 10 ** 9)
            rows = [r for r in rows if not r["metadata"]]
            rows, more = rows[:limit], len(rows) > limit
        else:
            rows, more = await self.read(self.store.list_jobs, self.project(request), after, limit, meta)
        return page([jobmod.job_object(r) for r in rows], more)

    async def retrieve_job(self, request: Request, job_id: str):
        return jobmod.job_object(await self.job_row(request, job_id))

    async def _request(self, request: Request, job_id: str, what: str):
        return jobmod.job_object(await self.call(self.store.request, self.project(request), job_id, what))

    async def cancel_job(self, request: Request, job_id: str):
        return await self._request(request, job_id, "cancel")

    async def pause_job(self, request: Request, job_id: str):
        return await self._request(request, job_id, "pause")

    async def resume_job(self, request: Request, job_id: str):
        return await self._request(request, job_id, "resume")

    async def list_events(self, request: Request, job_id: str):
        job = await self.job_row(request, job_id)
        limit = _int(request, "limit", 20, 1, 1000)
        rows, more = await self.read(self.store.list_events, job["id"], request.query_params.get("after"), limit)
        return page([jobmod.event_object(r) for r in rows], more)

    async def list_checkpoints(self, request: Request, job_id: str):
        job = await self.job_row(request, job_id)
        limit = _int(request, "limit", 10, 1, 1000)
        rows, more = await self.read(self.store.list_checkpoints, job["id"], request.query_params.get("after"), limit)
        return page([jobmod.checkpoint_object(r) for r in rows], more)

    # ---- downloads (a tunesmith extension) ----------------------------------------------------------
    async def download(self, request: Request, job_id: str):
        """The fine-tuned model as a tar: `format=adapter` (the peft adapter folder) or `merged` (the
        adapter folded into the base: a plain transformers model); `checkpoint=ftckpt-...` for a
        checkpoint instead of the final model."""
        job = await self.job_row(request, job_id)
        fmt = request.query_params.get("format", "adapter")
        if fmt not in ("adapter", "merged"):
            raise ApiError(400, f"format must be 'adapter' or 'merged', got {fmt!r}", param="format")
        ckpt_id = request.query_params.get("checkpoint")
        if ckpt_id:
            ckpt = await self._checkpoint(job, ckpt_id)
            folder, name = inside(self.data_dir, ckpt["path"]), f"{ckpt['id']}-{fmt}"
        else:
            if job["status"] != "succeeded" or not job["run_dir"]:
                raise ApiError(400, f"job {job_id} is {job['status']}: its model is downloadable once it has "
                               "succeeded (or name a checkpoint=...)", param="fine_tuning_job_id",
                               code="invalid_state")
            folder, name = inside(self.data_dir, job["run_dir"]), f"{job['id']}-{fmt}"
        tar = await asyncio.to_thread(self._export, job, folder, name, fmt, ckpt_id is not None)
        return FileResponse(tar, media_type="application/x-tar", filename=f"{name}.tar")

    async def _checkpoint(self, job: dict, ckpt_id: str) -> dict:
        after = None
        while True:  # a job has a handful of checkpoints: find the one asked for
            rows, more = await self.read(self.store.list_checkpoints, job["id"], after, 100)
            for r in rows:
                if r["id"] == ckpt_id:
                    return r
            if not more:
                raise ApiError(404, f"No such checkpoint of job {job['id']}: {ckpt_id}", param="checkpoint",
                               code="not_found")
            after = rows[-1]["id"]

    def _export(self, job: dict, folder: Path, name: str, fmt: str, checkpoint: bool) -> Path:
        """Build (once; cached in DATA_DIR/exports) the tar of an adapter or a merged model."""
        out = inside(self.data_dir, Path("exports") / f"{name}.tar")
        with self._lock(name):
            if out.is_file():
                return out
            if fmt == "adapter":
                src = folder / "adapter"  # a run folder's, or a checkpoint's (runner.py exports it there)
                if not (src / "adapter_config.json").is_file():
                    raise ApiError(400, f"job {job['id']} saved no peft adapter (method "
                                   f"{(job['tunesmith'] or {}).get('method', {}).get('name', '?')}); download "
                                   "format=merged", param="format")
            else:
                src = self._merged(job, folder, name, checkpoint)
            _write_tar(src, out, name)
            return out

    def _merged(self, job: dict, folder: Path, name: str, checkpoint: bool) -> Path:
        """The model with its adapter folded in, written once to DATA_DIR/exports/NAME (tunesmith
        merge). A checkpoint's adapter is merged through a run folder made of the job's config and
        that adapter."""
        from tunesmith.adapters import merge

        run = inside(self.data_dir, job["run_dir"]) if job["run_dir"] else None
        if not checkpoint and (folder / "model" / "config.json").is_file():
            return folder / "model"  # a full fine-tune saved a whole model already
        target = inside(self.data_dir, Path("exports") / name)
        if (target / "config.json").is_file():
            return target
        if checkpoint:
            if run is None or not (run / "config.yaml").is_file():
                raise ApiError(400, "this checkpoint's run has no config yet; download format=adapter",
                               param="format")
            view = inside(self.data_dir, Path("exports") / f"{name}-run")
            shutil.rmtree(view, ignore_errors=True)
            view.mkdir(parents=True)
            for f in ("config.yaml", "run.json"):
                if (run / f).is_file():
                    shutil.copyfile(run / f, view / f)
            shutil.copytree(folder / "adapter", view / "adapter")
            try:
                return merge(view, target, overwrite=True)
            finally:
                shutil.rmtree(view, ignore_errors=True)
        return merge(folder, target, overwrite=True)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._export_locks.setdefault(name, threading.Lock())


def _write_tar(src: Path, out: Path, name: str) -> None:
    """A tar of folder `src` with its files under `name/`, written to a temporary name first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tar.part")
    with tarfile.open(tmp, "w") as tar:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=f"{name}/{f.relative_to(src)}")
    tmp.replace(out)
