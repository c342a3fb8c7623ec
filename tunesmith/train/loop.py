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
from tunesmith.data.collate import collate_any, feature_length, split_by_tokens
from tunesmith.data.mixing import epoch_batches
from tunesmith.errors import TrainingCancelled
from tunesmith.evaluate import score_features
from tunesmith.methods import training_schedule
from tunesmith.tasks import get_task
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import frozen_cache
from tunesmith.train.averaging import WeightAverage

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
    t = cfg.train
    emit = on_event or (lambda e: None)
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

    batches_per_epoch = len(epoch_order(0))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    eval_every = steps_per_epoch if t.eval_every == "epoch" else t.eval_every
    metric, greater = cfg.best_metric()

    optimizer = make_optimizer(model, cfg, acc.device.type)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = training_schedule(acc.unwrap_model(model), cfg.method)  # diff pruning: L0 penalty, mask step
    ema = WeightAverage(params, t.ema_decay) if t.ema_decay else None
    averaged = ema.applied if ema is not None else nullcontext  # what evaluation and the kept model see
    frozen, why = frozen_cache.plan(acc.unwrap_model(model), cfg, [feats, val.features if val is not None else []])
    if why:
        emit({"kind": "message", "text": why})
    from_frozen = frozen.use if frozen is not None else (lambda fs, b: nullcontext())

    # Where we are: a fresh run starts at zero, a resumed one where its checkpoint left off.
    prog = {"step": 0, "epoch": 0, "batch": 0, "best_value": None, "best_step": None, "bad_evals": 0,
            "run_loss": 0.0, "run_count": 0, "run_extras": {}, "run_correct": 0}  # sums since the last log line (kept so resume logs match)
    # The training rows also carry the objective's argmax hits as the task's accuracy metric (token
    # accuracy for the LM tasks): the job service reports it per step, as OpenAI's metrics events do.
    acc_key = next((k for k in ("token_accuracy", "accuracy") if k in task.metrics), None)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        ckpt.load_weights(resume_from, acc.unwrap_model(model))
        state = ckpt.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if schedule is not None:
            schedule.load_state_dict(state["method"])
        prog = {"run_extras": {}, "run_correct": 0} | state["progress"]  # older checkpoints lack these keys
        _truncate_log(metrics_path, prog["step"])  # drop rows logged after the checkpoint
    history = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        emit(row)

    def save(step: int) -> None:
        ckpt.save_checkpoint(run_dir / "checkpoints" / f"step-{step}", acc.unwrap_model(model), optimizer, scheduler,
                             dict(prog), ema=ema, method=schedule)
        ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)
        emit({"kind": "checkpoint", "step": step, "path": str(run_dir / "checkpoints" / f"step-{step}")})

    model.train()
    bar = tqdm(total=total_steps, initial=prog["step"], desc="train", dynamic_ncols=True,
               disable=not acc.is_local_main_process, mininterval=1 if sys.stderr.isatty() else 30)
    start = time.perf_counter()
    tokens_seen, stop = 0, False
    while prog["step"] < total_steps and not stop:
        order = epoch_order(prog["epoch"])
        while prog["step"] < total_steps and not stop:
            # ---- one optimizer step over grad_accum micro-batches ----
            batch_idx = range(prog["batch"], min(prog["batch"] + t.grad_accum, len(order)))
            group_feats = [piece for j in batch_idx  # pieces bound activation memory (train.max_batch_tokens)
                           for piece in split_by_tokens([feats[i] for i in order[j]], t.max_batch_tokens)]
            group = [collate_any(fs, pad_id) for fs in group_feats]
            denom = sum(task.count_items(b) for b in group)  # loss normaliser for the whole step
            for k, (batch, batch_feats) in enumerate(zip(group, group_feats)):
                batch = {n: v.to(acc.device) for n, v in batch.items()}
                # DDP: gradients all-reduce once per step, on the last micro-batch's backward.
                with nullcontext() if k == len(group) - 1 else acc.no_sync(model):
                    with acc.autocast(), from_frozen(batch_feats, batch):
                        out = objective(model, batch)
                        loss = out.loss_sum / (denom if denom > 0 else 1)
                        if schedule is not None:  # a per-step penalty, spread over the micro-batches
                            loss = loss + schedule.penalty() / len(group)
                    acc.backward(loss)
                prog["run_loss"] += float(out.loss_sum.detach())
                prog["run_correct"] += out.correct
                for k, v in out.extras.items():  # e.g. DPO's implicit rewards, logged per step
                    prog["run_extras"][k] = prog["run_extras"].get(k, 0.0) + v
                tokens_seen += int(batch["attention_mask"].sum())
            prog["run_count"] += denom
            if t.max_grad_norm is not None:
                acc.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            if schedule is not None and schedule.step(prog["step"] + 1, total_steps):
                # From here on the model is the pruned one: evaluations of the unpruned diff no longer count.
                prog.update(best_value=None, best_step=None, bad_evals=0)
                emit({"kind": "message", "text": schedule.describe()})
                bar.write(schedule.describe())
            prog["step"] += 1
            prog["batch"] += len(batch_idx)
            step = prog["step"]
            epoch_float = round(prog["epoch"] + prog["batch"] / len(order), 3)
            epoch_done = prog["batch"] >= len(order)
            if epoch_done:  # the checkpoint below must point at the next epoch's start
                prog.update(epoch=prog["epoch"] + 1, batch=0)

            # ---- logging ----
            elapsed = time.perf_counter() - start
            if step % t.log_every == 0 or step == total_steps:
                log({"kind": "train", "step": step, "total_steps": total_steps, "epoch": epoch_float,
                     "loss": prog["run_loss"] / max(prog["run_count"], 1), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
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
                        m = score_features(model, val.features, cfg, data.labels, pad_id, acc, frozen=frozen)
                        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
                        improved = _improved(row[metric], prog["best_value"], greater)
                        if improved:  # the kept copy holds what was just evaluated
                            ckpt.save_checkpoint(run_dir / "checkpoints" / "best", acc.unwrap_model(model))
                    if improved:
                        prog.update(best_value=row[metric], best_step=step, bad_evals=0)
                    else:
                        prog["bad_evals"] += 1
                    stop = t.early_stopping_patience is not None and prog["bad_evals"] >= t.early_stopping_patience
                    row["early_stop"] = stop
                    bar.write(file=sys.stderr, s=f"step {step}: validation " + ", ".join(f"{k} {row[k]:.4f}" for k in dict.fromkeys(("loss", metric)) if k in row))
                row["elapsed_s"] = round(time.perf_counter() - start, 2)  # training clock incl. evals: time-to-accuracy
                log(row)
                save(step)
            elif t.save_every is not None and step % t.save_every == 0:  # between evaluations: a hard kill loses little
                save(step)
            if cancel is not None and cancel.is_set():  # Ctrl-C / SIGTERM / the caller: stop at this step boundary
                if not (run_dir / "checkpoints" / f"step-{step}").is_dir():
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
                     stopped_early=stop, train_seconds=time.perf_counter() - start, history=history)


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
