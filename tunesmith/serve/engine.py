"""The generation engine: one thread runs decoding steps over a running batch (continuous batching).

Every loop turn: take what arrived (new requests, jobs such as an encoder forward or an adapter
load), prefill each new request alone (no padding: its KV cache is what serving it alone gives)
and let it join the batch, then run one decoding step for every running sequence. Rows of the
batch may use different adapters and the base; lora_bank.py applies each row's own update in the
same forward pass. The batch's KV cache is left-padded: a joining sequence's cache is padded (or
the batch's is) to the longer length, its attention mask is 0 over the padding and its position
ids are its own, so the padding never changes what a row computes.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tunesmith.serve.lora_bank import LoraBank, Route

log = logging.getLogger("tunesmith.serve")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class GenRequest:
    """One prompt to continue; `emit` receives events from the engine thread (see Seq.step)."""
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None  # LoraBank adapter name; None = the base
    tokenizer: Any
    emit: Callable[[dict], None]
    cancelled: bool = False
    generator: torch.Generator | None = None
    unfinished: int = 0


class Seq:
    """One choice of a request: its tokens, the text sent so far, and when it stops."""

    def __init__(self, req: GenRequest, index: int, eos: set[int]) -> None:
        self.req, self.index, self.eos = req, index, eos
        self.tokens: list[int] = []
        self.sent = ""  # text already emitted
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1  # chars held back for a stop string

    def add(self, token: int, logprobs: dict | None) -> str | None:
        """Record a sampled token, emit the text it completes; returns a finish reason or None."""
        p = self.req.params
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            self.tokens.append(token)
        text = self.req.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in p.stop if s) if i >= 0),
                  default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        n_out = len(self.tokens) + (token in self.eos)
        if reason is None and n_out >= p.max_tokens:
            reason = "length"
        if reason is None:
            text = text[: len(text) - self.hold] if self.hold else text
            if text.endswith("\ufffd"):
                text = self.sent  # an unfinished UTF-8 character: wait for its next byte
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        self.req.emit({"type": "token", "index": self.index, "text": delta, "logprobs": logprobs,
                       "finish_reason": reason, "completion_tokens": n_out})
        return reason


class GenModel:
    """A causal LM (with its LoRA bank, if any adapters) and the per-forward state the engine sets."""

    def __init__(self, model: torch.nn.Module, autocast, eos: set[int], max_len: int) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.bank = LoraBank(model)
        self.autocast = autocast or nullcontext
        self.eos = eos
        self.max_len = max_len

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        with self.autocast():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().cpu()  # (B, V); sampled on the CPU with each request's generator


def _logprobs(logp: torch.Tensor, token: int, tok, top: int) -> dict:
    """OpenAI's per-token logprob entry: the chosen token, its log-probability and the top alternatives."""
    def entry(i: int, lp: float) -> dict:
        s = tok.decode([i])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    out = entry(token, float(logp[token]))
    out["top_logprobs"] = []
    if top:
        vals, idx = logp.topk(top)
        out["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(vals, idx)]
    return out


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling with the request's generator."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = (logits / p.temperature).softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """The engine thread: continuous batching over one GenModel; `call` runs other jobs between steps."""

    def __init__(self, gen: GenModel | None, max_batch: int = 32, on_stats: Callable[[int, int], None] | None = None):
        self.gen = gen
        self.max_batch = max_batch
        self.on_stats = on_stats or (lambda running, waiting: None)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[GenRequest] = []
        self.rows: list[Seq] = []
        self.cache = None  # DynamicCache over the rows, left-padded to a common length
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L)
        self.pos = torch.zeros(0, dtype=torch.long)  # (B,) position of each row's next token
        self.next_tok = torch.zeros(0, dtype=torch.long)  # (B,) sampled, not yet in the cache
        self.busy: dict[str | None, int] = {}  # adapter -> running or waiting requests
        self._busy_lock = threading.Lock()  # submit() runs on the server's thread, _done() on this one
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def submit(self, req: GenRequest) -> None:
        with self._busy_lock:
            self.busy[req.adapter] = self.busy.get(req.adapter, 0) + 1
        req.unfinished = req.params.n
        self.inbox.put(req)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps (model use stays single-threaded)."""
        fut: Future = Future()
        self.inbox.put((fn, fut))
        return fut

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.rows and not self.waiting)
            self._admit()
            if self.rows:
                try:
                    self._step()
                except Exception as e:  # a failing step fails its requests, never the server
                    log.exception("decoding step failed")
                    for req in {id(s.req): s.req for s in self.rows}.values():
                        self._fail(req, e)
                    self._reset()
            self.on_stats(len(self.rows), len(self.waiting))

    def _drain(self, block: bool) -> None:
        items = []
        try:
            items.append(self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            if isinstance(item, GenRequest):
                self.waiting.append(item)
            elif isinstance(item, tuple):
                fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # the caller gets it; the engine goes on
                        fut.set_exception(e)

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room. A request that arrived during a prefill
        is taken in too, before the next decoding step: its first token does not wait for a step of
        the running batch (a step costs about what a short prompt's prefill does on a CPU)."""
        while self.waiting and len(self.rows) + self.waiting[0].params.n <= max(self.max_batch, self.waiting[0].params.n):
            req = self.waiting.pop(0)
            if req.cancelled:
                self._done(req)
                continue
            try:
                self._prefill(req)
            except Exception as e:
                log.exception("prefill failed")
                self._fail(req, e)
            if not self.waiting:
                self._drain(block=False)

    def _fail(self, req: GenRequest, e: Exception) -> None:
        req.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
        self._done(req)

    def _done(self, req: GenRequest) -> None:
        with self._busy_lock:
            self.busy[req.adapter] -= 1
            if not self.busy[req.adapter]:
                del self.busy[req.adapter]

    @torch.no_grad()
    def _prefill(self, req: GenRequest) -> None:
        """Run the prompt alone, sample each choice's first token, and add the choices to the batch."""
        from transformers import DynamicCache

        gen = self.gen
        bank = gen.bank
        others = {s.req.adapter for s in self.rows} - {req.adapter}
        if req.adapter is not None and (others or bank.folded not in (None, req.adapter)):
            # a different adapter is folded or running: apply this one's update unfolded
            bank.unfold()
            bank.route = Route("one", slot=bank.slot(req.adapter))
        else:
            bank.use([req.adapter])
        ids = torch.tensor([req.prompt_ids], device=gen.device)  # (1, T)
        cache = DynamicCache(config=gen.model.config)
        pos = torch.arange(ids.shape[1], device=gen.device).unsqueeze(0)
        logits = gen.forward(ids, torch.ones_like(ids), pos, cache)[0]
        seqs = []
        for i in range(req.params.n):
            seq = Seq(req, i, gen.eos)
            tok = sample(logits, req.params, req.generator)
            lp = _logprobs(F.log_softmax(logits, -1), tok, req.tokenizer, req.params.top_logprobs) \
                if req.params.logprobs else None
            if seq.add(tok, lp) is None:
                seqs.append((seq, tok))
            else:
                self._finish_choice(req)
        if seqs:
            self._join(seqs, cache, len(req.prompt_ids))

    def _finish_choice(self, req: GenRequest) -> None:
        req.unfinished -= 1
        if req.unfinished == 0:
            req.emit({"type": "done"})
            self._done(req)

    def _join(self, seqs: list[tuple[Seq, int]], cache, length: int) -> None:
        n = len(seqs)
        kv = [(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)) for layer in cache.layers]
        mask = torch.ones(n, length, dtype=torch.long, device=self.gen.device)
        if not self.rows:
            self.cache, self.mask = cache, mask
            for layer, (k, v) in zip(cache.layers, kv):
                layer.keys, layer.values = k.contiguous(), v.contiguous()
        else:
            width = max(length, self.mask.shape[1])
            pad_new, pad_old = width - length, width - self.mask.shape[1]
            for layer, (k, v) in zip(self.cache.layers, kv):
                layer.keys = torch.cat([F.pad(layer.keys, (0, 0, pad_old, 0)), F.pad(k, (0, 0, pad_new, 0))])
                layer.values = torch.cat([F.pad(layer.values, (0, 0, pad_old, 0)), F.pad(v, (0, 0, pad_new, 0))])
            self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self.rows += [s for s, _ in seqs]
        dev = self.gen.device
        self.pos = torch.cat([self.pos.to(dev), torch.full((n,), length, dtype=torch.long, device=dev)])
        self.next_tok = torch.cat([self.next_tok.to(dev), torch.tensor([t for _, t in seqs], dtype=torch.long,
                                                                          device=dev)])

    @torch.no_grad()
    def _step(self) -> None:
        """One decoding step for every running row, then drop the rows that finished."""
        gen = self.gen
        gen.bank.use([s.req.adapter for s in self.rows])
        b = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=torch.long, device=self.mask.device)], dim=1)
        logits = gen.forward(self.next_tok.view(b, 1), self.mask, self.pos.view(b, 1), self.cache)  # (B, V)
        self.pos += 1
        logp = F.log_softmax(logits, -1) if any(s.req.params.logprobs for s in self.rows) else None
        keep = []
        for i, seq in enumerate(self.rows):
            req = seq.req
            if req.cancelled:
                self._finish_choice(req)
                continue
            tok = sample(logits[i], req.params, req.generator)
            lp = _logprobs(logp[i], tok, req.tokenizer, req.params.top_logprobs) if req.params.logprobs else None
            if seq.add(tok, lp) is None:
                self.next_tok[i] = tok
                keep.append(i)
            else:
                self._finish_choice(req)
        if len(keep) < b:
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before this are padding in every row
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]
        self.pos, self.next_tok = self.pos[idx], self.next_tok[idx]

    def _reset(self) -> None:
        self.rows, self.cache = [], None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)
        self.next_tok = torch.zeros(0, dtype=torch.long)
