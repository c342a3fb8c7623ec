"""Errors a user can act on.

Every error that comes from user input (config, data files, model paths) is a
`TunesmithError`; the CLI prints it without a traceback. Data errors carry the
file, line and field so the message points at the exact place to fix.
"""
from __future__ import annotations

from dataclasses import dataclass


class TunesmithError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


@dataclass(frozen=True)
class Location:
    """Where a record came from: file path and 1-based line (or row for binary formats)."""

    path: str
    line: int | None = None
    unit: str = "line"  # "line" for text formats, "row" for parquet / saved datasets

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.unit} {self.line}"


@dataclass(frozen=True)
class Problem:
    """One data problem: where, which field, what is wrong."""

    where: Location
    message: str
    field: str | None = None

    def __str__(self) -> str:
        fld = f" field '{self.field}':" if self.field else ""
        return f"{self.where}:{fld} {self.message}"


class DataError(TunesmithError):
    """One or more problems in data files; the message lists them all (up to a limit)."""

    def __init__(self, problems: list[Problem], limit: int = 20, partial: list | None = None):
        self.problems = problems
        self.partial = partial or []  # the records that were fine, for reports that go on
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} data problem(s):\n{shown}{more}")


class ConfigError(TunesmithError):
    """The config is invalid; the message lists every problem at once."""


class TrainingCancelled(TunesmithError):
    """Raised inside `train()` when the caller's cancel event is set; a checkpoint was saved."""
