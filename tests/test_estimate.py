"""`tunesmith estimate` (issue 25): the command, its parts and its advice, on tiny models (seconds).
Its accuracy against measured peaks on the real models is bench/estimate.py's (bench/RESULTS.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tunesmith.cli import run
from tunesmith.errors import ConfigError


def _config(tmp_path: Path, model: Path, rows: list[dict], task: str = "classification", **train) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = {"task": task, "model": {"name_or_path": str(model)},
           "data": {"train": str(data), "val_size": 8, "test_size": 8, "max_length": 32},
           "method": {"name": "lora", "r": 4}, "train": {"batch_size": 8, "precision": "fp32", **train},
           "output": {"dir": str(tmp_path / "runs" / "{name}")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _smol_shape(tmp_path: Path) -> dict:
    """SmolLM2-135M's shape from its config alone (no weights)."""
    from transformers import LlamaConfig

    from tunesmith.models.estimate import model_shape

    LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, tie_word_embeddings=True).save_pretrained(tmp_path / "smol")
    return model_shape(str(tmp_path / "smol"), None, 0)


def test_cli_estimate_json_parts_and_the_longest_batch(tmp_path, tiny_bert, sentiment_rows, capsys):
    from tunesmith.models.load import load_tokenizer

    cfg = _config(tmp_path, tiny_bert, sentiment_rows)
    assert run(["estimate", str(cfg), "--json", "--memory-mb=100000"]) == 0
    r = json.loads(capsys.readouterr().out)
    m = r["memory"]
    assert r["fits"] and r["advice"] == [] and r["device"] == "cpu" and r["precision"] == "fp32"
    train_sum = sum(m[k] for k in ("base", "weights", "gradients_optimizer", "activations", "logits"))
    assert abs(m["peak_mb"] - max(train_sum, m["load_peak_mb"])) <= 3  # parts are rounded one by one
    # the largest batch: batch_size x the longest training example as the tokenizer cuts it
    tok = load_tokenizer(str(tiny_bert))
    longest = max(min(len(tok(row["text"])["input_ids"]), 32) for row in sentiment_rows)
    assert r["longest_example"] <= longest and m["batch_tokens"] == 8 * r["longest_example"]
    assert m["base"] > 100  # measured in the process: Python, torch and transformers are in
    # the LoRA weights the method really adds (the estimate counts the adapted layers from the config alone)
    from tunesmith.config import load_config
    from tunesmith.methods import apply_method
    from tunesmith.models.load import load_model

    c = load_config(cfg)
    model = apply_method(load_model(str(tiny_bert), "classification", ["negative", "positive"]), c.method, c.task)
    assert r["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_cli_estimate_does_not_fit_exits_1_with_advice(tmp_path, tiny_bert, sentiment_rows, capsys):
    cfg = _config(tmp_path, tiny_bert, sentiment_rows)
    assert run(["estimate", str(cfg), "--memory-mb=50"]) == 1
    out = capsys.readouterr().out
    assert "will NOT fit" in out and "--train.batch_size=" in out and "--train.max_batch_tokens=" in out
    assert "--train.gradient_checkpointing=true" in out


def test_estimate_bad_input_is_a_clear_error(tmp_path, tiny_bert, sentiment_rows):
    cfg = _config(tmp_path, tiny_bert, sentiment_rows)
    with pytest.raises(ConfigError, match="train.batch_size"):  # the CLI prints it as `error: ...`, exit 2
        run(["estimate", str(cfg), "--train.batch_size=0"])
    from tunesmith.tasks.estimate import estimate_config

    with pytest.raises(ConfigError, match="missing.jsonl"):
        estimate_config(cfg, {"data.train": str(tmp_path / "missing.jsonl")})


def test_advice_rows_fit_and_agree_with_the_estimate_they_name(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.models.estimate import peak_memory
    from tunesmith.tasks.estimate import HEADROOM, advise

    shape = _smol_shape(tmp_path)
    config = {"task": "sft", "data": {"train": "x", "max_length": 1024}, "method": {"name": "lora", "r": 16},
              "train": {"batch_size": 16}}
    whole = peak_memory(load_config(config), shape, 1024, "fp32", 700)["peak_mb"]
    free = whole / 2 / HEADROOM  # room for half the peak
    rows = advise(config, {}, shape, 1024, "fp32", 700, free, "cpu")
    by_key = {tuple(sorted(r["overrides"])): r for r in rows}
    smaller = by_key[("train.batch_size", "train.grad_accum")]
    assert smaller["fits"] and smaller["overrides"]["train.batch_size"] * smaller["overrides"]["train.grad_accum"] == 16
    pieces = by_key[("train.max_batch_tokens",)]
    assert pieces["fits"] and pieces["overrides"]["train.max_batch_tokens"] % 1024 == 0
    for r in rows:  # each row's peak is the estimate of the config with its overrides
        cfg = load_config(config, r["overrides"])
        assert r["peak_mb"] == peak_memory(cfg, shape, 1024, "fp32", 700)["peak_mb"] < whole
        assert r["fits"] == (r["peak_mb"] <= HEADROOM * free)
    # a budget of k whole examples: one more would not fit
    k = pieces["overrides"]["train.max_batch_tokens"] // 1024
    over = peak_memory(load_config(config, {"train.max_batch_tokens": (k + 1) * 1024}), shape, 1024, "fp32", 700)
    assert over["peak_mb"] > HEADROOM * free


def test_memory_parts_follow_the_config(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.models.estimate import peak_memory, piece_tokens

    shape = _smol_shape(tmp_path)

    def mem(**kw):
        method = kw.pop("method", {"name": "lora"})
        return peak_memory(load_config({"task": "sft", "data": {"train": "x"}, "method": method, "train": kw}),
                           shape, 512, kw.get("precision", "fp32"), 700)

    lora, full = mem(batch_size=4), mem(batch_size=4, method={"name": "full"})
    assert lora["batch_tokens"] == 2048 and lora["activations"] > 0 and lora["logits"] > 0
    assert full["gradients_optimizer"] > 12 * shape["params"] / 2 ** 20 - 1  # gradient + AdamW's two moments
    assert lora["gradients_optimizer"] < full["gradients_optimizer"] / 50
    assert mem(batch_size=4, gradient_checkpointing=True)["activations"] < lora["activations"] / 2
    assert mem(batch_size=4, max_batch_tokens=1024)["batch_tokens"] == 1024
    assert mem(batch_size=4, precision="bf16")["activations"] < lora["activations"]
    qlora = mem(batch_size=4, method={"name": "qlora"})
    assert qlora["weights"] < lora["weights"] / 2
    assert piece_tokens(16, 512, 2048) == 2048 and piece_tokens(16, 512, 100) == 512 and piece_tokens(3, 10, None) == 30
