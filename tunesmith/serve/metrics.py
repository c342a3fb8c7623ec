"""Prometheus metrics of one server, labelled per model (base or adapter) and per API key.

API keys are never exported: the label is the first 8 hex digits of the key's SHA-256, enough to
tell clients apart on a dashboard ("-" without a key).
"""
from __future__ import annotations

import hashlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def key_label(key: str | None) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8] if key else "-"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tunesmith_requests", "Requests answered, by endpoint, model, API key and HTTP status",
                                ["endpoint", "model", "api_key", "status"], registry=r)
        self.prompt_tokens = Counter("tunesmith_prompt_tokens", "Prompt tokens processed", ["model", "api_key"],
                                     registry=r)
        self.generated_tokens = Counter("tunesmith_generation_tokens", "Tokens generated", ["model", "api_key"],
                                        registry=r)
        self.latency = Histogram("tunesmith_request_latency_seconds", "Time from request to its last byte",
                                 ["endpoint", "model"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("tunesmith_time_to_first_token_seconds", "Time from request to its first token",
                              ["model"], buckets=_TTFT, registry=r)
        self.running = Gauge("tunesmith_running_requests", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("tunesmith_waiting_requests", "Requests waiting to join the batch", registry=r)
        self.adapters = Gauge("tunesmith_adapters_loaded", "LoRA adapters loaded on the generative base", registry=r)

    def engine_stats(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
