"""`tunesmith serve`: many adapters over one base model behind an OpenAI-compatible HTTP API.

protocol.py holds the HTTP shapes, engine.py the continuous-batching engine thread,
lora_bank.py the batched LoRA layers, models.py what is served, app.py the FastAPI routes.
The server dependencies (fastapi, uvicorn, prometheus-client) are the `serve` extra.
"""
from __future__ import annotations

from tunesmith.errors import TunesmithError


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise TunesmithError(f"tunesmith serve needs the server packages ({e.name} is missing): "
                             "pip install 'tunesmith[serve]'") from None


def build_app(specs: list[str], api_keys: list[str] | None = None, precision: str | None = None,
              max_batch: int = 32, request_log: str | None = None):
    """Load the runs / models in `specs` (paths or name=path) and return the FastAPI app serving them.
    `request_log`: a JSONL file to append every finished request to (request_log.py), off if None."""
    _require_server_deps()
    from tunesmith.serve.app import create_app
    from tunesmith.serve.metrics import Metrics
    from tunesmith.serve.models import Registry
    from tunesmith.serve.request_log import RequestLog

    log = RequestLog(request_log) if request_log else None  # a bad path fails before the models load
    metrics = Metrics()
    registry = Registry(precision, max_batch, metrics.engine_stats)
    registry.load(specs)
    return create_app(registry, api_keys, metrics, log)


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          precision: str | None = None, max_batch: int = 32, request_log: str | None = None) -> None:
    """Serve until interrupted (the same app the tests start in a process of their own)."""
    import uvicorn

    app = build_app(specs, api_keys, precision, max_batch, request_log)
    models = ", ".join(app.state.registry.models) if hasattr(app.state, "registry") else ""
    print(f"serving {models} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
