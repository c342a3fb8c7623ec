"""A bridge to EleutherAI's lm-evaluation-harness for users' own task files (issue 23 §2).

`tunesmith eval RUN --lm-eval TASKS` scores a run's trained model (base + adapter as it was
trained, a merged run, or any local causal LM) on lm-eval task YAMLs from a local file or folder,
through lm-eval's HFLM wrapper given the already loaded model object: nothing is fetched from a hub.
Only the given tasks are indexed (not lm-eval's hundreds of builtin ones), which keeps it fast
and offline. Tasks read local data (`dataset_path: json` with `dataset_kwargs.data_files`).

lm-eval is an optional extra (pip install 'tunesmith[lm-eval]'); it is imported only here.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tunesmith.config import task_facts
from tunesmith.errors import TunesmithError
from tunesmith.methods.saved import is_run_dir, load_run, to_device
from tunesmith.models.load import resolve_model_path
from tunesmith.train.runtime import make_accelerator

LM_EVAL_INSTALL = "install lm-evaluation-harness: pip install 'tunesmith[lm-eval]'"


def _import_lm_eval():
    # Offline: a task that names a hub dataset fails at once instead of waiting on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise TunesmithError(f"--lm-eval: {LM_EVAL_INSTALL} ({e})") from e
    return lm_eval, HFLM, TaskManager


def find_tasks(tasks_path: str | Path, names: list[str] | None = None):
    """The lm-eval TaskManager over `tasks_path` (a task YAML or a folder of them) and the task
    names to run: `names`, or every task the file/folder defines.

    Raises:
        TunesmithError: a missing path, a file lm-eval cannot read as a task, or an unknown name.
    """
    _, _, TaskManager = _import_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(tasks_path).expanduser().absolute()
    if not path.exists():
        raise TunesmithError(f"--lm-eval: not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    if not files:
        raise TunesmithError(f"--lm-eval: {path} has no task files (*.yaml)")
    if path.is_file():  # lm-eval's index skips a file it cannot parse without a word: say why here
        try:
            cfg = load_yaml(path, resolve_func=False)
        except Exception as e:  # noqa: BLE001 - re-raised as the user's error, naming the file
            raise TunesmithError(f"--lm-eval: {path}: not a readable task file: {e}") from e
        if not isinstance(cfg, dict) or not (cfg.get("task") or cfg.get("group")):
            raise TunesmithError(f"--lm-eval: {path}: an lm-eval task file needs a 'task:' (or 'group:') name")
    manager = TaskManager(include_path=str(path.parent if path.is_file() else path), include_defaults=False)
    mine = sorted(n for n, e in manager.task_index.items()
                  if e.yaml_path is not None and (Path(e.yaml_path).resolve() in {f.resolve() for f in files}))
    if not mine:
        raise TunesmithError(f"--lm-eval: could not read any task from {path} (each file needs 'task:' and a "
                             "dataset; see docs/EVALUATION.md)")
    if names:
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise TunesmithError(f"--tasks: {', '.join(unknown)} not found in {path}; it defines: {', '.join(mine)}")
        return manager, list(names)
    return manager, mine


def lm_eval_run(run_or_model: str | Path, tasks_path: str | Path, names: list[str] | None = None, *,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                chat_template: bool = False, log_samples: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval tasks from local files on a run's trained model.

    Args:
        run_or_model: a run folder, a merged run, a model folder or a builtin:/.gguf alias.
        tasks_path: an lm-eval task YAML or a folder of them.
        names: which of their tasks (default: all of them).
        limit: at most this many documents per task.
        chat_template: wrap prompts in the tokenizer's chat template (lm-eval's apply_chat_template).
        log_samples: also return each document's requests and scores ('samples').
    Returns:
        lm-eval's result: 'results' (task -> 'metric,filter' -> value), 'versions', 'n-samples',
        'higher_is_better', and 'samples' when asked.
    Raises:
        TunesmithError: lm-eval missing, bad task files or names, or a model that is not a causal LM.
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    manager, tasks = find_tasks(tasks_path, names)  # task problems before loading a model
    target = Path(run_or_model)
    loaded = load_run(target if target.exists() and (is_run_dir(target) or target.is_dir())
                      else resolve_model_path(str(run_or_model)))
    if task_facts(loaded.cfg.task).head is not None:
        raise TunesmithError(f"--lm-eval scores a language model's text; {run_or_model} is a {loaded.cfg.task} "
                             "model with a prediction head")
    acc, _ = make_accelerator(loaded.cfg.train)
    model = to_device(loaded.model, acc.device)
    # HFLM takes the loaded object (a peft model forwards .config and .device to its base); its own
    # loading (from a path or the hub) is never used.
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the table
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=1000,
                                      apply_chat_template=chat_template, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    except FileNotFoundError as e:  # a task's data_files: lm-eval reads them relative to the working directory
        raise TunesmithError(f"--lm-eval: {e}; a task's dataset_kwargs.data_files are read relative to the "
                             f"working directory ({Path.cwd()}), not the YAML's folder: give absolute paths or run "
                             "from the tasks' folder") from e
    keep = ("results", "versions", "n-samples", "higher_is_better", "n-shot") + (("samples",) if log_samples else ())
    return json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))


def harness_markdown(result: dict[str, Any]) -> str:
    """One row per task and metric: value and lm-eval's standard error."""
    lines = ["| task | metric | value | stderr | examples |", "|---|---|---|---|---|"]
    for task, metrics in result["results"].items():
        n = result.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, v in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "name", "sample_len") or name.endswith("_stderr") or not isinstance(v, (int, float)):
                continue
            se = metrics.get(f"{name}_stderr,{filt}")
            se_text = f"{se:.4f}" if isinstance(se, (int, float)) else "n/a"
            label = name if filt in ("", "none") else f"{name} ({filt})"
            lines.append(f"| {task} | {label} | {v:.4f} | {se_text} | {n} |")
    return "\n".join(lines)
