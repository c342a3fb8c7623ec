"""Precision is decided once and the same everywhere a run is measured: forcing what `auto`
picks, and evaluating a saved run in the precision it trained in."""
from __future__ import annotations

import pytest

from tunesmith.config import TrainConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.models import device as runtime  # where resolve_precision looks up cpu_has_fast_bf16


def test_auto_precision_can_be_forced_for_the_process_tree(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.delenv(runtime.AUTO_PRECISION_ENV, raising=False)
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "bf16"
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp32")
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "fp32"
    assert runtime.resolve_precision(TrainConfig(precision="bf16"), "cpu") == "bf16"  # an explicit choice wins
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "bf16")
    assert runtime.resolve_precision(TrainConfig(), "cpu") == "bf16"
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(TunesmithError, match="fp16 needs a GPU"):
        runtime.resolve_precision(TrainConfig(), "cpu")
    monkeypatch.setenv(runtime.AUTO_PRECISION_ENV, "half")
    with pytest.raises(TunesmithError, match="expected fp32, bf16 or fp16"):
        runtime.resolve_precision(TrainConfig(), "cpu")


def test_a_saved_run_is_evaluated_in_the_precision_it_trained_in(monkeypatch):
    import tunesmith.methods.saved as runs

    cfg = load_config({"data": {"train": "x.jsonl"}})
    assert cfg.train.precision == "auto"
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: True)
    assert runs._as_trained(cfg, {"precision": "bf16"}).train.precision == "bf16"
    assert runs._as_trained(cfg, {"precision": "fp32"}).train.precision == "fp32"
    assert runs._as_trained(cfg, {}).train.precision == "auto"  # older runs: as before
    # emulated bf16 is ~200x slower: such a CPU evaluates a bf16 run in fp32 (and says so)
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: False)
    assert runs._as_trained(cfg, {"precision": "bf16"}).train.precision == "fp32"
    explicit = load_config({"data": {"train": "x.jsonl"}, "train": {"precision": "fp32"}})
    monkeypatch.setattr(runs, "cpu_has_fast_bf16", lambda: True)
    assert runs._as_trained(explicit, {"precision": "bf16"}).train.precision == "fp32"
