"""Job webhooks: a POST when a job succeeds, fails or is cancelled, signed as OpenAI signs its
webhooks (the Standard Webhooks scheme), so `openai.OpenAI().webhooks.unwrap(body, headers,
secret=...)` verifies and parses it.

Headers: webhook-id, webhook-timestamp (unix seconds), webhook-signature "v1,<base64 HMAC-SHA256 of
'{id}.{timestamp}.{body}'>", keyed by the secret's bytes (a 'whsec_' secret is base64 after the
prefix). Body: {"object": "event", "id": "evt_...", "type": "fine_tuning.job.<status>",
"created_at": ..., "data": {"id": "ftjob-..."}}. Delivered by the worker that finished the job,
retried a few times; a receiver that stays down loses the call (the job's status is the record).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.request

EVENTS = ("succeeded", "failed", "cancelled")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def deliver(hook: dict, job_id: str, status: str, tries: int = 3, timeout: float = 10) -> str | None:
    """POST the job's final status to hook['url']. Returns None on a 2xx answer, else what went wrong."""
    event_id = "evt_" + secrets.token_hex(12)
    ts = int(time.time())
    body = json.dumps({"object": "event", "id": event_id, "type": f"fine_tuning.job.{status}", "created_at": ts,
                       "data": {"id": job_id}})
    headers = {"content-type": "application/json", "webhook-id": event_id, "webhook-timestamp": str(ts),
               "webhook-signature": sign(hook["secret"], event_id, ts, body), "user-agent": "tunesmith-webhooks"}
    error = None
    for attempt in range(tries):
        try:
            req = urllib.request.Request(hook["url"], data=body.encode(), headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                if 200 <= r.status < 300:
                    return None
                error = f"HTTP {r.status}"
        except OSError as e:  # connection refused, timeout, HTTP error status
            error = f"{type(e).__name__}: {e}"
        time.sleep(min(2 ** attempt, 10))
    return error
