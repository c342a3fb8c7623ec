import pytest

from tunesmith.config import DataConfig
from tunesmith.data.formats import detect_format, filter_where, infer_labels
from tunesmith.data.readers import Record
from tunesmith.errors import DataError, Location, TunesmithError
from tunesmith.tasks import to_examples


def recs(*rows):
    return [Record(r, Location("f.jsonl", i)) for i, r in enumerate(rows, 1)]


@pytest.mark.parametrize("fields,fmt", [
    ({"text": "x"}, "text"), ({"text": "x", "label": 1}, "classification"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"instruction": "i", "input": "", "output": "o"}, "instruction"),
    ({"messages": []}, "chat"),
])
def test_detect(fields, fmt):
    assert detect_format(fields, DataConfig()) == fmt


def test_detect_unknown_columns_says_how_to_fix():
    with pytest.raises(TunesmithError, match="data.columns"):
        detect_format({"review": "x", "stars": 3}, DataConfig())


def test_column_mapping_and_where():
    cfg = DataConfig(columns={"text": "review", "label": "stars"})
    rows = filter_where(recs({"review": "a", "stars": "1", "src": "x"}, {"review": "b", "stars": "2", "src": "y"}), {"src": "x"})
    fmt, exs = to_examples(rows, "classification", cfg, ["1", "2"])
    assert fmt == "classification" and exs[0].text == "a" and exs[0].label == 0


def test_label_names_and_ids_and_unknown_label():
    cfg = DataConfig()
    _, exs = to_examples(recs({"text": "a", "label": 1}, {"text": "b", "label": "negative"}), "classification", cfg,
                         ["negative", "positive"])
    assert [e.label for e in exs] == [1, 0]
    with pytest.raises(DataError) as e:
        to_examples(recs({"text": "a", "label": "positive"}, {"text": "b", "label": "meh"}, {"text": "", "label": 0}),
                    "classification", cfg, ["negative", "positive"])
    msg = str(e.value)
    assert "f.jsonl:line 2: field 'label': unknown label 'meh'" in msg
    assert "f.jsonl:line 3: field 'text': empty" in msg


def test_integer_labels_inferred_in_numeric_order():
    assert infer_labels(recs({"text": "a", "label": 10}, {"text": "b", "label": 2}), DataConfig()) == ["2", "10"]
    _, exs = to_examples(recs({"text": "a", "label": 10}), "classification", DataConfig(), ["2", "10"])
    assert exs[0].label == 1


def test_template_renders_and_names_missing_field():
    cfg = DataConfig(template={"prompt": "Please answer the following question:\nQ: {question}\nA: ",
                               "completion": "{answer}"})
    _, exs = to_examples(recs({"question": "2+2?", "answer": "4"}), "sft", cfg, None)
    assert exs[0].plain_prompt == "Please answer the following question:\nQ: 2+2?\nA: " and exs[0].completion == "4"
    with pytest.raises(DataError, match="f.jsonl:line 1: field 'question': template references a field"):
        to_examples(recs({"q": "2+2?", "answer": "4"}), "sft", cfg, None)


def test_instruction_alpaca_layout():
    _, exs = to_examples(recs({"instruction": "Add", "input": "2 and 2", "output": "4"}), "sft", DataConfig(), None)
    assert "### Instruction:\nAdd" in exs[0].plain_prompt and "### Input:\n2 and 2" in exs[0].plain_prompt
    assert exs[0].prompt == "Add\n\n2 and 2"


def test_chat_messages_validated():
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_role = {"messages": [{"role": "bot", "content": "hi"}]}
    ends_user = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError) as e:
        to_examples(recs(ok, bad_role, ends_user), "sft", DataConfig(), None)
    msg = str(e.value)
    assert "line 2: field 'messages'" in msg and "line 3: field 'messages': the last message must be the assistant's" in msg


def test_task_format_mismatch():
    with pytest.raises(TunesmithError, match="task 'classification' cannot use"):
        to_examples(recs({"prompt": "p", "completion": "c"}), "classification", DataConfig(), ["a", "b"])


def test_train_may_mix_several_files(tmp_path):
    from tests.conftest import write_jsonl
    from tunesmith.config import load_config
    from tunesmith.tasks import load_examples

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)])
    cfg = load_config({"task": "sft", "data": {"train": [str(a), str(b)], "val_size": 0, "test_size": 0}})
    fmt, _, splits = load_examples(cfg)
    assert fmt == "prompt_completion" and len(splits["train"]) == 10
    assert {e.where.path for e in splits["train"]} == {str(a), str(b)}
