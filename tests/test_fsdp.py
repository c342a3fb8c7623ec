"""FSDP2 on the CPU (issue 25): torch's `fully_shard` runs with the gloo backend, so the sharded path
(train/sharded.py) is checked here as data parallel is in tests/test_distributed.py: 2 processes x
batch b, each holding half of every weight, gradient and AdamW state, give the weights 1 process x
batch 2b gives (fp32, within 1e-6); checkpoints are sharded (torch.distributed.checkpoint: one
file per process, no whole weights.pt); a run killed halfway through writing one resumes from the
one before and ends bit for bit where the uninterrupted 2-process run ends.

The launches are plain torchrun with what `accelerate launch --config_file
configs/accelerate/fsdp2-*.yaml` sets in each process: ACCELERATE_USE_FSDP=true, FSDP_VERSION=2.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.test_distributed import ENV, ROOT, TORCHRUN, _common, _rows
from tests.test_faults import _rows as _logged
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import train

FSDP_ENV = {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _configs(tmp_path: Path, tiny_bert: Path, tiny_llama: Path, rows: list[dict], qa: list[dict]) -> list[dict]:
    """A LoRA classifier (accumulation 2, evaluations with an uneven split of batches, a best copy),
    a fully fine-tuned one (every weight sharded and trained) and an SFT LoRA on a tiny Llama."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", rows[:83])
    sft = write_jsonl(tmp_path / "qa.jsonl", qa[:24] + [{"prompt": "what is your name", "completion": "alpha"}] * 5)
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    bert = {"name_or_path": str(tiny_bert), "dropout": 0.0, "attention_dropout": 0.0}
    cls_data = {"train": str(reviews), "val_size": 13, "test_size": 13, "max_length": 32}
    cls_eval = {"before": False, "num_samples": 0, "batch_size": 5}  # 3 batches: one process has 2, the other 1
    runs = tmp_path / "runs"
    return [
        {"task": "classification", "model": bert, "data": cls_data, "method": lora, "eval": cls_eval,
         **_common(runs, "cls-lora", batch_size=8, grad_accum=2, epochs=2, eval_every=2, save_every=1,
                   load_best=False, keep_checkpoints=2)},
        {"task": "classification", "model": bert, "data": cls_data, "method": {"name": "full"}, "eval": cls_eval,
         **_common(runs, "cls-full", batch_size=8, max_steps=4, eval_every=2, load_best=False)},
        {"task": "sft", "model": {"name_or_path": str(tiny_llama)},
         "data": {"train": str(sft), "val_size": 0, "test_size": 4, "max_length": 32, "chat_template": False},
         "method": lora, "eval": {"before": False, "num_samples": 0, "generate_metrics": False},
         **_common(runs, "sft-lora", batch_size=4, max_steps=4)},
    ]


def _saved(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final trained weights as the run wrote them (peft adapter or transformers model)."""
    folder = run_dir / ("adapter" if (run_dir / "adapter").is_dir() else "model")
    return load_file(folder / ("adapter_model.safetensors" if folder.name == "adapter" else "model.safetensors"))


def _launch(args: list[str], log: Path) -> int:
    with log.open("w") as f:
        return subprocess.run(args, cwd=ROOT, env=FSDP_ENV, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode


def test_fsdp2_two_processes_match_one_process_with_sharded_checkpoints_that_resume_exactly(
        tmp_path, tiny_bert, tiny_llama, sentiment_rows, qa_rows):
    configs = _configs(tmp_path / "one", tiny_bert, tiny_llama, sentiment_rows, qa_rows)
    two = _configs(tmp_path / "two", tiny_bert, tiny_llama, sentiment_rows, qa_rows)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(two))
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(TORCHRUN + ["--nproc-per-node", "2", "-m", "tests.dp_runs", str(spec)], cwd=ROOT,
                            env=FSDP_ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        for cfg in configs:  # the references, one process without FSDP, while the launch runs
            train(cfg)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    for cfg in configs:
        name = cfg["output"]["name"]
        one, many = tmp_path / "one" / "runs" / name, tmp_path / "two" / "runs" / name
        w1, w2 = _saved(one), _saved(many)
        assert w1.keys() == w2.keys() and w1
        worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        print(f"FSDP2 {name}: largest weight difference to one process {worst:.2e}")
        assert worst <= 1e-6, f"{name}: {worst:.2e}"
        for a, b in zip(_rows(one), _rows(many), strict=True):  # losses all-reduced, evaluations gathered
            assert (a["kind"], a["step"]) == (b["kind"], b["step"])
            for k in ("loss", "accuracy"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (name, a, b)
        last = ckpt.latest_checkpoint(many)  # sharded: a file per process, no whole weights
        assert sorted(p.name for p in (last / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (last / "weights.pt").exists() and ckpt.incomplete(last) is None
    assert (tmp_path / "two" / "runs" / "cls-lora" / "checkpoints" / "best" / "sharded" / ".metadata").is_file()

    # Killed halfway through writing its 4th checkpoint (the shards are in, the marker is not): --resume
    # takes the newest complete one, sharded, and ends bit for bit on the uninterrupted 2-process run.
    cfg = {**two[0], "output": {**two[0]["output"], "name": "killed"}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = TORCHRUN + ["--nproc-per-node", "2", "-m", "tunesmith", "train", str(path)]
    FSDP_ENV["TUNESMITH_FAULT"] = "checkpoint-write:4"  # process 0's 4th (a step or the best copy)
    try:
        assert _launch(run, tmp_path / "killed.log") != 0
    finally:
        del FSDP_ENV["TUNESMITH_FAULT"]
    killed = tmp_path / "two" / "runs" / "killed"
    stopped = ckpt.latest_checkpoint(killed)
    assert 1 <= ckpt.step_of(stopped) < 8 and list((killed / "checkpoints").glob(".tmp-*"))
    assert _launch(run + ["--resume"], tmp_path / "resume.log") == 0, (tmp_path / "resume.log").read_text()[-4000:]
    assert f"resuming from {stopped}" in (tmp_path / "resume.log").read_text()
    whole, again = _saved(tmp_path / "two" / "runs" / "cls-lora"), _saved(killed)
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert _logged(tmp_path / "two" / "runs" / "cls-lora") == _logged(killed)
    assert not list((killed / "checkpoints").glob(".*"))


def test_fsdp2_refuses_what_it_does_not_handle_yet():
    import pytest

    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.train.loop import _check_fsdp

    cfg = load_config({"task": "classification", "data": {"train": "x"}, "method": {"name": "diff_pruning"},
                       "train": {"ema_decay": 0.9}})
    with pytest.raises(TunesmithError, match=r"FSDP2 launches do not support train.ema_decay .*; method diff_pruning"):
        _check_fsdp(cfg, torch.nn.Linear(2, 2))
    _check_fsdp(load_config({"task": "classification", "data": {"train": "x"}}), torch.nn.Linear(2, 2))  # LoRA: fine
