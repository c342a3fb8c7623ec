"""The worker loop: claim a job, run it in a child process, hold its lease, act on cancel / pause.

    claim (atomic, store.claim) -> start `python -m tunesmith.service.runner JOB ...`
    every lease_s / 3: heartbeat (extend the lease; lost -> kill the child, the job is another's)
                       requested cancel / pause, or this worker stopping -> SIGTERM the child:
                       train() checkpoints at the next step and the child ends the job
    child exits -> if it left the job running (it crashed), the job fails with the log's tail;
                   then the job's webhook, if it has one

Many workers share one queue: embedded in `tunesmith service` (threads, SQLite or PostgreSQL) or
`tunesmith worker` processes on other machines (PostgreSQL, the data dir on shared storage).
A worker that dies (kill -9, lost machine) stops heart-beating; when its lease runs out another
worker claims the job and the child resumes it from its last checkpoint.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from tunesmith.service.store import TERMINAL, Store

# A dead worker's job waits this long before another worker resumes it; how often an idle worker
# looks for work. The environment sets them for the embedded workers of `tunesmith service` too.
LEASE_S = float(os.environ.get("TUNESMITH_WORKER_LEASE_S", 60))
POLL_S = float(os.environ.get("TUNESMITH_WORKER_POLL_S", 2))
MAX_ATTEMPTS = 5  # a job whose workers keep dying (e.g. it takes the machine down) fails after this many
STOP_GRACE_S = 120.0  # how long a stopping worker waits for its training to checkpoint
REQUEST_POLL_S = 2.0  # how soon a running job sees a cancel / pause request


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker: `run(stop)` loops until `stop` is set.

    Args:
        db: database URL (None: SQLite in the data dir).
        data_dir: the service's data folder (shared storage when workers run on several machines).
        lease_s: lease length; heartbeats every lease_s / 3.
        env: extra environment for the training processes (e.g. OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES).
    """

    def __init__(self, db: str | None, data_dir: Path, worker_id: str | None = None, lease_s: float | None = None,
                 poll_s: float | None = None, env: dict[str, str] | None = None, log=None) -> None:
        self.db, self.data_dir = db, Path(data_dir).absolute()
        self.store = Store(db, self.data_dir)
        self.id = worker_id or new_worker_id()
        self.lease_s, self.poll_s = lease_s or LEASE_S, poll_s or POLL_S
        self.env = env or {}
        self.log = log or (lambda msg: print(f"[worker {self.id}] {msg}", file=sys.stderr, flush=True))
        self.child: subprocess.Popen | None = None

    def run(self, stop: threading.Event) -> None:
        self.log(f"waiting for jobs ({self.store!r}, data dir {self.data_dir})")
        try:
            while not stop.is_set():
                job = self.store.claim(self.id, self.lease_s)
                if job is None:
                    stop.wait(self.poll_s)
                    continue
                self.run_job(job, stop)
        finally:
            self.store.close()

    def run_job(self, job: dict, stop: threading.Event) -> str:
        """Run one claimed job to its end (or until this worker loses it). Returns its status."""
        jid = job["id"]
        if job["requested"] in ("cancel", "pause"):  # asked while its last worker was dying
            status = "cancelled" if job["requested"] == "cancel" else "paused"
            self.store.finish(jid, self.id, status)
            return self._finished(jid)
        if job["attempts"] > MAX_ATTEMPTS:
            msg = f"the job's worker was lost {job['attempts'] - 1} times; giving up"
            self.store.add_event(jid, "error", msg)
            self.store.finish(jid, self.id, "failed", error={"code": "worker_lost", "message": msg, "param": None})
            return self._finished(jid)
        first = job["attempts"] == 1
        self.store.add_event(jid, "info", "Fine-tuning job started" if first else
                             f"Worker {self.id} took the job over (attempt {job['attempts']})")
        self.log(f"running {jid} (attempt {job['attempts']})")
        rc, lost = self._supervise(job, stop)
        if lost:
            self.log(f"lost the lease of {jid}; stopped its training")
            return "lost"
        row = self.store.job(jid) or {}
        if row.get("status") == "running" and row.get("worker_id") == self.id and rc == -signal.SIGTERM:
            # our SIGTERM came before the training process could catch it (it was still starting)
            status = {"cancel": "cancelled", "pause": "paused"}.get(row.get("requested"), "queued")
            self.store.finish(jid, self.id, status, **({"attempts": job["attempts"] - 1} if status == "queued" else {}))
        elif row.get("status") == "running" and row.get("worker_id") == self.id:  # the child died mid-job
            tail = _tail(self._log_path(jid))
            msg = f"the training process exited with code {rc}" + (f": {tail}" if tail else "")
            self.store.add_event(jid, "error", msg)
            self.store.finish(jid, self.id, "failed", error={"code": "training_crashed", "message": msg, "param": None})
        return self._finished(jid)

    def _supervise(self, job: dict, stop: threading.Event) -> tuple[int | None, bool]:
        """Start the child and hold the lease until it exits. Returns (exit code, lease lost)."""
        jid = job["id"]
        log_path = self._log_path(jid)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tunesmith.service.runner", jid, "--data-dir", str(self.data_dir),
               "--worker-id", self.id, "--parent-pid", str(os.getpid())]
        if self.db:
            cmd += ["--db", self.db]
        env = {**os.environ, **self.env}
        with log_path.open("a") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} worker {self.id} attempt {job['attempts']}\n")
            log.flush()
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL)
        signalled_at: float | None = None
        beat, look = self.lease_s / 3, min(self.lease_s / 3, REQUEST_POLL_S)
        next_beat = next_look = time.time()
        try:
            while True:
                try:
                    return self.child.wait(timeout=0.5), False
                except subprocess.TimeoutExpired:
                    pass
                now = time.time()
                if now >= next_beat:
                    next_beat = now + beat
                    if not self.store.heartbeat(jid, self.id, self.lease_s):
                        row = self.store.job(jid) or {}
                        if row.get("status") != "running":  # the child ended the job and is exiting
                            try:
                                return self.child.wait(timeout=STOP_GRACE_S), False
                            except subprocess.TimeoutExpired:
                                return None, False  # (killed below)
                        self.child.kill()  # another worker holds the job now: ours must not write to it
                        self.child.wait()
                        return None, True
                if signalled_at is None and (stop.is_set() or now >= next_look):
                    next_look = now + look
                    if stop.is_set() or (self.store.job(jid) or {}).get("requested") in ("cancel", "pause"):
                        self.child.send_signal(signal.SIGTERM)  # train() checkpoints at the next step
                        signalled_at = now
                elif signalled_at is not None and now - signalled_at > STOP_GRACE_S:
                    self.child.kill()  # stuck: its lease ends with this worker, the next one resumes
        finally:
            if self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            self.child = None

    def _finished(self, jid: str) -> str:
        row = self.store.job(jid) or {}
        status = row.get("status", "?")
        self.log(f"{jid}: {status}")
        if status in TERMINAL and row.get("webhook"):
            from tunesmith.service.webhooks import deliver

            error = deliver(row["webhook"], jid, status)
            self.store.add_event(jid, "warn" if error else "info",
                                 f"webhook {row['webhook']['url']}: " + (f"not delivered ({error})" if error else "delivered"))
        return status

    def _log_path(self, jid: str) -> Path:
        return self.data_dir / "logs" / f"{jid}.log"


def _tail(path: Path, lines: int = 12, chars: int = 2000) -> str:
    """The end of a training log: the traceback that says why it died."""
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def run_worker(db: str | None, data_dir: Path, stop: threading.Event, worker_id: str | None = None,
               **kwargs) -> None:
    """Run a worker until `stop` is set (what `tunesmith service` starts N of, in threads)."""
    Worker(db, data_dir, worker_id, **kwargs).run(stop)


def serve_forever(db: str | None, data_dir: Path, workers: int = 1, **kwargs) -> None:
    """`tunesmith worker`: N workers in this process until SIGTERM / Ctrl-C; a running job is
    checkpointed and handed back to the queue on the way out."""
    store = Store(db, Path(data_dir))
    store.migrate()
    store.close()
    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():
            raise KeyboardInterrupt
        print("stopping: running jobs checkpoint and go back to the queue (again to force)", file=sys.stderr, flush=True)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=run_worker, args=(db, data_dir, stop), kwargs=kwargs, name=f"worker-{i}")
               for i in range(workers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
