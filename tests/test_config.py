from pathlib import Path

import pytest

from tunesmith.config import RunConfig, describe_fields, load_config, parse_overrides
from tunesmith.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_need_only_train_data():
    cfg = load_config({"data": {"train": "x.jsonl"}})
    assert cfg.task == "classification" and cfg.method.name == "lora" and cfg.train.precision == "auto"


def test_every_problem_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: sft\nmethod: {name: head, rr: 3}\ntrain: {lr: -1, epochs: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    for needle in ("method.rr", "train.lr", "train.epochs"):
        assert needle in msg, msg
    assert str(bad) in msg


def test_cross_field_checks_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config({"task": "sft", "method": {"name": "head"}, "train": {"metric": "accuracy"}})
    msg = str(e.value)
    assert "data.train: required" in msg and "method.name: 'head'" in msg and "train.metric" in msg


def test_overrides_parse_yaml_values():
    ov = parse_overrides(["--train.lr=1e-4", "--method.target_modules", "[query, value]", "--train.max_steps=null"])
    assert ov == {"train.lr": 1e-4, "method.target_modules": ["query", "value"], "train.max_steps": None}
    cfg = load_config({"data": {"train": "x"}}, ["--train.epochs=2", "--method.r=4"])
    assert cfg.train.epochs == 2 and cfg.method.r == 4


def test_override_errors_are_clear():
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["train.lr=1"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("does-not-exist.yaml")


def test_best_metric_direction():
    assert load_config({"data": {"train": "x"}}).best_metric() == ("accuracy", True)
    assert load_config({"task": "sft", "data": {"train": "x"}}).best_metric() == ("loss", False)


def test_field_docs_cover_every_field():
    text = "\n".join(describe_fields())
    for section in ("model", "data", "method", "train", "eval", "output"):
        for name in RunConfig.model_fields[section].annotation.model_fields:
            assert f"{section}.{name} =" in text or f"[{section}.{name}]" in text


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_say_how_to_run(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first == f"# tunesmith train configs/{path.name}", "each config opens with the command that runs it"
    assert cfg.data.train
