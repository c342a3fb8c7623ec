"""tunesmith search on tiny models: the space file's errors, pruning from inside the loop, crash
isolation, trials that fail validation, and the best config reproducing its trial.

The processes tests (kill -9 and resume, two processes on one PostgreSQL study, memory over 20
trials) are in test_search_processes.py.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tunesmith.errors import ConfigError


def write_config(tmp_path: Path, model: Path, data: Path, **train) -> Path:
    """A tiny classification run: 96 training examples, batch 8 (12 steps an epoch), validation
    loss as the objective (a random-init tiny model's accuracy stays at chance in a few dozen
    steps; its loss still tells learning rates apart)."""
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump({
        "task": "classification", "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "val_size": 32, "test_size": 32, "max_length": 32},
        "method": {"name": "full"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "eval_every": 6, "metric": "loss", "num_threads": 1,
                  **train},
        "output": {"dir": str(tmp_path / "runs" / "{name}"), "name": "tiny"}}))
    return p


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def data(tmp_path, sentiment_rows) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", sentiment_rows)


# ---------------------------------------------------------------- the space: errors before any trial
@pytest.mark.parametrize("text, expected", [
    ("", ["space.yaml: the space is empty"]),
    ("# nothing but a comment\n", ["space.yaml: the space is empty"]),
    ("train.lr: {low: 1.0e-4, high: 1.0e-2}\ntrain.lrr: [1, 2]\n",
     ["space.yaml:2: train.lrr: unknown config field; did you mean train.lr?"]),
    ("nonsense.key: [1, 2]\n", ["space.yaml:1: nonsense.key: unknown config field"]),
    ("train.lr: {low: 1.0e-2, high: 1.0e-4, log: true}\n", ["space.yaml:1: train.lr: low (0.01) must be below high (0.0001)"]),
    ("train.lr: {low: 0, high: 1.0e-2, log: true}\n", ["train.lr: log: a log scale needs low > 0"]),
    ("method.r: []\n", ["space.yaml:1: method.r: choices: give a non-empty list"]),
    ("method.r: {low: 2, high: 8.5}\n", ["method.r: low/high: an int parameter needs whole numbers"]),
    ("method.r: {low: 2, high: 8, lgo: true}\n", ["method.r: unknown key(s) lgo"]),
    ("train.lr: [1.0e-3, 1.0e-3]\n", ["train.lr: choices: [0.001, 0.001] repeats a value"]),
    ("output.name: [a, b]\n", ["output.name: cannot be searched: the search names each trial's run folder"]),
    ("train.metric: [loss, accuracy]\n", ["train.metric: cannot be searched: it is the search's objective"]),
    ("method.r: {choices: [4, 8], when: {method.nme: lora}}\n",
     ["method.r: its condition names method.nme, which is not a config field"]),
    ("train.epochs: {choices: [1, 2], when: {train.seed: 1}}\ntrain.seed: {choices: [1, 2], when: {train.epochs: 1}}\n",
     ["conditions form a cycle: train.epochs -> train.seed -> train.epochs"]),
    ("- train.lr\n", ["the top level must map config fields"]),
    ("train.lr: {low: [oops\n", ["not valid YAML"]),
])
def test_a_bad_space_file_is_an_error_naming_line_and_parameter(tmp_path, text, expected):
    from tunesmith.search import load_space

    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, text))
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_contradictory_spaces_fail_against_the_config_before_any_trial(tmp_path, tiny_bert, data):
    from tunesmith.search import load_space, run_search

    cfg = write_config(tmp_path, tiny_bert, data)
    # r belongs to LoRA: searching it on a full fine-tuning config, or for method full, is refused by the config
    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, "method.r: [4, 8]\n")).check(cfg, {})
    assert "method.r: not an option of method 'full'" in str(e.value) and "[with method.r=4]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, "method.name: [lora, full]\nmethod.r: [4, 8]\n")).check(cfg, {})
    assert "method.r: not an option of method 'full'" in str(e.value), str(e.value)
    # ... and accepted when the condition says r is for LoRA only
    load_space(write_space(tmp_path, "method.name: [lora, full]\n"
                           "method.r: {choices: [4, 8], when: {method.name: lora}}\n")).check(cfg, {})
    # a condition that can never hold
    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, "train.weight_decay: {choices: [0.0, 0.1], when: {method.name: lora}}\n")
                   ).check(cfg, {})
    assert "space.yaml:1: train.weight_decay: its condition method.name in ['lora'] never holds" in str(e.value)
    # a bound the field refuses (warmup_ratio < 1), caught at its corner
    with pytest.raises(ConfigError) as e:
        load_space(write_space(tmp_path, "train.warmup_ratio: {low: 0.0, high: 1.0}\n")).check(cfg, {})
    assert "train.warmup_ratio" in str(e.value) and "less than 1" in str(e.value), str(e.value)
    # through run_search: the error comes before the study exists
    with pytest.raises(ConfigError):
        run_search(cfg, write_space(tmp_path, "method.r: [4, 8]\n"), trials=2)
    assert not (tmp_path / "runs").exists()


def test_every_method_has_a_default_space_that_its_config_accepts(tmp_path, tiny_bert, data):
    import typing

    from tunesmith.config import MethodName
    from tunesmith.search import default_space

    cfg = write_config(tmp_path, tiny_bert, data)
    for method in typing.get_args(MethodName):
        space = default_space(method)
        assert "train.lr" in space.names(), method
        ov = {"method.name": method}
        if method == "selective":
            ov["method.modules"] = ["LayerNorm"]
        space.check(cfg, ov)
    lora = default_space("lora")
    lr = next(p for p in lora.params if p.name == "train.lr")
    full_lr = next(p for p in default_space("full").params if p.name == "train.lr")
    assert lr.log and 5 <= (lr.low * lr.high) ** 0.5 / (full_lr.low * full_lr.high) ** 0.5 <= 20  # ~10x full's


def test_grid_points_follow_conditions(tmp_path):
    from tunesmith.search import load_space

    space = load_space(write_space(tmp_path, "method.name: [lora, full]\n"
                                   "method.r: {choices: [4, 8], when: {method.name: lora}}\n"
                                   "train.epochs: {type: int, low: 1, high: 2}\n"))
    points = space.grid({"method": {"name": "lora"}})
    assert len(points) == 6  # lora x 2 ranks x 2 epochs + full x 2 epochs; no r for full
    assert {"method.name": "full", "train.epochs": 1} in points
    assert all(("method.r" in p) == (p["method.name"] == "lora") for p in points)


# ---------------------------------------------------------------- a whole search, in this process
def test_search_prunes_reports_and_its_best_config_reproduces_the_trial(tmp_path, tiny_bert, data):
    """Pruning happens inside the loop (the pruned trial trains fewer steps), the objective is
    the keep-best validation value, and best.yaml trains to the same value."""
    from tunesmith.search import run_search
    from tunesmith.train import train

    cfg = write_config(tmp_path, tiny_bert, data, epochs=2)
    space = write_space(tmp_path, "train.lr: {low: 1.0e-5, high: 3.0e-2, log: true}\n"
                        "train.weight_decay: [0.0, 0.1]\n")
    events = []
    result = run_search(cfg, space, trials=6, sampler="random", seed=3, pruner="median", on_event=events.append)
    sd = result.search_dir
    assert sd == tmp_path / "runs" / "tiny-search" and result.direction == "minimize" and result.metric == "loss"
    for f in ("results.csv", "results.md", "best.yaml", "importance.png", "parallel_coordinate.png", "study.db"):
        assert (sd / f).is_file(), f
    by_state = {s: [r for r in result.table if r["state"] == s] for s in ("complete", "pruned", "fail")}
    assert len(result.table) == 6 and not by_state["fail"], result.table
    assert by_state["pruned"], "expected the median pruner to stop a trial (3 startup trials, 4 evaluations each)"
    full = 2 * 12  # steps of a whole trial
    for r in by_state["pruned"]:
        assert r["steps"] < full and "pruned at evaluation" in r["detail"], r
        evals = [e for e in events if e.get("kind") == "eval" and e["trial"] == r["trial"]]
        assert evals[-1]["step"] == r["steps"]  # stopped at the evaluation that pruned it
    for r in by_state["complete"]:
        assert r["steps"] == full
        rows = [json.loads(l) for l in (sd / "trials" / f"trial-{r['trial']:04d}" / "metrics.jsonl").read_text().splitlines()]
        losses = {e["step"]: e["loss"] for e in rows if e["kind"] == "eval"}
        assert r["loss"] == min(losses.values()) and r["best_step"] == min(losses, key=losses.get)  # keep-best, not last
    md = (sd / "results.md").read_text()
    assert "pruned" in md and f"{len(by_state['pruned'])} pruned" in md
    assert result.steps == sum(r["steps"] for r in result.table)
    assert not list((sd / "trials").glob("*/checkpoints"))  # a finished trial keeps its model, not its checkpoints

    # best.yaml is a whole config that reproduces the best trial
    best = result.best
    assert best["value"] == min(r["loss"] for r in by_state["complete"])
    header = (sd / "best.yaml").read_text().splitlines()[0]
    assert header == f"# tunesmith train {sd / 'best.yaml'}"
    again = train(sd / "best.yaml", {"output.dir": str(tmp_path / "again" / "{name}")})
    assert again.summary["best_value"] == pytest.approx(best["value"], abs=1e-6)
    assert again.summary["best_step"] == best["best_step"]

    # the same command again: the study is finished, nothing runs twice
    again_result = run_search(cfg, space, trials=6, sampler="random", seed=3, pruner="median")
    assert again_result.table == result.table
    # ... but a changed config, or another pruner, is not mixed into it
    with pytest.raises(Exception, match="was made with another config or space"):
        run_search(cfg, space, trials=6, overrides={"train.batch_size": 4})
    with pytest.raises(Exception, match="was made with --sampler random, --pruner median"):
        run_search(cfg, space, trials=6, sampler="random", pruner="asha")


def test_a_crashed_trial_fails_alone_and_an_invalid_one_says_why(tmp_path, tiny_bert, data):
    """Kill one trial's process mid-training (as the OOM killer would): that trial fails, the
    search goes on. A trial whose model path does not exist fails as invalid, naming the path."""
    from tunesmith.search import run_search

    cfg = write_config(tmp_path, tiny_bert, data, epochs=1)
    missing = tmp_path / "no-such-model"
    space = write_space(tmp_path, f"model.name_or_path: [{tiny_bert}, {missing}]\ntrain.lr: [1.0e-3, 1.0e-2]\n")
    killed = []

    def on_event(e):
        if e.get("kind") == "trial" and e["state"] == "running":
            pids[e["trial"]] = e["pid"]
        if e.get("kind") == "eval" and not killed:  # the first trial to reach a validation
            killed.append(e["trial"])
            os.kill(pids[e["trial"]], signal.SIGKILL)

    pids: dict[int, int] = {}
    result = run_search(cfg, space, sampler="grid", pruner="none", on_event=on_event)
    rows = {r["trial"]: r for r in result.table}
    assert len(rows) == 4
    assert rows[killed[0]]["state"] == "fail" and "killed by signal SIGKILL" in rows[killed[0]]["detail"]
    invalid = [r for r in rows.values() if r["model.name_or_path"] == str(missing)]
    assert len(invalid) == 2 and all(r["state"] == "fail" and r["detail"].startswith("invalid:")
                                     and str(missing) in r["detail"] for r in invalid), invalid
    others = [r for t, r in rows.items() if t != killed[0] and r not in invalid]
    assert len(others) == 1 and others[0]["state"] == "complete"
    assert result.counts == {"complete": 1, "pruned": 0, "fail": 3, "running": 0}


def test_train_on_validation_adds_the_validation_split_and_keeps_the_test_split(tmp_path, data):
    """What --retrain trains on: exactly train + validation of the search's split; the same test."""
    from tunesmith.config import load_config
    from tunesmith.tasks import load_examples

    base = {"data": {"train": str(data), "val_size": 32, "test_size": 32, "train_size": 60}}
    _, _, plain = load_examples(load_config(base))
    _, _, merged = load_examples(load_config(base, {"data.train_on_validation": True}))
    assert "validation" not in merged and merged["test"] == plain["test"]
    assert merged["train"] == plain["train"] + plain["validation"] and len(merged["train"]) == 92
    with pytest.raises(ConfigError, match="early_stopping_patience: needs a validation split"):
        load_config(base, {"data.train_on_validation": True, "train.early_stopping_patience": 2})


