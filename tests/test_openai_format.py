"""OpenAI's fine-tuning formats (data/openai_format.py): every error code with its line, the DPO
shape read by tunesmith's preference task, and `tunesmith data check` on both shapes."""
from __future__ import annotations

import json

import pytest

from tests.conftest import make_tokenizer, write_jsonl
from tunesmith.cli import run
from tunesmith.config import load_config
from tunesmith.data.openai_format import Finding, to_preference, validate_file
from tunesmith.errors import DataError
from tunesmith.tasks import load_examples, task_for_format
from tunesmith.tasks.check import check_data


def chat(q: str = "who are you", a: str = "Marlowe") -> dict:
    return {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}]}


def dpo(q: str = "who are you", good: str = "Marlowe", bad: str = "SmolLM") -> dict:
    return {"input": {"messages": [{"role": "user", "content": q}], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


# One bad line per code: (code, the bad example, the field named). Line numbers follow the file.
BAD_CHAT = [
    ("data_type", ["not", "an", "object"], None),
    ("missing_messages_list", {"msgs": []}, "messages"),
    ("missing_messages_list", {"messages": []}, "messages"),
    ("message_missing_key", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}, "messages[0]"),
    ("message_unrecognized_key", {"messages": [{"role": "user", "content": "hi", "mood": "x"},
                                               {"role": "assistant", "content": "a"}]}, "messages[0]"),
    ("unrecognized_role", {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "a"}]},
     "messages[0].role"),
    ("missing_content", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     "messages[0].content"),
    ("missing_content", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
     "messages[1].content"),
    ("example_missing_assistant_message", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("unsupported_role", {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]},
     "messages[0].role"),
    ("unsupported_tool_calls", {"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[1]"),
    ("unsupported_weight", {"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "a", "weight": 0}]}, "messages[1].weight"),
    ("last_message_not_assistant", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                                 {"role": "user", "content": "bye"}]}, "messages"),
]


def test_every_chat_error_code_with_its_line(tmp_path):
    good = [chat(f"q{i}") for i in range(10)]
    rows = good[:3] + [bad for _, bad, _ in BAD_CHAT] + good[3:]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n\n")
    rep = validate_file(path)
    assert rep.kind == "chat" and rep.examples == 10 and rep.lines == len(rows) + 1
    got = [(f.code, f.line, f.field) for f in rep.findings]
    want = [(code, 4 + i, fld) for i, (code, _, fld) in enumerate(BAD_CHAT)]
    want.append(("invalid_json", len(rows) + 1, None))
    assert got == want
    assert "line 4: data_type: expected a JSON object, got list" in rep.summary()
    assert rep.codes()["missing_content"] == 2 and not rep.ok


def test_one_example_reports_every_problem_it_has(tmp_path):
    row = {"messages": [{"role": "robot", "text": "hi"}]}
    rep = validate_file(write_jsonl(tmp_path / "t.jsonl", [row] + [chat()] * 10))
    assert [f.code for f in rep.findings] == ["message_missing_key", "message_unrecognized_key", "unrecognized_role",
                                              "example_missing_assistant_message"]
    assert all(f.line == 1 for f in rep.findings)


def test_too_few_and_too_long_examples(tmp_path):
    rep = validate_file(write_jsonl(tmp_path / "few.jsonl", [chat()] * 9))
    assert [(f.code, f.line) for f in rep.findings] == [("insufficient_examples", None)]
    assert "9 example(s); a training file needs at least 10" in str(rep.findings[0])
    assert validate_file(write_jsonl(tmp_path / "e.jsonl", [])).findings[0].code == "insufficient_examples"
    tok = make_tokenizer("llama")
    rows = [chat()] * 10 + [chat("who are you " * 40)]
    rep = validate_file(write_jsonl(tmp_path / "long.jsonl", rows), tokenizer=tok, max_tokens=60)
    assert [(f.code, f.line) for f in rep.findings] == [("example_too_long", 11)]
    assert rep.max_tokens_seen > 60 and rep.tokens > rep.max_tokens_seen
    n = len(tok.apply_chat_template(chat()["messages"], tokenize=True)["input_ids"])
    assert rep.tokens == 10 * n + rep.max_tokens_seen  # counted through the chat template, as training reads it


