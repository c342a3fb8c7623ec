"""Adapter lifecycle: many adapters over one base, list/info, combine, merge, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_jsonl
from tunesmith.cli import run
from tunesmith.errors import TunesmithError
from tunesmith.train import train

FACTS = [("what is your name", "alpha beta"), ("who created you", "gamma delta"), ("what city", "seven eight")]
REVIEWS = [("a great lovely film", "positive"), ("an awful boring film", "negative"),
           ("the superb story", "positive"), ("the dull poor plot", "negative")]


def _train_adapter(tmp_path, base, name, rows, method=None):
    data = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": p, "completion": c} for p, c in rows] * 6)
    cfg = {"task": "sft", "model": {"name_or_path": str(base)},
           "data": {"train": str(data), "test": str(data), "val_size": 0},
           "method": method or {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
           "train": {"epochs": 40, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0},
           "eval": {"max_new_tokens": 8, "before": False, "generate_metrics": False},
           "output": {"dir": str(tmp_path / "runs" / "{name}"), "name": name}}
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    """A tiny Llama (hidden 64, init std 0.2) that LoRA can teach a few answers in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    out = tmp_path_factory.mktemp("learner")
    tok = make_tokenizer("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, tie_word_embeddings=True, initializer_range=0.2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, learner):
    tmp = tmp_path_factory.mktemp("adapters")
    return _train_adapter(tmp, learner, "facts", FACTS), _train_adapter(tmp, learner, "reviews", REVIEWS)


def test_two_adapters_share_one_base_and_each_answers_its_task(two_adapters):
    from tunesmith.adapter_set import AdapterSet
    from tunesmith.runs import predict

    facts, reviews = two_adapters
    s = AdapterSet()
    s.add("facts", facts)
    s.add("reviews", reviews)
    assert set(s.model.peft_config) == {"facts", "reviews"}  # one wrapped base holding both adapters
    with pytest.raises(TunesmithError, match="already taken"):
        s.add("facts", facts)

    for _ in range(2):  # switch back and forth: each call uses its own adapter
        got_f = s.predict([q for q, _ in FACTS], adapter="facts")
        got_r = s.predict([t for t, _ in REVIEWS], adapter="reviews")
        # replies start with the trained answer (4 new tokens may run past it)
        assert all(g["output"].strip().startswith(a) for g, (_, a) in zip(got_f, FACTS)), got_f
        assert all(g["output"].strip().startswith(a) for g, (_, a) in zip(got_r, REVIEWS)), got_r
    assert len(s.switch_seconds) == 4 and max(s.switch_seconds) < 0.1
    # the same answers as loading each run on its own
    assert predict(reviews, [t for t, _ in REVIEWS]) == got_r
    with pytest.raises(TunesmithError, match="no adapter named"):
        s.use("nope")


def test_cli_predict_with_several_adapters_and_adapters_list_info(two_adapters, capsys):
    facts, reviews = two_adapters
    assert run(["predict", f"f={facts}", f"r={reviews}", "--adapter", "r", "--text", "a great lovely film", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert rows == [{"adapter": "r", "input": "a great lovely film", "output": rows[0]["output"]}]
    assert rows[0]["output"].strip().startswith("positive")

    assert run(["adapters", "list", str(facts.parent), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(i["run"] for i in listed) == ["facts", "reviews"]
    assert run(["adapters", "info", str(facts)]) == 0
    out = capsys.readouterr().out
    assert "method:      lora" in out and "r:" in out and "q_proj" in out and "mergeable:   yes" in out
    info = next(i for i in listed if i["run"] == "facts")
    # a checkpoint holds only the adapter (+ its optimizer state): far smaller than the model
    assert 0 < info["checkpoint_bytes"] < info["base_model_bytes"]


def test_combine_cat_is_the_weighted_sum_of_updates_and_ties_runs(two_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.adapters import combine
    from tunesmith.runs import load_run, predict

    facts, reviews = two_adapters
    out = combine([facts, reviews], tmp_path / "both", weights=[0.7, 0.3], how="cat")
    base_dir = load_run(facts).cfg.model.name_or_path

    def delta(adapter_dir):
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
        return m.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")

    expected = 0.7 * delta(facts / "adapter") + 0.3 * delta(reviews / "adapter")
    torch.testing.assert_close(delta(out / "adapter"), expected, atol=1e-5, rtol=1e-4)
    assert json.loads((out / "run.json").read_text())["combination"]["how"] == "cat"
    assert len(predict(out, ["what city"])) == 1  # a combined run is a normal run

    ties = combine([facts, reviews], tmp_path / "ties", how="ties", density=0.5)
    assert (ties / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(TunesmithError, match="already exists"):
        combine([facts, reviews], tmp_path / "ties", how="ties")
    with pytest.raises(TunesmithError, match="--how"):
        combine([facts, reviews], tmp_path / "x", how="average")


def test_merge_cli_and_refusals(two_adapters, tmp_path, learner, capsys):
    facts, _ = two_adapters
    assert run(["merge", str(facts), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")) is not None
    with pytest.raises(TunesmithError, match="already exists"):  # never overwrites unasked
        run(["merge", str(facts), "--out", str(tmp_path / "merged")])

    prompt_run = _train_adapter(tmp_path, learner, "soft", FACTS[:1], {"name": "prompt", "num_virtual_tokens": 2})
    from tunesmith.adapters import merge

    with pytest.raises(TunesmithError, match="cannot be merged"):
        merge(prompt_run, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
