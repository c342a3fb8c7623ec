"""The lm-evaluation-harness bridge (issue 23 §2): a local multiple-choice task over a local JSONL,
run offline on a trained tiny run (base + LoRA adapter). lm-eval's per-choice log-likelihoods are
checked against our own computation on the same trained model, and against the base's (they must
differ: the adapter was applied), and its accuracy against the argmax of ours.

lm-eval is an optional extra for users (`pip install 'tunesmith[lm-eval]'`, ~70 MB, ~30 s);
requirements.txt installs it for the tests, so CI runs them. Where it is missing, the scoring
tests skip, saying so, and the missing-extra error is tested either way (the import is blocked)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import write_jsonl
from tunesmith.cli import run
from tunesmith.errors import TunesmithError

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed: pip install 'tunesmith[lm-eval]' "
                                   "(the bridge's scoring is untested here)")

DOCS = [{"question": "what is your name", "choices": ["alpha beta", "gamma delta", "nine ten"], "answer": 0},
        {"question": "who created you", "choices": ["alpha beta", "gamma delta", "seven eight"], "answer": 1},
        {"question": "what city", "choices": ["nine ten", "seven eight", "alpha beta"], "answer": 1},
        {"question": "what year", "choices": ["gamma delta", "nine ten", "seven eight"], "answer": 1}]


def _task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = write_jsonl(folder / "facts.jsonl", DOCS)
    (folder / "facts.yaml").write_text(f"""task: facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama):
    import yaml

    tmp = tmp_path_factory.mktemp("lm-eval-run")
    rows = [{"prompt": f"Question: {d['question']}\nAnswer:", "completion": " " + d["choices"][d["answer"]]}
            for d in DOCS for _ in range(4)]
    data = write_jsonl(tmp / "train.jsonl", rows)
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "sft", "model": {"name_or_path": str(tiny_llama)},
        "data": {"train": str(data), "val_size": 4, "test_size": 4, "max_length": 32, "chat_template": False},
        "method": {"name": "lora", "r": 8, "target_modules": "all-linear"},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "eval_every": 6},
        "eval": {"before": False, "num_samples": 0, "bootstrap_resamples": 100},
        "track": {"tensorboard": False}, "output": {"dir": str(tmp / "runs" / "{name}"), "name": "qa"}}))
    assert run(["train", str(cfg)]) == 0
    return tmp / "runs" / "qa"


def _loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(continuation | context), split as lm-eval splits it (HFLM._encode_pair: the
    continuation is ' ' + choice, its tokens those of the whole string after the context's)."""
    out = []
    for choice in choices:
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx_ids):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits, -1)
        out.append(sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont)))
    return out


@needs_lm_eval
def test_lm_eval_scores_the_trained_model_on_a_local_task(tmp_path, trained_run, tiny_llama):
    from transformers import AutoModelForCausalLM

    from tunesmith.lm_eval_bridge import lm_eval_run
    from tunesmith.runs import load_run

    result = lm_eval_run(trained_run, _task(tmp_path), log_samples=True)
    samples = sorted(result["samples"]["facts"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS) and result["n-samples"]["facts"]["effective"] == len(DOCS)
    trained = load_run(trained_run)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    hits = 0
    for doc, s in zip(DOCS, samples):
        got = [r[0] for r in s["filtered_resps"]]  # (loglikelihood, is_greedy) per choice
        context = f"Question: {doc['question']}\nAnswer:"
        ours = _loglikelihoods(trained.model, trained.tokenizer, context, doc["choices"])
        assert got == pytest.approx(ours, abs=1e-3), doc
        assert got != pytest.approx(_loglikelihoods(base, trained.tokenizer, context, doc["choices"]), abs=1e-3)
        hits += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert result["results"]["facts"]["acc,none"] == pytest.approx(hits / len(DOCS))


@needs_lm_eval
def test_lm_eval_cli_prints_a_table_and_writes_json(tmp_path, trained_run, capsys):
    tasks = _task(tmp_path)
    out = tmp_path / "lm.json"
    assert run(["eval", str(trained_run), "--lm-eval", str(tasks / "facts.yaml"), "--limit", "2",
                "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| facts | acc |" in table
    saved = json.loads(out.read_text())
    assert saved["n-samples"]["facts"]["effective"] == 2 and 0 <= saved["results"]["facts"]["acc,none"] <= 1
    with pytest.raises(TunesmithError, match=r"--tasks: nope not found in .*it defines: facts"):
        run(["eval", str(trained_run), "--lm-eval", str(tasks), "--tasks", "nope"])
    (tasks / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(TunesmithError, match=r"broken.yaml: not a readable task file"):
        run(["eval", str(trained_run), "--lm-eval", str(tasks / "broken.yaml")])


def test_lm_eval_missing_is_a_clear_install_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(TunesmithError, match=r"install lm-evaluation-harness: pip install 'tunesmith\[lm-eval\]'"):
        run(["eval", str(tmp_path), "--lm-eval", str(tmp_path)])


def test_eval_needs_data_or_lm_eval(tmp_path):
    with pytest.raises(TunesmithError, match="--data FILE .* or --lm-eval TASKS"):
        run(["eval", str(tmp_path)])
    with pytest.raises(TunesmithError, match="--limit only apply with --lm-eval"):
        run(["eval", str(tmp_path), "--data", "x.jsonl", "--limit", "3"])
