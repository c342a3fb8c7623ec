"""`train()`: config in, evaluated run folder out.

Order matters for "nothing half-written": the config, data and model are all loaded and
checked before the run folder is created, and a run that fails before its first checkpoint
removes the folder it made.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from tunesmith.config import RunConfig, check_inputs_exist, dump_config, load_config
from tunesmith.data import PreparedData
from tunesmith.errors import TrainingCancelled, TunesmithError
from tunesmith.evaluate import evaluate_model
from tunesmith.evaluate.plots import confusion_plot, reliability_diagram
from tunesmith.evaluate.report import comparison_markdown, model_card, plot_curves, plot_pref_curves, write_report
from tunesmith.evaluate.stats import compare_results
from tunesmith.data.collate import collate_any
from tunesmith.methods import apply_method, check_gradients_reach, param_report, saved_as
from tunesmith.methods.bottleneck import save_bottleneck
from tunesmith.methods.lean_dropout import install_lean_dropout
from tunesmith.models.load import MERGED_BASE, load_model, load_tokenizer, resolve_model_path
from tunesmith.models.quant import is_quantized, prepare_for_training, quantization_config
from tunesmith.tasks import get_task
from tunesmith.utils import (current_rss_mb, folder_bytes, malloc_trim, model_memory_mb, peak_gpu_mb, peak_rss_mb,
                             set_mmap_threshold, weights_bytes)
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed as dist
from tunesmith.train import sharded
from tunesmith.train.loop import EventFn, fit
from tunesmith.train.online import fit_online
from tunesmith.train.runtime import enable_gradient_checkpointing, make_accelerator
from tunesmith.train.tracking import Trackers, check_tracking, open_trackers


# train.return_memory=mmap: allocations this large or larger are mapped and unmapped one by one. The
# main job's activations are 0.4-50 MB each; below 1 MB live the small objects the heap serves well.
MMAP_THRESHOLD = 1 << 20

# Below this many validation examples, keep-best picks a checkpoint on noise: say so.
SMALL_VALIDATION = 30


@dataclass
class RunResult:
    run_dir: Path
    before: dict | None
    after: dict
    summary: dict[str, Any]


def _merge_run_base(name: str, on_event: EventFn | None) -> None:
    """A finished run that saved a mergeable update (a sparse diff, LoRA, IA3...) as the base of a new
    run: fold it into its base once, into RUN/merged, which resolve_model_path then loads for this run
    and for everything that later loads it (predict, eval, serve). Other runs are left to
    resolve_model_path: a whole model loads as it is, a prompt or bottleneck adapter is a clear error."""
    run = Path(name)
    if (not (run / "run.json").is_file() or (run / "model" / "config.json").is_file()
            or (run / MERGED_BASE / "config.json").is_file()):
        return
    from tunesmith.adapters import adapter_info, merge

    if not adapter_info(run).get("mergeable"):
        return
    _say(f"{run}: merging its update into its base once, into {run / MERGED_BASE}: the base of this run", on_event)
    try:
        merge(run, run / MERGED_BASE)
    except TunesmithError:
        if not (run / MERGED_BASE / "config.json").is_file():  # another process merged it meanwhile: fine
            raise


def _say(msg: str, on_event: EventFn | None) -> None:
    if on_event:
        on_event({"kind": "message", "text": msg})


def _events(on_event: EventFn | None, echo: bool) -> EventFn | None:
    """The caller's event callback, plus printing the messages to stdout when `echo` (the CLI)."""
    if not echo:
        return on_event

    def emit(event: dict[str, Any]) -> None:
        if event.get("kind") == "message":
            print(event["text"], flush=True)
        if on_event:
            on_event(event)
    return emit


