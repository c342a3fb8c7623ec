"""PPO/GRPO runs have the ordinary loop's semantics: events, cancel with a checkpoint, an exact
--resume, and keep-best on the held-out (validation) reward. Tiny Llama, pinned to fp32."""
from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from tests.conftest import write_jsonl
from tunesmith.errors import TrainingCancelled
from tunesmith.train import train

REWARD_FN = '''
def reward(prompts, completions):
    return [c.count("a") / max(len(c), 1) * 10 for c in completions]
'''


def _cfg(tmp_path, tiny_llama, task: str, name: str) -> dict:
    rng = random.Random(0)
    words = ["the", "movie", "film", "plot", "was", "is", "very", "good", "bad"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": " ".join(rng.choice(words) for _ in range(3))}
                                                     for _ in range(40)])
    (tmp_path / "reward.py").write_text(REWARD_FN)
    return {"task": task, "model": {"name_or_path": str(tiny_llama)},
            "data": {"train": str(data), "val_size": 6, "test_size": 6, "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 4, "lr": 2e-2, "warmup_ratio": 0.0, "seed": 0, "precision": "fp32",
                      "eval_every": 1, "keep_checkpoints": 4},
            "pref": {"reward_fn": f"{tmp_path / 'reward.py'}:reward", "rollout_prompts": 4, "num_generations": 2,
                     "max_new_tokens": 6, "mini_batch_size": 4, "ppo_epochs": 2, "kl_target": 1.0},
            "eval": {"batch_size": 8, "num_samples": 2, "max_new_tokens": 4},
            "output": {"dir": str(tmp_path / "{name}"), "name": name}}


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step-{step}" / "weights.pt", weights_only=True)


@pytest.mark.parametrize("task", ["ppo", pytest.param("grpo", marks=pytest.mark.slow)])  # the same loop
def test_cancel_resume_lands_on_the_same_weights_and_keep_best_keeps_the_best_step(tmp_path, tiny_llama, task):
    events: list[dict] = []
    whole = train(_cfg(tmp_path, tiny_llama, task, "whole"), on_event=events.append)
    assert {"message", "train", "eval", "checkpoint", "done"} <= {e["kind"] for e in events}

    # keep-best: the best validation reward of the run's evaluations, its step, its weights
    rows = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    best = max(evals, key=lambda r: r["reward"])  # the first of equal ones, as keep-best keeps it
    assert (whole.summary["best_metric"], whole.summary["best_step"]) == ("reward", best["step"])
    assert whole.summary["best_value"] == pytest.approx(best["reward"])
    kept = torch.load(whole.run_dir / "checkpoints" / "best" / "weights.pt", weights_only=True)
    at_best = {k.removeprefix("policy."): v for k, v in _weights(whole.run_dir, best["step"]).items()
               if k.startswith("policy.")}
    assert kept.keys() == at_best.keys() and all(torch.equal(kept[k], at_best[k]) for k in kept)

    # cancel after step 2 (a checkpoint is written), then resume: the same weights as the whole run
    cancel = threading.Event()

    def stop_after_two(e: dict) -> None:
        if e["kind"] == "train" and e["step"] == 2:
            cancel.set()

    cfg = _cfg(tmp_path, tiny_llama, task, "resumed")
    with pytest.raises(TrainingCancelled):
        train(cfg, on_event=stop_after_two, cancel=cancel)
    assert (tmp_path / "resumed" / "checkpoints" / "step-2" / "state.pt").is_file()
    resumed = train(cfg, resume=True)
    a, b = _weights(whole.run_dir, 4), _weights(resumed.run_dir, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["best_step"] == whole.summary["best_step"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    again = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip(again) == strip(rows)