def test_parallel_trials_on_a_journal_file_then_the_best_retrained_on_train_and_validation(tmp_path, tiny_bert, data):
    from optuna.trial import TrialState

    from tunesmith.search import run_search

    cfg = write_config(tmp_path, tiny_bert, data, epochs=1)
    space = write_space(tmp_path, "train.lr: [1.0e-3, 3.0e-2]\n")
    journal = tmp_path / "study.log"
    result = run_search(cfg, space, sampler="grid", pruner="none", parallel=2, storage=str(journal), retrain=True,
                        out=tmp_path / "search")
    assert journal.is_file() and not (tmp_path / "search" / "study.db").exists()
    import optuna

    trials = optuna.load_study(study_name="tiny-search", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    a, b = sorted(trials, key=lambda t: t.datetime_start)
    assert b.datetime_start < a.datetime_complete, "two trials should have run at once"
    # the retrain: the best config on train + validation (96 + 32 examples), scored on the same 32 test examples
    r = result.retrain
    assert r["final_split"] == "test" and r["final_value"] is not None and Path(r["run_dir"]).is_dir()
    log = (tmp_path / "search" / "retrain.log").read_text()
    assert "test 32, train 128" in log, log[:500]
    retrained = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
    assert retrained["data"]["train_on_validation"] is True
    assert retrained["train"]["lr"] == result.best["params"]["train.lr"]


def test_the_shipped_space_file_fits_its_config():
    from tunesmith.search import load_space

    root = Path(__file__).resolve().parent.parent
    space = load_space(root / "configs" / "search" / "sentiment-lora.yaml")
    assert space.names()[0] == "train.lr"
    space.check(root / "configs" / "sentiment-lora.yaml", {})


def _open_storage_in_child(url: str, folder: str, q) -> None:
    from tunesmith.search.study import open_storage

    try:
        open_storage(url, Path(folder))
        q.put("ok")
    except Exception as e:  # reported to the parent, which fails the test with it
        q.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_fresh_postgresql_study_at_once_all_succeed(tmp_path):
    """Every process of a shared search opens the storage at the same moment; on an empty database
    they race to create optuna's tables, and the losers must retry, not crash."""
    import multiprocessing as mp

    from tests.pg import temp_database

    ctx = mp.get_context("spawn")
    with temp_database("ts_search_race") as url:
        q = ctx.Queue()
        procs = [ctx.Process(target=_open_storage_in_child, args=(url, str(tmp_path), q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    assert results == ["ok"] * 4, results


def test_further_objectives_give_the_pareto_front_and_its_configs(tmp_path, tiny_bert, data):
    """--also: the study has two objectives (validation loss, training time); the trials marked
    `pareto` are exactly those no other trial beats on both, each with a config that trains."""
    from tunesmith.search import run_search

    cfg = write_config(tmp_path, tiny_bert, data, epochs=1)
    space = write_space(tmp_path, "train.lr: {low: 1.0e-5, high: 3.0e-2, log: true}\n"
                        "train.batch_size: [4, 8, 16]\n")
    msgs = []
    result = run_search(cfg, space, trials=5, sampler="random", seed=1, also=["train_seconds"],
                        on_event=lambda e: msgs.append(e.get("text", "")))
    assert any("pruner median off" in m for m in msgs)  # optuna cannot prune several objectives
    done = [r for r in result.table if r["state"] == "complete"]
    assert len(done) == 5 and all(r["train_seconds"] > 0 for r in done), result.table
    dominated = {r["trial"] for r in done for o in done
                 if o["loss"] <= r["loss"] and o["train_seconds"] <= r["train_seconds"]
                 and (o["loss"], o["train_seconds"]) != (r["loss"], r["train_seconds"])}
    front = {r["trial"] for r in done} - dominated
    assert {r["trial"] for r in done if r["pareto"] == "yes"} == front
    assert {f["trial"] for f in result.front} == front and result.best is None
    sd = result.search_dir
    assert sorted(p.name for p in (sd / "pareto").iterdir()) == [f"trial-{n:04d}.yaml" for n in sorted(front)]
    assert (sd / "pareto_front.png").is_file() and not (sd / "best.yaml").exists()
    md = (sd / "results.md").read_text()
    assert "Pareto front" in md and "train_seconds (minimize)" in md
    for f in result.front:  # each front config is the trial's own: same parameters, a valid config
        y = yaml.safe_load(f["config"].read_text())
        assert y["train"]["batch_size"] == f["params"]["train.batch_size"]
    # the same study with another objective set is refused, not mixed
    with pytest.raises(Exception, match="another metric or --also"):
        run_search(cfg, space, trials=5, sampler="random", seed=1, pruner="none")


@pytest.mark.parametrize("also, retrain, match", [
    (["accuracy_of_vibes"], False, "unknown measure; choose from forgetting_perplexity"),
    (["forgetting_perplexity"], False, "task classification does not generate text"),
    (["train_seconds", "train_seconds"], False, "already an objective"),
    (["peak_rss_mb"], True, "--retrain takes the one best trial"),
])
def test_bad_further_objectives_fail_before_any_trial(tmp_path, tiny_bert, data, also, retrain, match):
    from tunesmith.search import run_search

    cfg = write_config(tmp_path, tiny_bert, data)
    with pytest.raises(ConfigError, match=match):
        run_search(cfg, trials=2, also=also, retrain=retrain)
    assert not (tmp_path / "runs" / "tiny-search" / "trials").exists()
