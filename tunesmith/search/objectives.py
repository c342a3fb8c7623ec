"""Further objectives of a search (`--also`): the keep-best validation metric stays the first, and
each named measure of the finished trial is another; the search then reports the Pareto front
(the trials no other trial beats on every objective) instead of one best trial.

The measures are ones a trial's validation score cannot see: what the run forgot (the forgetting
probe every generative run takes: docs/EVALUATION.md) and what it cost. Test-split metrics are
never objectives: the test split judges the chosen trial, it does not choose it.
"""
from __future__ import annotations

from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.tasks import get_task

# name -> (greater is better, where the trial's summary holds it, what it is)
MEASURES: dict[str, tuple[bool, str, str]] = {
    "forgetting_perplexity": (False, "final_metrics", "perplexity on held-out general text after training "
                                                      "(eval.forgetting_text; generative tasks)"),
    "general_qa_accuracy": (True, "final_metrics", "share of the general questions still answered after training "
                                                   "(eval.forgetting_questions; generative tasks)"),
    "train_seconds": (False, "summary", "training wall time"),
    "peak_rss_mb": (False, "summary", "peak resident memory of the trial's process"),
}
NEEDS = {"forgetting_perplexity": "forgetting_text", "general_qa_accuracy": "forgetting_questions"}


def check(cfg: RunConfig, also: list[str]) -> list[tuple[str, bool]]:
    """(name, greater) of each further objective, checked against the config before any trial.

    Raises:
        ConfigError: an unknown measure, one given twice or equal to the validation metric, or a
            forgetting measure the run will not produce.
    """
    metric, _ = cfg.best_metric()
    out = []
    for name in also:
        if name not in MEASURES:
            raise ConfigError(f"--also {name}: unknown measure; choose from "
                              + "; ".join(f"{k} ({v[2]})" for k, v in MEASURES.items()))
        if name == metric or name in (n for n, _ in out):
            raise ConfigError(f"--also {name}: already an objective of this search")
        if name in NEEDS:
            if get_task(cfg.task).predicts != "generate":
                raise ConfigError(f"--also {name}: task {cfg.task} does not generate text, so its runs take no "
                                  "forgetting probe")
            if getattr(cfg.eval, NEEDS[name]) is None:
                raise ConfigError(f"--also {name}: eval.{NEEDS[name]} is null in this config, so no trial measures it")
        out.append((name, MEASURES[name][0]))
    return out


def values(summary: dict[str, Any], also: list[str]) -> list[float] | str:
    """The further objectives' values from a finished trial's summary, or why one is missing."""
    out = []
    for name in also:
        holder = (summary.get("final_metrics") or {}) if MEASURES[name][1] == "final_metrics" else summary
        v = holder.get(name)
        if not isinstance(v, (int, float)):
            return f"no {name} in the run's summary"
        out.append(float(v))
    return out
