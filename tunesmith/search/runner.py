"""The search's side of one trial: start its process, relay its evaluations to the pruner, and
turn how it ended into a trial state.

Pruning happens inside our loop's own evaluation: at each validation the trial process sends
the row and waits; the search reports the best value so far (the objective is the keep-best
value, so that is what is compared) to optuna at that evaluation's number and answers "stop"
when the pruner says so. The trial then stops through train()'s cancel path at that same step,
so a pruned trial has spent exactly the steps up to the evaluation that pruned it.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

Outcome = Literal["complete", "pruned", "invalid", "crashed", "interrupted"]
CHILD_MODULE = "tunesmith.search.child"


@dataclass
class TrialRun:
    """How one trial process went."""

    outcome: Outcome
    detail: str  # one line for the table: why it failed, where it was pruned
    steps: int = 0  # optimizer steps it trained
    seconds: float = 0.0  # wall-clock of its process
    value: float | None = None  # the keep-best validation value (complete trials) or the best seen so far
    evals: list[dict[str, Any]] = field(default_factory=list)  # the validation rows it reported
    summary: dict[str, Any] | None = None
    run_dir: str | None = None


def start_server() -> None:
    """Start the forkserver now (its imports overlap with the search's own set-up)."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([CHILD_MODULE])
    forkserver.ensure_running()


def _entry(*args) -> None:
    from tunesmith.search.child import main  # preloaded in the forkserver: free here

    main(*args)


def run_trial(config: str | dict, overrides: dict[str, Any], log_path: Path, *, metric: str, greater: bool,
              report: Callable[[float, int], bool] | None = None, cancel: threading.Event | None = None,
              threads: int | None = None, on_start: Callable[[int], None] | None = None,
              on_eval: Callable[[dict[str, Any]], None] | None = None) -> TrialRun:
    """Run train(config, overrides) in a child process and wait for it.

    Args:
        report: called with (best value so far, evaluation number) at each validation; returns True
            to prune. None: no pruning (a retrain).
        cancel: when set, the trial stops at its next step (outcome "interrupted").
        threads: torch threads in the child (None: torch's default).
        on_start / on_eval: called with the child's pid once it runs / with each validation row.
    """
    start_server()
    ctx = multiprocessing.get_context("forkserver")
    mine, theirs = ctx.Pipe(duplex=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = ctx.Process(target=_entry, args=(config, overrides, theirs, str(log_path), threads),
                       name=f"trial:{log_path.stem}")
    t0 = time.perf_counter()
    proc.start()
    theirs.close()  # ours closed: the child's end sees EOF if we die
    if on_start is not None:
        on_start(proc.pid)
    evals: list[dict[str, Any]] = []
    best: float | None = None
    ending: dict[str, Any] | None = None
    stop_sent, pruned_at = False, None
    try:
        while True:
            if cancel is not None and cancel.is_set() and not stop_sent:
                stop_sent = True
                if not _send(mine, "stop"):
                    break
            if not mine.poll(0.2):
                if not proc.is_alive() and not mine.poll(0):
                    break
                continue
            try:
                msg = mine.recv()
            except (EOFError, ConnectionResetError):  # the process died: its exit code says how
                break
            if msg["kind"] == "eval":
                row = msg["row"]
                evals.append(row)
                value = row.get(metric)
                if value is not None:
                    best = value if best is None or (value > best if greater else value < best) else best
                verdict = "go"
                if report is not None and best is not None and not stop_sent and report(best, len(evals)):
                    verdict, pruned_at = "stop", row
                    stop_sent = True
                if on_eval is not None:
                    on_eval(row)
                if not _send(mine, verdict if not stop_sent else "stop"):
                    break
            else:
                ending = msg
    finally:
        proc.join(timeout=60)
        if proc.is_alive():  # it did not stop at its next step: end it
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        mine.close()
    seconds = time.perf_counter() - t0
    steps = int(evals[-1]["step"]) if evals else 0
    return _outcome(ending, proc.exitcode, evals, best, pruned_at, stop_sent, steps, seconds)


def _send(conn, msg: str) -> bool:
    """Send to the trial process; False when it has died (its exit code then says how)."""
    try:
        conn.send(msg)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def _outcome(ending: dict[str, Any] | None, exitcode: int | None, evals, best, pruned_at, stop_sent: bool,
             steps: int, seconds: float) -> TrialRun:
    kind = ending["kind"] if ending else None
    if kind == "result":
        s = ending["summary"]
        return TrialRun("complete", "", s.get("steps") or steps, seconds, s.get("best_value"), evals, s,
                        ending["run_dir"])
    if kind == "stopped" and pruned_at is not None:
        return TrialRun("pruned", f"pruned at evaluation {len(evals)} (step {pruned_at['step']})", steps, seconds,
                        best, evals)
    if kind == "stopped" or (stop_sent and kind is None):
        return TrialRun("interrupted", f"interrupted at step {steps}", steps, seconds, best, evals)
    if kind == "invalid":
        return TrialRun("invalid", f"invalid: {ending['message']}", steps, seconds, None, evals)
    if kind == "crashed":
        return TrialRun("crashed", f"crashed: {ending['message']}", steps, seconds, None, evals)
    how = (f"killed by signal {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
           else f"exited with code {exitcode} without a result")
    return TrialRun("crashed", f"crashed: {how}", steps, seconds, None, evals)
