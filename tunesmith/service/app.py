"""`tunesmith service`: one process serving the fine-tuning API, the inference API of `tunesmith
serve` for the models it produces, and N embedded workers.

The app is serve's app (tunesmith/serve/app.py: chat, completions, embeddings over a Registry
that starts with no model) with the job API (api.py) added, and an outer middleware that turns
the Bearer key into the caller's project. A finished job's adapter is hot-loaded into the
Registry (the base loads with the first one): by a poll of the store every second, and at once
when a project asks for its model before the poll did. A project sees the bases and its own ft:
models only; another project's model is a 404, as an unknown one. Deleting a model unloads it
once its in-flight requests have finished.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.routing import Route

from tunesmith.errors import TunesmithError
from tunesmith.serve.app import ApiError, _error
from tunesmith.service.store import Store

MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/classify", "/score")
# vLLM's adapter calls take a filesystem path and act on every project's models: finished jobs
# load themselves here, so these stay off. /metrics labels series with every project's model ids.
BLOCKED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics")
OPEN = ("/health",)
CKPT = ":ckpt-step-"
KEY_TTL_S = 5.0  # a revoked key stops working within this long


class ModelHost:
    """Which ft: models are loaded in the serve Registry, whose they are, and loading/unloading them."""

    def __init__(self, registry, store: Store, data_dir: Path, models: dict[str, str]) -> None:
        self.registry, self.store, self.data_dir = registry, store, Path(data_dir)
        self.base_names = {str(Path(p)): name for name, p in models.items()}  # base path -> --model NAME
        self.owners: dict[str, str] = {}  # model id -> project id
        self.failed: dict[str, str] = {}  # model id -> why it could not be loaded (not retried)
        self._lock = asyncio.Lock()

    def visible(self, project_id: str, model_id: str) -> bool:
        served = self.registry.models.get(model_id)
        if served is None or served.unloading:
            return False
        return self.owners.get(model_id, project_id if served.parent is None else None) == project_id

    def cards(self, project_id: str) -> list[dict[str, Any]]:
        return [{"id": s.id, "object": "model", "created": s.created, "owned_by": self.owners.get(s.id, "tunesmith"),
                 "parent": s.parent, "root": s.parent or s.id, "serves": sorted(s.serves)}
                for s in list(self.registry.models.values()) if self.visible(project_id, s.id)]

    async def sync(self) -> None:
        """Load every succeeded job's model not loaded yet (all projects)."""
        for job in await asyncio.to_thread(self.store.succeeded_jobs):
            name = job["fine_tuned_model"]
            if name and name not in self.registry.models and name not in self.failed and job["run_dir"]:
                await self.load(name, job["project_id"], job["run_dir"])

    async def ensure(self, project_id: str, model_id: str) -> bool:
        """Whether `model_id` is one this project may use, loading it first when it is the project's
        succeeded job's model or one of its checkpoints not loaded yet."""
        if self.visible(project_id, model_id):
            return True
        if not model_id.startswith("ft:") or model_id in self.failed:
            return False
        found = await asyncio.to_thread(self._find, project_id, model_id)
        if found is None:
            return False
        await self.load(model_id, project_id, *found)
        return self.visible(project_id, model_id)

    def _find(self, project_id: str, model_id: str) -> tuple[str, str] | None:
        """(folder relative to the data dir, the job's run folder) of the project's model or checkpoint."""
        if CKPT not in model_id:
            job = self.store.job_for_model(project_id, model_id)
            return (job["run_dir"], job["run_dir"]) if job and job["status"] == "succeeded" and job["run_dir"] else None
        job = self.store.job_for_model(project_id, model_id.split(CKPT)[0])  # a finished job's checkpoint
        ckpt = self.store.checkpoint_by_name(job["id"], model_id) if job else None
        if ckpt is not None:
            return f"{ckpt['path']}/adapter", job["run_dir"] or ckpt["path"]
        after = None
        while True:  # the project's jobs, newest first; a checkpoint's name names its job's model
            rows, more = self.store.list_jobs(project_id, after, 100)
            for job in rows:
                ckpt = self.store.checkpoint_by_name(job["id"], model_id)
                if ckpt is not None:  # runner.py exports a checkpoint's peft adapter into it
                    return f"{ckpt['path']}/adapter", job["run_dir"] or ckpt["path"]
            if not more:
                return None
            after = rows[-1]["id"]

    async def load(self, name: str, project_id: str, rel: str, run_rel: str | None = None) -> None:
        """Read the adapter at DATA_DIR/rel (a run folder or a peft adapter folder) and attach it
        as model `name`, loading the base first if none is loaded."""
        from tunesmith.service.files import inside

        async with self._lock:
            if name in self.registry.models or name in self.failed:
                return
            path = inside(self.data_dir, rel)
            run = inside(self.data_dir, run_rel or rel)
            try:
                if self.registry.gen is None:
                    await asyncio.to_thread(self.registry.ensure_base, run, self._base_id(run),
                                            path if path != run else None)
                # as /v1/load_lora_adapter does: not behind the running decoding step
                await self.registry.hot_load(name, str(path))
            except TunesmithError as e:  # e.g. trained on another base than the one this process serves
                self.failed[name] = str(e)
                print(f"tunesmith service: cannot serve {name}: {e}", flush=True)
                return
            self.owners[name] = project_id

    def _base_id(self, run: Path) -> str | None:
        """The --model NAME of the run's base, so the base is listed under the name jobs use."""
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        path = str(cfg.get("model", {}).get("name_or_path", ""))
        return self.base_names.get(str(Path(path)), path or None)

    async def unload(self, name: str) -> None:
        served = self.registry.models.get(name)
        if served is None or served.parent is None:
            return
        served.unloading = True  # new requests get a 404; those in flight finish first
        while self.registry.engine.busy.get(served.adapter):
            await asyncio.sleep(0.02)
        await asyncio.wrap_future(self.registry.engine.call(lambda: self.registry.remove_adapter(name)))
        self.owners.pop(name, None)


