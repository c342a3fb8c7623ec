"""Checkpoints that resume exactly: trainable weights, optimizer, schedule, RNG, data position.

Only the weights that train are saved (a LoRA checkpoint is a few MB, not the whole model).
Writes go to a temporary folder renamed into place, so a crash never leaves a torn checkpoint.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.methods.common import trainable_state
from tunesmith.utils import atomic_folder


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, optimizer=None, scheduler=None, progress: dict[str, Any] | None = None,
                    ema=None, method=None) -> None:
    """Atomically write a checkpoint folder: weights.pt, plus state.pt when an optimizer is given
    (without one it is a weights-only copy, as kept for the best validation step). weights.pt holds
    the raw training weights; a weight average, if any, and a method's own state (diff pruning's
    mask) go into state.pt."""
    with atomic_folder(folder) as tmp:
        torch.save(trainable_state(model), tmp / "weights.pt")
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state(), "progress": progress,
                        **({"ema": ema.state_dict()} if ema is not None else {}),
                        **({"method": method.state_dict()} if method is not None else {})}, tmp / "state.pt")


def load_weights(folder: Path, model) -> None:
    """Load trainable weights saved by save_checkpoint into the (same-shaped) model."""
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    missing = set(state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {folder} has weights the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
