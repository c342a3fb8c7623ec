"""The real CLI end to end on tiny models built from config: files, formats, improvement, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tunesmith.cli import run


def _config(tmp_path: Path, **sections) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(sections))
    return p


# A random-init tiny model needs more steps than a pretrained one; at ~50 steps/s that is cheap.
LR = {"lora": 3e-3, "head": 1e-2, "full": 3e-3, "adapter": 3e-3}
METHOD_OPTIONS = {"lora": {"name": "lora", "r": 8, "target_modules": "all-linear"}, "full": {"name": "full"},
                  "head": {"name": "head", "unfreeze_top_layers": 1}, "adapter": {"name": "adapter"}}


def _cls_config(tmp_path, tiny_bert, data, method, **train):
    return _config(tmp_path, task="classification", model={"name_or_path": str(tiny_bert)},
                   data={"train": str(data), "val_size": 32, "test_size": 32, "max_length": 32},
                   method=METHOD_OPTIONS[method],
                   train={"epochs": 25, "batch_size": 16, "lr": LR[method], "log_every": 5, **train},
                   eval={"samples": ["a great film", "an awful film"]},
                   output={"dir": str(tmp_path / "runs" / "{name}"), "name": method})


@pytest.mark.parametrize("method", ["lora", "full", "head"])
def test_classification_methods_train_save_and_improve(tmp_path, tiny_bert, sentiment_rows, method, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows)
    assert run(["train", str(_cls_config(tmp_path, tiny_bert, data, method))]) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "| accuracy |" in out
    rd = tmp_path / "runs" / method
    for f in ("config.yaml", "metrics.jsonl", "eval_report.json", "eval_report.md", "curves.png", "run.json"):
        assert (rd / f).is_file(), f
    report = json.loads((rd / "eval_report.json").read_text())
    after = report["after"]["metrics"]
    # A random-init tiny model's held-out accuracy is too noisy to assert on (real-model tests
    # check that); what must hold for every method is that training fits the training data.
    losses = [json.loads(l)["loss"] for l in (rd / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(after["per_class"]) == {"negative", "positive"} and len(after["confusion_matrix"]) == 2
    assert len(report["after"]["samples"]) == 2 == len(report["before"]["samples"])
    summary = json.loads((rd / "run.json").read_text())
    pct = summary["param_counts"]["percent"]
    assert (pct == 100.0) if method == "full" else (0 < pct < 50)

    if method == "lora":  # a standard peft adapter, loadable without tunesmith
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
        model = PeftModel.from_pretrained(base, str(rd / "adapter"))
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(rd / "model"))
        assert model.config.id2label == {0: "negative", 1: "positive"}

    # predict and eval from the CLI on the finished run
    assert run(["predict", str(rd), "--text", "a great superb film", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pred["label"] in {"negative", "positive"} and 0.5 <= pred["probability"] <= 1
    assert run(["eval", str(rd), "--data", str(data), "--json", str(tmp_path / "ev.json")]) == 0
    assert 0 <= json.loads((tmp_path / "ev.json").read_text())["metrics"]["accuracy"] <= 1


def test_sft_chat_lora_and_generation(tmp_path, tiny_llama, qa_rows, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in qa_rows[::6]])
    cfg = _config(tmp_path, task="sft", model={"name_or_path": str(tiny_llama)},
                  data={"train": str(data), "test": str(test), "val_size": 0},
                  method={"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                  train={"epochs": 40, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0},
                  eval={"max_new_tokens": 6},
                  output={"dir": str(tmp_path / "runs" / "{name}"), "name": "sft"})
    assert run(["train", str(cfg)]) == 0
    rd = tmp_path / "runs" / "sft"
    report = json.loads((rd / "eval_report.json").read_text())
    b, a = report["before"]["metrics"], report["after"]["metrics"]
    assert a["loss"] < b["loss"] * 0.7 and a["contains"] >= b["contains"]
    assert {"exact_match", "contains", "perplexity", "token_accuracy"} <= set(a)
    assert json.loads((rd / "run.json").read_text())["chat_template"] is True
    # issue 23: answers scored against references, and the forgetting probe, each with a paired test
    assert {"rouge_l", "chrf", "forgetting_perplexity", "general_qa_accuracy"} <= set(a)
    stats = report["stats"]["metrics"]
    assert stats["general_qa_accuracy"]["test"].startswith("McNemar") and stats["contains"]["test"].startswith("McNemar")
    assert {stats[m]["test"] for m in ("forgetting_perplexity", "rouge_l", "chrf", "perplexity")} == {"paired bootstrap"}
    lo, hi = stats["perplexity"]["after_ci"]
    assert lo <= a["perplexity"] <= hi and stats["perplexity"]["change"] < 0
    md = (rd / "eval_report.md").read_text()
    assert "## Forgetting" in md and "What is the capital of France?" in md and "rouge_l" in md

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(rd / "adapter"))
    assert run(["predict", str(rd), "--text", "who created you", "--max-new-tokens", "4"]) == 0
    assert ">>> who created you" in capsys.readouterr().out


def test_cpt_packing_lowers_perplexity(tmp_path, tiny_llama):
    docs = [{"text": "alpha beta gamma delta one two three four five six seven eight nine ten"} for _ in range(40)]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = _config(tmp_path, task="cpt", model={"name_or_path": str(tiny_llama)},
                  data={"train": str(data), "val_size": 4, "test_size": 4, "max_length": 64},
                  method={"name": "full"}, train={"epochs": 4, "batch_size": 4, "lr": 3e-3},
                  eval={"max_new_tokens": 5, "num_samples": 1},
                  output={"dir": str(tmp_path / "runs" / "{name}"), "name": "cpt"})
    assert run(["train", str(cfg)]) == 0
    report = json.loads((tmp_path / "runs" / "cpt" / "eval_report.json").read_text())
    assert report["after"]["metrics"]["perplexity"] < report["before"]["metrics"]["perplexity"] / 2


def test_early_stopping_and_keep_best(tmp_path, tiny_bert, sentiment_rows):
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows)
    cfg = _cls_config(tmp_path, tiny_bert, data, "full", epochs=40, early_stopping_patience=2, metric="loss",
                      eval_every=2)
    res = train(cfg)
    evals = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert res.summary["stopped_early"] and evals[-1]["early_stop"]
    assert res.summary["best_value"] == min(e["loss"] for e in evals)
    assert (res.run_dir / "checkpoints" / "best" / "weights.pt").is_file()


@pytest.mark.parametrize("problem,expect", [
    # relative paths resolve against the config's folder, and the error shows the path it tried
    ({"model": {"name_or_path": "./no/such/model"}}, "model path does not exist: {tmp}/no/such/model"),
    ({"data": {"train": "missing.jsonl"}}, "data file not found: {tmp}/missing.jsonl"),
    ({"data": {"template": {"prompt": "Q: {question}"}}}, "field 'question': template references"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_llama, qa_rows, problem, expect, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    base = {"task": "sft", "model": {"name_or_path": str(tiny_llama)}, "data": {"train": "qa.jsonl"},
            "output": {"dir": "runs/{name}"}}
    for section, values in problem.items():
        base[section] = {**base[section], **values}
    cfg = _config(tmp_path, **base)
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert expect.format(tmp=tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_data_lines_are_named(tmp_path, tiny_bert):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine", "label": "positive"}\n{"text": "x", "label": "neutral"}\n{"text": "y"}\n')
    cfg = _config(tmp_path, model={"name_or_path": str(tiny_bert)}, data={"train": str(p), "labels": ["negative", "positive"]},
                  output={"dir": str(tmp_path / "runs")})
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{p}:line 2: field 'label': unknown label 'neutral'" in proc.stderr
    assert f"{p}:line 3: field 'label': missing" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, tiny_bert, sentiment_rows):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows)
    (tmp_path / "runs" / "lora").mkdir(parents=True)
    (tmp_path / "runs" / "lora" / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train",
                           str(_cls_config(tmp_path, tiny_bert, data, "lora"))], capture_output=True, text=True)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp_path / "runs" / "lora" / "keep.txt").read_text() == "mine"


def test_data_check_cli(tmp_path, tiny_llama, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "who are you", "completion": "alpha " * 40}, {"prompt": "x"}])
    code = run(["data", "check", str(p), "--task=sft", f"--model.name_or_path={tiny_llama}", "--data.max_length=16"])
    out = capsys.readouterr().out
    assert code == 1
    assert "rows: 2 read, 1 valid" in out and "format: prompt_completion" in out
    assert "line 2: field 'completion': missing" in out and "1 example(s) cut" in out


def test_config_doc_cli(capsys):
    assert run(["config", "--doc"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = None" in out and "5e-5 for method full" in out  # method-aware default (issue 27)


def test_eval_base_model_cli(tmp_path, tiny_llama, qa_rows, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows[:8])
    out_json = tmp_path / "ev.json"
    assert run(["eval", str(tiny_llama), "--data", str(data), "--task=sft", "--eval.max_new_tokens=3",
                "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "Evaluated 8 examples." in out and "| perplexity |" in out and "| contains |" in out
    result = json.loads(out_json.read_text())
    assert result["metrics"]["tokens"] > 0 and len(result["generations"]) == 8


def test_a_finished_run_is_a_base_for_the_next(tmp_path, tiny_bert, sentiment_rows):
    """LP-FT as two runs: the head (and top block) first, then LoRA from the model that run saved.
    The second run must start from the first one's weights, head included: its 'before'
    evaluation is the first run's 'after' on the same held-out split."""
    from tunesmith.errors import TunesmithError
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows)
    first = train(_cls_config(tmp_path, tiny_bert, data, "head", epochs=5))
    second = train(_cls_config(tmp_path, tiny_bert, data, "lora", epochs=1),
                   [f"--model.name_or_path={first.run_dir}", "--output.name=second"])
    assert second.before["metrics"]["loss"] == pytest.approx(first.after["metrics"]["loss"], abs=1e-6)
    assert second.before["metrics"]["accuracy"] == first.after["metrics"]["accuracy"]
    # A LoRA run as a base: merged once into RUN/merged, and the third run starts from the second's weights.
    third = train(_cls_config(tmp_path, tiny_bert, data, "lora", epochs=1),
                  [f"--model.name_or_path={second.run_dir}", "--output.name=third"])
    assert (second.run_dir / "merged" / "config.json").is_file()
    assert third.before["metrics"]["loss"] == pytest.approx(second.after["metrics"]["loss"], abs=1e-5)
    bottleneck = train(_cls_config(tmp_path, tiny_bert, data, "adapter", epochs=1))
    with pytest.raises(TunesmithError, match="Prompt-learning and bottleneck adapters cannot be merged"):
        train(_cls_config(tmp_path, tiny_bert, data, "lora", epochs=1),
              [f"--model.name_or_path={bottleneck.run_dir}", "--output.name=fourth"])
