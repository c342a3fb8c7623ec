"""The server's opt-in request log (`tunesmith serve ... --request-log FILE.jsonl`).

One JSON line per finished request (per input of a request with several), for `tunesmith monitor
RUN --request-log FILE`: what the deployed model was asked and what it answered, in the fields
`tunesmith predict --json` uses, so the same drift tests read it:

    {"time": "2026-11-30T17:20:01.123Z", "model": "cls", "endpoint": "/classify",
     "input": "the film was dull", "label": "negative", "probability": 0.9731}
    {"time": ..., "model": "A", "endpoint": "/v1/chat/completions", "input": "what city",
     "messages": "system: be brief\\nuser: what city", "output": "seven eight"}

`input` is what the run's own `predict` would be given: a classify / score text, a completion
prompt, or a chat's last user message (the whole conversation, rendered one "role: content" line
per message, is in `messages`). Requests that fail are not logged; embeddings are not logged.

Each line goes to the file in one os.write on a descriptor opened with O_APPEND: the kernel
appends it whole, so a crash (or another server appending to the same file) never leaves half a
line or interleaves two. Nothing is buffered in the process, so nothing is lost with it.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def render_messages(messages: list[dict[str, str]]) -> str:
    """A chat as text: one "role: content" line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class RequestLog:
    """Appends one JSON line per logged input; safe to call from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise TunesmithError(f"--request-log: cannot open {self.path} for appending: {e}") from None
        self._lock = threading.Lock()

    def write(self, model: str, endpoint: str, rows: list[dict[str, Any]]) -> None:
        """One line per row ({"input": ..., prediction fields...}), stamped with time, model and endpoint."""
        stamp = _now()
        for row in rows:
            line = json.dumps({"time": stamp, "model": model, "endpoint": endpoint, **row}, ensure_ascii=False)
            data = (line + "\n").encode("utf-8")
            with self._lock:
                written = os.write(self._fd, data)
            if written != len(data):  # a regular file takes the whole line or fails (disk full: OSError)
                raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes of a log line")

    def close(self) -> None:
        os.close(self._fd)
