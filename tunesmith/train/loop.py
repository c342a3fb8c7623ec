"""The training loop: forward, loss, backward, accumulate, clip, step, evaluate, checkpoint.

Read top to bottom. Objectives plug in as `(model, batch) -> LossOut`; methods only decide
which parameters have requires_grad. Progress goes to `on_event` (for workers and UIs) and
`cancel` (a threading.Event) stops the run cleanly after saving a checkpoint.
"""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from tunesmith.config import RunConfig
from tunesmith.data import PreparedData
from tunesmith import faults
from tunesmith.data.collate import collate_any, feature_length, padded_width, split_by_tokens
from tunesmith.data.mixing import epoch_batches
from tunesmith.errors import TrainingCancelled, TunesmithError
from tunesmith.evaluate import score_features
from tunesmith.methods import training_schedule
from tunesmith.tasks import get_task
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed as dist
from tunesmith.train import frozen_cache
from tunesmith.train import sharded
from tunesmith.train.averaging import WeightAverage
from tunesmith.utils import malloc_trim

EventFn = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    steps: int
    best_metric: str
    best_value: float | None
    best_step: int | None
    stopped_early: bool
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm


def make_optimizer(model, cfg: RunConfig, device: str = "cpu") -> torch.optim.Optimizer:
    """AdamW (torch, or bitsandbytes 8-bit/paged); no weight decay on biases and norms (1-D tensors)."""
    from tunesmith.models.quant import make_optimizer_class

    from tunesmith.methods.diff_pruning import GATE_LR

    decay, no_decay, lora_b, gates = [], [], [], []
    ratio = cfg.method.opt("lr_ratio") if cfg.method.name in ("lora", "dora", "qlora") else 1.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            # LoRA+: peft names the up-projections lora_B.<adapter>.weight; diff pruning's gates are *.log_alpha
            (lora_b if ratio != 1.0 and ".lora_B." in name else gates if name.endswith(".log_alpha")
             else no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": lora_b, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.lr * ratio},
              {"params": gates, "weight_decay": 0.0, "lr": GATE_LR}]
    cls, note = make_optimizer_class(cfg.train.optimizer, device)
    if note:
        print(note, file=sys.stderr, flush=True)
    # torch's fused AdamW (CPU and CUDA) updates every tensor in one kernel; the default foreach
    # path builds a temporary copy of the parameter list each step. For SmolLM2 LoRA r16 on an
    # H100: 0.2 against 18.6 MB extra peak, 1.75 against 4.4 ms a step. Same updates to float
    # rounding (5e-8 after 20 steps); also the HF Trainer's default.
    kwargs = {"fused": True} if cls is torch.optim.AdamW and device in ("cpu", "cuda") else {}
    return cls([g for g in groups if g["params"]], lr=cfg.train.lr, **kwargs)


def _improved(value: float, best: float | None, greater: bool) -> bool:
    return best is None or (value > best if greater else value < best)


