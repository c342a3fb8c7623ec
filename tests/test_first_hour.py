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
                 f"--output.dir={tmp_path / 'runs' / '{name}'}"]
    proc = _cli(["train", "../project/reviews.yaml", *overrides], cwd=elsewhere)
    ckpts = tmp_path / "runs" / "reviews" / "checkpoints"
    deadline = time.time() + 120
    while not any(ckpts.glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: stopped at step" in err and "--resume" in err
    rd = tmp_path / "runs" / "reviews"
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
