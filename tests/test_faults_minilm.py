"""kill -9 on a real model (issue 25): a short MiniLM LoRA run of the main job's config
(configs/sentiment-lora.yaml: IMDB, all-MiniLM-L6-v2, LoRA r8 with dropout 0.1), killed at random
moments and named points, resumed each time, ends on the same trainable weights, bit for bit, as
the run never interrupted. tests/test_faults.py does the same at many more points on a tiny model;
this checks that nothing about the real model (its tokenizer, pooling, 103 weight files' loading,
the builtin data source's split) breaks exactness. fp32, one thread. Several minutes: slow.

    .venv/bin/python -m pytest tests/test_faults_minilm.py -m slow -s
"""
from __future__ import annotations

import json
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
    step_s = json.loads((tmp_path / "runs" / "whole" / "run.json").read_text())["train_seconds"] / STEPS
    seed = int(os.environ.get("TUNESMITH_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # Every kill must land, whatever the seed and the machine's load: each link may carry the run at
    # most 2 steps (one checkpoint) past where it resumed, so the 6 links end by step 10 of 12 and
    # every point below is still ahead of its link. Mid-accumulation in the link's 2nd or 3rd step;
    # two kills from outside at a random moment within the step after the link's first logged one
    # (keyed to its progress: a timer from its start would mostly measure the loading, which varies
    # with the load); halfway through the link's first checkpoint write (a step or the best copy);
    # inside its first validation; after its 1st to 3rd optimizer step.
    plan = [f"micro-batch:{rng.randint(2, 3)}", "after-step", "after-step", "checkpoint-write:1", "eval:1",
            f"step:{rng.randint(1, 3)}"]
    args = _args(tmp_path, "killed")
    killed, log = kill_chain(args, plan, tmp_path / "runs" / "killed", lambda: rng.uniform(0.0, 1.0) * step_s, 900,
                             seed)
    print(f"seed {seed}: uninterrupted {whole_s:.0f} s ({step_s:.1f} s a step); {log}")
    assert killed == len(plan), f"seed {seed}: only {killed} of {len(plan)} kills landed: {log}"
    whole, other = tmp_path / "runs" / "whole", tmp_path / "runs" / "killed"
    a, b = (torch.load(r / "checkpoints" / f"step-{STEPS}" / "weights.pt", weights_only=True) for r in (whole, other))
    assert a.keys() == b.keys() and a
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"seed {seed}: {len(diff)} of {len(a)} trainable tensors differ, e.g. {diff[0]}; kills: {log}"
    assert _rows(whole) == _rows(other), f"seed {seed}: logged losses differ; kills: {log}"
    assert not list((other / "checkpoints").glob(".*"))  # no half-written leftovers
