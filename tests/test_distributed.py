"""Data parallel on the CPU (issue 25): N processes with the gloo backend give the run one
process gives, because the config's batch is the global batch (train/distributed.py).

Every launch pins the loopback interface and one thread per process. The references run in the
test process itself; the data-parallel runs in real torchrun launches (`torchrun -m tunesmith
train`, `tunesmith train --nproc`, two "nodes" on localhost). Tiny models, fp32.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.conftest import free_port, write_jsonl
from tests.test_pref import _pairs
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
       "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _common(out: Path, name: str, **train_over) -> dict:
    return {"train": {"epochs": 1, "lr": 1e-3, "precision": "fp32", "num_threads": 1, "warmup_ratio": 0.0,
                      "log_every": 1, "seed": 0, "keep_checkpoints": 1, **train_over},
            "output": {"dir": str(out / "{name}"), "name": name}}


def _configs(tmp_path: Path, tiny_bert: Path, tiny_llama: Path, rows: list[dict], qa: list[dict]) -> list[dict]:
    """Classification, SFT and DPO, each with and without accumulation. 57 and 25 training examples:
    each epoch ends on a short batch, one of whose shares is a single example (or none)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", rows[:83])
    sft = write_jsonl(tmp_path / "qa.jsonl", qa[:24] + [{"prompt": "what is your name", "completion": "alpha"}] * 5)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(29))
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    out = []
    for accum in (1, 2):
        out.append({"task": "classification", "model": {"name_or_path": str(tiny_bert), "dropout": 0.0,
                                                        "attention_dropout": 0.0},
                    "data": {"train": str(reviews), "val_size": 13, "test_size": 13, "max_length": 32},
                    "method": lora, "eval": {"before": False, "num_samples": 0, "batch_size": 4},
                    **_common(tmp_path / "runs", f"cls-{accum}", batch_size=8, grad_accum=accum, eval_every=2)})
        out.append({"task": "sft", "model": {"name_or_path": str(tiny_llama)},
                    "data": {"train": str(sft), "val_size": 0, "test_size": 4, "max_length": 32, "chat_template": False},
                    "method": lora, "eval": {"before": False, "num_samples": 0, "generate_metrics": False},
                    **_common(tmp_path / "runs", f"sft-{accum}", batch_size=4, grad_accum=accum)})
        out.append({"task": "dpo", "model": {"name_or_path": str(tiny_llama)},
                    "data": {"train": str(pairs), "val_size": 0, "test_size": 4, "max_length": 32},
                    "method": lora, "eval": {"before": False, "num_samples": 0},
                    **_common(tmp_path / "runs", f"dpo-{accum}", batch_size=4, grad_accum=accum)})
    return out


