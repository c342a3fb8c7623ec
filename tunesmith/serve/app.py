"""The FastAPI app: OpenAI's endpoints over the registry and its engine.

Requests are parsed here into the protocol models (400 on anything malformed, naming the field
in `param`), turned into token ids with the model's own chat template or prompt template, and
handed to the engine thread; its events come back through an asyncio queue and leave as one JSON
object or as server-sent events. Every error leaves in OpenAI's envelope.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.data.tokenize import render_prompt
from tunesmith.errors import TunesmithError
from tunesmith.serve import protocol as P
from tunesmith.serve.engine import GenRequest, SamplingParams
from tunesmith.serve.metrics import Metrics, key_label
from tunesmith.serve.models import Registry, Served
from tunesmith.serve.request_log import RequestLog, render_messages

log = logging.getLogger("tunesmith.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])
    return ApiError(400, f"invalid request: {msgs}", param=param, code="invalid_value")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


ROUTES = [("GET", "/health", "health"), ("GET", "/metrics", "prom"), ("GET", "/v1/models", "models"),
          ("POST", "/v1/chat/completions", "chat_completions"), ("POST", "/v1/completions", "completions"),
          ("POST", "/v1/embeddings", "embeddings"), ("POST", "/classify", "classify"), ("POST", "/score", "score"),
          ("POST", "/v1/load_lora_adapter", "load_lora"), ("POST", "/v1/unload_lora_adapter", "unload_lora")]


def create_app(registry: Registry, api_keys: list[str] | None = None, metrics: Metrics | None = None,
               request_log: RequestLog | None = None) -> FastAPI:
    """The server's app over a loaded registry (its engine already running): routes, errors, auth.
    `request_log`: where finished requests are logged for `tunesmith monitor` (None: nowhere)."""
    app = FastAPI(title="tunesmith serve", docs_url=None, redoc_url=None)
    app.state.registry = registry
    api = Api(registry, set(api_keys or []), metrics or Metrics(), request_log)
    keys, metrics = api.keys, api.metrics
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, getattr(api, endpoint), methods=[method])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                      code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        key = None
        if keys and path not in ("/health", "/metrics"):
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            if key not in keys:
                metrics.requests.labels(path, "-", key_label(None), "401").inc()
                return _error(401, "missing API key (Authorization: Bearer KEY)" if key is None else
                              "incorrect API key provided", "invalid_request_error", code="invalid_api_key")
        request.state.key = key_label(key)
        request.state.model = "-"
        t0 = time.perf_counter()
        response = await call_next(request)
        if path not in ("/health", "/metrics"):
            metrics.requests.labels(path, request.state.model, request.state.key, str(response.status_code)).inc()
            if response.status_code < 400 and not isinstance(response, StreamingResponse):
                metrics.latency.labels(path, request.state.model).observe(time.perf_counter() - t0)
        return response

    return app


class Api:
    """The endpoints (one method each, registered in ROUTES) over a registry, its engine and metrics."""

    def __init__(self, registry: Registry, keys: set[str], metrics: Metrics, request_log: RequestLog | None = None) -> None:
        self.registry, self.keys, self.metrics = registry, keys, metrics
        self.request_log = request_log
        self.engine = registry.engine
        metrics.adapters.set(len(registry.gen.bank.slots) - 1 if registry.gen else 0)

    def lookup(self, request: Request, model_id: str, endpoint: str) -> Served:
        served = self.registry.models.get(model_id)
        if served is None or served.unloading:
            raise ApiError(404, f"The model '{model_id}' does not exist" + (" (it is being unloaded)" if served else "")
                           + f"; served: {', '.join(sorted(m for m in self.registry.models)) or 'none'}",
                           param="model", code="model_not_found")
        request.state.model = model_id
        if endpoint not in served.serves:
            raise ApiError(400, f"model '{model_id}' does not offer {endpoint}; it offers "
                           f"{', '.join(sorted(served.serves))}", param="model", code="unsupported_endpoint")
        return served

    # ---- models, health, self.metrics --------------------------------------------------------------
    async def health(self):
        if not self.engine.thread.is_alive():
            return _error(503, "the self.engine thread has stopped", "server_error")
        return {"status": "ok"}

    async def prom(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        cards = [P.ModelCard(id=s.id, created=s.created, root=s.root, parent=s.parent, serves=sorted(s.serves))
                 for s in self.registry.models.values() if not s.unloading]
        return P.ModelList(data=cards).model_dump(exclude_none=True)

    def log_rows(self, served: Served, endpoint: str, rows: list[dict]) -> None:
        """Append finished requests to the request log, if there is one. The reply has been computed:
        a log that cannot be written (disk full) is reported in the server's log, not to the client."""
        if self.request_log is None:
            return
        try:
            self.request_log.write(served.id, endpoint, rows)
        except OSError:
            log.exception("request log %s: could not append %d line(s)", self.request_log.path, len(rows))

    def log_generated(self, served: Served, endpoint: str, inputs: list[dict] | None, texts: dict[int, str],
                      n: int) -> None:
        """One log line per prompt: its input fields and its reply (choice 0 as "output"; all n as "outputs")."""
        if self.request_log is None or inputs is None:
            return
        rows = []
        for i, fields in enumerate(inputs):
            outs = [texts.get(i * n + j, "") for j in range(n)]
            rows.append({**fields, "output": outs[0], **({"outputs": outs} if n > 1 else {})})
        self.log_rows(served, endpoint, rows)

    # ---- generation ---------------------------------------------------------------------------
    def params_of(self, req: P.ChatCompletionRequest | P.CompletionRequest, served: Served, n_prompt: int,
                  max_tokens: int | None, logprobs: bool, top: int) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        stops = req.stops()
        if len(stops) > 4 or any(not isinstance(s, str) or not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
        max_len = self.registry.gen.max_len
        room = max_len - n_prompt
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                           f"requested {n_prompt + (max_tokens or 1)} tokens ({n_prompt} in the prompt, "
                           f"{max_tokens or 1} for the completion).", param="max_tokens" if room >= 1 else "messages",
                           code="context_length_exceeded")
        if req.seed is not None and not 0 <= req.seed < 2 ** 63:
            raise ApiError(400, "seed must be between 0 and 2**63 - 1", param="seed", code="invalid_value")
        return SamplingParams(max_tokens=max_tokens or min(served.max_new_tokens, room), temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=stops, n=req.n, logprobs=logprobs,
                              top_logprobs=top)

    def chat_ids(self, served: Served, req: P.ChatCompletionRequest) -> list[int]:
        tok = served.tokenizer
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(p.get("type") != "text" for p in m.content):
                raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
        if served.chat:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            if served.data.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": served.data.system_prompt}] + msgs
            try:
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # a template that refuses this conversation (roles, order)
                raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from None
            return tok(text, add_special_tokens=False)["input_ids"]
        # Trained without a chat template: the last user message through the run's own prompt
        # template, exactly as `tunesmith predict` renders its input.
        users = [m.text() for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "this model has no chat template; send at least one user message", param="messages")
        return tok(render_prompt(users[-1], served.data, tok, False))["input_ids"]

    def completion_prompts(self, served: Served, req: P.CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            vocab = len(served.tokenizer)
            if any(not 0 <= x < vocab for x in p):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            prompts = [list(p)]
        else:
            texts = [p] if isinstance(p, str) else list(p)
            if len(texts) > 64:
                raise ApiError(400, "at most 64 prompts per request", param="prompt")
            prompts = [served.tokenizer(t)["input_ids"] for t in texts]
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ApiError(400, "the prompt is empty", param="prompt")
        return prompts

    async def run_requests(self, served: Served, prompts: list[list[int]], params: SamplingParams,
                           reqs: list[GenRequest]) -> AsyncIterator[tuple[int, dict]]:
        """Submit one self.engine request per prompt; yield (prompt index, event) until all are done."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, ids in enumerate(prompts):
            gen = torch.Generator().manual_seed(params.seed + i) if params.seed is not None else None
            reqs.append(GenRequest(ids, params, served.adapter, served.tokenizer,
                                   lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)),
                                   generator=gen))
        for r in reqs:
            self.engine.submit(r)
        pending = len(reqs)
        while pending:
            i, ev = await events.get()
            if ev["type"] == "error":
                raise ApiError(500, f"generation failed: {ev['message']}")
            if ev["type"] == "done":
                pending -= 1
            yield i, ev

    def observe(self, request: Request, served: Served, t0: float, n_prompt: int, n_gen: int,
                first: float | None) -> None:
        self.metrics.prompt_tokens.labels(served.id, request.state.key).inc(n_prompt)
        self.metrics.generated_tokens.labels(served.id, request.state.key).inc(n_gen)
        if first is not None:
            self.metrics.ttft.labels(served.id).observe(first - t0)

    async def generate(self, request: Request, served: Served, prompts: list[list[int]], params: SamplingParams,
                       chat: bool, stream: bool, include_usage: bool, inputs: list[dict] | None = None):
        """`inputs`: each prompt's request-log fields ({"input": ...}), when the request log is on."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        t0 = time.perf_counter()
        n = params.n
        n_prompt = sum(len(p) for p in prompts)
        reqs: list[GenRequest] = []
        if stream:
            events = self._stream(request, served, prompts, params, chat, include_usage, rid, created, t0, n_prompt, reqs,
                                  inputs)
            return StreamingResponse(events, media_type="text/event-stream")
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        lps: dict[int, list] = {}
        n_gen: dict[int, int] = {}
        first = None
        try:
            async for i, ev in self.run_requests(served, prompts, params, reqs):
                if ev["type"] != "token":
                    continue
                first = first or time.perf_counter()
                k = i * n + ev["index"]
                texts[k] = texts.get(k, "") + ev["text"]
                if ev["logprobs"]:
                    lps.setdefault(k, []).append(ev["logprobs"])
                n_gen[k] = ev["completion_tokens"]
                if ev["finish_reason"]:
                    finish[k] = ev["finish_reason"]
        finally:
            for r in reqs:
                r.cancelled = True  # no-op once finished; stops the work if the client went away
        total = sum(n_gen.values())
        self.observe(request, served, t0, n_prompt, total, first)
        self.log_generated(served, request.url.path, inputs, texts, n)
        usage = P.Usage(prompt_tokens=n_prompt, completion_tokens=total, total_tokens=n_prompt + total)
        choice_ids = range(len(prompts) * n)
        if chat:
            choices = [P.ChatChoice(index=k, message=P.AssistantMessage(content=texts.get(k, "")),
                                    finish_reason=finish.get(k, "length"),
                                    logprobs=P.ChoiceLogprobs(content=lps.get(k, [])) if params.logprobs else None)
                       for k in choice_ids]
            body = P.ChatCompletion(id=rid, created=created, model=served.id, choices=choices, usage=usage)
        else:
            choices = [P.CompletionChoice(index=k, text=texts.get(k, ""), finish_reason=finish.get(k, "length"),
                                          logprobs=_completion_logprobs(lps.get(k, []), params) if params.logprobs
                                          else None) for k in choice_ids]
            body = P.Completion(id=rid, created=created, model=served.id, choices=choices, usage=usage)
        return body.model_dump(exclude_none=True)

    async def _stream(self, request, served, prompts, params, chat, include_usage, rid, created, t0, n_prompt, reqs,
                      inputs):
        n = params.n
        texts: dict[int, str] = {}  # each choice's text so far, for the request log
        chunk_type = P.ChatCompletionChunk if chat else P.Completion
        n_gen: dict[int, int] = {}
        offsets: dict[int, int] = {}
        first = None

        def sse(choices: list, usage: P.Usage | None = None) -> str:
            obj = chunk_type(id=rid, created=created, model=served.id, choices=choices, usage=usage)
            return f"data: {json.dumps(obj.model_dump(exclude_none=True))}\n\n"

        try:
            if chat:
                for k in range(len(prompts) * n):
                    yield sse([P.ChunkChoice(index=k, delta=P.Delta(role="assistant", content=""))])
            async for i, ev in self.run_requests(served, prompts, params, reqs):
                if ev["type"] != "token":
                    continue
                first = first or time.perf_counter()
                k = i * n + ev["index"]
                n_gen[k] = ev["completion_tokens"]
                texts[k] = texts.get(k, "") + ev["text"]
                lp = [ev["logprobs"]] if ev["logprobs"] else None
                if ev["text"] or lp:
                    if chat:
                        yield sse([P.ChunkChoice(index=k, delta=P.Delta(content=ev["text"]),
                                                 logprobs=P.ChoiceLogprobs(content=lp) if lp else None)])
                    else:
                        clp = _completion_logprobs(lp, params, offsets.get(k, 0)) if lp else None
                        yield sse([P.CompletionChoice(index=k, text=ev["text"], finish_reason=None, logprobs=clp)])
                    offsets[k] = offsets.get(k, 0) + len(ev["text"])
                if ev["finish_reason"]:
                    yield sse([P.ChunkChoice(index=k, delta=P.Delta(), finish_reason=ev["finish_reason"])] if chat else
                              [P.CompletionChoice(index=k, text="", finish_reason=ev["finish_reason"])])
            total = sum(n_gen.values())
            if include_usage:
                yield sse([], P.Usage(prompt_tokens=n_prompt, completion_tokens=total, total_tokens=n_prompt + total))
            self.observe(request, served, t0, n_prompt, total, first)
            self.metrics.latency.labels(request.url.path, served.id).observe(time.perf_counter() - t0)
            self.log_generated(served, request.url.path, inputs, texts, n)
        except ApiError as e:  # the status line is sent already: the error goes in the stream
            err = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
            yield f"data: {json.dumps({'error': err})}\n\n"
        finally:
            for r in reqs:
                r.cancelled = True
        yield "data: [DONE]\n\n"

    async def chat_completions(self, request: Request):
        req = await _parse(request, P.ChatCompletionRequest)
        served = self.lookup(request, req.model, "chat")
        for name in ("tools", "response_format"):
            value = getattr(req, name)
            if value and not (name == "response_format" and value.get("type") == "text"):
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids = self.chat_ids(served, req)
        params = self.params_of(req, served, len(ids), req.max_completion_tokens or req.max_tokens, req.logprobs,
                           req.top_logprobs or 0)
        inputs = None
        if self.request_log is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            users = [m["content"] for m in msgs if m["role"] == "user"]
            inputs = [{"input": users[-1] if users else "", "messages": render_messages(msgs)}]
        return await self.generate(request, served, [ids], params, True, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage), inputs)

    async def completions(self, request: Request):
        req = await _parse(request, P.CompletionRequest)
        served = self.lookup(request, req.model, "completions")
        for name in ("echo", "suffix"):
            if getattr(req, name):
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        prompts = self.completion_prompts(served, req)
        params = self.params_of(req, served, max(len(p) for p in prompts), req.max_tokens, req.logprobs is not None,
                           req.logprobs or 0)
        inputs = None
        if self.request_log is not None:  # prompts given as token ids are logged as their text
            p = req.prompt
            texts = [p] if isinstance(p, str) else list(p) if all(isinstance(x, str) for x in p) else \
                [served.tokenizer.decode(ids) for ids in prompts]
            inputs = [{"input": t} for t in texts]
        return await self.generate(request, served, prompts, params, False, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage), inputs)

    # ---- encoders -------------------------------------------------------------------------------
    def encode(self, served: Served, texts: list[str], truncate: bool) -> dict:
        tok = served.tokenizer
        limit = min(served.data.max_length if truncate else 10 ** 9,
                    getattr(served.encoder.model.config, "max_position_embeddings", 512))
        enc = tok(texts, padding=True, truncation=truncate, max_length=limit if truncate else None, return_tensors="pt")
        if enc["input_ids"].shape[1] > limit:
            raise ApiError(400, f"an input is longer than this model's maximum of {limit} tokens", param="input",
                           code="context_length_exceeded")
        return enc

    async def on_engine(self, fn):
        return await asyncio.wrap_future(self.engine.call(fn))

    def texts_of(self, value: Any, param: str = "input") -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input: a string or a non-empty list of strings", param=param)
        if len(texts) > 256:
            raise ApiError(400, "at most 256 inputs per request", param=param)
        return texts

    async def embeddings(self, request: Request):
        req = await _parse(request, P.EmbeddingRequest)
        served = self.lookup(request, req.model, "embeddings")
        if req.dimensions is not None:
            raise ApiError(400, "dimensions is not supported by this server", param="dimensions")
        texts = self.texts_of(req.input)
        enc = self.encode(served, texts, truncate=False)

        @torch.no_grad()
        def run():
            group = served.encoder
            if group.aset is not None:
                group.aset.use(served.adapter)
            with group.acc.autocast():
                out = group.model(**{k: v.to(group.acc.device) for k, v in enc.items()}, output_hidden_states=True)
            hidden = out.hidden_states[-1].float()  # (B, T, H)
            # sentence-transformers' mean pooling: the average of the real tokens, then unit length
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).cpu()

        vecs = await self.on_engine(run)
        data = [P.Embedding(index=i, embedding=base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                            if req.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vecs)]
        n = int(enc["attention_mask"].sum())
        self.metrics.prompt_tokens.labels(served.id, request.state.key).inc(n)
        usage = P.Usage(prompt_tokens=n, total_tokens=n)
        return P.EmbeddingResponse(data=data, model=served.id, usage=usage).model_dump()

    async def head_logits(self, served: Served, texts: list[str]) -> tuple[torch.Tensor, int]:
        served.tokenizer.truncation_side = served.data.truncation_side
        enc = self.encode(served, texts, truncate=True)  # truncated as `tunesmith predict` does

        @torch.no_grad()
        def run():
            group = served.encoder
            if group.aset is not None:
                group.aset.use(served.adapter)
            with group.acc.autocast():
                return group.model(**{k: v.to(group.acc.device) for k, v in enc.items()}).logits.float().cpu()

        return await self.on_engine(run), int(enc["attention_mask"].sum())

    async def classify(self, request: Request):
        req = await _parse(request, P.ClassifyRequest)
        served = self.lookup(request, req.model, "classify")
        texts = self.texts_of(req.input)
        logits, n = await self.head_logits(served, texts)
        probs = logits.softmax(-1)
        data = [{"index": i, "label": served.labels[int(p.argmax())], "probs": p.tolist(), "num_classes": len(p),
                 "probabilities": dict(zip(served.labels, p.tolist()))} for i, p in enumerate(probs)]
        # the fields `tunesmith predict --json` prints for a classification run
        self.log_rows(served, request.url.path, [{"input": t, "label": d["label"], "probability": round(max(d["probs"]), 4)}
                                                 for t, d in zip(texts, data)])
        return {"id": "classify-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
                "model": served.id, "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

    async def score(self, request: Request):
        req = await _parse(request, P.ClassifyRequest)
        served = self.lookup(request, req.model, "score")
        texts = self.texts_of(req.input)
        logits, n = await self.head_logits(served, texts)
        data = [{"index": i, "object": "score", "score": float(row[0])} for i, row in enumerate(logits)]
        self.log_rows(served, request.url.path, [{"input": t, "score": round(d["score"], 4)} for t, d in zip(texts, data)])
        return {"id": "score-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()), "model": served.id,
                "data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}

    # ---- adapters at run time (vLLM's calls) -----------------------------------------------------
    async def load_lora(self, request: Request):
        req = await _parse(request, P.LoadLoraRequest)
        if req.lora_name in self.registry.models:
            raise ApiError(400, f"The lora adapter '{req.lora_name}' has already been loaded", param="lora_name")
        try:
            # into a free slot at once, not after the running decoding step (which can take longer
            # than the load); only a larger rank than the stacks' waits for the engine thread
            await self.registry.hot_load(req.lora_name, req.lora_path)
        except TunesmithError as e:
            raise ApiError(400, str(e), param="lora_path") from None
        self.metrics.adapters.set(len(self.registry.gen.bank.slots) - 1)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora(self, request: Request):
        req = await _parse(request, P.UnloadLoraRequest)
        served = self.registry.models.get(req.lora_name)
        if served is None or served.unloading:
            raise ApiError(404, f"The lora adapter '{req.lora_name}' cannot be found", param="lora_name",
                           code="model_not_found")
        if served.parent is None:
            raise ApiError(400, f"'{req.lora_name}' is a base model, not a LoRA adapter", param="lora_name")
        served.unloading = True  # new requests get a 404; those in flight finish first
        while self.engine.busy.get(served.adapter):
            await asyncio.sleep(0.02)
        await self.on_engine(lambda: self.registry.remove_adapter(req.lora_name))
        self.metrics.adapters.set(len(self.registry.gen.bank.slots) - 1)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def _completion_logprobs(entries: list[dict], params: SamplingParams, offset: int = 0) -> P.CompletionLogprobs:
    """The legacy completions logprobs object from per-token entries."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return P.CompletionLogprobs(tokens=[e["token"] for e in entries], token_logprobs=[e["logprob"] for e in entries],
                                top_logprobs=[{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]
                                if params.top_logprobs else None, text_offset=offsets)
