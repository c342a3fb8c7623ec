"""The task seam: what the rest of tunesmith may ask of a task, in one place.

A first slice (issue 20 grows it into one module per task): how a trained run of the task
predicts, and what a served model of it offers. The server, the job service and search ask
this instead of comparing task names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunesmith.errors import ConfigError

Predicts = Literal["classify", "score", "generate"]
# What a server may offer for a model: OpenAI's chat/completions for generative tasks,
# /classify and /v1/embeddings for encoder classifiers, scoring for reward models.
Endpoint = Literal["chat", "completions", "classify", "score", "embeddings"]


@dataclass(frozen=True)
class Task:
    name: str
    predicts: Predicts
    serves: frozenset[str]


_GENERATE = frozenset({"chat", "completions"})
_TASKS = {
    "classification": Task("classification", "classify", frozenset({"classify", "embeddings"})),
    "reward": Task("reward", "score", frozenset({"score", "embeddings"})),
    **{name: Task(name, "generate", _GENERATE) for name in ("sft", "cpt", "dpo", "kto", "orpo", "ppo", "grpo")},
}


def get_task(name: str) -> Task:
    """The task called `name`; a clear error for an unknown one."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}'; known: {', '.join(_TASKS)}") from None
