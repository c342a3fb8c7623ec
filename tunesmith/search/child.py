"""One trial in its own process: `train()` with the trial's overrides, talking to the search.

The search forks this from a server process that has already imported torch and tunesmith
(multiprocessing's forkserver), so a trial starts in well under a second instead of the ~15 s
the imports take here; each trial's memory goes back to the system when its process exits.

Messages to the search (over `conn`): {"kind": "eval", "row"} at each validation (the loop
waits for the answer: "go" or "stop"), then one of {"kind": "result", "summary"},
{"kind": "stopped"} (cancelled: pruned or interrupted), {"kind": "invalid", "message"} (a
TunesmithError: bad config or data), {"kind": "crashed", "message"} (anything else; the
traceback is in the trial's log). If the search goes away (kill -9), the connection closes and
the trial exits at once: a rerun of the search retries it.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from typing import Any

import tunesmith.train  # noqa: F401 (the forkserver imports this module first: the heavy imports happen once)

EXIT_ORPHANED = 75
SUMMARY_KEYS = ("best_metric", "best_value", "best_step", "steps", "train_seconds", "wall_seconds", "final_split",
                "final_metric", "final_value", "final_metrics", "peak_rss_mb", "stopped_early")


def main(config: str | dict, overrides: dict[str, Any], conn, log_path: str, threads: int | None) -> None:
    """The body of a trial process (multiprocessing target)."""
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)  # this process's prints, warnings and progress bar go to the trial's log
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    if threads:
        import torch

        torch.set_num_threads(threads)
    from tunesmith.errors import TrainingCancelled, TunesmithError
    from tunesmith.train import train

    cancel = threading.Event()
    verdicts: queue.Queue[str] = queue.Queue()

    def listen() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the search is gone: nobody will count this trial
                print("the search process went away; stopping", flush=True)
                os._exit(EXIT_ORPHANED)
            if msg == "stop":
                cancel.set()
            verdicts.put(msg)

    threading.Thread(target=listen, daemon=True, name="trial-listener").start()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("kind") == "message":
            print(event["text"], flush=True)
        elif event.get("kind") == "eval":
            conn.send({"kind": "eval", "row": {k: v for k, v in event.items() if isinstance(v, (int, float, str))}})
            verdicts.get()  # the search reports it (pruning) before this trial goes on; "stop" also set `cancel`

    try:
        result = train(config, overrides, on_event=on_event, cancel=cancel)
    except TrainingCancelled as e:
        print(f"stopped: {e}", flush=True)
        conn.send({"kind": "stopped"})
        return
    except TunesmithError as e:
        print(f"error: {e}", flush=True)
        conn.send({"kind": "invalid", "message": str(e)})
        return
    except BaseException as e:
        traceback.print_exc()
        conn.send({"kind": "crashed", "message": f"{type(e).__name__}: {e}"})
        raise
    conn.send({"kind": "result", "summary": {k: result.summary.get(k) for k in SUMMARY_KEYS},
               "run_dir": str(result.run_dir)})
