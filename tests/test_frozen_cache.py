"""The frozen-bottom cache (train/frozen_cache.py): the same training, without rerunning the frozen blocks."""
import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.methods import apply_method
from tunesmith.models.load import load_model
from tunesmith.train import frozen_cache, train
from tests.conftest import write_jsonl


def _cfg(task, model_dir, data, out, method, cache_gb, val=16, **model):
    return load_config({
        "task": task, "model": {"name_or_path": str(model_dir), **model},
        "data": {"train": str(data), "val_size": val, "test_size": val // 2, **({"chat_template": False} if task == "sft" else {})},
        "method": method,
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0, "frozen_cache_gb": cache_gb},
        "eval": {"before": False, "num_samples": 0, **({"generate_metrics": False} if task == "sft" else {})},
        "output": {"dir": str(out)},
    })


def _run_counting_block_calls(cfg, block_cls, monkeypatch):
    """Train; return the run and the calls of the model's blocks in the second epoch (from the
    first evaluation to the second, which it includes), when every example has been seen once."""
    calls, marks = [0], {}
    real = block_cls.forward
    monkeypatch.setattr(block_cls, "forward", lambda self, *a, **k: calls.__setitem__(0, calls[0] + 1) or real(self, *a, **k))
    on_event = lambda e: marks.setdefault(e["epoch"], calls[0]) if e.get("kind") == "eval" else None  # noqa: E731
    res = train(cfg, on_event=on_event)
    monkeypatch.setattr(block_cls, "forward", real)
    (_, first), (_, second) = sorted(marks.items())
    return res, second - first


def test_head_training_with_cache_equals_without_and_skips_the_blocks(tiny_bert, sentiment_rows, tmp_path, monkeypatch):
    from transformers.models.bert.modeling_bert import BertLayer

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows)
    runs = {gb: _run_counting_block_calls(_cfg("classification", tiny_bert, data, tmp_path / str(gb), {"name": "head"}, gb,
                                               dropout=0.0, attention_dropout=0.0), BertLayer, monkeypatch)
            for gb in (4.0, 0.0)}
    # second epoch: uncached, both blocks run for every batch and the evaluation; cached, never
    assert runs[4.0][1] == 0 and runs[0.0][1] == 2 * (17 + 1)
    (a, _), (b, _) = runs[4.0], runs[0.0]
    ha, hb = ([r["loss"] for r in _history(r.run_dir)] for r in (a, b))
    assert len(ha) == len(hb) > 2
    torch.testing.assert_close(torch.tensor(ha), torch.tensor(hb), rtol=1e-5, atol=1e-6)
    wa, wb = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def _history(run_dir):
    import json
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_lora_on_the_top_block_of_a_causal_lm_with_cache_equals_without(tiny_llama, qa_rows, tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "layers": [1]}
    runs = {gb: _run_counting_block_calls(_cfg("sft", tiny_llama, data, tmp_path / str(gb), method, gb, val=4), LlamaDecoderLayer,
                                          monkeypatch) for gb in (4.0, 0.0)}
    # block 0 is skipped, block 1 (LoRA) still runs: half the block calls of the uncached run
    assert 0 < runs[4.0][1] and 2 * runs[4.0][1] == runs[0.0][1]
    wa, wb = (load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors")) for r, _ in runs.values())
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
    la, lb = (_history(r.run_dir) for r, _ in runs.values())
    torch.testing.assert_close(torch.tensor([r["loss"] for r in la]), torch.tensor([r["loss"] for r in lb]), rtol=1e-5, atol=1e-6)


def _plan(model_dir, task, method, labels=None, **model):
    cfg = load_config({"task": task, "model": {"name_or_path": str(model_dir)}, "data": {"train": "x.jsonl"},
                       "method": method})
    m = apply_method(load_model(str(model_dir), task, labels, **model), cfg.method, task)
    return frozen_cache.plan(m, cfg, [[{"input_ids": [2, 5, 7, 9]}]])


def test_plan_uses_the_cache_only_where_the_bottom_is_frozen_and_deterministic(tiny_bert, tiny_llama):
    fb, why = _plan(tiny_bert, "classification", {"name": "head"}, ["a", "b"], dropout=0.0, attention_dropout=0.0)
    assert fb is not None and fb.k == 2 and "embeddings and blocks 0-1" in why
    fb, why = _plan(tiny_bert, "classification", {"name": "head"}, ["a", "b"])  # BERT's default dropout 0.1
    assert fb is None and "hidden_dropout_prob" in why and "model.dropout" in why
    lora_all = {"name": "lora", "r": 4, "dropout": 0.0}
    assert _plan(tiny_llama, "sft", lora_all)[0] is None  # block 0 trains: nothing below it to keep
    fb, _ = _plan(tiny_llama, "sft", {**lora_all, "layers": [1]})
    assert fb is not None and fb.k == 1
    # trainable embeddings feed the bottom: autograd sees it, whatever the parameters are called
    fb, _ = _plan(tiny_llama, "sft", {"name": "selective", "modules": ["embed_tokens"], "layers": [1]})
    assert fb is None
    assert _plan(tiny_llama, "sft", {"name": "prompt", "num_virtual_tokens": 2})[0] is None
