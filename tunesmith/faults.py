"""Deliberate crashes, for the tests that prove a run survives them (tests/test_faults.py).

`TUNESMITH_FAULT=POINT[:N]` kills this process with SIGKILL the N-th time (default: the first)
the run passes POINT, so a test can stop a run exactly mid-accumulation or halfway through a
checkpoint write, where a kill from outside would land there only by luck.
`TUNESMITH_FAULT_DELAY=POINT:SECONDS` sleeps there every time instead: a slow step, so a test's
request (the job service's pause) surely lands mid-run however fast the CPU is. Unset (always,
outside the tests), `reached` is two dictionary lookups. The points:

    micro-batch       after a micro-batch's backward, before the optimizer step (mid-accumulation)
    step              after the optimizer step, before the step is counted or checkpointed
    checkpoint-write  inside a checkpoint write: weights written, state and completion marker not yet
    eval              inside an evaluation, after its first batch
"""
from __future__ import annotations

import os
import signal
import time

ENV, DELAY_ENV = "TUNESMITH_FAULT", "TUNESMITH_FAULT_DELAY"
POINTS = ("micro-batch", "step", "checkpoint-write", "eval")
_passed: dict[str, int] = {}


def reached(point: str) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        name, _, seconds = delay.partition(":")
        if name == point:
            time.sleep(float(seconds))
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