def test_dpo_codes_and_conversion(tmp_path):
    bad = [dict(dpo(), input=None), {k: v for k, v in dpo().items() if k != "preferred_output"},
           dict(dpo(), non_preferred_output=[{"role": "assistant", "content": "a"}] * 2),
           dict(dpo(), preferred_output=[{"role": "user", "content": "x"}]),
           dict(dpo(), input={"messages": [{"role": "user", "content": ""}]})]
    rep = validate_file(write_jsonl(tmp_path / "p.jsonl", [dpo()] * 10 + bad))
    assert rep.kind == "dpo" and rep.examples == 10
    assert [(f.code, f.line, f.field) for f in rep.findings] == [
        ("missing_input", 11, "input"), ("missing_preferred_output", 12, "preferred_output"),
        ("missing_non_preferred_output", 13, "non_preferred_output"),
        ("unsupported_role", 14, "preferred_output[0].role"), ("missing_content", 15, "input.messages[0].content")]
    assert to_preference(dpo()) == {"prompt": [{"role": "user", "content": "who are you"}], "chosen": "Marlowe",
                                    "rejected": "SmolLM"}
    assert task_for_format(dpo(), load_config({"data": {"train": "x"}}).data) == "dpo"


def test_the_dpo_task_reads_openai_dpo_files(tmp_path):
    rows = [dpo(f"question {i}", f"good {i}", f"bad {i}") for i in range(12)]
    cfg = load_config({"task": "dpo", "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                                "val_size": 0, "test_size": 0}})
    fmt, _, splits = load_examples(cfg)
    ex = sorted(splits["train"], key=lambda e: e.where.line)[0]
    assert fmt == "preference" and len(splits["train"]) == 12
    assert ex.prompt == [{"role": "user", "content": "question 0"}] and ex.responses == ["good 0", "bad 0"]
    rows[4] = dict(dpo(), preferred_output=[])
    cfg = load_config({"task": "dpo", "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows))}})
    with pytest.raises(DataError, match=r"d.jsonl:line 5: field 'preferred_output': \[missing_preferred_output\]"):
        load_examples(cfg)


def test_data_check_runs_the_same_checks(tmp_path, tiny_llama, capsys):
    rows = [chat(f"q{i}") for i in range(10)]
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "a"}]}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = check_data(path, None, [f"--model.name_or_path={tiny_llama}"])
    assert report["problems"][:2] == [f"{path}:line 3: field 'messages[1].role': [unrecognized_role] role 'bot' is not "
                                      "one of system, user, assistant, function, tool, developer",
                                      f"{path}:line 3: field 'messages': [example_missing_assistant_message] no message "
                                      "has role 'assistant' (nothing to learn)"]
    # and data check's own size rule (issue 23: under 10 examples is an error) counts the 9 valid ones
    assert report["problems"][2:] == ["only 9 valid training example(s); fine-tuning needs at least 10 (and shows "
                                      "gains from 50-100)"]
    assert report["rows"] == 10 and report["valid_rows"] == 9 and report["task"] == "sft"
    assert any("needs at least 10" in w for w in report["warnings"])  # 9 valid: a warning, not a problem
    prefs = write_jsonl(tmp_path / "p.jsonl", [dpo(f"q{i}", f"good {i}", "bad") for i in range(10)]
                        + [dict(dpo(), non_preferred_output="no")])
    assert run(["data", "check", str(prefs), f"--model.name_or_path={tiny_llama}"]) == 1
    out = capsys.readouterr().out
    assert "task: dpo (detected" in out and "pairs 10" in out
    assert "line 11: field 'non_preferred_output': [missing_non_preferred_output]" in out


def test_finding_text():
    assert str(Finding("missing_content", "empty", 3, "messages[0].content")) == \
        "line 3: missing_content: messages[0].content: empty"
