"""The task seam: what the rest of tunesmith may ask of a task, in one place.

Each task is one module (the preference family shares one) that builds a `Task` (tasks/base.py):
its data formats and reader, how examples tokenise, its objective, metrics and default keep-best
metric, its sample inputs, how a trained run predicts (`predicts`: classify / score / generate),
what a served model offers (`serves`), whether it trains online, and its own config checks.
The loop, evaluation, runs, the CLI, the server, jobs and search ask `get_task(name)` and never
compare task names (tests/test_architecture.py enforces it). docs/TASKS.md: how to add a task.
"""
from __future__ import annotations

from typing import Any

from tunesmith.config import DataConfig, RunConfig
from tunesmith.data import PreparedData, split_examples
from tunesmith.data.openai_format import is_openai_dpo
from tunesmith.data.readers import Record
from tunesmith.data.tokenize import TokenStats
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.tasks import classification, cpt, preference, regression, sft
from tunesmith.tasks.base import Endpoint, Predicts, Sums, Task  # noqa: F401 (the seam's types)

_TASKS: dict[str, Task] = {t.name: t for t in (classification.TASK, sft.TASK, cpt.TASK, regression.TASK,
                                               *preference.TASKS)}


def get_task(name: str) -> Task:
    """The task called `name`; a clear error for an unknown one."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}'; known: {', '.join(_TASKS)}") from None


def task_for_format(fields: dict[str, Any], data: DataConfig) -> str:
    """The task a record's shape suggests when no config names one (`data check` without --config,
    `init`): preference pairs, rankings and OpenAI's DPO shape -> dpo, else the first task that reads the detected format."""
    if {"chosen", "rejected"} <= set(fields) or "responses" in fields or is_openai_dpo(fields):
        return "dpo"
    for task in _TASKS.values():
        try:
            if task.detect(fields, data) in task.formats:
                return task.name
        except TunesmithError:
            continue
    raise TunesmithError(f"cannot tell the task from the columns {', '.join(fields)}; set task (or data.columns)")


def task_names() -> list[str]:
    return list(_TASKS)


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    """The whole data pipeline for a run, as its task reads and encodes (Task.prepare)."""
    return get_task(cfg.task).prepare(cfg, tokenizer)


def load_examples(cfg: RunConfig) -> tuple[str, list[str] | None, dict[str, list[Any]]]:
    """Read, validate and split without a tokenizer: (format, labels, splits)."""
    return split_examples(cfg, get_task(cfg.task).read)


def _with_data(task: str, data: DataConfig) -> RunConfig:
    return RunConfig.model_construct(task=task, data=data)  # the other sections at their defaults


def to_examples(records: list[Record], task: str, cfg: DataConfig, labels: list[str] | None,
                label_names: list[str] | None = None) -> tuple[str, list[Any]]:
    """Validate records for `task` with data settings only: (format, examples); DataError lists every bad one."""
    return get_task(task).read(records, _with_data(task, cfg), labels, label_names)


def tokenize(examples: list[Any], task: str, fmt: str, cfg: DataConfig, tokenizer) -> tuple[list[dict], TokenStats]:
    """Encode examples for `task` with data settings only (its chat-template rule applies)."""
    t, run = get_task(task), _with_data(task, cfg)
    return t.encode(examples, fmt, run, tokenizer, t.chat(run, fmt, examples, tokenizer))


def count_items(task: str, batch: dict) -> float:
    """The loss denominator a batch of `task` contributes (examples, target tokens, pair weights)."""
    return get_task(task).count_items(batch)
