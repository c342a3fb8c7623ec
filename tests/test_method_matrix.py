"""Every method x a tiny encoder classifier and a tiny causal LM: trains (loss falls), saves,
loads back to the same predictions, and merges where merging is defined.

Tiny random-init models make this a seconds-per-case matrix; the real-model comparison of the
same methods is bench/methods.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tokenizer, write_jsonl
from tunesmith.adapters import adapter_info, merge
from tunesmith.runs import evaluate, load_run
from tunesmith.train import train

# (method options, learning rate): prompt-learning methods train a few embeddings from scratch
# and need a larger step than LoRA; full fine-tuning a smaller one.
CASES = {
    "lora": ({"r": 4}, 1e-2),
    "rslora": ({"name": "lora", "r": 4, "rslora": True}, 1e-2),
    "lora-pissa": ({"name": "lora", "r": 4, "init": "pissa"}, 1e-2),
    "lora-olora": ({"name": "lora", "r": 4, "init": "olora"}, 1e-2),
    "lora-gaussian": ({"name": "lora", "r": 4, "init": "gaussian"}, 1e-2),
    "dora": ({"r": 4}, 1e-2),
    "qlora": ({"r": 4}, 1e-2),
    "lora-int8": ({"name": "lora", "r": 4, "quantize": "int8"}, 1e-2),
    "loha": ({"r": 4}, 1e-2),
    "lokr": ({"r": 4}, 1e-2),
    "ia3": ({}, 1e-1),
    "prefix": ({"num_virtual_tokens": 4}, 1e-1),
    "prompt": ({"num_virtual_tokens": 4}, 3e-1),  # the prompt-tuning paper's learning rate
    "ptuning": ({"num_virtual_tokens": 4, "encoder_hidden_size": 16}, 1e-1),
    "adapter": ({"adapter_size": 8}, 3e-2),
    "adapter-houlsby": ({"name": "adapter", "adapter_size": 8, "placement": "houlsby"}, 1e-2),
    "bitfit": ({}, 3e-2),
    "selective": ({"modules": ["(?i)norm"], "unfreeze_top_layers": 1}, 1e-2),
    "full": ({}, 3e-3),
    "head": ({}, 5e-2),
}
# Methods that act only at the input or the output (soft prompts, a head, biases) fit a tiny
# random model's training set more slowly than weight updates do; they still must clearly move.
FIT = {"prompt": 0.9, "ptuning": 0.9, "bitfit": 0.9, "head": 0.95}
NOT_FOR = {"llama": {"bitfit", "head"}}  # Llama has no biases; head is classification-only
MERGEABLE = {"lora", "rslora", "lora-pissa", "lora-olora", "lora-gaussian", "dora", "qlora", "lora-int8", "loha", "lokr", "ia3"}


def _method(case: str) -> dict:
    opts, _ = CASES[case]
    return {"name": case, **opts} if "name" not in opts else dict(opts)


def _train(tmp_path, model_dir, kind, case, train_file, test_file):
    _, lr = CASES[case]
    task = "classification" if kind == "bert" else "sft"
    cfg = {"task": task, "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(train_file), "test": str(test_file), "val_size": 0, "max_length": 32},
           "method": _method(case),
           "train": {"epochs": 100, "batch_size": 16, "lr": lr,
                     "warmup_ratio": 0, "log_every": 2, "eval_every": 1000},
           "eval": {"max_new_tokens": 4, "samples": ["a great film"] if kind == "bert" else ["what city"]},
           "output": {"dir": str(tmp_path / "{name}"), "name": case}}
    return train(cfg), cfg


@pytest.fixture(scope="module")
def mixing_models(tmp_path_factory):
    """Tiny BERT and Llama whose random weights mix tokens strongly (init std 0.2, not 0.02).

    With std 0.02 a random BERT's [CLS] vector is almost the same for every input, so methods
    that only act late (a head, biases, prompts) have no signal to learn from; pretrained models
    do mix, and so must these stand-ins.
    """
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    out = {}
    for kind in ("bert", "llama"):
        folder = tmp_path_factory.mktemp(f"mixing-{kind}")
        tok = make_tokenizer(kind)
        torch.manual_seed(0)
        if kind == "bert":
            model = BertForSequenceClassification(BertConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=128, pad_token_id=tok.pad_token_id, initializer_range=0.2)).bert
        else:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True, initializer_range=0.2))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture
def files(tmp_path, sentiment_rows, qa_rows):
    """Small fixed sets each method must be able to fit: the check that its gradients train the model."""
    cls = write_jsonl(tmp_path / "cls.jsonl", sentiment_rows[:16])
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows[::6])
    return {"bert": (cls, cls), "llama": (qa, qa)}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_saves_loads_and_merges(tmp_path, mixing_models, files, kind, case):
    if case in NOT_FOR.get(kind, ()):
        pytest.skip(f"{case} does not apply to {kind} (its error is tested below)")
    model_dir = mixing_models[kind]
    train_file, test_file = files[kind]
    result, _ = _train(tmp_path, model_dir, kind, case, train_file, test_file)
    rd = result.run_dir

    # trains: the loss on the examples it trained on falls well below the untrained model's
    before, after = result.before["metrics"]["loss"], result.after["metrics"]["loss"]
    assert after < FIT.get(case, 0.7) * before, (before, after)
    summary = result.summary
    assert summary["saved_as"] == ("model" if case in ("full", "head", "bitfit", "selective")
                                   else "bottleneck" if case.startswith("adapter") else "adapter")
    assert 0 < summary["param_counts"]["percent"] <= 100

    # saves and loads: the reloaded run scores the test file exactly as training's final evaluation did
    again = evaluate(rd, test_file)
    assert again["metrics"]["loss"] == pytest.approx(result.after["metrics"]["loss"], rel=1e-4, abs=1e-5)

    info = adapter_info(rd)
    assert info["size_bytes"] > 0 and info["mergeable"] == (case in MERGEABLE)
    if case in MERGEABLE:  # merged weights give the unmerged model's logits (on the full-precision base)
        out = merge(rd, tmp_path / "merged")
        _assert_merged_matches(rd, out, kind)


def _assert_merged_matches(rd, merged_dir, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    merged = auto.from_pretrained(str(merged_dir)).eval()
    unmerged = load_run(rd, quantized=False)
    ids = unmerged.tokenizer(["a great superb film", "what city is it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = unmerged.model(**ids).logits
        b = merged(**ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in n or "ia3_" in n or "hada_" in n or "lokr_" in n for n, _ in merged.named_parameters())
