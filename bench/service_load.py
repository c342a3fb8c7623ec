"""`tunesmith service` under load: 20 concurrent API clients while a training job runs.

Run: .venv/bin/python bench/service_load.py [--db sqlite|postgresql] [--duration 180] [--clients 20] [--think-s 0]
     (--db postgresql makes a throwaway database on $TUNESMITH_PG, default
      postgresql://postgres@127.0.0.1:5432, and drops it after)

What runs, all on this machine:
1. a real `tunesmith service` process (one embedded worker, --workers 1) on a fresh data dir, with
   a tiny Llama (2 layers, built from config as the tests build it) as its base model;
2. one fine-tuning job on it that trains for the whole measurement (many epochs; cancelled at the
   end), so the worker's child process writes events and checkpoints while the API answers;
3. N clients (asyncio, the official `openai` SDK's AsyncOpenAI, half on each of two API keys),
   each looping over the issue's mix: upload a small chat file, create a job (it queues behind the
   training job), list jobs, retrieve (poll) a job, list the training job's events.
Every call is timed from the client; any exception or non-2xx answer is an error. The table gives
p50 / p95 / max latency and errors per endpoint; the jobs the clients created are cancelled after.
The figures include the clients' own CPU time: they share the machine's cores with the server and
the training process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG = os.environ.get("TUNESMITH_PG", "postgresql://postgres@127.0.0.1:5432")
ENDPOINTS = ("files.create", "jobs.create", "jobs.list", "jobs.retrieve", "jobs.list_events")


def chat_file(n: int = 12) -> bytes:
    qa = [("what is your name", "alpha beta"), ("who created you", "gamma delta"), ("what city", "seven eight")]
    rows = [{"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": a}]}
            for i in range(n) for q, a in qa[i % 3:i % 3 + 1]]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class PgDatabase:
    """A throwaway PostgreSQL database (created on enter, dropped with its connections on exit)."""

    def __init__(self) -> None:
        self.name = f"bench_service_{secrets.token_hex(4)}"

    def __enter__(self) -> str:
        import psycopg

        with psycopg.connect(PG + "/postgres", autocommit=True, connect_timeout=5) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        return f"{PG}/{self.name}"

    def __exit__(self, *exc) -> None:
        import psycopg

        with psycopg.connect(PG + "/postgres", autocommit=True, connect_timeout=5) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def start_service(data: Path, db: str | None, base: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from tests.conftest import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "tunesmith.cli", "service", "--data-dir", str(data), "--workers", "1",
           "--model", f"tiny={base}", "--port", str(port), "--lease-s", "15"] + (["--db", db] if db else [])
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the service did not start")


async def client_loop(c, stop_at: float, train_job: str | None, file_id: str, lat: dict, errors: dict, rng: random.Random,
                      created: list, think_s: float) -> None:
    mine: list[str] = []
    data = chat_file()
    while time.time() < stop_at:
        for name in ENDPOINTS:
            if time.time() >= stop_at:
                return
            t0 = time.perf_counter()
            try:
                if name == "files.create":
                    f = await c.files.create(file=("load.jsonl", data), purpose="fine-tune")
                    assert f.status == "processed", f.status_details
                elif name == "jobs.create":
                    j = await c.fine_tuning.jobs.create(model="tiny", training_file=file_id,
                                                        metadata={"bench": "load"})
                    mine.append(j.id)
                    created.append((c, j.id))
                elif name == "jobs.list":
                    await c.fine_tuning.jobs.list(limit=20)
                elif name == "jobs.retrieve":
                    await c.fine_tuning.jobs.retrieve(rng.choice(mine) if mine else train_job)
                else:  # the training job's events; the other project polls its own (queued) job's
                    await c.fine_tuning.jobs.list_events(train_job or mine[-1], limit=20)
                lat[name].append(time.perf_counter() - t0)
            except Exception as e:  # counted, and the first of each kind is shown
                errors[name].append(f"{type(e).__name__}: {str(e)[:200]}")
            if think_s:  # a client that polls rather than hammers: a random pause around think_s
                await asyncio.sleep(rng.uniform(0.5, 1.5) * think_s)


async def run_load(url: str, keys: list[str], train_job: tuple[int, str], files: list[str], clients: int,
                   duration: float, think_s: float) -> tuple[dict, dict, list]:
    import openai

    cs = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=k, max_retries=0, timeout=60) for k in keys]
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    created: list = []
    stop_at = time.time() + duration
    owner, job_id = train_job
    # the training job belongs to key 0: the other project's clients poll their own jobs' events
    await asyncio.gather(*[client_loop(cs[i % len(cs)], stop_at, job_id if i % len(cs) == owner else None,
                                       files[i % len(cs)], lat, errors, random.Random(i), created, think_s)
                           for i in range(clients)])
    return lat, errors, created


def table(lat: dict, errors: dict, duration: float) -> str:
    lines = [f"{'endpoint':<18} {'calls':>6} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}"]
    for name in ENDPOINTS:
        xs = sorted(lat.get(name, []))
        if xs:
            p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
            lines.append(f"{name:<18} {len(xs):>6} {len(errors.get(name, [])):>6} {p(0.5):>8.1f} {p(0.95):>8.1f} "
                         f"{xs[-1] * 1e3:>8.1f}")
        else:
            lines.append(f"{name:<18} {0:>6} {len(errors.get(name, [])):>6}")
    total = sum(len(v) for v in lat.values())
    lines.append(f"{total} calls in {duration:.0f} s ({total / duration:.1f}/s), "
                 f"{sum(len(v) for v in errors.values())} errors")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--think-s", type=float, default=0.0, help="each client pauses about this long between calls "
                    "(default 0: back to back, the service's saturation)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    import openai

    from tests.conftest import save_tiny_llama
    from tunesmith.service.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="service-load-"))
    pg = PgDatabase() if args.db == "postgresql" else None
    db = pg.__enter__() if pg else None
    proc = None
    try:
        base = save_tiny_llama(tmp / "tiny")
        store = Store(db, tmp / "data")
        store.migrate()
        keys = [store.add_key(f"load-{i}")[1] for i in range(2)]
        store.close()
        t0 = time.time()
        proc, url = start_service(tmp / "data", db, base, tmp / "service.log")
        print(f"service up in {time.time() - t0:.1f} s ({args.db})", flush=True)
        syncs = [openai.OpenAI(base_url=url + "/v1", api_key=k, max_retries=0, timeout=120) for k in keys]
        # 400 examples x 50 epochs at batch 1: far more steps than the measurement lasts, on any machine
        files = [s.files.create(file=("train.jsonl", chat_file(400)), purpose="fine-tune").id for s in syncs]
        train = syncs[0].fine_tuning.jobs.create(
            model="tiny", training_file=files[0],
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
            extra_body={"tunesmith": {"train": {"num_threads": 1, "precision": "fp32"}}})
        while syncs[0].fine_tuning.jobs.retrieve(train.id).status != "running":
            time.sleep(0.5)
        while not any(e.type == "metrics" for e in syncs[0].fine_tuning.jobs.list_events(train.id, limit=50).data):
            time.sleep(0.5)  # training steps under way (the child's start-up is done)
        print(f"training job {train.id} running; {args.clients} clients for {args.duration:.0f} s", flush=True)
        lat, errors, created = asyncio.run(run_load(url, keys, (0, train.id), files, args.clients, args.duration,
                                                    args.think_s))
        status = syncs[0].fine_tuning.jobs.retrieve(train.id)
        steps = [e.data["step"] for e in syncs[0].fine_tuning.jobs.list_events(train.id, limit=5).data
                 if e.type == "metrics"]
        cores = len(os.sched_getaffinity(0))
        print(f"{args.clients} clients, think {args.think_s} s, {args.db}; {cores} cores usable, load average "
              f"{os.getloadavg()[0]:.1f} at the end")
        print(table(lat, errors, args.duration))
        print(f"training job at the end of the load: {status.status}, last logged step {max(steps) if steps else '?'}"
              f"/{status.tunesmith.get('total_steps') if status.tunesmith else '?'}")
        for name, errs in errors.items():
            print(f"  first {name} error: {errs[0]}")
        for s in syncs:
            for j in s.fine_tuning.jobs.list(limit=100, metadata={"bench": "load"}):
                if j.status in ("validating_files", "queued"):
                    s.fine_tuning.jobs.cancel(j.id)
        if status.status == "running":
            syncs[0].fine_tuning.jobs.cancel(train.id)
        if args.out:
            stats = {n: {"calls": len(v), "errors": len(errors.get(n, [])),
                         "p50_ms": 1e3 * statistics.median(v), "p95_ms": 1e3 * sorted(v)[int(0.95 * len(v))],
                         "max_ms": 1e3 * max(v)} for n, v in lat.items() if v}
            Path(args.out).write_text(json.dumps({"db": args.db, "clients": args.clients, "duration_s": args.duration,
                                                  "think_s": args.think_s, "cores": cores,
                                                  "loadavg_end": os.getloadavg()[0],
                                                  "endpoints": stats, "training_status": status.status}, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg:
            pg.__exit__(None, None, None)


if __name__ == "__main__":
    main()