def train(config: RunConfig | str | Path | dict, overrides: dict | list[str] | None = None, *, resume: bool = False,
          on_event: EventFn | None = None, cancel: threading.Event | None = None, echo: bool = False) -> RunResult:
    """Fine-tune according to `config` and write a run folder.

    Args:
        config: a RunConfig, a YAML path or a dict.
        overrides: {'train.lr': 1e-4} or ['--train.lr=1e-4'].
        resume: continue from the run folder's latest checkpoint.
        on_event: called with dicts (kind: message/train/eval/checkpoint/done) as training goes.
        cancel: set it from another thread (or a signal handler) to stop at the next step boundary
            after saving a checkpoint (raises TrainingCancelled; `resume=True` continues).
        echo: also print progress messages and the before/after tables to stdout (the CLI does;
            the API leaves stdout alone and sends them to `on_event`; the progress bar is on stderr).
    Returns:
        RunResult with the before/after evaluations and the run summary.
    Raises:
        ConfigError, DataError, TunesmithError for bad input (before anything is written).
    """
    cfg = _resolve_config(config, overrides)
    task = get_task(cfg.task)
    check_inputs_exist(cfg)
    check_tracking(cfg)  # a configured tracker whose package is missing: say so before loading anything
    if task.online and dist.world_size() > 1:
        raise TunesmithError(f"task {cfg.task}: online RL (rollouts) does not run data-parallel yet; run it in one "
                             "process (without --nproc / torchrun / accelerate launch)")
    main = int(os.environ.get("RANK", "0")) == 0  # data parallel: process 0 alone prints and writes the run folder
    on_event = _events(on_event, echo and main)
    t0, rss_start = time.perf_counter(), current_rss_mb()
    if cfg.train.return_memory == "mmap":  # big tensors in their own mappings, returned when freed (utils.py)
        set_mmap_threshold(MMAP_THRESHOLD)
    run_dir = cfg.run_dir
    resume_from, notes = _check_run_dir(run_dir, cfg, resume)
    for note in notes:
        _say(note, on_event)

    # ---- everything that can fail on user input happens before the run folder exists ----
    set_seed(cfg.train.seed)
    _merge_run_base(cfg.model.name_or_path, on_event)
    base_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    data = task.prepare(cfg, tokenizer)
    _say(_data_summary(data, task), on_event)
    val = data.splits.get("validation")
    if val is not None and len(val.features) < SMALL_VALIDATION and (cfg.train.load_best or cfg.train.early_stopping_patience):
        _say(f"warning: the validation split has only {len(val.features)} examples: keep-best and early stopping "
             f"choose on its noise (one example moves accuracy by {1 / len(val.features):.2f}); give data.val_size "
             f"or a validation file of {SMALL_VALIDATION}+ examples, or set train.load_best=false", on_event)
    acc, precision = make_accelerator(cfg.train)
    quant = quantization_config(cfg.method, precision)
    model = load_model(base_path, cfg.task, data.labels, cfg.model.trust_remote_code, tokenizer.pad_token_id,
                       dropout=cfg.model.dropout, attention_dropout=cfg.model.attention_dropout,
                       quantization=quant, device=str(acc.device))
    if quant is not None:
        model = prepare_for_training(model, precision)
    model = apply_method(model, cfg.method, cfg.task, tokenizer_path=base_path)
    if not is_quantized(model):
        model.to(acc.device)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.train.lean_lora_dropout and cfg.method.name == "lora":
        install_lean_dropout(model)  # LoRA dropout keeps a bool mask for backward (methods/lean_dropout.py)
    task.before_fit(model, tokenizer, data, cfg, acc, lambda msg: _say(msg, on_event))  # e.g. DPO's reference log-probs
    with acc.autocast():  # the same precision as the training steps (a bf16 embedding needs it)
        check_gradients_reach(model, _first_batch(data, tokenizer, acc, task), task.objective(cfg), cfg.method.name)
    params = param_report(model)
    quant_note = f", base quantised {cfg.method.opt('quantize')}" if quant is not None else ""
    _say(f"method {cfg.method.name}: {params}{quant_note}", on_event)
    _say(f"device {acc.device}, precision {precision}, threads {torch.get_num_threads()}", on_event)

    if cancel is not None and cancel.is_set():
        raise TrainingCancelled("stopped before training started; nothing was written")
    dist.barrier(acc)  # every process has checked the run folder before process 0 replaces it
    created = not run_dir.exists()
    if main:
        if resume_from is None and run_dir.exists():
            shutil.rmtree(run_dir)  # output.overwrite (or a resume with nothing to resume): replaced only now
            created = True
        run_dir.mkdir(parents=True, exist_ok=True)
    trackers = Trackers([], lambda msg: _say(msg, on_event))  # process 0's, once the run folder exists
    try:
        if main:
            dump_config(cfg, run_dir / "config.yaml")
            trackers = open_trackers(cfg, run_dir, ckpt.step_of(resume_from), lambda msg: _say(msg, on_event))
            on_event = trackers.listen(on_event)  # TensorBoard / MLflow see the rows metrics.jsonl gets
        before = _before(model, tokenizer, data, cfg, acc, run_dir, resume_from, on_event)
        fit_fn = fit_online if task.online else fit
        if torch.cuda.is_available():  # training's own peak, apart from loading and evaluation
            torch.cuda.reset_peak_memory_stats()
        result = fit_fn(model, tokenizer, data, cfg, acc, run_dir, on_event=on_event, cancel=cancel, resume_from=resume_from)
    except BaseException as e:
        trackers.close("KILLED" if isinstance(e, (TrainingCancelled, KeyboardInterrupt)) else "FAILED")
        if main and created and ckpt.latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before any checkpoint: leave nothing behind
        raise

    try:  # a failure from here on marks the tracked run FAILED
        train_peak_gpu, train_peak_rss = peak_gpu_mb(), peak_rss_mb()  # before the final evaluation adds its own
        model = acc.unwrap_model(model)
        if cfg.train.load_best and result.best_step is not None and result.best_step != result.steps:
            ckpt.load_weights(run_dir / "checkpoints" / "best", model)
            _say(f"restored best checkpoint (step {result.best_step}, validation {result.best_metric} {result.best_value:.4f})", on_event)
        _say("evaluating the trained model ...", on_event)
        after = evaluate_model(model, tokenizer, data, cfg, acc, _eval_split(data))  # every process: a share each
        if sharded.is_sharded(model):  # FSDP2: the whole weights, gathered for process 0 to write
            sharded.materialise(model, main)
        if not main:  # process 0 writes the model, summary and report; the others wait for it and return
            dist.barrier(acc)
            return RunResult(run_dir, before, after, {"steps": result.steps, "status": "completed", "rank": acc.process_index})
        saved = _save_model(model, tokenizer, cfg, run_dir, base_path)
        summary = {
            "name": cfg.output.name, "task": cfg.task, "method": cfg.method.name, "base_model": cfg.model.name_or_path,
            "quantize": cfg.method.opt("quantize") if cfg.method.name in ("lora", "dora", "qlora") else "none",
            "saved_as": saved.name, "saved_bytes": folder_bytes(saved),
            "checkpoint_bytes": folder_bytes(run_dir / "checkpoints" / f"step-{result.steps}"),
            "base_model_bytes": weights_bytes(base_path), "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "train_peak_gpu_mb": train_peak_gpu, "train_peak_rss_mb": train_peak_rss,
            "rss_start_mb": rss_start, "model_memory_mb": model_memory_mb(model),
            "resolved_base": base_path, "labels": data.labels, "format": data.fmt, "chat_template": data.chat,
            "params": str(params), "param_counts": params.as_dict(), "precision": precision, "device": str(acc.device),
            "steps": result.steps, "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - t0,
            "best_metric": result.best_metric, "best_value": result.best_value, "best_step": result.best_step,
            "stopped_early": result.stopped_early, "status": "completed", "skipped_steps": result.skipped_steps,
            "processes": acc.num_processes,
            # the trained model's score on the held-out split, as in the report
            "final_split": after["split"], "final_metric": result.best_metric,
            "final_value": after["metrics"].get(result.best_metric),
            "final_metrics": {k: v for k, v in after["metrics"].items() if isinstance(v, (int, float))},
            "forgetting_note": _forgetting_note(cfg),
        }
        (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
        train_data = cfg.data.train_name()
        stats = compare_results(before, after, cfg.eval.bootstrap_resamples, cfg.train.seed)
        card = model_card({**summary, "predicts": task.predicts, "data_summary": _data_summary(data, task)}, before, after,
                          run_dir.name, train_data, stats, _hyperparameters(cfg))
        (saved / "README.md").write_text(card)  # beside the weights, for sharing them
        (run_dir / "README.md").write_text(card)  # and the run folder's own card
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        plot_pref_curves(run_dir / "metrics.jsonl", run_dir / "pref_curves.png")  # pairwise objectives only
        reliability_diagram(before, after, run_dir / "reliability.png")  # classifiers: their probabilities
        confusion_plot(before, after, run_dir / "confusion.png")
        write_report(run_dir, before, after, summary, stats)  # after the figures it links to
        trackers.finish(before, after, summary, saved)
    except BaseException:
        trackers.close("FAILED")
        raise
    _say("\n" + comparison_markdown(before, after, stats) + f"\n\nrun folder: {run_dir}", on_event)
    if on_event:
        on_event({"kind": "done", "run_dir": str(run_dir), "metrics": after["metrics"]})
    dist.barrier(acc)
    return RunResult(run_dir, before, after, summary)


def _hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The settings a model card lists: the method's options and the optimisation's."""
    method = {k: v for k, v in cfg.method.model_dump().items() if v not in (None, [], {}) and k != "name"}
    t = cfg.train
    steps = {"max steps": t.max_steps} if t.max_steps else {"epochs": t.epochs}
    return {"method options": method, **steps, "batch size": t.batch_size,
            "gradient accumulation": t.grad_accum, "learning rate": t.lr, "seed": t.seed,
            "max length": cfg.data.max_length}


def _forgetting_note(cfg: RunConfig) -> str | None:
    """A warning when the forgetting text is the run's own training data: then its perplexity
    measures learning, not forgetting."""
    sources = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
    if cfg.eval.forgetting_text and cfg.eval.forgetting_text in sources:
        return (f"eval.forgetting_text ({cfg.eval.forgetting_text}) is this run's training data: its perplexity "
                "shows what the run learnt, not what it forgot; set eval.forgetting_text to other text")
    return None


def _resolve_config(config: RunConfig | str | Path | dict, overrides: dict | list[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        return load_config(config.model_dump(), overrides) if overrides else config
    return load_config(config, overrides)


def _check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start at step 0) and what to tell the user about it."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise TunesmithError(f"--resume: {run_dir} is not a run folder (no config.yaml); start without --resume")
        changed = _config_changes(load_config(run_dir / "config.yaml").model_dump(), cfg.model_dump())
        if changed:
            raise TunesmithError(f"--resume: the config differs from the run's config.yaml in "
                                 f"{', '.join(changed)}; resume with the same settings")
        last, notes = ckpt.find_resume(run_dir) if int(os.environ.get("RANK", "0")) == 0 else (ckpt.latest_checkpoint(run_dir), [])
        if last is None:  # stopped before its first checkpoint: nothing to keep, start again
            return None, notes + [f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}: starting from step 0"]
        step = int(last.name.split("-")[1])
        return last, notes + [f"resuming from {last} (step {step}, the newest complete checkpoint)"]
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
        raise TunesmithError(f"run folder {run_dir} already exists; use --output.overwrite=true, "
                             f"another --output.name, or --resume")
    return None, []


# Settings that change how fast a run goes or how often it saves, not what it computes: free to
# change on resume (e.g. resuming on a machine with another core count).
_SPEED_ONLY = frozenset({"train.frozen_cache_gb", "train.num_threads", "train.save_every", "train.keep_checkpoints",
                         "train.max_bad_steps", "train.lean_lora_dropout", "train.return_memory"})


def _config_changes(saved: dict, now: dict) -> list[str]:
    """Dotted names of settings that differ; eval and output settings may change on resume."""
    changed = []
    for section in ("task", "model", "data", "method", "train"):
        a, b = saved[section], now[section]
        if isinstance(a, dict):
            changed += [f"{section}.{k}" for k in a if a[k] != b.get(k) and f"{section}.{k}" not in _SPEED_ONLY]
        elif a != b:
            changed.append(section)
    return changed


def _eval_split(data: PreparedData) -> str:
    return "test" if "test" in data.splits else "validation" if "validation" in data.splits else "train"


def _before(model, tokenizer, data, cfg, acc, run_dir: Path, resume_from, on_event) -> dict | None:
    """Evaluate the untrained model once; a resumed run reuses the saved result."""
    path = run_dir / "before.json"
    if resume_from is not None and path.exists():
        return json.loads(path.read_text())
    if not cfg.eval.before:
        return None
    _say("evaluating the untrained base model ...", on_event)
    rng = torch.get_rng_state()
    before = evaluate_model(model, tokenizer, data, cfg, acc, _eval_split(data))
    torch.set_rng_state(rng)  # evaluation must not change what training sees
    if cfg.train.return_memory == "step":
        malloc_trim()
    if acc.is_main_process:
        path.write_text(json.dumps(before))
    return before


def _save_model(model, tokenizer, cfg: RunConfig, run_dir: Path, base_path: str) -> Path:
    """peft methods -> run/adapter (peft format); bottleneck adapters -> run/bottleneck and diff pruning
    -> run/diff (ours); methods that change the model's own weights -> run/model (transformers format).
    Tokenizer beside it."""
    out = run_dir / saved_as(cfg.method.name)
    if out.name == "diff":
        from tunesmith.methods.diff_pruning import save_diff

        save_diff(model, out, {"method": "diff_pruning", "mode": cfg.method.opt("mode"),
                               "density": cfg.method.opt("density"), "mask_at": cfg.method.opt("mask_at"),
                               "target_modules": cfg.method.opt("target_modules"),
                               "base_model_name_or_path": base_path, "task": cfg.task})
    elif out.name == "bottleneck":
        save_bottleneck(model, out, {"method": "adapter", "adapter_size": cfg.method.opt("adapter_size"),
                                     "placement": cfg.method.opt("placement"), "layers": cfg.method.layers,
                                     "base_model_name_or_path": cfg.model.name_or_path, "task": cfg.task})
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (out / "adapter_config.json").is_file():
        _tidy_adapter_config(out / "adapter_config.json", cfg)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base.config, "id2label", None) and get_task(cfg.task).predicts != "generate":
            base.config.save_pretrained(out)  # config.json with id2label/label2id: plain peft loading gets the names
    return out


def _tidy_adapter_config(path: Path, cfg: RunConfig) -> None:
    """peft writes the base's resolved path (a folder inside this machine's venv for a builtin:
    alias) and, for classifiers, the head once from us and once from its own task defaults.
    Keep the name the user gave (their hub id, folder or the builtin alias) and each module once."""
    c = json.loads(path.read_text())
    c["base_model_name_or_path"] = cfg.model.name_or_path
    if c.get("modules_to_save"):
        c["modules_to_save"] = list(dict.fromkeys(c["modules_to_save"]))
    path.write_text(json.dumps(c, indent=2, sort_keys=True))


def _first_batch(data: PreparedData, tokenizer, acc, task) -> dict[str, torch.Tensor]:
    feats = task.probe(data.splits["train"].features[:2])
    batch = collate_any(feats, tokenizer.pad_token_id)
    return {k: v.to(acc.device) for k, v in batch.items()}


def _data_summary(data: PreparedData, task) -> str:
    parts = [f"{name} {len(s.features)}" for name, s in data.splits.items()]
    trunc = sum(s.stats.truncated for s in data.splits.values())
    labels = f", labels {data.labels}" if data.labels else ""
    chat = ", chat template" if data.chat else ""
    line = f"data: format {data.fmt}{labels}{chat}; " + ", ".join(parts) + f"; truncated {trunc}"
    train = data.splits["train"]
    for what, report in task.describe(train.examples, train.features).items():  # e.g. preference pairs
        line += f"\n{what} data (train): {report}"
    return line
