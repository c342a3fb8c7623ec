"""A long run survives what a long run meets (issue 25): kill -9 at any moment, SIGTERM/SIGINT,
non-finite losses and gradients, a full disk or a folder that turns read-only.

Tiny BERT + LoRA classifier, fp32, one thread. The killed runs are forked from the test process
(the imports are already done: a link of the kill chain costs a second, not a Python start-up)
and stopped by a real SIGKILL, either at a named point (tunesmith/faults.py: mid-accumulation,
after the optimizer step, halfway through a checkpoint write, inside an evaluation) or from the
outside after a random delay. Each resumed run continues from the newest complete checkpoint;
the last one must end on the same trainable weights, bit for bit, as a run never interrupted.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_jsonl
from tunesmith.cli import run
from tunesmith.train import checkpoint as ckpt

TOTAL = 14  # optimizer steps of the run below: 56 train examples / (4 x 2 accumulated) x 2 epochs


def _config(tmp_path: Path, tiny_bert: Path, rows: list[dict], **train) -> Path:
    data = write_jsonl(tmp_path / "reviews.jsonl", rows[:80])
    cfg = {"task": "classification", "model": {"name_or_path": str(tiny_bert), "dropout": 0.1},
           "data": {"train": str(data), "val_size": 12, "test_size": 12, "max_length": 32},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
           "train": {"epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "precision": "fp32",
                     "num_threads": 1, "eval_every": 4, "save_every": 2, "log_every": 1, "keep_checkpoints": 2,
                     "ema_decay": 0.9, "seed": 3, **train},
           "eval": {"before": False, "num_samples": 2, "batch_size": 5},
           "output": {"dir": str(tmp_path / "runs" / "{name}")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _child(args: list[str], fault: str | None) -> None:
    if fault:
        os.environ["TUNESMITH_FAULT"] = fault
    try:
        code = run(args)
    except BaseException as e:  # noqa: BLE001 (reported through the exit code)
        print(f"child failed: {type(e).__name__}: {e}", flush=True)
        code = 3
    os._exit(code)


def _fork(args: list[str], fault: str | None = None) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args, fault))
    proc.start()
    return proc


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step-{step}" / "weights.pt", weights_only=True)


def _rows(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss"), r.get("accuracy")) for r in rows]


def _assert_same_run(whole: Path, other: Path, why: str) -> None:
    a, b = _weights(whole, TOTAL), _weights(other, TOTAL)
    assert a.keys() == b.keys() and a, why
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{why}: {len(diff)} trainable tensors differ, e.g. {diff[0]}"
    from safetensors.torch import load_file
    fa, fb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (whole, other))
    assert all(torch.equal(fa[k], fb[k]) for k in fa), why  # the saved (averaged, best) adapter too
    assert _rows(whole) == _rows(other), why  # every logged loss and accuracy, none twice


def kill_chain(args: list[str], plan: list[str], run_dir: Path, timer_delay, timeout: float, seed: int
               ) -> tuple[int, list[str]]:
    """Run `args` once per link of `plan` (every link after the first with --resume): a fault point
    (faults.py) kills the link from inside, "timer" with SIGKILL from outside after timer_delay()
    seconds, "after-step" from outside timer_delay() seconds after the link has logged its first
    training step (keyed to the run's progress, not to its start-up time, which varies with the
    machine's load). Stops early when a link finishes; then runs the rest to the end. Returns the
    kills that landed and a line per link."""
    killed, log, proc = 0, [], None
    for i, where in enumerate(plan):
        outside = where in ("timer", "after-step")
        resumed_at = (ckpt.step_of(ckpt.latest_checkpoint(run_dir)) or 0) if i else 0
        started = time.time()
        proc = _fork(args + (["--resume"] if i else []), None if outside else where)
        if outside:  # from outside, at a moment nobody chose
            if where == "after-step":
                deadline = time.time() + timeout
                while proc.is_alive() and _trained_past(run_dir, resumed_at, started) is None and time.time() < deadline:
                    time.sleep(0.01)
            delay = timer_delay()
            proc.join(delay)
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
            where = f"{where} {delay:.1f}s" + (f" (link resumed at step {resumed_at})" if i else "")
        proc.join(timeout)
        assert proc.exitcode is not None, f"seed {seed}: link {i} ({where}) hangs"
        newest = ckpt.latest_checkpoint(run_dir)
        log.append(f"{where} -> exit {proc.exitcode}, newest {newest.name if newest else None}")
        if proc.exitcode == 0:
            break  # the run ended before this link's point: nothing left to kill
        assert proc.exitcode == -signal.SIGKILL, f"seed {seed}: {log}"
        killed += 1
    if proc is not None and proc.exitcode != 0:
        assert run(args + ["--resume"]) == 0
    return killed, log


def _trained_past(run_dir: Path, step: int, since: float) -> int | None:
    """The newest training step after `step` that a link started at `since` has logged (None while
    there is none). Rows the killed link before it logged past its checkpoint are still there until
    the new link truncates the log (which rewrites the file): a file not written since is not read."""
    path = run_dir / "metrics.jsonl"
    if not path.exists() or path.stat().st_mtime < since:
        return None
    steps = [r["step"] for line in path.read_text().splitlines() if line.endswith("}")
             for r in [json.loads(line)] if r["kind"] == "train" and r["step"] > step]
    return max(steps, default=None)


def test_kill_9_at_random_moments_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, tiny_bert, sentiment_rows):
    cfg = _config(tmp_path, tiny_bert, sentiment_rows)
    assert run(["train", str(cfg), "--output.name=whole"]) == 0
    whole = tmp_path / "runs" / "whole"

    seed = int(os.environ.get("TUNESMITH_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # where to die, in the order the links meet them; a resumed link counts its passes from 1
    plan = [f"micro-batch:{rng.randint(1, 2)}",  # mid-accumulation, before the first checkpoint: starts over
            f"checkpoint-write:{rng.randint(1, 3)}", f"eval:{rng.randint(1, 2)}", f"step:{rng.randint(1, 4)}",
            f"micro-batch:{rng.randint(2, 5)}", "timer", f"checkpoint-write:{rng.randint(1, 2)}", "timer"]
    args = ["train", str(cfg), "--output.name=killed"]
    killed, log = kill_chain(args, plan, tmp_path / "runs" / "killed", lambda: rng.uniform(0.3, 3.0), 300, seed)
    print(f"seed {seed}: {log}")
    assert killed >= 5, f"seed {seed}: only {killed} kills landed: {log}"
    _assert_same_run(whole, tmp_path / "runs" / "killed", f"seed {seed}, kills: {log}")
    assert not list((tmp_path / "runs" / "killed" / "checkpoints").glob(".*"))  # no half-written leftovers


def test_sigterm_checkpoints_at_the_next_step_exits_143_and_resumes_exactly(tmp_path, tiny_bert, sentiment_rows):
    cfg = _config(tmp_path, tiny_bert, sentiment_rows, save_every=None)
    assert run(["train", str(cfg), "--output.name=whole"]) == 0
    args = ["train", str(cfg), "--output.name=stopped"]
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    proc = _fork(args)
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.02)  # a few steps in: between evaluations, no checkpoint yet
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(300)
    assert proc.exitcode == 128 + signal.SIGTERM
    run_dir = tmp_path / "runs" / "stopped"
    stopped = ckpt.latest_checkpoint(run_dir)
    assert stopped is not None and ckpt.incomplete(stopped) is None
    assert not (run_dir / "run.json").exists()
    assert run(args + ["--resume"]) == 0
    _assert_same_run(tmp_path / "runs" / "whole", run_dir, f"SIGTERM at {stopped.name}")


def test_sigint_exit_code_differs_from_sigterm(tmp_path, tiny_bert, sentiment_rows):
    cfg = _config(tmp_path, tiny_bert, sentiment_rows, max_steps=400, save_every=None, eval_every=1000)
    proc = _fork(["train", str(cfg), "--output.name=int"])
    metrics = tmp_path / "runs" / "int" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(300)
    assert proc.exitcode == 128 + signal.SIGINT
    assert ckpt.latest_checkpoint(tmp_path / "runs" / "int") is not None


# ---- non-finite losses and gradients --------------------------------------------------------------

def _poison(monkeypatch, bad_loss: set[int], bad_grad: set[int]) -> None:
    """The task's objective, with a NaN loss on the micro-batch calls in `bad_loss` and an infinite
    gradient (through a backward hook) on those in `bad_grad` (calls counted from 1)."""
    import tunesmith.train.loop as loop

    real_get_task = loop.get_task
    calls = [0]

    def get_task(name):
        task = real_get_task(name)

        def objective(cfg):
            inner = task.objective(cfg)

            def poisoned(model, batch):
                calls[0] += 1
                out = inner(model, batch)
                if calls[0] in bad_loss:
                    out = dataclasses.replace(out, loss_sum=out.loss_sum * float("nan"))
                if calls[0] in bad_grad:
                    out = dataclasses.replace(out, loss_sum=out.loss_sum + _inf_grad(out.loss_sum))
                return out
            return poisoned
        return dataclasses.replace(task, objective=objective)

    monkeypatch.setattr(loop, "get_task", get_task)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def _inf_grad(loss: torch.Tensor) -> torch.Tensor:
    return _InfGrad.apply(loss)  # adds 0 to the loss and inf to every gradient


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_bert, sentiment_rows, monkeypatch):
    from tunesmith.train import train

    cfg = _config(tmp_path, tiny_bert, sentiment_rows, grad_accum=1, max_steps=6, ema_decay=None)
    _poison(monkeypatch, bad_loss={3}, bad_grad={5})  # steps 3 and 5 (one micro-batch a step)
    events: list[dict] = []
    res = train(str(cfg), ["--output.name=poisoned"], on_event=events.append)
    assert res.summary["skipped_steps"] == 2 and res.summary["steps"] == 6
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if r["kind"] == "train"] == [0, 0, 1, 1, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN reaches the log
    notes = [e["text"] for e in events if e["kind"] == "message" and "update skipped" in e["text"]]
    assert len(notes) == 2 and "step 3: non-finite loss (loss nan" in notes[0]
    assert "step 5: non-finite gradient norm (loss " in notes[1] and "in a row, 2 in all" in notes[1]
    w = _weights(res.run_dir, 6)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_a_run_of_non_finite_steps_stops_with_the_last_good_checkpoint_intact(tmp_path, tiny_bert, sentiment_rows,
                                                                              monkeypatch):
    from tunesmith.train import train
    from tunesmith.train.loop import NonFiniteError

    cfg = _config(tmp_path, tiny_bert, sentiment_rows, grad_accum=1, max_steps=12, ema_decay=None, max_bad_steps=3)
    _poison(monkeypatch, bad_loss=set(range(5, 100)), bad_grad=set())  # from step 5 on, every step
    with pytest.raises(NonFiniteError, match=r"stopped at step 7: 3 steps in a row had a non-finite loss") as e:
        train(str(cfg), ["--output.name=poisoned"])
    run_dir = tmp_path / "runs" / "poisoned"
    assert str(run_dir / "checkpoints" / "step-4") in str(e.value)  # names the last good checkpoint
    assert ckpt.latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-4"
    w = _weights(run_dir, 4)
    assert all(torch.isfinite(v).all() for v in w.values())
    monkeypatch.undo()  # the data is fine again: --resume goes on from step 4
    res = train(str(cfg), ["--output.name=poisoned"], resume=True)
    assert res.summary["steps"] == 12 and res.summary["skipped_steps"] == 0


# ---- disk full, folder read-only ------------------------------------------------------------------

def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_bert, sentiment_rows, monkeypatch, capsys):
    """Simulated: torch.save raises ENOSPC half-way through its third file (the step-4 weights)."""
    cfg = _config(tmp_path, tiny_bert, sentiment_rows, grad_accum=1, max_steps=8, ema_decay=None, eval_every=100)
    real_save, calls = torch.save, [0]

    def full(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            f.write(b"\0" * 100)  # a torn file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)  # checkpoint.py calls torch.save(obj, open file)
    with pytest.raises(ckpt.CheckpointError) as e:
        run(["train", str(cfg), "--output.name=full"])
    msg = str(e.value)
    run_dir = tmp_path / "runs" / "full"
    assert "No space left on device (ENOSPC)" in msg and f"{run_dir / 'checkpoints' / 'step-2'} is intact" in msg
    assert ckpt.latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-2"
    assert ckpt.incomplete(run_dir / "checkpoints" / "step-2") is None
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]  # no torn step-4, no temp folder
    monkeypatch.undo()
    assert run(["train", str(cfg), "--output.name=full", "--resume"]) == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A real, small filesystem of its own (needs root / CAP_SYS_ADMIN; skipped elsewhere)."""
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        if not _mount_tmpfs(path, size):
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated disk-full test covers the code path")
        mounted.append(path)
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path, tiny_bert, sentiment_rows, tmpfs):
    """Full fine-tuning checkpoints (~0.5 MB with AdamW's state) on a 1 MB filesystem: the second one
    cannot be written next to the first."""
    fs = tmpfs("1m")
    cfg = _config(tmp_path, tiny_bert, sentiment_rows, grad_accum=1, max_steps=8, ema_decay=None, eval_every=100)
    tree = yaml.safe_load(cfg.read_text())
    tree["method"] = {"name": "full"}
    tree["output"]["dir"] = str(fs / "{name}")
    cfg.write_text(yaml.safe_dump(tree))
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device \(ENOSPC\)"):
        run(["train", str(cfg), "--output.name=full"])
    run_dir = fs / "full"
    newest = ckpt.latest_checkpoint(run_dir)
    assert newest is not None and ckpt.incomplete(newest) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_folder_turned_read_only_while_training(tmp_path, tiny_bert, sentiment_rows, tmpfs):
    from tunesmith.errors import TunesmithError
    from tunesmith.train import train

    fs = tmpfs("20m")
    cfg = _config(tmp_path, tiny_bert, sentiment_rows, grad_accum=1, max_steps=8, ema_decay=None, eval_every=100)

    def on_event(e: dict) -> None:
        if e["kind"] == "checkpoint" and e["step"] == 2:  # the disk goes read-only (a failing volume does)
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)

    with pytest.raises(TunesmithError, match=r"Read-only file system.*step-2\)? is intact") as e:
        train(str(cfg), ["--output.name=ro", f"--output.dir={fs / '{name}'}"], on_event=on_event)
    assert "--resume" in str(e.value)
    assert ckpt.latest_checkpoint(fs / "ro") == fs / "ro" / "checkpoints" / "step-2"