class KeyCache:
    """Bearer key -> project, remembered for KEY_TTL_S (one store query per key per few seconds)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, tuple[float, dict | None]] = {}

    async def project(self, key: str) -> dict | None:
        hit = self._seen.get(key)
        if hit is not None and time.monotonic() - hit[0] < KEY_TTL_S:
            return hit[1]
        project = (await asyncio.to_thread(self.store.project_for_key, key) if self.store.postgres
                   else self.store.project_for_key(key))  # one indexed read; see ServiceApi.read
        if len(self._seen) > 10000:
            self._seen.clear()
        self._seen[key] = (time.monotonic(), project)
        return project


class ProjectAuth:
    """Pure ASGI middleware, outermost: Bearer key -> the caller's project (scope state "project"),
    401 without a valid key; the routes that take a path or leak other projects' ids stay off; a
    request naming a model another project owns is a 404 before serve's routes see it.
    (Pure ASGI rather than @app.middleware: BaseHTTPMiddleware costs ~5 ms a request here.)"""

    def __init__(self, app, keys: KeyCache, host: ModelHost) -> None:
        self.app, self.keys, self.host = app, keys, host

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in BLOCKED:
            return await _error(404, f"{path} is not offered by tunesmith service (finished jobs load themselves)",
                                "invalid_request_error", code="not_found")(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        project = await self.keys.project(key) if key else None
        if project is None:
            return await _error(401, "missing API key (Authorization: Bearer KEY; make one with tunesmith keys add "
                                "NAME)" if key is None else "incorrect API key provided", "invalid_request_error",
                                code="invalid_api_key")(scope, receive, send)
        scope.setdefault("state", {})["project"] = project
        if scope["method"] == "POST" and path in MODEL_ROUTES:
            messages, body = [], b""
            while True:  # the body is read here to see its model, then replayed to the route
                msg = await receive()
                messages.append(msg)
                body += msg.get("body", b"")
                if msg["type"] != "http.request" or not msg.get("more_body"):
                    break
            model = _model_of(body)
            if model is not None and not await self.host.ensure(project["id"], model):
                return await _not_found(model)(scope, receive, send)

            async def replay():
                return messages.pop(0) if messages else await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def _model_of(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # serve's own parser answers the malformed body
    return obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), str) else None


def _not_found(model: str):
    return _error(404, f"The model '{model}' does not exist or you do not have access to it", "invalid_request_error",
                  param="model", code="model_not_found")


def create_service_app(store: Store, data_dir: Path, models: dict[str, str] | None = None, workers: int = 1,
                       max_file_bytes: int | None = None, max_example_tokens: int | None = None,
                       precision: str | None = None, max_batch: int = 32, poll_s: float = 1.0,
                       worker_options: dict | None = None) -> FastAPI:
    """The service's app over a migrated store (see the module docstring)."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.metrics import Metrics
    from tunesmith.serve.models import Registry
    from tunesmith.service.api import ServiceApi
    from tunesmith.service.files import DEFAULT_MAX_BYTES, Files, TokenCounter

    data_dir = Path(data_dir)
    models = dict(models or {})
    metrics = Metrics()
    registry = Registry(precision, max_batch, metrics.engine_stats)
    registry.load([])  # no model yet: the base loads with the first finished job
    app = create_app(registry, None, metrics)
    files = Files(store, data_dir, max_file_bytes or DEFAULT_MAX_BYTES, _token_counter(models, max_example_tokens))
    files.sweep()
    api = ServiceApi(store, files, data_dir, models)
    host = ModelHost(registry, store, data_dir, models)
    keys = KeyCache(store)
    app.state.store, app.state.host = store, host
    # serve's GET /v1/models lists every model; the service's lists the caller's
    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, Route) and r.path == "/v1/models")]
    api.install(app)

    async def list_models(request: Request):
        await host.sync()
        return {"object": "list", "data": host.cards(request.state.project["id"])}

    async def retrieve_model(request: Request, model: str):
        if not await host.ensure(request.state.project["id"], model):
            raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return next(c for c in host.cards(request.state.project["id"]) if c["id"] == model)

    async def delete_model(request: Request, model: str):
        project = request.state.project["id"]
        served = registry.models.get(model)
        if served is not None and served.parent is None:
            raise ApiError(400, f"'{model}' is a base model; only fine-tuned models can be deleted", param="model")
        if not await asyncio.to_thread(store.delete_model, project, model):
            raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        await host.unload(model)
        return {"id": model, "object": "model", "deleted": True}

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", retrieve_model, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", delete_model, methods=["DELETE"])

    app.add_middleware(ProjectAuth, keys=keys, host=host)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        stop = threading.Event()
        threads = _start_workers(workers, store, data_dir, stop, worker_options or {})
        poller = asyncio.create_task(_poll(host, poll_s))
        await api.validate_leftovers()
        try:
            yield
        finally:
            poller.cancel()
            stop.set()
            for t in threads:
                t.join(timeout=60)

    app.router.lifespan_context = lifespan
    return app


