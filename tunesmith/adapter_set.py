"""Many adapters over one base model in one process ("one app, many tasks").

The base is loaded once; each run's peft adapter is added under a name, and a call picks its
adapter with peft's `set_adapter`, which only changes which adapter weights the wrapped layers
use: no weights are loaded or copied on a switch. Each adapter keeps its own run config
(template, chat template, labels, generation length), so it answers the way it was trained.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import RunConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import predict_texts
from tunesmith.models.load import load_tokenizer, resolve_model_path
from tunesmith.train.runtime import make_accelerator
from tunesmith.tasks import get_task


@dataclass
class _Entry:
    run_dir: Path
    cfg: RunConfig
    tokenizer: object
    labels: list[str] | None
    chat: bool


class AdapterSet:
    """Load adapters of runs that share a base; predict with any of them per call.

    >>> s = AdapterSet(); s.add("sentiment", "runs/a"); s.add("identity", "runs/b")
    >>> s.predict(["Who made you?"], adapter="identity")
    """

    def __init__(self) -> None:
        self.model = None
        self.entries: dict[str, _Entry] = {}
        self.active: str | None = None
        self.base_key: tuple | None = None
        self.acc = None
        self.load_seconds: dict[str, float] = {}
        self.switch_seconds: list[float] = []

    def add(self, name: str, run_dir: str | Path) -> None:
        from peft import PeftModel

        from tunesmith.runs import is_run_dir, load_base, to_device

        run_dir = Path(run_dir)
        if name in self.entries:
            raise TunesmithError(f"adapter name '{name}' is already taken")
        if not is_run_dir(run_dir) or not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise TunesmithError(f"{run_dir}: not a run with a peft adapter (adapter/adapter_config.json); "
                                 "only adapter runs can share a base")
        cfg = load_config(run_dir / "config.yaml")
        info = json.loads((run_dir / "run.json").read_text())
        key = (resolve_model_path(cfg.model.name_or_path), get_task(cfg.task).head, cfg.method.opt("quantize")
               if cfg.method.name in ("lora", "dora", "qlora") else "none")
        if self.base_key is not None and key != self.base_key:
            raise TunesmithError(f"{run_dir}: its base {key} differs from the loaded base {self.base_key}; "
                                 "adapters in one set must share the base model, head type and quantisation")
        tok = load_tokenizer(str(run_dir / "adapter"))
        t0 = time.perf_counter()
        if self.model is None:
            self.acc, _ = make_accelerator(cfg.train)
            base = load_base(cfg, info.get("labels"), tok.pad_token_id)
            self.model = PeftModel.from_pretrained(base, str(run_dir / "adapter"), adapter_name=name)
            to_device(self.model, self.acc.device)
            self.base_key = key
            self.active = name
        else:
            self.model.load_adapter(str(run_dir / "adapter"), adapter_name=name)
            to_device(self.model, self.acc.device)
            self.model.set_adapter(self.active)  # loading does not change the active adapter; keep it explicit
        self.model.eval()
        self.load_seconds[name] = time.perf_counter() - t0
        self.entries[name] = _Entry(run_dir, cfg, tok, info.get("labels"), bool(info.get("chat_template")))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def use(self, name: str) -> float:
        """Make `name` the active adapter; returns the seconds the switch took."""
        if name not in self.entries:
            raise TunesmithError(f"no adapter named '{name}'; loaded: {', '.join(self.entries) or 'none'}")
        t0 = time.perf_counter()
        if name != self.active:
            self.model.set_adapter(name)
            self.active = name
        dt = time.perf_counter() - t0
        self.switch_seconds.append(dt)
        return dt

    @torch.no_grad()
    def predict(self, texts: list[str], adapter: str, max_new_tokens: int | None = None) -> list[dict]:
        """Classify or generate with one adapter, exactly as `tunesmith predict` does for its run."""
        self.use(adapter)
        e = self.entries[adapter]
        cfg = e.cfg
        if max_new_tokens:
            cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": max_new_tokens})})
        return predict_texts(self.model, e.tokenizer, texts, cfg, e.chat, e.labels, self.acc)