# ---- atomic checkpoints, newest complete, keep-K ------------------------------------------------

def _fake(run_dir: Path, step: int, complete: bool = True) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step}"
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(folder, model)
    if not complete:
        (folder / ckpt.MARKER).unlink()
    return folder


def test_resume_takes_the_newest_complete_checkpoint_and_says_which(tmp_path):
    run_dir = tmp_path / "run"
    for s in (2, 4, 6):
        _fake(run_dir, s)
    _fake(run_dir, 8, complete=False)  # as a filesystem without atomic rename could leave it
    (run_dir / "checkpoints" / "step-6" / "weights.pt").write_bytes(b"torn")  # not the size its marker says
    (run_dir / "checkpoints" / ".tmp-step-10-abc").mkdir()  # a write killed half-way
    aside = run_dir / "checkpoints" / ".old-best-xyz"
    (aside / "best").mkdir(parents=True)  # killed between renaming the old best aside and the new one in
    last, notes = ckpt.find_resume(run_dir)
    assert last == run_dir / "checkpoints" / "step-4"
    assert any("skipped step-8: no COMPLETE marker" in n for n in notes)
    assert any("skipped step-6: weights.pt is missing or not the size" in n for n in notes)
    assert (run_dir / "checkpoints" / "best").is_dir() and not aside.exists()
    assert not (run_dir / "checkpoints" / ".tmp-step-10-abc").exists()


