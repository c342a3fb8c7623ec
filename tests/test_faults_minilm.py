"""kill -9 on a real model (issue 25): a short MiniLM LoRA run of the main job's config
(configs/sentiment-lora.yaml: IMDB, all-MiniLM-L6-v2, LoRA r8 with dropout 0.1), killed at random
moments and named points, resumed each time, ends on the same trainable weights, bit for bit, as
the run never interrupted. tests/test_faults.py does the same at many more points on a tiny model;
this checks that nothing about the real model (its tokenizer, pooling, 103 weight files' loading,
the builtin data source's split) breaks exactness. fp32, one thread. Several minutes: slow.

    .venv/bin/python -m pytest tests/test_faults_minilm.py -m slow -s
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from tests.test_faults import _rows, kill_chain
from tunesmith.cli import run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


def _args(tmp_path: Path, name: str) -> list[str]:
    return ["train", str(ROOT / "configs" / "sentiment-lora.yaml"), "--data.train_size=64", "--data.val_size=16",
            "--data.test_size=16", "--data.max_length=96", f"--train.max_steps={STEPS}", "--train.batch_size=8",
            "--train.grad_accum=2", "--train.save_every=2", "--train.eval_every=4", "--train.keep_checkpoints=2",
            "--train.log_every=1", "--train.precision=fp32", "--train.num_threads=1", "--eval.before=false",
            "--eval.samples=[]", "--eval.batch_size=8", f"--output.dir={tmp_path}/runs/{{name}}",
            f"--output.name={name}"]


@pytest.mark.slow
def test_minilm_lora_killed_at_random_moments_resumes_bitwise(tmp_path):
    t0 = time.perf_counter()
    assert run(_args(tmp_path, "whole")) == 0
    whole_s = time.perf_counter() - t0
    seed = int(os.environ.get("TUNESMITH_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # mid-accumulation, two kills from outside at a moment nobody chose (a fraction of the uninterrupted
    # run's time, loading included), mid-checkpoint-write, mid-evaluation, after a step. The timers come
    # early, while most of the run is left: late in the chain a resumed link can finish before its timer
    # (seed 6040 on a quiet CPU: resumed at step 10 of 12, done in 8.8 s)
    plan = [f"micro-batch:{rng.randint(3, 6)}", "timer", "timer", f"checkpoint-write:{rng.randint(1, 2)}",
            f"eval:{rng.randint(1, 2)}", f"step:{rng.randint(1, 3)}"]
    args = _args(tmp_path, "killed")
    killed, log = kill_chain(args, plan, tmp_path / "runs" / "killed", lambda: rng.uniform(0.2, 0.4) * whole_s, 600,
                             seed)
    print(f"seed {seed}: uninterrupted {whole_s:.0f} s; {log}")
    assert killed >= 4, f"seed {seed}: only {killed} kills landed: {log}"
    whole, other = tmp_path / "runs" / "whole", tmp_path / "runs" / "killed"
    a, b = (torch.load(r / "checkpoints" / f"step-{STEPS}" / "weights.pt", weights_only=True) for r in (whole, other))
    assert a.keys() == b.keys() and a
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"seed {seed}: {len(diff)} of {len(a)} trainable tensors differ, e.g. {diff[0]}; kills: {log}"
    assert _rows(whole) == _rows(other), f"seed {seed}: logged losses differ; kills: {log}"
    assert not list((other / "checkpoints").glob(".*"))  # no half-written leftovers
