"""Helpers for the service tests: a data dir with a tiny model, OpenAI-format files, waiting."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from tunesmith.data.openai_format import validate_file
from tunesmith.service.store import Store, new_id

FACTS = [("what is your name", "alpha beta"), ("who created you", "gamma delta"), ("what city", "seven eight"),
         ("what year", "nine ten"), ("hello", "one two three")]


def chat_rows(n: int) -> list[dict]:
    """OpenAI chat-format examples of a few facts the tiny model can learn."""
    return [{"messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in (FACTS[i % len(FACTS)] for i in range(n))]


def dpo_rows(n: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": "bad awful"}]}
            for q, a in (FACTS[i % len(FACTS)] for i in range(n))]


def data_dir_with_model(root: Path, tiny_llama: Path) -> Path:
    """DATA_DIR with the tiny model as DATA_DIR/models/tiny (jobs ask for model="tiny")."""
    root.mkdir(parents=True, exist_ok=True)
    models = root / "models"
    models.mkdir(exist_ok=True)
    if not (models / "tiny").exists():
        shutil.copytree(tiny_llama, models / "tiny")
    return root


def add_file(store: Store, project_id: str, data_dir: Path, rows: list[dict], kind: str = "chat") -> dict:
    """An uploaded, validated file as the API leaves it (files/<id>.jsonl, status processed, info)."""
    fid = new_id("file-")
    path = data_dir / "files" / f"{fid}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = validate_file(path, kind)
    assert rep.ok, rep.summary()
    info = rep.as_dict() | {"task": "dpo" if kind == "dpo" else "sft"}
    return store.add_file(project_id, f"{kind}.jsonl", "fine-tune", path.stat().st_size, f"files/{fid}.jsonl",
                          id=fid, status="processed", info=info)


def wait_for(what: Callable[[], object], timeout: float, message: str, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