def _final(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    steps = json.loads((run_dir / "run.json").read_text())["steps"]
    return steps, torch.load(run_dir / "checkpoints" / f"step-{steps}" / "weights.pt", weights_only=True)


def _assert_close_runs(one: Path, many: Path) -> None:
    (s1, w1), (s2, w2) = _final(one), _final(many)
    assert s1 == s2 and w1.keys() == w2.keys() and w1
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"{many.name}: {s1} steps, largest weight difference to one process {worst:.2e}")
    assert worst <= 1e-6, f"{many.name}: largest weight difference {worst:.2e}"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _launch(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env or ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_processes_give_the_one_process_run_for_classification_sft_and_dpo(tmp_path, tiny_bert, tiny_llama,
                                                                                sentiment_rows, qa_rows):
    configs = _configs(tmp_path / "one", tiny_bert, tiny_llama, sentiment_rows, qa_rows)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_configs(tmp_path / "two", tiny_bert, tiny_llama, sentiment_rows, qa_rows)))
    log = tmp_path / "torchrun.log"
    proc = _launch(TORCHRUN + ["--nproc-per-node", "2", "-m", "tests.dp_runs", str(spec)], log)
    try:
        for cfg in configs:  # the references, in this process, while the launch runs
            train(cfg)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    for cfg in configs:
        name = cfg["output"]["name"]
        one, two = tmp_path / "one" / "runs" / name, tmp_path / "two" / "runs" / name
        _assert_close_runs(one, two)
        # process 0 alone wrote: the same files (one TensorBoard event file, named by time and pid), each log row once
        assert _files(one) == _files(two) and _files(two).count("tensorboard/events") == 1
        r1, r2 = _rows(one), _rows(two)
        assert [(r["kind"], r["step"]) for r in r1] == [(r["kind"], r["step"]) for r in r2]
        for a, b in zip(r1, r2):  # training losses all-reduced, evaluations gathered: each example once
            for k in ("loss", "accuracy", "rewards/margins"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (name, a, b)
        s2 = json.loads((two / "run.json").read_text())
        assert s2["processes"] == 2 and s2["final_metrics"]["loss"] == pytest.approx(
            json.loads((one / "run.json").read_text())["final_metrics"]["loss"], rel=1e-5)
    evals = [r for r in _rows(tmp_path / "two" / "runs" / "cls-1") if r["kind"] == "eval"]
    assert evals and all(abs(r["accuracy"] * 13 - round(r["accuracy"] * 13)) < 1e-9 for r in evals)  # 13 examples, not 16


def _files(run: Path) -> list[str]:
    """A run folder's files; event files as 'tensorboard/events' (their names hold the time and pid)."""
    names = (p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    return sorted("tensorboard/events" if n.startswith("tensorboard/events.out.tfevents.") else n for n in names)


def _cls_config(tmp_path: Path, tiny_bert: Path, rows: list[dict], name: str, **train_over) -> Path:
    reviews = write_jsonl(tmp_path / "reviews.jsonl", rows[:120])
    cfg = {"task": "classification", "model": {"name_or_path": str(tiny_bert), "dropout": 0.0, "attention_dropout": 0.0},
           "data": {"train": str(reviews), "val_size": 12, "test_size": 12, "max_length": 32},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "eval": {"before": False, "num_samples": 0, "batch_size": 5},
           **_common(tmp_path / "runs", name, **({"batch_size": 8, "grad_accum": 2, "epochs": 3, "eval_every": 1000,
                                                  "save_every": 3} | train_over))}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes under a launcher, by RANK."""
    out = {}
    for p in launcher.children(recursive=True):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "tunesmith" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p
    return out


def _node(r: int, cfg: Path, endpoint: str, log: Path, ours: bool) -> subprocess.Popen:
    """One "machine" of a two-node run on localhost, one process: `tunesmith train --nnodes 2 ...` or plain torchrun."""
    if ours:
        return _launch([sys.executable, "-m", "tunesmith", "train", str(cfg), "--nproc", "1", "--nnodes", "2",
                        "--node-rank", str(r), "--rdzv-endpoint", endpoint], log)
    return _launch(TORCHRUN + ["--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--rdzv-backend",
                               "static", "--rdzv-endpoint", endpoint, "-m", "tunesmith", "train", str(cfg)], log)


def test_two_nodes_sigterm_to_one_rank_then_resume_with_nproc(tmp_path, tiny_bert, sentiment_rows):
    """Node 0 by `tunesmith train --nnodes 2`, node 1 by plain `torchrun ... -m tunesmith train`. SIGTERM reaches
    only rank 1 (not the one that writes): both agree at the next step, rank 0 saves, both stop; our launcher
    exits 143. Then `tunesmith train --nproc 2 --resume` on one machine ends where one process ends."""
    cfg = _cls_config(tmp_path, tiny_bert, sentiment_rows, "dp")
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [_node(0, cfg, endpoint, logs[0], ours=True), _node(1, cfg, endpoint, logs[1], ours=False)]
    run_dir = tmp_path / "runs" / "dp"
    tail = lambda: "\n".join(f.read_text()[-3000:] for f in logs)  # noqa: E731
    try:
        deadline = time.time() + 600
        while ckpt.latest_checkpoint(run_dir) is None and nodes[0].poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert nodes[0].poll() is None, tail()
        _workers(psutil.Process(nodes[1].pid))[1].send_signal(signal.SIGTERM)
        codes = [n.wait(timeout=300) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert codes[0] == 128 + signal.SIGTERM, tail()  # torchrun itself (node 1) says 1 for any stop
    assert "SIGTERM: stopping at the next step" in logs[1].read_text()
    assert "stopped by SIGTERM with a checkpoint" in logs[0].read_text()
    stopped = ckpt.latest_checkpoint(run_dir)
    assert stopped is not None and not (run_dir / "run.json").exists()
    assert int(stopped.name.split("-")[1]) < 18  # (3 epochs x 6 steps: stopped before the end)

    resume_log = tmp_path / "resume.log"
    proc = _launch([sys.executable, "-m", "tunesmith", "train", str(cfg), "--nproc", "2", "--resume"], resume_log)
    try:
        assert proc.wait(timeout=600) == 0, resume_log.read_text()[-4000:]
    finally:
        proc.kill()
    assert f"resuming from {stopped}" in resume_log.read_text()
    train(str(cfg), ["--output.name=one"])
    _assert_close_runs(tmp_path / "runs" / "one", run_dir)
    assert json.loads((run_dir / "run.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_nodes_on_localhost_uninterrupted(tmp_path, tiny_bert, sentiment_rows):
    cfg = _cls_config(tmp_path, tiny_bert, sentiment_rows, "nodes", epochs=1)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [_node(r, cfg, endpoint, tmp_path / f"node{r}.log", ours=r == 0) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:] + (tmp_path / "node1.log").read_text()[-3000:]
    train(str(cfg), ["--output.name=one"])
    _assert_close_runs(tmp_path / "runs" / "one", tmp_path / "runs" / "nodes")


@pytest.mark.parametrize("task", ["ppo", "grpo"])
def test_online_rl_refuses_data_parallel_with_a_clear_message(tmp_path, tiny_llama, monkeypatch, task):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the movie"}] * 8)
    (tmp_path / "reward.py").write_text("def reward(prompts, completions):\n    return [len(c) for c in completions]\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process
    with pytest.raises(TunesmithError, match=f"task {task}: online RL .* does not run data-parallel yet; run it in one "
                                             "process"):
        train({"task": task, "model": {"name_or_path": str(tiny_llama)}, "data": {"train": str(data)},
               "pref": {"reward_fn": f"{tmp_path / 'reward.py'}:reward"}, "output": {"dir": str(tmp_path / "{name}")}})
    assert not (tmp_path / "run").exists()


# ---- engines: the shipped accelerate configs, and what tunesmith says about each -----------------

TEMPLATES = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_templates_are_valid_accelerate_configs_with_their_command():
    from accelerate.commands.config.config_args import ClusterConfig

    names = {p.name for p in TEMPLATES}
    assert {"ddp.yaml", "ddp-cpu.yaml", "fsdp2-lora.yaml", "fsdp2-full.yaml", "fsdp2-qlora.yaml",
            "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names
    for path in TEMPLATES:
        cfg = ClusterConfig.from_yaml_file(str(path))  # what `accelerate launch --config_file` reads
        assert f"accelerate launch --config_file configs/accelerate/{path.name} -m tunesmith train" in path.read_text()
        if path.name.startswith("fsdp2"):
            assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        if path.name.startswith("deepspeed"):
            assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
        assert path.name in (ROOT / "docs" / "DISTRIBUTED.md").read_text()


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "install deepspeed with pip install 'tunesmith\\[deepspeed\\]'"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 launches are not supported by tunesmith yet"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "Use FSDP2 \\(fsdp_version: 2"),
])
def test_sharded_engines_stop_with_what_to_do(monkeypatch, env, message):
    import importlib.util

    from tunesmith.config import TrainConfig
    from tunesmith.train.runtime import make_accelerator

    assert importlib.util.find_spec("deepspeed") is None  # (this environment: the message, not a DeepSpeed run)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TunesmithError, match=message):
        make_accelerator(TrainConfig(precision="fp32"))


@pytest.mark.slow
def test_accelerate_launch_with_the_cpu_ddp_template(tmp_path, tiny_bert, sentiment_rows):
    """`accelerate launch --config_file configs/accelerate/ddp-cpu.yaml -m tunesmith train CONFIG` (2 CPU processes)."""
    cfg = _cls_config(tmp_path, tiny_bert, sentiment_rows, "acc", epochs=1)
    log = tmp_path / "accelerate.log"
    proc = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "ddp-cpu.yaml"), "-m", "tunesmith", "train", str(cfg)], log)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    train(str(cfg), ["--output.name=one"])
    _assert_close_runs(tmp_path / "runs" / "one", tmp_path / "runs" / "acc")
    assert json.loads((tmp_path / "runs" / "acc" / "run.json").read_text())["processes"] == 2


def test_nproc_launcher_command_line_and_its_errors():
    from tunesmith.launch import torchrun_args

    assert torchrun_args("cfg.yaml", ["--train.lr=1e-4"], 2) == [
        "--nproc-per-node", "2", "--nnodes", "1", "-m", "tunesmith", "train", "cfg.yaml", "--train.lr=1e-4"]
    assert torchrun_args("cfg.yaml", [], 1, 2, 1, "10.0.0.1:29500", resume=True) == [
        "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static",
        "--rdzv-endpoint", "10.0.0.1:29500", "-m", "tunesmith", "train", "cfg.yaml", "--resume"]
    with pytest.raises(TunesmithError, match="--nnodes > 1 needs --rdzv-endpoint HOST:PORT"):
        torchrun_args("cfg.yaml", [], 1, 2, 0, None)
    with pytest.raises(TunesmithError, match="--node-rank must be 0 .. 1"):
        torchrun_args("cfg.yaml", [], 1, 2, 2, "h:1")
    with pytest.raises(TunesmithError, match="--nproc and --nnodes must be at least 1"):
        torchrun_args("cfg.yaml", [], 0)
