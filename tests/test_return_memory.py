"""train.return_memory (utils.set_mmap_threshold / malloc_trim): freed tensors go back to the OS, and
the run computes the same numbers whichever way; train() installs the lean LoRA dropout by default."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.utils import _glibc
from tests.conftest import write_jsonl

glibc = pytest.mark.skipif(_glibc() is None, reason="glibc malloc only (Linux)")

# In a fresh process: a 16 MB tensor is freed (glibc's dynamic threshold would now put blocks up to
# 16 MB on the heap), then a 4 MB one is allocated; mallinfo2 counts the mapped blocks.
PROBE = """
import ctypes, sys, torch
from tunesmith.utils import set_mmap_threshold
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MI2
applied = set_mmap_threshold(1 << 20) if sys.argv[1] == "mmap" else None
freed = torch.empty(4 << 20)  # 16 MB of fp32
del freed
before = libc.mallinfo2().hblks
big = torch.empty(1 << 20)  # 4 MB
print(applied, libc.mallinfo2().hblks - before)
"""


@glibc
@pytest.mark.parametrize("mode, mapped", [("keep", 0), ("mmap", 1)])
def test_mmap_threshold_keeps_big_tensors_off_the_heap(mode, mapped):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(mode == "mmap" or None), str(mapped)]


def _cfg(tiny_bert, data, out, name, mode):
    return load_config({
        "task": "classification", "model": {"name_or_path": str(tiny_bert), "dropout": 0.0, "attention_dropout": 0.0},
        "data": {"train": str(data), "val_size": 8, "test_size": 8},
        "method": {"name": "lora", "r": 4, "dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "return_memory": mode, "log_every": 1},
        "eval": {"before": False, "num_samples": 0},
        "output": {"dir": str(out / "{name}"), "name": name},
    })


def test_return_memory_modes_train_the_same(tiny_bert, sentiment_rows, tmp_path, monkeypatch):
    import tunesmith.train as train_module  # noqa: F401 (the module, for its set_mmap_threshold)

    train_mod = sys.modules["tunesmith.train"]
    loop_mod = sys.modules["tunesmith.train.loop"]
    calls = {"mmap": 0, "trim": 0}
    monkeypatch.setattr(train_mod, "set_mmap_threshold", lambda n: calls.__setitem__("mmap", calls["mmap"] + 1) or True)
    monkeypatch.setattr(loop_mod, "malloc_trim", lambda: calls.__setitem__("trim", calls["trim"] + 1) or True)
    real_install, installed = train_mod.install_lean_dropout, []
    monkeypatch.setattr(train_mod, "install_lean_dropout", lambda model: installed.append(real_install(model)) or installed[-1])
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows)
    runs = {}
    for mode in ("keep", "step", "mmap"):
        calls.update(mmap=0, trim=0)
        runs[mode] = train(_cfg(tiny_bert, data, tmp_path, mode, mode)).run_dir
        assert calls == {"keep": {"mmap": 0, "trim": 0}, "step": {"mmap": 0, "trim": 5}, "mmap": {"mmap": 1, "trim": 0}}[mode]
    losses = {m: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
              for m, d in runs.items()}
    assert losses["keep"] == losses["step"] == losses["mmap"]
    assert installed == [13, 13, 13]  # train.lean_lora_dropout (default on): 2 blocks x 6 linear layers and the pooler
    weights = {m: load_file(d / "adapter" / "adapter_model.safetensors") for m, d in runs.items()}
    for k, v in weights["keep"].items():
        assert v.equal(weights["step"][k]) and v.equal(weights["mmap"][k]), k
