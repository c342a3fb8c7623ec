"""Data mixing (issue 23): weighted sources, repeat vs per-epoch sampling, curriculum order,
per-source metrics; every existing form of data.train still loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.data.mixing import epoch_batches, epoch_indices
from tunesmith.errors import ConfigError


def test_every_form_of_data_train_loads(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert [(s.path, s.weight) for s in load_config({"data": {"train": a}}).data.sources()] == [(a, 1.0)]
    assert [s.path for s in load_config({"data": {"train": [a, b]}}).data.sources()] == [a, b]
    mixed = load_config({"data": {"train": [a, {"path": b, "weight": 0.5}]}}).data
    assert [(s.path, s.weight) for s in mixed.sources()] == [(a, 1.0), (b, 0.5)] and mixed.train_name() == f"{a}, {b}"
    # relative paths inside a config file resolve against its folder, in the {path, weight} form too
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2}\n")
    assert [s.path for s in load_config(cfg).data.sources()] == [a, b]
    with pytest.raises(ConfigError, match="weight"):
        load_config({"data": {"train": [{"path": a, "weight": 0}]}})
    with pytest.raises(ConfigError, match="data.order: 'score' needs data.score_column"):
        load_config({"data": {"train": a, "order": "score"}})


def test_shipped_configs_still_load():
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        assert load_config(path).data.sources(), path


def test_repeat_gives_the_same_dose_every_epoch():
    sources = [0] * 10 + [1] * 4
    e0 = epoch_indices(14, sources, [0.5, 2.5], "repeat", seed=1, epoch=0)
    e1 = epoch_indices(14, sources, [0.5, 2.5], "repeat", seed=1, epoch=1)
    assert sorted(e0) == sorted(e1)  # the same half of source 0 each epoch
    assert sum(i < 10 for i in e0) == 5 and len(set(i for i in e0 if i < 10)) == 5
    # 2.5 x 4 rows: every row twice plus two of them a third time
    assert sorted(e0.count(i) for i in range(10, 14)) == [2, 2, 3, 3]
    assert epoch_indices(14, sources, [1.0, 1.0], "repeat", 1, 0) == list(range(14))


def test_sample_draws_afresh_each_epoch():
    sources = [0] * 100 + [1] * 10
    draws = [epoch_indices(110, sources, [0.3, 1.5], "sample", seed=1, epoch=e) for e in range(3)]
    for d in draws:
        assert sum(i < 100 for i in d) == 30 and sum(i >= 100 for i in d) == 15
        assert len({i for i in d if i < 100}) == 30  # without replacement up to the source's size
    assert {i for i in draws[0] if i < 100} != {i for i in draws[1] if i < 100}


def test_curriculum_orders():
    d = load_config({"data": {"train": "x", "order": "short_to_long"}}).data
    lengths = [5, 3, 9, 1, 7, 3]
    batches = epoch_batches(lengths, None, None, d, 2, seed=0, epoch=0, group_by_length=True)
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths) and sorted(flat) == list(range(6))
    d = load_config({"data": {"train": "x", "order": "score", "score_column": "difficulty"}}).data
    scores = [0.9, 0.1, 0.5, 0.3]
    assert [i for b in epoch_batches([1] * 4, None, scores, d, 3, 0, 0, True) for i in b] == [1, 3, 2, 0]


def test_mixed_run_reports_each_source(tmp_path, tiny_bert, sentiment_rows):
    from tunesmith.train import train

    a = write_jsonl(tmp_path / "a.jsonl", sentiment_rows[:100])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(r, difficulty=i % 7) for i, r in enumerate(sentiment_rows[100:160])])
    cfg = {"task": "classification", "model": {"name_or_path": str(tiny_bert)},
           "data": {"train": [str(a), {"path": str(b), "weight": 2.0}], "val_size": 20, "test_size": 32, "max_length": 32},
           "method": {"name": "full"}, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
           "eval": {"samples": ["a great film"]}, "output": {"dir": str(tmp_path / "runs" / "{name}"), "name": "mix"}}
    res = train(cfg)
    per_source = res.after["per_source"]
    assert set(per_source) == {str(a), str(b)} and sum(v["examples"] for v in per_source.values()) == 32
    assert all("accuracy" in v["metrics"] for v in per_source.values())
    assert f"| `{b}` |" in (res.run_dir / "eval_report.md").read_text()
    # 108 training rows; source b (weight 2, repeat) counts twice: one epoch is ceil((108 + b's rows) / 16) steps
    from tunesmith.data import split_with_meta
    from tunesmith.tasks import get_task

    _, _, _, meta = split_with_meta(load_config(cfg), get_task("classification").read)
    n_b = meta["train"].sources.count(1)
    steps = [json.loads(l)["step"] for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(meta["train"].sources) == 108 and max(steps) == -(-(108 + n_b) // 16)
