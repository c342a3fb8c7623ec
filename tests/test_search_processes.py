"""tunesmith search as processes: kill -9 and rerun, two processes on one PostgreSQL study, and
the search process's memory over 20 trials (slow). Each drives the real CLI in subprocesses."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from tests.conftest import write_jsonl
from tests.test_search import write_config, write_space

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql://postgres@127.0.0.1:5432"


def search(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "search", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"search did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-3000:]


def gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def tiny_search(tmp_path, tiny_bert, sentiment_rows):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows)
    cfg = write_config(tmp_path, tiny_bert, data)
    space = write_space(tmp_path, "train.lr: {low: 1.0e-5, high: 3.0e-2, log: true}\ntrain.weight_decay: [0.0, 0.1]\n")
    return cfg, space


@pytest.mark.slow
def test_kill_9_mid_trial_then_the_same_command_continues(tmp_path, tiny_search):
    cfg, space = tiny_search
    args = [str(cfg), "--space", str(space), "--trials", "3", "--sampler", "random", "--seed", "5", "--pruner", "none"]
    proc = search(args, tmp_path / "first.log")
    db = tmp_path / "runs" / "tiny-search" / "study.db"
    storage = f"sqlite:///{db}"
    victim = None
    deadline = time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                running = optuna.load_study(study_name="tiny-search", storage=storage).get_trials(
                    states=(TrialState.RUNNING,))
            except KeyError:  # the study is being created
                continue
            victim = next((t for t in running if t.intermediate_values and "child_pid" in t.user_attrs), None)
    assert victim is not None, (tmp_path / "first.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)  # mid-trial: it has reported a validation and trains on
    proc.wait()
    assert gone(victim.user_attrs["child_pid"]), "the trial's process outlived its search"

    wait(search(args, tmp_path / "again.log"), tmp_path / "again.log")
    trials = optuna.load_study(study_name="tiny-search", storage=storage).get_trials()
    dead = next(t for t in trials if t.number == victim.number)
    retries = [t for t in trials if t.user_attrs.get("retry_of") == [victim.number]]
    assert dead.state == TrialState.FAIL and len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == victim.params
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    counted = [t for t in trials if t.number != victim.number]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    assert f"trial {victim.number}: its search process is gone; marked failed and queued again" in \
        (tmp_path / "again.log").read_text()
    md = (tmp_path / "runs" / "tiny-search" / "results.md").read_text()
    assert "3 trials: 3 complete" in md and f"retried as trial {retries[0].number}" in md, md


@pytest.mark.slow
def test_two_processes_on_one_postgresql_study_share_its_trials(tmp_path, tiny_search):
    import psycopg

    cfg, space = tiny_search
    db = f"tunesmith_search_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{PG}/test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        url = f"{PG}/{db}"
        common = [str(cfg), "--space", str(space), "--trials", "6", "--storage", url, "--study", "shared",
                  "--sampler", "random", "--pruner", "none", "--train.epochs=2"]
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        folders = [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]  # each process reports on its own
        procs = [search(common + ["--seed", str(i), "--out", str(f)], log)
                 for i, (log, f) in enumerate(zip(logs, folders))]
        for p, log in zip(procs, logs):
            wait(p, log)
        storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://"))
        trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
        storage.engine.dispose()
        assert sorted(t.number for t in trials) == list(range(6))
        assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state) for t in trials]
        owners = {t.user_attrs["owner"]["pid"] for t in trials}
        assert owners == {p.pid for p in procs}, "both processes should have run trials"
        for t in trials:  # each trial trained once: one run folder, one data line in its log
            logs = [f / "trials" / f"trial-{t.number:04d}.log" for f in folders]
            assert sum(p.exists() for p in logs) == 1, t.number
            log = next(p for p in logs if p.exists()).read_text()
            assert log.count("data: format classification") == 1, t.number
        for f in folders:  # whichever process ends first waits for the other's trials: both report all six
            md = (f / "results.md").read_text()
            assert "6 trials: 6 complete" in md, md
    finally:
        with psycopg.connect(f"{PG}/test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.mark.slow
def test_search_process_memory_does_not_grow_over_20_trials(tmp_path, tiny_search):
    cfg, space = tiny_search
    log = tmp_path / "search.log"
    wait(search([str(cfg), "--space", str(space), "--trials", "20", "--sampler", "random", "--seed", "0",
                 "--pruner", "none", "--train.epochs=1"], log), log, timeout=1800)
    with (tmp_path / "runs" / "tiny-search" / "results.csv").open() as f:
        rss = [float(r["search_rss_mb"]) for r in csv.DictReader(f)]
    print(f"search process RSS after each of 20 trials (MiB): {rss}")
    assert len(rss) == 20
    # after the first few trials (imports and caches settle) the search process stays flat
    assert max(rss[5:]) - rss[4] < 10, rss  # measured: +1.7 MiB from trial 1 to 20 (424.2 -> 425.9)
