"""Precision is decided once and the same everywhere a run is measured: forcing what `auto`
picks, evaluating a saved run in the precision it trained in, and online RL's rollout log-probs
in the precision of its update pass."""
from __future__ import annotations

import pytest
import torch

from tunesmith.config import TrainConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.train import runtime


def test_auto_precision_can_be_forced_for_the_process_tree(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.delenv(runtime.AUTO_PRECISION_ENV, raising=False)
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "bf16"
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp32")
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "fp32"
    assert runtime.resolve_precision(TrainConfig(precision="bf16"), "cpu") == "bf16"  # an explicit choice wins
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "bf16")
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "bf16"
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(TunesmithError, match="fp16 needs a GPU"):
        runtime.resolve_precision(TrainConfig(), "cpu")
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "half")
    with pytest.raises(TunesmithError, match="expected fp32, bf16 or fp16"):
        runtime.resolve_precision(TrainConfig(), "cpu")


def test_a_saved_run_is_evaluated_in_the_precision_it_trained_in(monkeypatch):
    import tunesmith.runs as runs

    cfg = load_config({"data": {"train": "x.jsonl"}})
    assert cfg.train.precision == "auto"
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: True)
    assert runs._as_trained(cfg, {"precision": "bf16"}).train.precision == "bf16"
    assert runs._as_trained(cfg, {"precision": "fp32"}).train.precision == "fp32"
    assert runs._as_trained(cfg, {}).train.precision == "auto"  # older runs: as before
    # emulated bf16 is ~200x slower: such a CPU evaluates a bf16 run in fp32 (and says so)
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: False)
    assert runs._as_trained(cfg, {"precision": "bf16"}).train.precision == "fp32"
    explicit = load_config({"data": {"train": "x.jsonl"}, "train": {"precision": "fp32"}})
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: True)
    assert runs._as_trained(explicit, {"precision": "bf16"}).train.precision == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rollout_logps_equal_the_update_pass_before_any_step(tiny_llama, tmp_path, precision):
    """PPO's ratio exp(logp - old) is exactly 1 before the first update, in bf16 as in fp32: the
    rollout scores its samples under the same autocast as the update pass (it used fp32, and in
    bf16 the mismatch spent the clip range on rounding)."""
    from tunesmith.methods import apply_method
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.pref.online import make_reference, make_rollout, policy_forward

    cfg = load_config({"task": "grpo", "model": {"name_or_path": str(tiny_llama)},
                       "data": {"train": "x.jsonl", "chat_template": False},
                       "method": {"name": "lora", "r": 4, "dropout": 0.0},
                       "pref": {"max_new_tokens": 6, "reward_fn": "x:y"}, "train": {"precision": precision}})
    acc, _ = runtime.make_accelerator(cfg.train)
    tok = load_tokenizer(str(tiny_llama))
    model = apply_method(load_model(str(tiny_llama), "sft", pad_token_id=tok.pad_token_id), cfg.method, "sft")
    prompts = ["who are you", "what city is it", "the movie"]
    ids = [tok(p)["input_ids"] for p in prompts]
    torch.manual_seed(0)
    ro = make_rollout(model, make_reference(model), tok, prompts, ids, lambda p, c: torch.zeros(len(c)), cfg, acc)
    assert torch.equal(ro.logps, ro.ref_logps)  # an untrained LoRA policy is its reference
    model.eval()
    with torch.no_grad(), acc.autocast():
        lp, _, _ = policy_forward(model, ro.ids, ro.attn, ro.width, cfg.pref.temperature, cfg.method.name)
    assert torch.equal(lp.cpu(), ro.logps)
