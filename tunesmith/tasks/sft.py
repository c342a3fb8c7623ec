"""sft: supervised fine-tuning of a causal LM on prompt -> answer; loss on the answer's tokens only."""
from __future__ import annotations

from tunesmith.data.formats import read_examples
from tunesmith.data.tokenize import tokenize_sft, use_chat_template
from tunesmith.objectives import causal_lm, count_targets
from tunesmith.tasks.base import GENERATE, Task, generate, generate_replies, lm_rows, row_keys
from tunesmith.tasks.metrics import chrf, lm_metrics, match_metrics, normalize, rouge_l

FORMATS = frozenset({"prompt_completion", "instruction", "chat"})
LM_METRICS = {"loss": False, "perplexity": False, "token_accuracy": True}


def evaluate_more(result: dict, model, tokenizer, data, cfg, acc, split: str) -> None:
    """Generate an answer to every held-out prompt and score it against its reference: exact
    match, containment, ROUGE-L F1 and chrF (per answer, so each has an interval)."""
    if not cfg.eval.generate_metrics:
        return
    feats = data.splits[split].features[: cfg.eval.max_examples]
    prompts = [f["input_ids"][: f["prompt_len"]] for f in feats]
    gens = generate(model, tokenizer, prompts, acc, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    refs = [f["reference"] for f in feats]
    result["metrics"].update(match_metrics(gens, refs))
    result["generations"] = [{"prompt": f.get("question"), "reference": f["reference"], "output": g,
                              "exact": normalize(g) == normalize(f["reference"]),
                              "contains": f" {normalize(f['reference'])} " in f" {normalize(g)} "}
                             for f, g in zip(feats, gens)]
    # ROUGE-L and chrF compare with the full answer the data gives (a completion), which `expected`
    # (a phrase the reply must contain) may shorten: they score wording, contains scores the fact
    full = [f.get("answer") or f["reference"] for f in feats]
    rouge, chrf_scores = [rouge_l(g, r) for g, r in zip(gens, full)], chrf(gens, full)
    result["metrics"].update(rouge_l=sum(rouge) / max(len(rouge), 1), chrf=sum(chrf_scores) / max(len(chrf_scores), 1))
    result.setdefault("rows", []).append({
        "name": "generation", "unit": "example", "keys": row_keys(data.splits[split], len(feats)),
        "columns": {"exact": [float(g["exact"]) for g in result["generations"]],
                    "contains": [float(g["contains"]) for g in result["generations"]],
                    "rouge_l": rouge, "chrf": chrf_scores},
        "metrics": {"exact_match": ["share", "exact"], "contains": ["share", "contains"],
                    "rouge_l": ["mean", "rouge_l"], "chrf": ["mean", "chrf"]}})


TASK = Task(
    name="sft", predicts="generate", serves=GENERATE, head=None, formats=FORMATS, metrics=LM_METRICS,
    best_metric="loss",
    read=lambda records, cfg, labels, names: read_examples(records, cfg.task, FORMATS, cfg.data, None, names),
    encode=lambda examples, fmt, cfg, tokenizer, chat: tokenize_sft(examples, fmt, cfg.data, tokenizer),
    chat=lambda cfg, fmt, examples, tokenizer: use_chat_template(cfg.data, fmt, tokenizer),
    objective=lambda cfg: causal_lm, count_items=count_targets,
    summarise=lambda s, labels: lm_metrics(s.loss, s.count, s.correct),
    sample_inputs=lambda cfg, examples: [e.prompt if e.messages is None else e.messages[-2]["content"] for e in examples],
    predict=generate_replies, evaluate_more=evaluate_more, per_example=lm_rows,
)
