"""One decoding step of the serving engine's model, by the adapters in the batch (the forward alone:
no HTTP, sampling or detokenising), on SmolLM2-135M-Instruct with 8 LoRA adapters (r 16, all
linear layers, random B as bench/serve.py makes them).

Run: .venv/bin/python bench/serve_step.py [--batch 8] [--compare OLD_LORA_BANK.py]

Mixes: plain (every row on the base), folded (every row on one adapter, served folded), mixed8
(each row on its own adapter, 8 distinct), mixed2 (two adapters, half the rows each). Each figure
is the lower quartile of 12 steps' CPU time of this thread (one torch thread), so the machine's
other jobs move it less than wall time. --compare loads another version of
tunesmith/serve/lora_bank.py beside this one (e.g. `git show main:tunesmith/serve/lora_bank.py >
/tmp/old.py`) and times both in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step_ms(model, bank, names: list[str | None], ids: torch.Tensor, steps: int = 12) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    bank.use([None] * len(names))
    times = []
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prompts' cache
        tok = torch.randint(0, 1000, (len(names), 1), generator=torch.Generator().manual_seed(0))
        for _ in range(steps):
            bank.use(names)
            t = time.thread_time()
            model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.thread_time() - t)
    return sorted(times)[len(times) // 4] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=40, help="tokens already in each row's cache")
    ap.add_argument("--compare", help="another lora_bank.py to time beside this one")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from bench.serve import BASE, make_adapters
    from tunesmith.models.load import resolve_model_path
    from tunesmith.serve import lora_bank

    base = resolve_model_path(BASE)
    adapters = make_adapters(base, Path(tempfile.mkdtemp(prefix="bench-step-")), 8)
    versions = {"this": lora_bank}
    if args.compare:
        spec = importlib.util.spec_from_file_location("other_lora_bank", args.compare)
        other = importlib.util.module_from_spec(spec)
        sys.modules["other_lora_bank"] = other  # dataclasses look their module up
        spec.loader.exec_module(other)
        versions["other"] = other
    setups = {}
    for name, mod in versions.items():
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        bank = mod.LoraBank(model)
        for i, p in enumerate(adapters):
            bank.add(f"a{i}", p)
        setups[name] = (model, bank)
    b = args.batch
    mixes = {"plain": [None] * b, "folded": ["a0"] * b, "mixed8": [f"a{i % 8}" for i in range(b)],
             "mixed2": [f"a{i % 2}" for i in range(b)]}
    ids = torch.randint(0, 1000, (b, args.prompt), generator=torch.Generator().manual_seed(1))
    for _ in range(args.repeats):
        row = {f"{mix}/{name}": round(step_ms(model, bank, names, ids), 1)
               for mix, names in mixes.items() for name, (model, bank) in setups.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
