"""Property-based fuzzing (issue 25): random and mutated data files and configs never raise
anything but tunesmith's own clear errors, and a run that fails on them leaves no run folder.

hypothesis draws the inputs; each property runs a bounded number of examples (the suite shares
two cores), derandomized so a failure reproduces. Mutations start from valid files of each
format: a byte flipped, a line cut, a field renamed or retyped, invalid UTF-8, NUL bytes.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_tokenizer
from tunesmith.config import load_config
from tunesmith.data.readers import read_records
from tunesmith.errors import TunesmithError
from tunesmith.tasks import get_task

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID = {
    ".jsonl": b'{"text": "a good film", "label": "positive"}\n{"text": "a dull plot", "label": "negative"}\n',
    ".json": b'[{"text": "a good film", "label": "positive"}, {"text": "a dull plot", "label": "negative"}]',
    ".csv": b'text,label\n"a good film",positive\n"a dull plot, sadly",negative\n',
    ".tsv": b"text\tlabel\na good film\tpositive\na dull plot\tnegative\n",
    ".txt": b"In the beginning was the word.\n",
}


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """A valid file with a few random edits: flips, cuts, inserts of awkward bytes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[i: i + draw(st.integers(1, 20))]
        elif kind == "insert":
            data[i:i] = draw(st.sampled_from([b"\x00", b"\xff\xfe", b'"', b",", b"\n", b"{", b"]", b"\t", b"\r",
                                              b'{"a":' * 50, "é😀".encode()]))
        else:
            del data[i:]
    return bytes(data)


def _file(tmp_path: Path, suffix: str, data: bytes) -> Path:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    return path


@FUZZ
@given(suffix=st.sampled_from(sorted(VALID)), data=st.data())
def test_readers_raise_only_tunesmith_errors(tmp_path, suffix, data):
    raw = data.draw(st.one_of(mutated(VALID[suffix]), st.binary(max_size=300)))
    path = _file(tmp_path, suffix, raw)
    try:
        records = read_records(path)
    except TunesmithError as e:
        assert str(path) in str(e)  # the message names the file
        return
    assert all(isinstance(r.fields, dict) for r in records)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer("bert")


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv"]), task=st.sampled_from(["classification", "sft"]),
       data=st.data())
def test_data_pipeline_raises_only_tunesmith_errors(tmp_path, tokenizer, suffix, task, data):
    """read -> detect format -> validate -> split -> tokenise, as `train` and `data check` run it."""
    raw = data.draw(mutated(VALID[suffix]))
    path = _file(tmp_path, suffix, raw)
    cfg = load_config({"task": task, "data": {"train": str(path), "val_size": 0, "test_size": 0, "max_length": 16}})
    try:
        prepared = get_task(task).prepare(cfg, tokenizer)
    except TunesmithError:
        return
    assert len(prepared.splits["train"].features) > 0


CONFIG = {"task": "classification", "model": {"name_or_path": "builtin:all-MiniLM-L6-v2"},
          "data": {"train": "reviews.csv", "val_size": 0.1, "columns": {"text": "review"}},
          "method": {"name": "lora", "r": 8}, "train": {"epochs": 2, "lr": 1e-4, "eval_every": "epoch"},
          "output": {"name": "x"}}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                             st.integers(), max_size=2))


@st.composite
def mutated_config(draw) -> dict:
    tree = json.loads(json.dumps(CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(tree) + ["trian", "eval"]))
        if section not in tree or not isinstance(tree[section], dict) or draw(st.booleans()) is False:
            tree[section] = draw(VALUES) if draw(st.booleans()) else tree.get(section, {})
            continue
        key = draw(st.sampled_from(sorted(tree[section]) + ["lr", "epoch", "batch_size", "name", "r"]))
        tree[section][key] = draw(VALUES)
    return tree


@FUZZ
@given(tree=mutated_config())
def test_config_loader_raises_only_config_errors_for_mutated_configs(tmp_path, tree):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_config(path)
    except TunesmithError as e:
        assert str(path) in str(e) or "config" in str(e)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), mutated(yaml.safe_dump(CONFIG).encode()).map(
    lambda b: b.decode("utf-8", "replace"))))
def test_config_loader_raises_only_config_errors_for_random_yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except TunesmithError:
        pass


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=mutated(b"text,label\n" + b"".join(b'"%s film",%s\n' % ((b"great", b"positive") if i % 2 else
                                                                   (b"dull", b"negative")) for i in range(12))))
def test_a_run_on_a_mutated_file_fails_clearly_or_trains_and_never_leaves_half_a_folder(tmp_path, tiny_bert, raw):
    from tunesmith.train import train

    data = _file(tmp_path, ".csv", raw)
    out = tmp_path / "runs" / uuid.uuid4().hex  # a folder of its own per example
    cfg = {"task": "classification", "model": {"name_or_path": str(tiny_bert)},
           "data": {"train": str(data), "val_size": 0, "test_size": 2, "max_length": 16},
           "method": {"name": "lora", "r": 2, "alpha": 4}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
           "eval": {"before": False, "num_samples": 0}, "output": {"dir": str(out)}}
    try:
        train(cfg)
    except TunesmithError:
        assert not out.exists()  # everything that can fail on input fails before the folder is made
        return
    assert (out / "run.json").is_file()
