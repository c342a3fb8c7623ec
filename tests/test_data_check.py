"""`tunesmith data check` / `data clean` (issue 23, section 1): each check against a case worked out
by hand (or against datasketch itself), the JSON and Markdown outputs, `data clean`'s atomic copy,
and errors that name the file and line."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from tests.conftest import WORDS, write_jsonl
from tunesmith.cli import run
from tunesmith.data import dedup, label_issues, quality
from tunesmith.errors import TunesmithError

FOX = "the quick brown fox jumps over the lazy dog today"  # 10 words: 8 word 3-grams


# ---------------------------------------------------------------- MinHash / LSH against datasketch
def test_signatures_equal_datasketch_update_batch():
    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)) for n in (1, 5, 40, 300)]
    sh = dedup.Shingles(np.concatenate(sets + [np.zeros(0, np.uint32)]),
                        np.concatenate([[0], np.cumsum([len(s) for s in sets] + [0])]))
    sig = dedup.signatures(sh)
    for i, s in enumerate(sets):
        m = MinHash(num_perm=dedup.NUM_PERM, seed=dedup.SEED, hashfunc=lambda v: v)
        m.update_batch(s.tolist())
        assert (sig[i] == m.hashvalues).all()
    assert (sig[-1] == np.iinfo(np.uint32).max).all()  # an empty set keeps MinHash's initial values


def test_candidates_equal_minhashlsh_query():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2 ** 32, size=(60, dedup.NUM_PERM), dtype=np.uint64).astype(np.uint32)
    sig = np.concatenate([base, base[:20].copy()])
    sig[60:, :40] = rng.integers(0, 2 ** 32, size=(20, 40), dtype=np.uint64)  # copies whose first 40 values differ
    bands, rows = dedup.lsh_params(0.7)
    ours = {tuple(p) for p in dedup.candidates(sig, bands, rows)}
    lsh = MinHashLSH(num_perm=dedup.NUM_PERM, params=(bands, rows))
    mh = [MinHash(num_perm=dedup.NUM_PERM, hashvalues=s, scheme="affine32") for s in sig]
    for i, m in enumerate(mh):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(mh) for j in lsh.query(m) if j != i}
    assert ours == theirs and len(ours) >= 10


def test_near_pairs_by_hand():
    texts = [FOX,
             FOX.replace("today", "again"),  # last word changed: 7 of 9 distinct 3-grams shared
             "an unrelated sentence about cooking pasta with garlic and oil tonight",
             FOX.upper().replace(" ", ",  "),  # case and punctuation only: the same set
             FOX.replace("over", "under").replace("brown", "red")]  # two inner words: 2 of 8 3-grams kept
    pairs = {(i, j): round(jac, 4) for i, j, jac in dedup.near_pairs(dedup.shingle(dedup.words(texts)), 0.7)}
    assert pairs == {(0, 1): round(7 / 9, 4), (0, 3): 1.0, (1, 3): round(7 / 9, 4)}
    # between two sets: only pairs across the split count
    across = dedup.near_pairs(dedup.shingle(dedup.words(texts[:2] + texts[2:4])), 0.7, split=2)
    assert [(i, j) for i, j, _ in across] == [(0, 3), (1, 3)]
    assert dedup.clusters(5, [(0, 1), (1, 3)]) == [[0, 1, 3]]


# ---------------------------------------------------------------- junk, lengths, balance
@pytest.mark.parametrize("text,reasons", [
    ("   \n ", ["empty"]),
    ("12345 !!! ???", ["no_letters"]),
    ("<html><body><p>hello</p></body></html>", ["markup"]),
    ("A long review that says a lot about the film.<br /><br />And then some more words here.", ["html_line_breaks"]),
    ("a <b>bold</b> claim &amp; a <i>quiet</i> one", ["markup"]),  # 24 of 44 characters are tags
    ("a caf\u00c3\u00a9 that I liked", ["mojibake"]),  # "café" as UTF-8 read as latin-1
    ("it\u00e2\u20ac\u2122s fine", ["mojibake"]),  # "it’s" read as cp1252
    ("a café in Zürich, naïve", []),
    ("bad \ufffd bytes", ["replacement_char"]),
    ("a bell\x07 rings", ["control_chars"]),
    ("tab\tand\nnewline are fine", []),
])
def test_junk_reasons(text, reasons):
    assert quality.junk_reasons(text) == reasons


def test_repetitive_and_junk_indexes():
    texts = ["good " * 9 + "film and plot", "fine words that are all different from each other here", "  "]
    found = quality.junk(texts, dedup.words(texts))
    assert found == {"empty": [2], "repetitive": [0]}  # 9 of 12 words are 'good'


def test_length_outliers_by_hand():
    words = np.array([8, 9, 10, 11, 12] * 4 + [200, 1])
    short, long, (lo, hi) = quality.length_outliers(words)
    # log1p quartiles 2.303 (9 words) and 2.485 (11): IQR 0.182, fences at 3 IQR -> 4.8 and 19.7 words
    assert short == [21] and long == [20] and 4.5 < lo < 5.1 and 19.4 < hi < 20.1
    assert quality.length_outliers(np.array([1, 500] + [10] * 10)) == ([], [], (0.0, float("inf")))  # < 20 rows


def test_balance_ratio():
    assert quality.balance({"a": 50, "b": 10, "c": 0}) == {"largest": "a", "smallest": "b", "ratio": 5.0}
    assert quality.balance({"a": 5, "b": 0}) == {}


# ---------------------------------------------------------------- confident learning
def test_confident_joint_and_issues_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.9, 0.9, 0.7, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    # thresholds: t0 = mean(.9, .8, .1) = .6, t1 = mean(.9, .7, .8) = .8; row 2 (given 0) has p1 .9 >= t1;
    # row 4 reaches neither threshold; calibrated to 3 rows per label: [[2, 1], [0, 3]]
    assert label_issues.confident_joint(labels, probs).tolist() == [[2, 1], [0, 3]]
    assert label_issues.find_label_issues(labels, probs).tolist() == [2]
    agree = np.where(labels == 1, 0.8, 0.3)  # a model that agrees with every label flags nothing
    assert label_issues.find_label_issues(labels, np.stack([1 - agree, agree], axis=1)).tolist() == []


def _sentiment(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    pos, neg, filler = ["good", "great", "superb", "lovely"], ["bad", "awful", "boring", "dull"], WORDS[10:30]
    rows = []
    for i in range(n):
        words = [rng.choice(filler) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randrange(len(words)), rng.choice(pos if i % 2 else neg))
        rows.append({"text": " ".join(words), "label": "positive" if i % 2 else "negative"})
    return rows


def test_planted_flips_are_found_first():
    rows = _sentiment(160)
    y = np.array([int(r["label"] == "positive") for r in rows])
    flips = [5, 40, 77]
    y[flips] = 1 - y[flips]
    texts = [r["text"] for r in rows]
    probs = label_issues.out_of_sample_probs(label_issues.features(dedup.words(texts)), y)
    found = label_issues.find_label_issues(y, probs).tolist()
    assert sorted(found[:3]) == flips and len(found) <= 6  # all three, ranked first; at most 3 others


# ---------------------------------------------------------------- data check end to end
def _planted(tmp_path):
    """A training file with known faults at known lines, and a test file that leaks two of its rows."""
    rows = _sentiment(80)
    long_review = "this film has a slow start but the second half pulls every thread together with real care " \
                  "and the actors clearly enjoyed working on it"
    rows[10] = {"text": long_review, "label": "positive"}
    rows[20] = {"text": long_review.replace("slow", "sluggish"), "label": "positive"}  # line 21: near copy of 11
    rows[30] = dict(rows[3])  # line 31: exact copy of line 4
    rows[40] = {"text": "<div><b>click here</b></div>", "label": "negative"}  # line 41: markup
    rows[50] = {"text": "bad awful boring " + rows[50]["text"] + " dull", "label": "positive"}  # line 51: mislabelled
    test = [dict(rows[60]), {"text": rows[61]["text"] + " indeed", "label": rows[61]["label"]}] + _sentiment(30, seed=7)
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "test.jsonl", test)


def _config(tmp_path, tiny_bert, train, test) -> dict:
    return {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": str(train), "test": str(test)}}


def test_data_check_names_every_planted_row(tmp_path, tiny_bert):
    from tunesmith import check_data

    train, test = _planted(tmp_path)
    rep = check_data(train, _config(tmp_path, tiny_bert, train, test))
    by = {f["check"]: f for f in rep["findings"]}
    lines = {c: [r["line"] for r in f["rows"]] for c, f in by.items()}
    assert lines["duplicates"] == [31] and by["duplicates"]["rows"][0]["same_as"] == f"{train}:line 4"
    assert lines["near_duplicates"] == [21] and by["near_duplicates"]["rows"][0]["same_as"] == f"{train}:line 11"
    assert lines["leakage"] == [61] and lines["near_leakage"] == [62]
    assert by["junk"]["rows"][0]["line"] == 41 and "markup" in by["junk"]["message"]
    assert lines["label_issues"][0] == 51  # the planted flip, ranked first
    assert all(f["drop"] == (f["check"] in ("duplicates", "near_duplicates", "leakage", "near_leakage"))
               for f in rep["findings"])
    assert rep["problems"] == [] and rep["estimate"]["seconds"] > 0 and rep["estimate"]["peak_memory_mb"] > 600
    # the held-out side: its rows that repeat training rows, named in the test file
    rep = check_data(test, _config(tmp_path, tiny_bert, train, test), label_check=False)
    lines = {f["check"]: [r["line"] for r in f["rows"]] for f in rep["findings"]}
    assert lines["leakage"] == [1] and lines["near_leakage"] == [2] and "estimate" not in rep
    assert any("only 32 held-out example(s)" in w for w in rep["warnings"])


@pytest.mark.parametrize("n,severity", [(9, "error"), (10, "warning"), (49, "warning"), (50, None)])
def test_too_few_examples(tmp_path, tiny_bert, n, severity):
    from tunesmith import check_data

    f = write_jsonl(tmp_path / "d.jsonl", _sentiment(n))
    rep = check_data(f, {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": str(f)}}, label_check=False)
    sizes = [x["severity"] for x in rep["findings"] if x["check"] == "size"]
    assert sizes == ([severity] if severity else [])
    assert bool(rep["problems"]) == (severity == "error")


def test_imbalance_and_small_class(tmp_path, tiny_bert):
    from tunesmith import check_data

    rows = [r for r in _sentiment(120) if r["label"] == "negative"] + [r for r in _sentiment(120) if r["label"] == "positive"][:8]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = check_data(f, {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": str(f)}}, label_check=False)
    msgs = [x["message"] for x in rep["findings"] if x["check"] == "balance"]
    assert any("'negative' has 7.5x the rows of 'positive'" in m for m in msgs)
    assert any("fewer than 10 rows: 'positive' (8)" in m for m in msgs)


def test_record_check_hook(tmp_path, tiny_bert, monkeypatch):
    from tunesmith import check_data
    from tunesmith.tasks import findings

    f = write_jsonl(tmp_path / "d.jsonl", _sentiment(60))
    seen = []
    monkeypatch.setattr(findings, "RECORD_CHECKS", [lambda recs, cfg: seen.append(len(recs)) or
                                                    [findings.Finding("format", "error", "planted", [findings.row(recs[0].where)])]])
    rep = check_data(f, {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": str(f)}}, label_check=False)
    assert seen == [60] and rep["problems"] == ["planted"]


# ---------------------------------------------------------------- outputs and data clean
def test_cli_writes_json_and_markdown(tmp_path, tiny_bert, capsys):
    import yaml

    train, test = _planted(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, tiny_bert, train, test)))
    out_json, out_md = tmp_path / "r" / "report.json", tmp_path / "r" / "report.md"
    code = run(["data", "check", str(train), "--config", str(cfg), "--json", str(out_json), "--markdown", str(out_md),
                "--no-label-check"])
    text = capsys.readouterr().out
    assert code == 0 and "checks: 1 duplicates, 1 near-duplicates, 1 leaked rows, 1 near-leaked rows" in text
    report = json.loads(out_json.read_text())
    near = next(f for f in report["findings"] if f["check"] == "near_duplicates")
    assert near["rows"] == [{"file": str(train), "line": 21, "unit": "line", "same_as": f"{train}:line 11",
                             "similarity": near["rows"][0]["similarity"]}] and near["count"] == 1
    md = out_md.read_text()
    assert "## warning: near-duplicates (1 row(s))" in md and f"| {train}:line 21 | {train}:line 11 |" in md
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["report.json", "report.md"]  # no temp files left


def test_data_clean_drops_duplicates_and_leaks(tmp_path, tiny_bert, capsys):
    train, test = _planted(tmp_path)
    cfg = _config(tmp_path, tiny_bert, train, test)
    from tunesmith.tasks.clean import clean_data, format_clean

    summary = clean_data(train, cfg, tmp_path / "clean.jsonl")
    assert [r["line"] for r in summary["dropped"]] == [21, 31, 61, 62] and summary["kept"] == 76
    kept = (tmp_path / "clean.jsonl").read_text().splitlines()
    original = train.read_text().splitlines()
    assert kept == [line for n, line in enumerate(original, 1) if n not in (21, 31, 61, 62)]  # byte for byte
    assert "dropped 4 of 80 rows" in format_clean(summary) and "line 21: near duplicates of" in format_clean(summary)
    with pytest.raises(TunesmithError, match="already exists"):
        clean_data(train, cfg, tmp_path / "clean.jsonl")
    with pytest.raises(TunesmithError, match="use the input's extension"):
        clean_data(train, cfg, tmp_path / "clean.csv")


def test_data_clean_csv_keeps_multiline_records_whole(tmp_path, tiny_bert):
    import csv

    from tunesmith.tasks.clean import clean_data

    rows = _sentiment(60)
    rows[5] = {"text": "a review\nover two lines, with a comma", "label": rows[5]["label"]}
    rows[9] = dict(rows[5])  # the copy starts on line 12 (the header is line 1; record 6 spans lines 7-8)
    src = tmp_path / "d.csv"
    with src.open("w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    summary = clean_data(src, {"model": {"name_or_path": str(tiny_bert)}, "data": {"train": str(src)}}, tmp_path / "c.csv")
    assert [r["line"] for r in summary["dropped"]] == [12]
    with (tmp_path / "c.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == rows[:9] + rows[10:]


def test_data_clean_leaves_nothing_half_written(tmp_path, tiny_bert, monkeypatch):
    from tunesmith.tasks import clean

    train, test = _planted(tmp_path)
    out = tmp_path / "out" / "clean.jsonl"

    def crash(src, dst, drop):
        dst.write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setitem(clean._WRITERS, "jsonl", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        clean.clean_data(train, _config(tmp_path, tiny_bert, train, test), out)
    assert list(out.parent.iterdir()) == []


def test_bad_input_names_file_and_line(tmp_path, tiny_bert, capsys):
    rows = [json.dumps(r) for r in _sentiment(20)]
    rows[2] = '{"text": "broken", "label": '
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(rows) + "\n")
    code = run(["data", "check", str(f), f"--model.name_or_path={tiny_bert}", "--no-label-check"])
    assert code == 1 and f"{f}:line 3: malformed JSON" in capsys.readouterr().out
    code = run(["data", "clean", str(f), f"--model.name_or_path={tiny_bert}", "--out", str(tmp_path / "c.jsonl")])
    assert code == 0 and (tmp_path / "c.jsonl").read_text().splitlines()[2] == rows[2]  # kept for the user to fix
    with pytest.raises(TunesmithError, match="data file not found: .*missing.jsonl"):
        run(["data", "clean", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")])


# ---------------------------------------------------------------- the time and memory estimate
def _estimate(task: str, shape: dict, lengths: list[int], gflops: float = 146.0, **train):
    from tunesmith.config import load_config
    from tunesmith.models.estimate import estimate

    cfg = load_config({"task": task, "data": {"train": "x"}, "method": {"name": train.pop("method", "lora")},
                       "train": train, "eval": {"before": False}})
    return estimate(cfg, shape, lengths, 0, gflops, "cpu")


def test_estimate_flops_by_hand():
    shape = {"params": 1000, "matmul_params": 1000, "linear_in_out": 0, "layers": 2, "hidden": 10, "vocab": 0}
    # full fine-tuning, 100 examples x 10 tokens, 1 epoch: 1,000 x (6 x 1,000 + 12 x 2 x 10 x 10) = 8.4e6 FLOPs,
    # at 0.001 GFLOP/s x 0.38 utilisation: 22.1 s
    e = _estimate("classification", shape, [10] * 100, gflops=0.001, method="full", epochs=1)
    assert e["seconds"] == 22.1 and e["train_tokens_per_epoch"] == 1000
    assert _estimate("classification", shape, [10] * 100, gflops=0.001, method="full", epochs=1,
                     max_steps=5, batch_size=10)["seconds"] == 11.1  # 5 steps x 10 examples: half an epoch


def test_estimate_matches_measured_runs(tmp_path):
    """Calibration: bench/scaling.py's measured peak RSS and bench/mfu.py's seconds per step
    (bench/RESULTS.md, 2-core CPU, fp32) against the estimate for the same shapes."""
    from transformers import BertConfig, LlamaConfig

    from tunesmith.models.estimate import model_shape

    LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, tie_word_embeddings=True).save_pretrained(tmp_path / "smol")  # SmolLM2-135M
    BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
               intermediate_size=1536).save_pretrained(tmp_path / "minilm")  # all-MiniLM-L6-v2
    smol, minilm = model_shape(str(tmp_path / "smol"), None, 0), model_shape(str(tmp_path / "minilm"), "labels", 2)
    assert smol["params"] == 134_515_008  # SmolLM2-135M's count
    # These runs were measured with peft's own LoRA forward (its dropout keeps two float copies of each input)
    # and glibc's default heap, before train.lean_lora_dropout and train.return_memory existed.
    old = {"lean_lora_dropout": False, "return_memory": "keep"}
    measured_mb = {128: 1702, 512: 2939, 2048: 8790, 4096: 16010}  # SmolLM2 LoRA, batch 1
    for tokens, mb in measured_mb.items():
        assert 0.9 < _estimate("sft", smol, [tokens], batch_size=1, **old)["peak_memory_mb"] / mb < 1.1
    for tokens, mb in {1024: 2828, 2048: 4864}.items():  # with gradient checkpointing (its two constants' fit)
        ckpt = _estimate("sft", smol, [tokens], batch_size=1, gradient_checkpointing=True, **old)["peak_memory_mb"]
        assert 0.95 < ckpt / mb < 1.05
    assert 0.9 < _estimate("classification", minilm, [256] * 4, batch_size=4, **old)["peak_memory_mb"] / 1090 < 1.1
    # seconds per step at the measured matmul peak (134-158 GFLOP/s: 146): MiniLM 256 x 16 took 3.15 s,
    # SmolLM2 128 x 8 8.72 s
    assert 0.8 < _estimate("classification", minilm, [256] * 16, batch_size=16, epochs=1)["seconds"] / 3.15 < 1.3
    assert 0.8 < _estimate("sft", smol, [128] * 8, batch_size=8, epochs=1)["seconds"] / 8.72 < 1.3


def test_model_shape_counts_what_the_model_has(tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunesmith.models.estimate import model_shape

    real = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    shape = model_shape(str(tiny_bert), "labels", 3)
    assert shape["params"] == sum(p.numel() for p in real.parameters())
    assert shape["matmul_params"] == sum(m.weight.numel() for m in real.modules() if isinstance(m, torch.nn.Linear))
