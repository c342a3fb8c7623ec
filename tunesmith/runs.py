"""Use a finished run (or any base model): load it, evaluate it on a file, predict with it."""
from __future__ import annotations

from pathlib import Path

from tunesmith.config import load_config, parse_overrides
from tunesmith.evaluate import evaluate_model, predict_texts
from tunesmith.methods.saved import LoadedModel, is_run_dir, load_base, load_run, to_device  # noqa: F401 (re-exported)
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
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    # The whole file is the evaluation set: no splitting, no sampling.
    ov.update({"data.train": str(data), "data.validation": None, "data.test": None,
               "data.train_size": None, "data.val_size": 0, "data.test_size": 0})
    model = None
    if is_run_dir(run_or_model):
        loaded = load_run(run_or_model)
        if loaded.labels:
            ov["data.labels"] = loaded.labels  # the trained head's classes, in its order
        cfg = load_config(config or str(Path(run_or_model) / "config.yaml"), ov)
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
        model = load_model(resolve_model_path(cfg.model.name_or_path), cfg.task, prepared.labels,
                           cfg.model.trust_remote_code, tokenizer.pad_token_id)
    acc, _ = make_accelerator(cfg.train)
    to_device(model, acc.device)
    return evaluate_model(model, tokenizer, prepared, cfg, acc, "test")


def predict(run: str | Path, texts: list[str], max_new_tokens: int | None = None) -> list[dict]:
    """Classify texts ({'label', 'probability'}) or generate replies ({'output'}) with a trained run."""
    loaded = load_run(run)
    cfg = loaded.cfg
    if max_new_tokens:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": max_new_tokens})})
    acc, _ = make_accelerator(cfg.train)
    to_device(loaded.model, acc.device)
    return predict_texts(loaded.model, loaded.tokenizer, texts, cfg, loaded.chat, loaded.labels, acc)