def fit(model, tokenizer, data: PreparedData, cfg: RunConfig, acc: Accelerator, run_dir: Path, *,
        on_event: EventFn | None = None, cancel: threading.Event | None = None,
        resume_from: Path | None = None) -> FitResult:
    """The loop. On N data-parallel processes every process runs it; process 0 alone writes the
    log and the checkpoints, and the processes decide together (train/distributed.py) when to stop
    or skip a step, so none is left waiting in an all-reduce."""
    t = cfg.train
    main, size = acc.is_main_process, acc.num_processes
    emit = on_event if on_event is not None and main else (lambda e: None)

    def say(text: str) -> None:  # a message for the log and the terminal (process 0)
        emit({"kind": "message", "text": text})
        if main:
            tqdm.write(text, file=sys.stderr)
    task = get_task(cfg.task)
    objective = task.objective(cfg)
    train_split = data.splits["train"]
    feats = train_split.features
    val = data.splits.get("validation")
    lengths = [feature_length(f) for f in feats]
    pad_id = tokenizer.pad_token_id

    def epoch_order(epoch: int) -> list[list[int]]:  # data.train's weights and data.order (data/mixing.py)
        return epoch_batches(lengths, train_split.sources, train_split.scores, cfg.data, t.batch_size, t.seed, epoch,
                             t.group_by_length)

    # train.batch_size is the global micro-batch: the step's shape does not depend on the process count
    batches_per_epoch = len(epoch_order(0))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    eval_every = steps_per_epoch if t.eval_every == "epoch" else t.eval_every
    metric, greater = cfg.best_metric()

    fsdp = sharded.requested() and size > 1  # FSDP2: this process holds 1/N of each weight (train/sharded.py)
    if fsdp:
        _check_fsdp(cfg, acc.unwrap_model(model))
        sharded.shard_model(acc.unwrap_model(model))  # in place, before the optimizer sees the parameters
    optimizer = make_optimizer(model, cfg, acc.device.type)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    if not fsdp:  # accelerate would wrap the sharded model in DDP on CPUs: FSDP2 reduces its own gradients
        model, optimizer = acc.prepare(model, optimizer)
    no_sync = (lambda: sharded.no_sync(model)) if fsdp else (lambda: acc.no_sync(model))
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = training_schedule(acc.unwrap_model(model), cfg.method)  # diff pruning: L0 penalty, mask step
    ema = WeightAverage(params, t.ema_decay) if t.ema_decay else None
    averaged = ema.applied if ema is not None else nullcontext  # what evaluation and the kept model see
    frozen, why = (None, "frozen-bottom cache: off under FSDP") if fsdp else frozen_cache.plan(
        acc.unwrap_model(model), cfg, [feats, val.features if val is not None else []])
    if why:
        emit({"kind": "message", "text": why})
    from_frozen = frozen.use if frozen is not None else (lambda fs, b: nullcontext())

    # Where we are: a fresh run starts at zero, a resumed one where its checkpoint left off.
    prog = {"step": 0, "epoch": 0, "batch": 0, "best_value": None, "best_step": None, "bad_evals": 0,
            "skipped": 0, "bad_run": 0,  # non-finite steps: in all, and in a row now
            "run_loss": 0.0, "run_count": 0, "run_extras": {}, "run_correct": 0}  # sums since the last log line (kept so resume logs match)
    # The training rows also carry the objective's argmax hits as the task's accuracy metric (token
    # accuracy for the LM tasks): the job service reports it per step, as OpenAI's metrics events do.
    acc_key = next((k for k in ("token_accuracy", "accuracy") if k in task.metrics), None)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:  # older checkpoints lack some progress keys: prog's defaults stay
        prog = prog | _restore(resume_from, acc, model, optimizer, scheduler, ema, schedule, emit)
        if main:
            _truncate_log(metrics_path, prog["step"])  # drop rows logged after the checkpoint
        dist.barrier(acc)
    history = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    saved_at = prog["step"] if resume_from is not None else None

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        _on_main(acc, lambda: _append(metrics_path, row, saved_at, run_dir))
        emit(row)

    def save(step: int) -> None:
        nonlocal saved_at
        rngs = dist.gather(acc, ckpt.rng_state())  # each process's dropout stream, to resume exactly
        shards = _write_shards(acc, run_dir, f"step-{step}", model, optimizer) if fsdp else None
        _on_main(acc, lambda: (ckpt.save_checkpoint(
            run_dir / "checkpoints" / f"step-{step}", acc.unwrap_model(model), None if fsdp else optimizer, scheduler,
            dict(prog), ema=ema, method=schedule, rngs=rngs, shards=shards),
            ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)))
        saved_at = step
        emit({"kind": "checkpoint", "step": step, "path": str(run_dir / "checkpoints" / f"step-{step}")})

    model.train()
    bar = tqdm(total=total_steps, initial=prog["step"], desc="train", dynamic_ncols=True,
               disable=not acc.is_local_main_process, mininterval=1 if sys.stderr.isatty() else 30)
    start = time.perf_counter()
    tokens_seen, stop = 0, False
    while prog["step"] < total_steps and not stop:
        order = epoch_order(prog["epoch"])
        while prog["step"] < total_steps and not stop:
            # ---- one optimizer step over grad_accum (global) micro-batches; this process's share ----
            batch_idx = range(prog["batch"], min(prog["batch"] + t.grad_accum, len(order)))
            group = [piece for j in batch_idx  # pieces bound activation memory (train.max_batch_tokens)
                     for piece in split_by_tokens([feats[i] for i in order[j]], t.max_batch_tokens)]
            denom, shares = _shares(group, task, pad_id, acc.process_index, size)  # denom: the step's loss normaliser
            loss_sum, extras, tokens, correct = 0.0, {}, 0, 0
            for k, (batch, batch_feats, weight) in enumerate(shares):
                batch = {n: v.to(acc.device) for n, v in batch.items()}
                # DDP: gradients all-reduce (averaged over processes) once per step, on the last micro-batch's backward.
                with nullcontext() if k == len(shares) - 1 else no_sync():
                    with acc.autocast(), from_frozen(batch_feats, batch):
                        out = objective(model, batch)
                        loss = out.loss_sum * (weight * size / (denom if denom > 0 else 1))
                        if schedule is not None:  # a per-step penalty, spread over the micro-batches
                            loss = loss + schedule.penalty() / len(shares)
                    acc.backward(loss)
                if k < len(shares) - 1:
                    faults.reached("micro-batch")
                for name, v in out.extras.items():  # e.g. DPO's implicit rewards, logged per step
                    extras[name] = extras.get(name, 0.0) + (v if weight else 0.0)  # same keys on every process
                if weight:
                    loss_sum += float(out.loss_sum.detach())
                    tokens += int(batch["attention_mask"].sum())
                    correct += int(out.correct)
            norm = _grad_norm(acc, params, t.max_grad_norm, fsdp)  # clipped to max_grad_norm when set
            names = sorted(extras)
            totals = dist.sum_across(acc, [loss_sum, tokens, float(cancel is not None and cancel.is_set()), correct,
                                           *[extras[n] for n in names]])
            loss_sum, tokens, cancelled = totals[0], int(totals[1]), totals[2] > 0  # every process agrees
            if math.isfinite(loss_sum) and math.isfinite(norm):
                optimizer.step()
                prog["bad_run"] = 0
                prog["run_loss"] += loss_sum
                prog["run_count"] += denom
                prog["run_correct"] += int(totals[3])
                for name, v in zip(names, totals[4:]):
                    prog["run_extras"][name] = prog["run_extras"].get(name, 0.0) + v
            else:  # skip the update on every process (the gradient norm is the all-reduced one)
                prog["skipped"] += 1
                prog["bad_run"] += 1
                say(f"step {prog['step'] + 1}: non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} "
                    f"(loss {loss_sum:.4g}, gradient norm {norm:.4g}); update skipped ({prog['bad_run']} in a row, "
                    f"{prog['skipped']} in all)")
                if prog["bad_run"] >= t.max_bad_steps:
                    raise NonFiniteError(_non_finite_message(prog, saved_at, run_dir, t.max_bad_steps))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if t.return_memory == "step":  # the step's activations back to the OS (utils.malloc_trim)
                malloc_trim()
            if ema is not None and prog["bad_run"] == 0:
                ema.update()
            faults.reached("step")
            if schedule is not None and schedule.step(prog["step"] + 1, total_steps):
                # From here on the model is the pruned one: evaluations of the unpruned diff no longer count.
                prog.update(best_value=None, best_step=None, bad_evals=0)
                say(schedule.describe())
            prog["step"] += 1
            prog["batch"] += len(batch_idx)
            step = prog["step"]
            epoch_float = round(prog["epoch"] + prog["batch"] / len(order), 3)
            epoch_done = prog["batch"] >= len(order)
            if epoch_done:  # the checkpoint below must point at the next epoch's start
                prog.update(epoch=prog["epoch"] + 1, batch=0)

            # ---- logging ----
            tokens_seen += tokens
            elapsed = time.perf_counter() - start
            if step % t.log_every == 0 or step == total_steps:
                log({"kind": "train", "step": step, "total_steps": total_steps, "epoch": epoch_float,
                     "loss": prog["run_loss"] / max(prog["run_count"], 1), "lr": scheduler.get_last_lr()[0],
                     "grad_norm": norm,  # this step's (before clipping), as the HF Trainer logs it
                     "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "skipped_steps": prog["skipped"],
                     **({acc_key: prog["run_correct"] / max(prog["run_count"], 1)} if acc_key else {}),
                     **{k: v / max(prog["run_count"], 1) for k, v in prog["run_extras"].items()}})
                bar.set_postfix(loss=f"{prog['run_loss'] / max(prog['run_count'], 1):.4f}",
                                tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}", refresh=False)
                prog.update(run_loss=0.0, run_count=0, run_extras={}, run_correct=0)
            bar.update(1)

            # ---- evaluate, keep best, checkpoint, early stopping ----
            if step % eval_every == 0 or step == total_steps or (t.eval_every == "epoch" and epoch_done):
                row: dict[str, Any] = {"kind": "eval", "step": step, "total_steps": total_steps, "epoch": epoch_float}
                if val is not None:
                    with averaged():
                        m = score_features(acc.unwrap_model(model), val.features, cfg, data.labels, pad_id, acc,
                                           frozen=frozen)
                        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
                        improved = _improved(row[metric], prog["best_value"], greater)
                        if improved:  # the kept copy holds what was just evaluated
                            best = _write_shards(acc, run_dir, "best", model, None) if fsdp else None
                            _on_main(acc, lambda: ckpt.save_checkpoint(run_dir / "checkpoints" / "best",
                                                                        acc.unwrap_model(model), shards=best))
                    if improved:
                        prog.update(best_value=row[metric], best_step=step, bad_evals=0)
                    else:
                        prog["bad_evals"] += 1
                    stop = t.early_stopping_patience is not None and prog["bad_evals"] >= t.early_stopping_patience
                    row["early_stop"] = stop
                    if main:
                        bar.write(file=sys.stderr, s=f"step {step}: validation " + ", ".join(f"{k} {row[k]:.4f}" for k in dict.fromkeys(("loss", metric)) if k in row))
                if t.return_memory == "step":
                    malloc_trim()
                row["elapsed_s"] = round(time.perf_counter() - start, 2)  # training clock incl. evals: time-to-accuracy
                log(row)
                if prog["bad_run"] == 0:  # in a run of skipped steps, the last good checkpoint stays the newest
                    save(step)
            elif t.save_every is not None and step % t.save_every == 0 and prog["bad_run"] == 0:
                save(step)  # between evaluations: a hard kill loses little
            # one process: a cancel that came during this step's evaluation or checkpoint counts now
            cancelled = cancelled or (size == 1 and cancel is not None and cancel.is_set())
            if cancelled:  # Ctrl-C / SIGTERM / the caller, on any process: stop at this step boundary
                if saved_at != step:
                    save(step)
                bar.close()
                raise TrainingCancelled(f"stopped at step {step} of {total_steps}; checkpoint saved in "
                                        f"{run_dir / 'checkpoints' / f'step-{step}'}; continue with --resume")
            if epoch_done:
                break  # next epoch: a new order
    bar.close()
    if ema is not None:
        ema.copy_to_params()  # the model this run hands on is the average it evaluated
    return FitResult(steps=prog["step"], best_metric=metric, best_value=prog["best_value"], best_step=prog["best_step"],
                     stopped_early=stop, train_seconds=time.perf_counter() - start, history=history,
                     skipped_steps=prog["skipped"])


