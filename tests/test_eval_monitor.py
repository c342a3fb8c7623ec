"""The evaluation report's intervals and calibration, `tunesmith compare` and `tunesmith monitor`,
end to end on a tiny classifier built from config (issue 23, sections 2 and 4)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import WORDS, write_jsonl
from tunesmith.cli import run
from tunesmith.errors import TunesmithError

POS, NEG, FILLER = ["good", "great", "superb", "lovely"], ["bad", "awful", "boring", "dull"], WORDS[10:30]


def _reviews(n: int, seed: int) -> list[dict]:
    """The conftest sentiment task: the label is whether a positive or a negative word appears."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randrange(len(words)), rng.choice(POS if i % 2 else NEG))
        rows.append({"text": " ".join(words), "label": "positive" if i % 2 else "negative"})
    return rows


def _train(root: Path, tiny_bert: Path, data: Path, method: dict, name: str, epochs: int = 8) -> Path:
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "classification", "model": {"name_or_path": str(tiny_bert)},
        "data": {"train": str(data), "val_size": 32, "test_size": 80, "max_length": 32},
        "method": method, "train": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "log_every": 10},
        "eval": {"bootstrap_resamples": 300}, "output": {"dir": str(root / "runs" / "{name}"), "name": name}}))
    assert run(["train", str(cfg)]) == 0
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalmon")
    data = write_jsonl(root / "train.jsonl", _reviews(240, 1))
    return {"data": data, "root": root,
            "lora": _train(root, tiny_bert, data, {"name": "lora", "r": 8, "target_modules": "all-linear"}, "lora"),
            "head": _train(root, tiny_bert, data, {"name": "head"}, "head", epochs=3)}


def test_report_shows_intervals_tests_and_calibration(runs):
    rd = runs["lora"]
    report = json.loads((rd / "eval_report.json").read_text())
    after, stats = report["after"], report["stats"]["metrics"]
    # the per-example rows reproduce the metrics the task computed (scikit-learn), in the same units
    group = after["rows"][0]
    assert group["name"] == "eval" and len(group["keys"]) == after["examples"] == 80
    assert np.mean(group["columns"]["correct"]) == pytest.approx(after["metrics"]["accuracy"])
    for m in ("accuracy", "f1_macro", "ece"):
        row = stats[m]
        assert row["after"] == pytest.approx(after["metrics"][m])
        assert row["change_ci"][0] <= row["change"] <= row["change_ci"][1]
        if m == "ece":  # a percentile interval of |gap| need not hold the estimate: with every example in one
            # bin (the untrained base here), the smallest resampled ECE is the estimate itself give or take the
            # confidences' spread, so the interval's low end can sit a hair above it (seen: 1e-8). It is ordered.
            assert row["before_ci"][0] <= row["before_ci"][1] and row["after_ci"][0] <= row["after_ci"][1]
            continue
        assert row["after_ci"][0] <= row["after"] <= row["after_ci"][1]
        assert row["before_ci"][0] <= row["before"] <= row["before_ci"][1]
    assert stats["accuracy"]["test"].startswith("McNemar") and stats["f1_macro"]["test"] == "paired bootstrap"
    # the significance verdict follows from the p-value and agrees with the interval of the change
    acc = stats["accuracy"]
    assert acc["significant"] == (acc["p"] < 0.05)
    assert sum(b["count"] for b in after["metrics"]["calibration"]) == 80 and len(after["metrics"]["calibration"]) == 15
    md = (rd / "eval_report.md").read_text()
    assert "before [95% CI]" in md and "McNemar mid-p" in md and "## Calibration" in md and "ECE" in md
    assert f"{acc['after']:.4f} [{acc['after_ci'][0]:.4f}, {acc['after_ci'][1]:.4f}]" in md
    for png in ("reliability.png", "confusion.png"):
        assert (rd / png).stat().st_size > 5000, png
    # the model card (run folder and adapter): Hugging Face metadata with the results as model-index
    card = (rd / "README.md").read_text()
    assert card == (rd / "adapter" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["datasets"] == [str(runs["data"])]
    assert front["pipeline_tag"] == "text-classification"
    metrics = {m["type"]: m for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"]["value"] == round(acc["after"], 4) and "95% CI" in metrics["accuracy"]["name"]
    for section in ("## Data", "## Results on the held-out test split", "## Intended use and limits", "## Training",
                    "learning rate: 0.003", "McNemar mid-p"):
        assert section in card, section


def test_compare_runs_paired_and_unpaired(runs, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert run(["compare", str(runs["lora"]), str(runs["head"]), "--json", str(out), "--resamples", "300"]) == 0
    text = capsys.readouterr().out
    assert "| metric | lora | head |" in text and "**head vs lora**" in text and "McNemar" in text
    c = json.loads(out.read_text())
    assert c["vs_first"]["head"]["accuracy"]["paired"] and not c["unpaired"]["head"]
    a, b = c["metrics"]["lora"]["accuracy"]["value"], c["metrics"]["head"]["accuracy"]["value"]
    assert c["vs_first"]["head"]["accuracy"]["change"] == pytest.approx(b - a)

    # the same run evaluated on other data: not paired, and the table says so
    other = write_jsonl(tmp_path / "other.jsonl", _reviews(90, 7))
    ev = tmp_path / "ev.json"
    assert run(["eval", str(runs["lora"]), "--data", str(other), "--json", str(ev)]) == 0
    assert "accuracy | " in capsys.readouterr().out
    assert run(["compare", str(runs["lora"]), str(ev), "--resamples", "200"]) == 0
    text = capsys.readouterr().out
    assert "Not paired (eval)" in text and "unpaired bootstrap" in text


def test_compare_bad_input_names_the_file_and_line(runs, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "metrics": {},\n  "rows": [,]\n}\n')
    out = tmp_path / "never.json"
    with pytest.raises(TunesmithError, match=r"bad\.json:3: invalid JSON"):
        run(["compare", str(runs["lora"]), str(bad), "--json", str(out)])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"metrics": {"accuracy": 0.5}, "examples": 3}))
    with pytest.raises(TunesmithError, match=r"old\.json: no per-example scores \('rows'\)"):
        run(["compare", str(runs["lora"]), str(old)])
    broken = tmp_path / "broken.json"
    rep = json.loads((runs["head"] / "eval_report.json").read_text())
    rep["after"]["rows"][0]["columns"]["correct"].pop()
    broken.write_text(json.dumps(rep))
    with pytest.raises(TunesmithError, match=r"broken\.json: after\.rows\[0\]\.columns\.correct: 79 values for 80 keys"):
        run(["compare", str(runs["lora"]), str(broken)])
    with pytest.raises(TunesmithError, match="eval_report.json: not found"):
        run(["compare", str(runs["lora"]), str(tmp_path)])
    assert not out.exists()


