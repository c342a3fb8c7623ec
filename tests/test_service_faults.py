"""Faults, each with real processes: kill -9 a `tunesmith worker` mid-job while a second one runs
(PostgreSQL), and kill -9 a whole `tunesmith service` mid-job and start it again (SQLite). The job
finishes once, on the weights an uninterrupted run reaches, with every metrics event and
checkpoint row written once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ServerProcess
from tests.pg import temp_database
from tests.service_jobs import add_file, chat_rows, data_dir_with_model, wait_for
from tunesmith.service import jobs
from tunesmith.service.store import Store

ROOT = Path(__file__).parent.parent
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TUNESMITH_WORKER_LEASE_S": "3", "TUNESMITH_WORKER_POLL_S": "0.3"}
# 80 steps of batch 1 over 40 examples; a checkpoint every 10 steps (and at each epoch), 3 kept.
BODY = {"model": "tiny", "seed": 11, "hyperparameters": {"n_epochs": 2, "batch_size": 1},
        "tunesmith": {"method": {"name": "lora", "r": 4}, "train": {"lr": 2e-3, "log_every": 2, "save_every": 10}}}
STEPS = 80


def _worker(db: str | None, data_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunesmith", "worker", "--data-dir", str(data_dir)] + (["--db", db] if db else [])
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").is_file() and "zombie" in Path(f"/proc/{pid}/status").read_text()


def _metrics_steps(store: Store, job_id: str) -> list[int]:
    rows, _ = store.list_events(job_id, limit=100_000)
    return [r["data"]["step"] for r in reversed(rows) if r["type"] == "metrics"]


def _reference_run(store: Store, job: dict, data_dir: Path, out: Path):
    """The same job's config trained straight through, in this process, on one thread as the workers."""
    from tunesmith.train import train

    cfg = jobs.run_config(store, job, data_dir)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(out)})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg).run_dir
    finally:
        torch.set_num_threads(threads)


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def _check_exactly_once(store: Store, job: dict, data_dir: Path, reference: Path) -> None:
    """Every metrics event once, with the uninterrupted run's losses; checkpoint rows = the folders
    the uninterrupted run kept; final weights = the uninterrupted run's."""
    run_dir = data_dir / job["run_dir"]
    assert _metrics_steps(store, job["id"]) == list(range(2, STEPS + 1, 2))
    ref_rows = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    ref_loss = {r["step"]: r["loss"] for r in ref_rows if r["kind"] == "train"}
    events = [r["data"] for r in reversed(store.list_events(job["id"], limit=100_000)[0]) if r["type"] == "metrics"]
    assert [(d["step"], round(d["train_loss"], 4)) for d in events] == [(s, round(ref_loss[s], 4)) for s in ref_loss]
    ref_ckpts = sorted(int(p.name.split("-")[1]) for p in (reference / "checkpoints").glob("step-*"))
    rows = sorted(c["step"] for c in store.list_checkpoints(job["id"], limit=1000)[0])
    assert rows == ref_ckpts == sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    _same_weights(run_dir, reference)
    messages = [r["message"] for r in store.list_events(job["id"], limit=100_000)[0] if r["type"] == "message"]
    assert len(messages) == len(set(messages)), "a message written twice"


def test_kill9_worker_while_another_runs_postgres(tmp_path, tiny_llama):
    data_dir = data_dir_with_model(tmp_path / "data", tiny_llama)
    with temp_database("ts_faults") as url:
        store = Store(url, data_dir)
        store.migrate()
        project, _ = store.add_key("alice")
        f = add_file(store, project["id"], data_dir, chat_rows(40))
        job = jobs.create_job(store, project["id"], BODY | {"training_file": f["id"]}, data_dir)
        procs = []
        try:
            w1 = _worker(url, data_dir, tmp_path / "w1.log")
            procs.append(w1)
            first = wait_for(lambda: store.job(job["id"])["worker_id"], 120, "worker 1 to claim the job")
            w2 = _worker(url, data_dir, tmp_path / "w2.log")  # idle, polling the same queue
            procs.append(w2)
            # past a checkpoint, with steps after it that the next worker must not write twice
            wait_for(lambda: (c := store.list_checkpoints(job["id"])[0]) and c[0]["step"] >= 20
                     and max(_metrics_steps(store, job["id"])) > c[0]["step"], 300, "training past step 20")
            trainers = _children(w1.pid)
            assert trainers, "worker 1 runs the training in a child process"
            w1.kill()  # kill -9: no heartbeat, no checkpoint, no goodbye
            w1.wait()
            wait_for(lambda: all(_gone(p) for p in trainers), 10, "worker 1's training to die with it")
            done = wait_for(lambda: (j := store.job(job["id"]))["status"] in ("succeeded", "failed") and j, 400,
                            "worker 2 to finish the job")
            assert done["status"] == "succeeded", (done["error"], (tmp_path / "w2.log").read_text()[-2000:])
            assert done["attempts"] == 2 and done["worker_id"] is None
            took = [e["message"] for e in store.list_events(job["id"], limit=10_000)[0] if "took the job over" in e["message"]]
            assert len(took) == 1 and first not in took[0]  # one hand-over, to the other worker
            assert w2.poll() is None  # and that worker is still there for the next job
        finally:
            for p in procs:
                p.kill()
                p.wait()
        _check_exactly_once(store, done, data_dir, _reference_run(store, done, data_dir, tmp_path / "reference"))
        store.close()


@pytest.mark.slow
def test_kill9_service_then_restart_keeps_the_queue_and_resumes(tmp_path, tiny_llama):
    """`tunesmith service` (SQLite, one embedded worker) killed with -9 mid-job: the queued job stays
    queued, the running one is resumed from its checkpoint after the restart, both finish once."""
    data_dir = data_dir_with_model(tmp_path / "data", tiny_llama)
    store = Store(None, data_dir)
    store.migrate()
    project, _ = store.add_key("alice")
    f = add_file(store, project["id"], data_dir, chat_rows(40))
    a = jobs.create_job(store, project["id"], BODY | {"training_file": f["id"]}, data_dir)
    b = jobs.create_job(store, project["id"], BODY | {"training_file": f["id"], "seed": 12}, data_dir)
    args = ["--data-dir", str(data_dir), "--workers", "1"]
    srv = ServerProcess(args, tmp_path / "service1.log", command="service", env=ENV)
    try:
        wait_for(lambda: (c := store.list_checkpoints(a["id"])[0]) and c[0]["step"] >= 20, 300, "job a past step 20")
        trainers = _children(srv.proc.pid)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        wait_for(lambda: all(_gone(p) for p in trainers), 10, "the training to die with the service")
    finally:
        srv.stop()
    assert store.job(a["id"])["status"] == "running"  # until its lease runs out and a worker resumes it
    assert store.job(b["id"])["status"] == "queued" and store.job(b["id"])["attempts"] == 0
    srv = ServerProcess(args, tmp_path / "service2.log", command="service", env=ENV)
    try:
        for j in (a, b):
            wait_for(lambda: store.job(j["id"])["status"] in ("succeeded", "failed"), 600, f"job {j['id']}")
    finally:
        srv.stop()
    done_a, done_b = store.job(a["id"]), store.job(b["id"])
    assert (done_a["status"], done_a["attempts"], done_b["status"], done_b["attempts"]) == ("succeeded", 2, "succeeded", 1)
    _check_exactly_once(store, done_a, data_dir, _reference_run(store, done_a, data_dir, tmp_path / "reference"))
    store.close()