def _shares(group: list[list[dict]], task, pad_id: int, rank: int, size: int) -> tuple[float, list[tuple[dict, list[dict], float]]]:
    """This process's share of each micro-batch of a step, collated, with its weight (1, or 0 for a
    stand-in example when the share is empty), and the step's item count over all processes (the
    loss normaliser). Each share is padded to its micro-batch's width, as one process pads it."""
    denom, mine = 0.0, []
    for feats in group:
        width = padded_width(feats)
        for r in range(size):
            part = dist.shard(feats, r, size)
            batch = collate_any(part or feats[:1], pad_id, width)
            if part:
                denom += task.count_items(batch)
            if r == rank:
                mine.append((batch, part or feats[:1], 1.0 if part else 0.0))
    return denom, mine


def _grad_norm(acc: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None, fsdp: bool = False) -> float:
    """The gradient's total norm (after DDP's all-reduce: the same on every process), clipped when asked.
    Under FSDP2 each process holds a shard of each gradient: the norm is a DTensor, made whole here."""
    if max_norm is not None:
        norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if fsdp else acc.clip_grad_norm_(params, max_norm))
        return float(sharded.full_tensor(norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(sharded.full_tensor(torch.nn.utils.get_total_norm(grads))) if grads else 0.0


def _check_fsdp(cfg: RunConfig, model) -> None:
    """What the FSDP2 path does not handle yet: say so before training starts."""
    from tunesmith.models.quant import is_quantized

    problems = [what for what, bad in (("train.ema_decay (the average is kept by process 0 alone)", cfg.train.ema_decay),
                                       ("method diff_pruning (its mask state is kept by process 0 alone)",
                                        cfg.method.name == "diff_pruning"),
                                       ("a quantised base (QLoRA)", is_quantized(model))) if bad]
    if problems:
        raise TunesmithError("FSDP2 launches do not support " + "; ".join(problems) + " yet: run it data parallel "
                             "(configs/accelerate/ddp.yaml, or tunesmith train --nproc N)")


def _write_shards(acc: Accelerator, run_dir: Path, name: str, model, optimizer) -> Path:
    """Every process writes its shard of the trainable weights (and the optimizer state) into a
    temporary folder that process 0 then moves into the checkpoint `name` (FSDP2, train/sharded.py).
    A kill leaves only a `.tmp-*` folder, which resume removes."""
    folder = run_dir / "checkpoints" / f".tmp-shards-{name}"
    if acc.is_main_process:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier(acc)
    sharded.save_shards(folder, model, optimizer)
    return folder


def _on_main(acc: Accelerator, write: Callable[[], Any]) -> None:
    """Process 0 writes; every process learns whether it failed (else the others would wait forever
    at the next all-reduce) and raises."""
    error: Exception | None = None
    if acc.is_main_process:
        try:
            write()
        except ckpt.CheckpointError as e:
            error = e
    if dist.agree(acc, error is not None):
        raise error or ckpt.CheckpointError("process 0 could not write a checkpoint (its error says why)")


def _restore(folder: Path, acc: Accelerator, model, optimizer, scheduler, ema, schedule, emit: EventFn) -> dict[str, Any]:
    """Load a checkpoint into the run's objects; returns its progress."""
    if (folder / ckpt.SHARDS).is_dir():  # FSDP2: each process reads its shard of the weights and optimizer state
        sharded.load_shards(folder / ckpt.SHARDS, acc.unwrap_model(model), optimizer)
    else:
        ckpt.load_weights(folder, acc.unwrap_model(model))
    state = ckpt.load_state(folder)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng_by_rank", [state["rng"]])
    if len(rngs) != acc.num_processes:
        emit({"kind": "message", "text": f"the checkpoint was written by {len(rngs)} process(es), this run has "
              f"{acc.num_processes}: same data order and weights, but dropout draws differ from the original run"})
    ckpt.set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if schedule is not None:
        schedule.load_state_dict(state["method"])
    return state["progress"]  # older checkpoints lack some keys: the caller's defaults stay


class NonFiniteError(TunesmithError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def _non_finite_message(prog: dict[str, Any], saved_at: int | None, run_dir: Path, limit: int) -> str:
    last = (f"the newest checkpoint, {run_dir / 'checkpoints' / f'step-{saved_at}'}, holds the last good weights"
            if saved_at is not None else "no checkpoint had been written yet")
    return (f"stopped at step {prog['step'] + 1}: {limit} steps in a row had a non-finite loss or gradient norm "
            f"(each was skipped: no update); {last}. Try a lower train.lr, train.max_grad_norm, train.precision=fp32, "
            f"or look for extreme values in the data, then start again or --resume")


def _append(path: Path, row: dict[str, Any], saved_at: int | None, run_dir: Path) -> None:
    try:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # disk full, folder made read-only: say so, like a failed checkpoint
        last = run_dir / "checkpoints" / f"step-{saved_at}" if saved_at is not None else "none yet"
        raise ckpt.CheckpointError(f"could not append to {path}: {ckpt.os_error(e)}; the newest checkpoint ({last}) "
                                   "is intact. Free disk space or make the folder writable, then --resume") from e


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