def test_monitor_flags_off_topic_inputs_and_not_clean_ones(runs, tmp_path, capsys):
    clean = tmp_path / "clean.txt"
    clean.write_text("\n".join(r["text"] for r in _reviews(120, 11)) + "\n")
    assert run(["monitor", str(runs["lora"]), "--data", str(clean), "--window", "60", "--reference", "80",
                "--out", str(tmp_path / "m1")]) == 0
    rep = json.loads((tmp_path / "m1" / "report.json").read_text())
    assert not rep["drift"] and len(rep["windows"]) == 2 and rep["predictions"] == "computed by the run"
    assert {"embedding", "length", "vocabulary", "predicted_label", "probability"} == set(rep["windows"][0]["tests"])
    assert (tmp_path / "m1" / "drift.png").stat().st_size > 5000
    assert "no drift detected in 2 windows" in capsys.readouterr().out

    # the second window turns to verses: long, in words the reviews never used
    rng = random.Random(3)
    bible = ["thee thou hath unto lord spake verily begat", "and it came to pass in those days"]
    lines = [r["text"] for r in _reviews(60, 12)] + [" ".join(rng.choice(bible).split() * 3) for _ in range(60)]
    drifted = tmp_path / "drifted.txt"
    drifted.write_text("\n".join(lines) + "\n")
    assert run(["monitor", str(runs["lora"]), "--data", str(drifted), "--window", "60", "--reference", "80",
                "--out", str(tmp_path / "m2")]) == 1  # exit 1: drift
    rep = json.loads((tmp_path / "m2" / "report.json").read_text())
    assert [w["drift"] for w in rep["windows"]] == [False, True]
    assert {"embedding", "length", "vocabulary"} <= set(rep["windows"][1]["fired"])
    md = (tmp_path / "m2" / "report.md").read_text()
    assert "drift in 1 of 2 windows (first: window 1)" in md and "commonest unseen: " in md
    assert {"thee", "hath", "came"} & set(rep["windows"][1]["tests"]["vocabulary"]["top_unseen"])


