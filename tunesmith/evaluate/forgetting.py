"""The forgetting probe of a generative run: perplexity on held-out general text, and answers to a
small general-knowledge question set, on the same blocks and questions before and after training.

Fine-tuning on a narrow set teaches it and can unteach the rest: the SFT identity example, trained
without general data mixed in, answered that the capital of France is Tallinn. The probe measures
that on every generative run (SFT, CPT, preference policies): the text's perplexity (does the
model still model ordinary language?) and the share of questions whose answer it still contains.
Both are per-unit scores (text blocks, questions), so the report gives intervals and paired tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.assets import data_source
from tunesmith.config import RunConfig
from tunesmith.data import text_blocks
from tunesmith.data.tokenize import render_prompt
from tunesmith.errors import TunesmithError
from tunesmith.objectives import causal_lm_rows
from tunesmith.tasks.base import generate, unit_key
from tunesmith.tasks.metrics import normalize

QA_NEW_TOKENS = 32  # answers are a few words; longer generations only cost time


def read_questions(source: str) -> list[dict[str, Any]]:
    """{"question", "answers": [accepted answers]} per line of a JSONL file (or builtin: alias).

    Raises:
        TunesmithError naming the file and line of a malformed row.
    """
    path = Path(data_source(source)["path"])
    if not path.is_file():
        raise TunesmithError(f"eval.forgetting_questions: file not found: {path.absolute()}")
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunesmithError(f"{path}:{no}: invalid JSON ({e.msg})") from None
        answers = row.get("answers") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(answers, list) \
                or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise TunesmithError(f"{path}:{no}: expected {{\"question\": text, \"answers\": [text, ...]}}")
        rows.append({"question": row["question"], "answers": answers})
    if not rows:
        raise TunesmithError(f"eval.forgetting_questions: {path} has no questions")
    return rows


def answered(output: str, answers: list[str]) -> bool:
    """Whether the output contains one of the accepted answers as whole words (normalised)."""
    out = f" {normalize(output)} "
    return any(f" {normalize(a)} " in out for a in answers)


def forgetting_probe(result: dict, model, tokenizer, cfg: RunConfig, acc, chat: bool) -> None:
    """Add forgetting_perplexity / general_qa_accuracy to result["metrics"], their row groups,
    and each question's answer to result["forgetting"]."""
    if cfg.eval.forgetting_text:
        feats = text_blocks(cfg.eval.forgetting_text, cfg.eval.forgetting_blocks, cfg, tokenizer, "eval.forgetting_text")
        rows = causal_lm_rows(model, feats, tokenizer.pad_token_id, cfg.eval.batch_size, acc)
        tokens = sum(rows["tokens"])
        result["metrics"]["forgetting_perplexity"] = float(torch.tensor(sum(rows["loss"]) / max(tokens, 1)).clamp(max=50).exp())
        result["rows"].append({"name": "forgetting_text", "unit": "text block",
                               "keys": [unit_key({"input_ids": f["input_ids"]}) for f in feats], "columns": rows,
                               "metrics": {"forgetting_perplexity": ["exp_ratio", "loss", "tokens"]}})
    if cfg.eval.forgetting_questions:
        qa = read_questions(cfg.eval.forgetting_questions)
        # a chat model is asked as its users ask it; a plain LM gets a Q/A frame to continue
        texts = [q["question"] if chat else f"Question: {q['question']}\nAnswer:" for q in qa]
        prompts = [tokenizer(render_prompt(t, cfg.data, tokenizer, chat), add_special_tokens=not chat)["input_ids"]
                   for t in texts]
        outs = generate(model, tokenizer, prompts, acc, min(cfg.eval.max_new_tokens, QA_NEW_TOKENS), cfg.eval.batch_size)
        right = [answered(o, q["answers"]) for o, q in zip(outs, qa)]
        result["metrics"]["general_qa_accuracy"] = sum(right) / len(right)
        result["rows"].append({"name": "forgetting_qa", "unit": "question", "keys": [unit_key(q) for q in qa],
                               "columns": {"correct": [float(r) for r in right]},
                               "metrics": {"general_qa_accuracy": ["share", "correct"]}})
        result["forgetting"] = [{"question": q["question"], "answers": q["answers"], "output": o, "correct": r}
                                for q, o, r in zip(qa, outs, right)]
