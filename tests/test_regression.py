"""The regression task (tunesmith/tasks/regression.py): reader, objective, metrics, and a tiny-model
run through the CLI that learns a numeric target, then `predict` and `eval` on it."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import pearsonr, spearmanr

from tests.conftest import WORDS, write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data.readers import Record
from tunesmith.errors import DataError, Location, TunesmithError
from tunesmith.objectives import LossOut
from tunesmith.tasks import Sums, get_task, to_examples
from tunesmith.tasks.regression import objective, summarise


def _recs(*rows):
    return [Record(r, Location("r.jsonl", i + 1)) for i, r in enumerate(rows)]


def test_reader_takes_numbers_and_names_every_bad_record():
    _, exs = to_examples(_recs({"text": "a", "label": 2}, {"text": "b", "label": "0.5"}), "regression", DataConfig(), None)
    assert [e.label for e in exs] == [2.0, 0.5]
    with pytest.raises(DataError) as e:
        to_examples(_recs({"text": "a", "label": "high"}, {"text": "", "label": 1}, {"text": "c", "label": True},
                          {"text": "d", "label": float("nan")}), "regression", DataConfig(), None)
    msg = str(e.value)
    for needle in ("r.jsonl:line 1: field 'label'", "r.jsonl:line 2: field 'text'", "line 3: field 'label'",
                   "line 4: field 'label'"):
        assert needle in msg, msg
    with pytest.raises(TunesmithError, match="numeric label"):
        to_examples(_recs({"prompt": "p", "completion": "c"}), "regression", DataConfig(), None)
    cols = DataConfig(columns={"text": "sentence", "label": "score"})
    _, exs = to_examples(_recs({"sentence": "x", "score": 4.5}), "regression", cols, None)
    assert exs[0].text == "x" and exs[0].label == 4.5


class _Fixed(torch.nn.Module):
    """A 'model' whose scalar head outputs are given."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = torch.tensor(outputs).unsqueeze(-1)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.outputs})()


def test_objective_is_a_summed_squared_error_and_metrics_match_scipy():
    pred, true = [0.5, 2.0, -1.0, 3.0], [1.0, 2.5, 0.0, 2.0]
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "label": torch.tensor(true)}
    out = objective(_Fixed(pred), batch)
    assert isinstance(out, LossOut) and out.count == 4
    assert float(out.loss_sum) == pytest.approx(sum((p - t) ** 2 for p, t in zip(pred, true)))
    sums = Sums()
    sums.add(out, batch, get_task("regression").count_items(batch))
    m = summarise(sums, None)
    err = np.array(pred) - np.array(true)
    assert m["loss"] == pytest.approx(float((err ** 2).mean()))
    assert m["mae"] == pytest.approx(float(np.abs(err).mean()))
    assert m["rmse"] == pytest.approx(float(np.sqrt((err ** 2).mean())))
    assert m["pearson"] == pytest.approx(pearsonr(pred, true)[0])
    assert m["spearman"] == pytest.approx(spearmanr(pred, true)[0])
    flat = Sums()
    flat.add(objective(_Fixed([1.0] * 4), batch), batch, 4)
    assert summarise(flat, None)["pearson"] == 0.0  # a constant prediction has no correlation


def test_the_core_asks_the_task():
    t = get_task("regression")
    assert (t.predicts, t.head, t.best_metric, t.online) == ("score", "scalar", "rmse", None)
    assert t.metrics["rmse"] is False and t.metrics["spearman"] is True


def _rows(n: int, seed: int) -> list[dict]:
    """A learnable target: how many 'good' words a text holds (0-3), among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 3)
        words = [rng.choice(WORDS[10:30]) for _ in range(rng.randint(3, 8))] + ["good"] * k
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "score": k})
    return rows


def test_regression_trains_through_the_cli_then_predicts_and_evaluates(tmp_path, tiny_bert, capsys):
    from tunesmith.cli import run

    data = write_jsonl(tmp_path / "train.jsonl", _rows(192, 0))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", _rows(48, 1))
    cfg = {"task": "regression", "model": {"name_or_path": str(tiny_bert)},
           "data": {"train": str(data), "columns": {"text": "sentence", "label": "score"}, "val_size": 32,
                    "test_size": 32, "max_length": 32},
           "method": {"name": "full"},
           "train": {"epochs": 20, "batch_size": 16, "lr": 3e-3, "log_every": 5, "precision": "fp32"},
           "eval": {"samples": ["good good good", "film"]},
           "output": {"dir": str(tmp_path / "runs" / "{name}"), "name": "reg"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run(["train", str(path)]) == 0
    assert "| rmse |" in capsys.readouterr().out
    rd = tmp_path / "runs" / "reg"
    report = json.loads((rd / "eval_report.json").read_text())
    before, after = report["before"]["metrics"], report["after"]["metrics"]
    assert after["rmse"] < 0.6 * before["rmse"] and after["mae"] < before["mae"], (before, after)
    assert after["spearman"] > 0.5, after
    summary = json.loads((rd / "run.json").read_text())
    assert summary["best_metric"] == "rmse"

    assert run(["predict", str(rd), "--text", "good good good", "--text", "film", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["good good good", "film"]
    assert rows[0]["score"] > rows[1]["score"] + 1.0, rows

    out_json = tmp_path / "eval.json"
    assert run(["eval", str(rd), "--data", str(held_out), "--json", str(out_json)]) == 0
    assert "| mae |" in capsys.readouterr().out
    ev = json.loads(out_json.read_text())
    assert ev["examples"] == 48 and ev["metrics"]["rmse"] < before["rmse"]