def test_monitor_reads_logged_predictions_and_rejects_bad_lines(runs, tmp_path):
    from tunesmith.runs import predict

    texts = [r["text"] for r in _reviews(40, 21)]
    logged = write_jsonl(tmp_path / "log.jsonl", predict(runs["lora"], texts))  # as `predict --json` prints them
    assert run(["monitor", str(runs["lora"]), "--data", str(logged), "--window", "40", "--reference", "80",
                "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "report.json").read_text())["predictions"] == "logged in the file"

    rows = predict(runs["lora"], texts[:5])
    del rows[2]["probability"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TunesmithError, match=r"bad\.jsonl:line 3: prediction fields \['label'\] differ"):
        run(["monitor", str(runs["lora"]), "--data", str(bad), "--out", str(tmp_path / "never")])
    short = tmp_path / "short.txt"
    short.write_text("a good film\n" * 5)
    with pytest.raises(TunesmithError, match=r"short\.txt: 5 inputs; a drift test needs at least 20"):
        run(["monitor", str(runs["lora"]), "--data", str(short), "--out", str(tmp_path / "never")])
    with pytest.raises(TunesmithError, match="--window: at least 20"):
        run(["monitor", str(runs["lora"]), "--data", str(short), "--window", "5", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_static_embeddings_are_the_mean_of_the_token_rows(runs):
    from tunesmith.monitor import static_embeddings
    from tunesmith.runs import load_run

    loaded = load_run(runs["head"])
    emb = static_embeddings(loaded, ["a good film", "awful"])
    table = loaded.model.get_input_embeddings().weight.detach().numpy()
    ids = loaded.tokenizer("a good film", add_special_tokens=False)["input_ids"]
    assert emb[0] == pytest.approx(table[ids].mean(0), abs=1e-5)
    # a text far longer than max_length (cut by characters first): the same kept tokens
    long_text = " ".join(_reviews(60, 5)[i]["text"] for i in range(60))
    for side in ("left", "right"):
        loaded.cfg.data.truncation_side = side
        loaded.tokenizer.truncation_side = side
        full = loaded.tokenizer(long_text, truncation=True, max_length=loaded.cfg.data.max_length,
                                add_special_tokens=False)["input_ids"]
        assert len(long_text) > 16 * loaded.cfg.data.max_length
        assert static_embeddings(loaded, [long_text])[0] == pytest.approx(table[full].mean(0), abs=1e-5)


def test_monitor_reads_the_servers_request_log(runs, tmp_path):
    """A real `tunesmith serve --request-log` process classifies clean reviews, then off-topic verses;
    `tunesmith monitor --request-log` finds the drift in the second window only, from the served
    predictions (equal to `tunesmith predict`'s)."""
    pytest.importorskip("fastapi")
    import urllib.request

    from tests.conftest import ServerProcess
    from tunesmith.runs import predict

    log = tmp_path / "requests.jsonl"
    srv = ServerProcess([f"sent={runs['lora']}", "--request-log", str(log), "--precision", "fp32"],
                        tmp_path / "server.log", threads=1)
    rng = random.Random(5)
    bible = ["thee thou hath unto lord spake verily begat", "and it came to pass in those days"]
    clean = [r["text"] for r in _reviews(40, 31)]
    verses = [" ".join(rng.choice(bible).split() * 3) for _ in range(40)]
    try:
        for i in range(0, 80, 10):  # 8 requests of 10 inputs
            body = json.dumps({"model": "sent", "input": (clean + verses)[i:i + 10]}).encode()
            req = urllib.request.Request(srv.url + "/classify", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200
    finally:
        srv.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 80 and log.read_text().endswith("\n")
    assert {x["model"] for x in lines} == {"sent"} and {x["endpoint"] for x in lines} == {"/classify"}
    want = predict(runs["lora"], clean[:10])
    assert [(x["input"], x["label"]) for x in lines[:10]] == [(w["input"], w["label"]) for w in want]
    assert all(abs(x["probability"] - w["probability"]) < 1e-3 for x, w in zip(lines, want))

    assert run(["monitor", str(runs["lora"]), "--request-log", str(log), "--window", "40", "--reference", "80",
                "--out", str(tmp_path / "m")]) == 1  # drift
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    assert rep["predictions"] == "from the server's request log (model 'sent')"
    assert [w["drift"] for w in rep["windows"]] == [False, True]
    assert {"predicted_label", "probability"} <= set(rep["windows"][0]["tests"])

    bad = tmp_path / "bad.jsonl"
    text = log.read_text().splitlines()
    bad.write_text("\n".join(text[:2] + ['{"model": "sent", "input": "cut off'] + text[3:]) + "\n")
    with pytest.raises(TunesmithError, match=r"bad\.jsonl:line 3: not a JSON line"):
        run(["monitor", str(runs["lora"]), "--request-log", str(bad), "--out", str(tmp_path / "never")])
    with pytest.raises(TunesmithError, match=r"no request of model 'other' in the log \(it has: sent\)"):
        run(["monitor", str(runs["lora"]), "--request-log", str(log), "--model", "other", "--out", str(tmp_path / "never")])
    with pytest.raises(TunesmithError, match="--data FILE or --request-log FILE"):
        run(["monitor", str(runs["lora"]), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
