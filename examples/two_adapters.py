"""Two adapters, two tasks, one SmolLM2 base in one process ("one app, many tasks").

    tunesmith train configs/sentiment-smollm2-lora.yaml
    tunesmith train configs/sft-identity-lora.yaml
    python examples/two_adapters.py [SENTIMENT_RUN IDENTITY_RUN] [--reviews 100]

Loads the base model once and adds both runs' LoRA adapters. Then it alternates between them,
one call at a time:
- the sentiment adapter labels held-out IMDB reviews (its run's own test split, never trained on);
- the identity adapter answers the held-out paraphrased questions (a reply counts when it
  contains the expected answer).

It prints each adapter's score on its own task, and what each adapter answers on the other's
inputs, which shows the switch is real. Then the time per switch (peft's set_adapter: no
weights move) and the time to load the base with both adapters.
"""
from __future__ import annotations

import argparse
import statistics
import time

from tunesmith.adapter_set import AdapterSet
from tunesmith.config import load_config
from tunesmith.data import load_records
from tunesmith.models.load import load_tokenizer, resolve_model_path
from tunesmith.tasks import prepare_data


def held_out_reviews(run_dir: str, n: int) -> list[tuple[str, str]]:
    """(review text, label name) for the first n examples of the run's own test split."""
    cfg = load_config(f"{run_dir}/config.yaml")
    tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
    data = prepare_data(cfg, tok)
    records = {}
    for source in [cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train:
        records.update({(r.where.path, r.where.line): r for r in load_records(source, cfg.data)[0]})
    out = []
    for ex in data.splits["test"].examples[:n]:
        rec = records[(ex.where.path, ex.where.line)]
        out.append((rec.fields["text"], ex.completion.strip()))
    return out


def held_out_questions(run_dir: str) -> list[tuple[str, str]]:
    cfg = load_config(f"{run_dir}/config.yaml")
    tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path))
    return [(ex.prompt, ex.expected or ex.completion) for ex in prepare_data(cfg, tok).splits["test"].examples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=["runs/sentiment-smollm2-lora", "runs/sft-identity-lora"])
    ap.add_argument("--reviews", type=int, default=100)
    args = ap.parse_args()
    sentiment, identity = args.runs
    reviews = held_out_reviews(sentiment, args.reviews)
    questions = held_out_questions(identity)

    t0 = time.perf_counter()
    aset = AdapterSet()
    aset.add("sentiment", sentiment)
    aset.add("identity", identity)
    load_s = time.perf_counter() - t0

    hits_s, hits_i = 0, 0
    batch = 10  # alternate adapters every few inputs, as a server answering mixed traffic would
    for i in range(0, max(len(reviews), len(questions)), batch):
        part = reviews[i: i + batch]
        if part:
            outs = aset.predict([t for t, _ in part], "sentiment")
            hits_s += sum(o["output"].strip().lower().startswith(label) for o, (_, label) in zip(outs, part))
        part = questions[i: i + batch]
        if part:
            outs = aset.predict([q for q, _ in part], "identity")
            hits_i += sum(exp.lower() in o["output"].lower() for o, (_, exp) in zip(outs, part))
    crossed = [("identity", aset.predict([reviews[0][0][:300]], "identity")[0]["output"]),
               ("sentiment", aset.predict([questions[0][0]], "sentiment")[0]["output"])]

    switches = [s for s in aset.switch_seconds if s > 0]
    print(f"base + 2 adapters loaded in {load_s:.1f} s (one copy of the base weights)")
    print(f"sentiment adapter on {len(reviews)} held-out IMDB reviews: accuracy {hits_s / len(reviews):.3f}")
    print(f"identity adapter on {len(questions)} held-out questions: contains-answer {hits_i / len(questions):.3f}")
    for name, out in crossed:
        print(f"  ({name} adapter on the other task's input: {out[:80]!r})")
    print(f"adapter switches: {len(switches)}, median {statistics.median(switches) * 1e3:.2f} ms, "
          f"max {max(switches) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
