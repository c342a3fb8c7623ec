"""Use a finished run (or any base model): load it, evaluate it on a file, predict with it."""
from __future__ import annotations

import string
from pathlib import Path

from tunesmith.config import RunConfig, load_config, parse_overrides
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import evaluate_model, predict_texts
from tunesmith.methods.saved import (  # noqa: F401 (re-exported)
    MERGED_CONFIG,
    LoadedModel,
    is_run_dir,
    load_base,
    load_run,
    to_device,
)
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
from tunesmith.tasks import prepare_data
from tunesmith.train.runtime import make_accelerator


def evaluate(run_or_model: str | Path, data: str | Path, config: str | Path | dict | None = None,
             overrides: dict | list[str] | None = None) -> dict:
    """Evaluate a run, or a base model as it is, on a data file.

    A run uses its own config (task, columns, template, labels) unless `config` is given; a base
    model uses `config` (or the defaults) with `task` etc. from `overrides`.
    Returns:
        {"split", "examples", "metrics", "samples"[, "generations"]} as in the run report.
    """
    if not str(data).startswith("builtin:") and not Path(data).exists():  # before loading any model
        raise TunesmithError(f"data file not found: {Path(data).absolute()}")
    target = Path(run_or_model)
    if not target.exists() and (str(run_or_model).startswith((".", "/", "~")) or target.parts[0] != str(target)
                                and Path(target.parts[0]).is_dir()):  # a local path, not a hub id 'org/name'
        raise TunesmithError(f"not found: {target.absolute()}")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    # The whole file is the evaluation set: no splitting, no sampling.
    ov.update({"data.train": str(data), "data.validation": None, "data.test": None,
               "data.train_size": None, "data.val_size": 0, "data.test_size": 0})
    model, warnings = None, []
    own_config = target / "config.yaml" if is_run_dir(target) else target / MERGED_CONFIG
    if own_config.is_file():  # a run, or a merged run: its own task, columns and labels
        cfg = load_config(config or own_config, ov)  # validate the data settings before loading the model
        loaded = load_run(run_or_model)
        if loaded.labels:
            ov["data.labels"] = loaded.labels  # the trained head's classes, in its order
        cfg = load_config(config or own_config, ov)
        if cfg.train.precision == "auto":  # the precision the run's own final evaluation used
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": loaded.cfg.train.precision})})
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        ov["model.name_or_path"] = str(run_or_model)
        cfg = load_config(config, ov)
        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    prepared = prepare_data(cfg, tokenizer)
    prepared.splits = {"test": prepared.splits["train"]}
    if model is None:
        path = resolve_model_path(cfg.model.name_or_path)
        model = load_model(path, cfg.task, prepared.labels, cfg.model.trust_remote_code, tokenizer.pad_token_id)
        if prepared.labels and not _has_trained_head(path, prepared.labels):
            warnings.append(f"{run_or_model} has no trained classification head for these {len(prepared.labels)} "
                            "classes: its head is newly initialised (random), so these scores are chance level. "
                            "Evaluate a trained run (or the base before training, as the run's before.json does)")
    acc, _ = make_accelerator(cfg.train)
    to_device(model, acc.device)
    result = evaluate_model(model, tokenizer, prepared, cfg, acc, "test")
    result["warnings"] = warnings + result.get("warnings", [])
    return result


def _has_trained_head(path: str, labels: list[str]) -> bool:
    """Whether a model folder already holds a sequence-classification head of this size."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(path)
    return any("ForSequenceClassification" in a for a in getattr(mc, "architectures", None) or []) \
        and mc.num_labels == len(labels)


def predict(run: str | Path, texts: list[str], max_new_tokens: int | None = None) -> list[dict]:
    """Classify texts ({'label', 'probability'}) or generate replies ({'output'}) with a trained run."""
    loaded = load_run(run)
    cfg = loaded.cfg
    if max_new_tokens:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": max_new_tokens})})
    acc, _ = make_accelerator(cfg.train)
    to_device(loaded.model, acc.device)
    return predict_texts(loaded.model, loaded.tokenizer, texts, cfg, loaded.chat, loaded.labels, acc)


def read_inputs(path: str | Path, cfg: RunConfig) -> list[str]:
    """Inputs for predict from a file: a .txt file is one input per line; any data file (CSV,
    JSONL, ...) is read like training data, through the run's data.columns, taking each record's
    input column (text, prompt, instruction [+ input], or a chat's last user message).

    Raises:
        TunesmithError: the file is missing, or a record has no input column (naming the file's columns).
    """
    from tunesmith.data.formats import file_columns, rename_columns
    from tunesmith.data.readers import detect_reader, read_records

    p = Path(path)
    if not p.exists():
        raise TunesmithError(f"input file not found: {p.absolute()}")
    if detect_reader(p) == "text" and p.is_file():
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = read_records(p)
    tpl = cfg.data.template.prompt
    fields = [n for _, n, _, _ in string.Formatter().parse(tpl) if n] if tpl else []
    keys = fields[:1] if len(fields) == 1 else ["text", "prompt", "instruction", "messages"]
    out = []
    for rec in records:
        f = rename_columns(rec, cfg.data.columns)
        key = next((k for k in keys if f.get(k) not in (None, "")), None)
        if key is None:
            want = ", ".join(f"'{cfg.data.columns.get(k, k)}'" for k in keys)
            raise TunesmithError(f"{rec.where}: no input column: expected {want} (the run's data.columns); "
                                 f"the file has {', '.join(file_columns(records))}")
        value = f[key]
        if key == "messages":
            value = next((m.get("content") for m in reversed(value) if isinstance(m, dict) and m.get("role") == "user"), None)
        elif key == "instruction" and f.get("input"):
            value = f"{value}\n\n{f['input']}"
        if not isinstance(value, str):
            raise TunesmithError(f"{rec.where}: column '{cfg.data.columns.get(key, key)}': expected text, "
                                 f"got {type(value).__name__}")
        out.append(value)
    return out