async def _poll(host: ModelHost, every_s: float) -> None:
    while True:
        try:
            await host.sync()
        except Exception as e:  # a database hiccup must not end hot-loading for the process's lifetime
            print(f"tunesmith service: loading finished models failed: {type(e).__name__}: {e}", flush=True)
        await asyncio.sleep(every_s)


def _start_workers(n: int, store: Store, data_dir: Path, stop: threading.Event, options: dict) -> list[threading.Thread]:
    """N worker loops (worker.py) as threads of this process; each runs its jobs in child processes."""
    if n <= 0:
        return []
    from tunesmith.service.worker import run_worker

    threads = []
    for i in range(n):
        t = threading.Thread(target=run_worker, args=(store.url, data_dir, stop), kwargs=options,
                             name=f"tunesmith-worker-{i}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def _token_counter(models: dict[str, str], max_tokens: int | None):
    """Count upload tokens with the first --model's tokenizer; the limit defaults to its context length."""
    from tunesmith.service.files import TokenCounter

    if not models:
        return None
    path = next(iter(models.values()))

    def load():
        from tunesmith.models.load import load_tokenizer, resolve_model_path

        return load_tokenizer(resolve_model_path(path))

    limit = max_tokens if max_tokens is not None else _context_length(path)
    counter = TokenCounter(load, limit)
    counter.tokenizer()  # at start: a bad --model is an error now, not a failed upload later
    return counter


def _context_length(path: str) -> int | None:
    from transformers import AutoConfig

    from tunesmith.models.load import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError, TunesmithError):
        return None
    return getattr(config, "max_position_embeddings", None)


def parse_models(specs: list[str]) -> dict[str, str]:
    """--model NAME=PATH (or PATH, named by itself) -> {NAME: PATH}."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        if not name or not path:
            raise TunesmithError(f"--model {spec!r}: expected NAME=PATH")
        out[name] = path
    return out


def serve_service(data_dir: str | Path, db: str | None = None, workers: int = 1, host: str = "127.0.0.1",
                  port: int = 8000, models: list[str] | None = None, **options: Any) -> None:
    """`tunesmith service`: migrate the store, then serve until interrupted."""
    import uvicorn

    from tunesmith.serve import _require_server_deps
    from tunesmith.service import require_store_deps

    _require_server_deps()
    require_store_deps()
    store = Store(db, Path(data_dir))
    store.migrate()
    app = create_service_app(store, Path(data_dir), parse_models(models or []), workers, **options)
    print(f"tunesmith service on http://{host}:{port}/v1 (data {Path(data_dir).resolve()}, {store!r}, "
          f"{workers} worker(s))", flush=True)
    # Keep-alive longer than clients keep idle connections (httpx, under the openai SDK: 5 s, as
    # uvicorn's default): with equal timeouts a client could send on a connection the server was
    # closing at that moment, a connection error the SDK retries (or, with max_retries=0, reports).
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S)


KEEP_ALIVE_S = 75  # nginx's default keep-alive
