"""Checkpoints that resume exactly: trainable weights, optimizer, schedule, RNG, data position.

Only the weights that train are saved (a LoRA checkpoint is a few MB, not the whole model).
A checkpoint is written into a temporary folder, its files fsynced, a completion marker
(COMPLETE, listing each file's size) written last, and only then renamed into place
(utils.atomic_folder). So a kill, a power cut or a full disk at any moment leaves either the
new checkpoint whole or no trace of it, and the previous one untouched; resume takes the newest
folder whose marker is there and whose files have the sizes it lists.
"""
from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith import faults
from tunesmith.errors import TunesmithError
from tunesmith.methods.common import trainable_state
from tunesmith.train import sharded
from tunesmith.train.sharded import SHARDS
from tunesmith.utils import atomic_folder, restore_aside

MARKER = "COMPLETE"


class CheckpointError(TunesmithError):
    """A checkpoint could not be written (disk full, folder not writable); the previous one is intact."""


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
                    ema=None, method=None, rngs: list[dict[str, Any]] | None = None, shards: Path | None = None) -> None:
    """Atomically write a checkpoint folder: weights.pt, plus state.pt when an optimizer is given
    (without one it is a weights-only copy, as kept for the best validation step). weights.pt holds
    the raw training weights; a weight average, if any, and a method's own state (diff pruning's
    mask) go into state.pt. `rngs`: every process's RNG state, by rank (default: this process's).
    `shards`: under FSDP2, a folder every process has written its shard of the weights and optimizer
    state into (train/sharded.py); it is moved in as `sharded/` in place of weights.pt and the
    optimizer, and state.pt (written when `progress` is given) holds the rest.

    Raises:
        CheckpointError: the folder could not be written (the message says why, and which
            checkpoint is still there to resume from).
    """
    folder = Path(folder)
    try:
        with atomic_folder(folder, durable=True) as tmp:
            if shards is None:
                _save(trainable_state(model), tmp / "weights.pt")
            else:
                shutil.move(str(shards), str(tmp / SHARDS))
            faults.reached("checkpoint-write")
            if optimizer is not None or (shards is not None and progress is not None):
                rngs = rngs or [rng_state()]
                _save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                       "scheduler": scheduler.state_dict(),
                            "rng": rngs[0], "rng_by_rank": rngs, "progress": progress,
                            **({"ema": ema.state_dict()} if ema is not None else {}),
                            **({"method": method.state_dict()} if method is not None else {})}, tmp / "state.pt")
            sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / MARKER).write_text(json.dumps({"files": sizes}))  # last: its presence means the rest is whole
    except OSError as e:
        prev = latest_checkpoint(folder.parent.parent) if folder.parent.name == "checkpoints" else None
        kept = (f"the previous checkpoint {prev} is intact" if prev is not None and prev != folder
                else "no earlier checkpoint was touched")
        raise CheckpointError(f"could not write checkpoint {folder}: {os_error(e)}; {kept}. Free disk space or make "
                              f"the folder writable, then continue with --resume") from e


def _save(obj: Any, path: Path) -> None:
    """torch.save, with a full disk reported as the OSError it is (torch's zip writer turns the
    failed write into a RuntimeError about stream positions, the OSError kept as its context)."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from e
        raise


def os_error(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the words and the name a search finds."""
    return f"{e.strerror or e} ({errno.errorcode.get(e.errno, 'error')})" if e.errno else str(e)


def incomplete(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint, or None when it is."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (a write that never finished, or a checkpoint from before markers)"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"unreadable {MARKER} marker"
    for name, size in sizes.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or not the size its marker records"
    return None


def load_weights(folder: Path, model) -> None:
    """Load trainable weights saved by save_checkpoint into the (same-shaped) model. A sharded
    checkpoint (FSDP2) is read by every process, each into its own shard (a collective)."""
    if (folder / SHARDS).is_dir():
        sharded.load_shards(folder / SHARDS, model, None)
        return
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    missing = set(state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {folder} has weights the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


def _steps(run_dir: Path) -> list[Path]:
    """step-N folders, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def step_of(folder: Path | None) -> int | None:
    """The step of a checkpoint folder 'step-N' (None for None)."""
    return None if folder is None else int(folder.name.split("-")[1])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint."""
    return next((p for p in reversed(_steps(run_dir)) if incomplete(p) is None), None)


def find_resume(run_dir: Path) -> tuple[Path | None, list[str]]:
    """Tidy up after a crash (half-written temporary folders) and pick the checkpoint to resume:
    the newest complete one. Returns it and notes on what was skipped or tidied, for the log."""
    notes = restore_aside(Path(run_dir) / "checkpoints") if (Path(run_dir) / "checkpoints").is_dir() else []
    for p in reversed(_steps(run_dir)):
        why = incomplete(p)
        if why is None:
            return p, notes
        notes.append(f"skipped {p.name}: {why}")
    return None, notes


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the `keep` newest complete step checkpoints; delete older ones and incomplete ones below the
    newest complete one. The best copy (checkpoints/best) is a folder of its own and never pruned; the
    newest complete checkpoint is always among those kept (keep >= 1)."""
    steps = _steps(run_dir)
    complete = [p for p in steps if incomplete(p) is None]
    kept = set(complete[-max(keep, 1):])
    newest = complete[-1] if complete else None
    for p in steps:
        if p not in kept and newest is not None and int(p.name.split("-")[1]) < int(newest.name.split("-")[1]):
            shutil.rmtree(p, ignore_errors=True)