def test_keep_k_never_deletes_the_best_or_the_newest(tmp_path):
    run_dir = tmp_path / "run"
    best = run_dir / "checkpoints" / "best"
    ckpt.save_checkpoint(best, torch.nn.Linear(2, 2))
    for s in range(1, 8):
        _fake(run_dir, s)
        ckpt.prune_checkpoints(run_dir, keep=1)
    _fake(run_dir, 9, complete=False)
    ckpt.prune_checkpoints(run_dir, keep=1)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best", "step-7", "step-9"]  # the newest complete survives an incomplete newer one
    assert ckpt.incomplete(best) is None
    ckpt.prune_checkpoints(run_dir, keep=3)
    assert ckpt.latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-7"


def _replace_then_die(best: Path) -> None:
    real_replace, calls = os.replace, []

    def die_on_second(a, b):
        calls.append(a)
        if len(calls) == 2:  # the old copy is aside, the new one not yet in
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(a, b)

    os.replace = die_on_second
    ckpt.save_checkpoint(best, torch.nn.Linear(2, 2))


def test_replacing_a_checkpoint_never_leaves_none(tmp_path):
    """Killed between 'old aside' and 'new in': the old copy is still there to restore."""
    best = tmp_path / "checkpoints" / "best"
    ckpt.save_checkpoint(best, torch.nn.Linear(2, 2))
    before = (best / "weights.pt").read_bytes()
    proc = multiprocessing.get_context("fork").Process(target=_replace_then_die, args=(best,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert not best.exists()
    notes = ckpt.find_resume(tmp_path)[1]
    assert "restored best (its replacement was never completed)" in notes and notes[0].startswith("removed unfinished")
    assert (best / "weights.pt").read_bytes() == before and ckpt.incomplete(best) is None
