"""cpt: continued pre-training of a causal LM on raw text, packed into blocks; loss on every token."""
from __future__ import annotations

from tunesmith.data.formats import read_examples
from tunesmith.data.tokenize import tokenize_cpt
from tunesmith.objectives import causal_lm, count_targets
from tunesmith.tasks.base import GENERATE, Task, first_words, generate_replies, lm_rows
from tunesmith.tasks.metrics import lm_metrics
from tunesmith.tasks.sft import LM_METRICS

FORMATS = frozenset({"text", "classification"})  # a labelled file's text is still text

TASK = Task(
    name="cpt", predicts="generate", serves=GENERATE, head=None, formats=FORMATS, metrics=LM_METRICS,
    best_metric="loss",
    read=lambda records, cfg, labels, names: read_examples(records, cfg.task, FORMATS, cfg.data, None, names),
    encode=lambda examples, fmt, cfg, tokenizer, chat: tokenize_cpt(examples, cfg.data, tokenizer),
    objective=lambda cfg: causal_lm, count_items=count_targets,
    summarise=lambda s, labels: lm_metrics(s.loss, s.count, s.correct),
    # continue a document's opening words
    sample_inputs=lambda cfg, examples: [first_words(e.text) for e in examples], predict=generate_replies,
    per_example=lm_rows,
)
