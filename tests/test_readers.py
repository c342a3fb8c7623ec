import json

import pytest

from tunesmith.data.readers import read_records
from tunesmith.errors import DataError, TunesmithError


def test_jsonl_with_line_numbers_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    recs = read_records(p)
    assert [r.fields["text"] for r in recs] == ["a", "b"]
    assert [r.where.line for r in recs] == [1, 3]


def test_malformed_jsonl_names_every_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n[1, 2]\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = str(e.value)
    assert f"{p}:line 2: malformed JSON" in msg and f"{p}:line 3: expected a JSON object" in msg


def test_json_array_and_jsonl_named_json(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert len(read_records(a)) == 2
    b = tmp_path / "b.json"
    b.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert len(read_records(b)) == 2


def test_csv_line_numbers_with_multiline_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"one\ntwo",1\nthree,0\nfour\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    assert f"{p}:line 5: expected 2 columns" in str(e.value)
    p.write_text('text,label\n"one\ntwo",1\nthree,0\n')
    recs = read_records(p)
    assert recs[0].fields == {"text": "one\ntwo", "label": "1"} and [r.where.line for r in recs] == [2, 4]


def test_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "d.parquet")
    recs = read_records(tmp_path / "d.parquet")
    assert recs[1].fields == {"text": "b", "label": 1} and str(recs[1].where).endswith("row 2")
    datasets.Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds")[0].fields == {"prompt": "p", "completion": "c"}


def test_text_file_and_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "b.txt").write_text("second document")
    assert [r.fields["text"] for r in read_records(tmp_path / "docs")] == ["first document", "second document"]
    assert read_records(tmp_path / "docs" / "a.txt")[0].fields == {"text": "first document"}


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(TunesmithError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(TunesmithError, match="empty"):
        read_records(tmp_path / "e.jsonl")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(TunesmithError, match="data.reader"):
        read_records(tmp_path / "x.xyz")
