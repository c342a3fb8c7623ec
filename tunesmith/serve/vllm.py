"""The same run folders on vLLM (GPUs, scale): the `vllm serve` command that serves them.

vLLM loads peft adapter folders as they are (`--lora-modules name=path`), over the base model
folder they were trained on; tunesmith's builtin: aliases and .gguf files resolve to that folder.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.models.load import resolve_model_path
from tunesmith.runs import is_run_dir
from tunesmith.serve.models import parse_spec


def vllm_command(specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules name=path ...` for these runs (or BASE + adapters)."""
    base, modules, ranks = None, [], []
    for spec in specs:
        name, path = parse_spec(spec)
        p = Path(path)
        if is_run_dir(p):
            if not (p / "adapter" / "adapter_config.json").is_file():
                this = str(p / "model")
            else:
                this = resolve_model_path(load_config(p / "config.yaml").model.name_or_path)
                modules.append(f"{name or p.name}={(p / 'adapter').resolve()}")
                ranks.append(json.loads((p / "adapter" / "adapter_config.json").read_text()).get("r", 8))
        elif (p / "adapter_config.json").is_file():
            modules.append(f"{name or p.name}={p.resolve()}")
            ranks.append(json.loads((p / "adapter_config.json").read_text()).get("r", 8))
            continue
        else:
            this = resolve_model_path(path)
        if base is not None and Path(this).resolve() != Path(base).resolve():
            raise TunesmithError(f"{path}: base '{this}' differs from '{base}'; one vLLM server serves one base")
        base = this
    if base is None:
        raise TunesmithError("give a base model or at least one run")
    cmd = ["vllm", "serve", base, "--host", host, "--port", str(port)]
    if modules:
        # vLLM's default --max-lora-rank is 16; a larger rank must be declared.
        cmd += ["--enable-lora", "--max-loras", str(max(len(modules), 1)), "--max-lora-rank", str(max(max(ranks), 8)),
                "--lora-modules", *modules]
    for key in api_keys or []:
        cmd += ["--api-key", key]
    return cmd


def run_vllm(specs: list[str], host: str, port: int, api_keys: list[str] | None) -> int:
    """Print the command; run it where vLLM is installed, else say how to install it."""
    import os
    import sys

    cmd = vllm_command(specs, host, port, api_keys)
    print(shlex.join(cmd), flush=True)
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed here: on a CUDA machine, `pip install vllm`, then run the command above "
              "(see docs/SERVING.md).", file=sys.stderr)
        return 1
    os.execvp(cmd[0], cmd)
    return 0  # not reached
