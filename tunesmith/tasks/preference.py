"""The preference family: reward (a reward model), dpo (also IPO, cDPO), kto, orpo, and the online
ppo and grpo. They share readers (pref/data.py), objectives (pref/objectives.py) and the policy
evaluation (pref/evaluate.py); each is one Task below. docs/PREFERENCES.md has the details."""
from __future__ import annotations

from functools import partial

from tunesmith.config import RunConfig
from tunesmith.data import split_examples
from tunesmith.objectives import causal_lm, count_targets
from tunesmith.pref.data import (
    PrefExample,
    detect_pref_format,
    encode_pairs,
    encode_prompts,
    encode_unpaired,
    pref_report,
    reward_text,
    to_pref_examples,
    use_chat,
)
from tunesmith.pref.evaluate import alignment_tax, evaluate_policy
from tunesmith.pref.objectives import (
    add_reference_logps,
    count_weights,
    dpo_objective,
    kto_objective,
    orpo_objective,
    reward_objective,
)
from tunesmith.tasks.base import GENERATE, RowGroup, Sums, Task, generate_replies, head_outputs, lm_rows, unit_key
from tunesmith.tasks.metrics import lm_metrics

PAIRS = frozenset({"preference", "ranking"})
PAIR_METRICS = {"loss": False, "accuracy": True, "margin": True}


def _read(formats: frozenset[str]):
    return lambda records, cfg, labels, names: to_pref_examples(records, cfg, formats)


def _read_unpaired(records, cfg: RunConfig, labels, names) -> tuple[str, list[PrefExample]]:
    """KTO: thumbs up/down as given, or each pair as one thumbs-up and one thumbs-down."""
    fmt, exs = to_pref_examples(records, cfg, frozenset({"unpaired", "preference"}))
    if fmt != "preference":
        return fmt, exs
    return fmt, [PrefExample(e.where, e.prompt, [r], desirable=good) for e in exs
                 for r, good in ((e.responses[0], True), (e.responses[1], False))]


def _summarise_pairs(s: Sums, labels) -> dict:
    return {"loss": s.loss / (s.items or 1), "accuracy": s.correct / max(s.count, 1),
            **{k: v / max(s.count, 1) for k, v in s.extras.items()}}


def _pair_rows(s: Sums, labels) -> RowGroup:
    """Per pair (KTO: per example): its weighted loss and weight, whether it ranked right, its margin."""
    return {"columns": s.row_columns(), "metrics": {"loss": ["ratio", "loss", "weight"],
                                                    "accuracy": ["share", "correct"], "margin": ["mean", "margin"]}}


def _prompt_text(cfg, examples: list[PrefExample]) -> list[str]:
    return [e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"] for e in examples]


def _chat(default: bool):
    return lambda cfg, fmt, examples, tokenizer: use_chat(cfg, examples, tokenizer, default)


def _score(model, tokenizer, texts: list[str], cfg, chat, labels, acc) -> list[dict]:
    scores = head_outputs(model, tokenizer, texts, cfg, acc, cfg.eval.batch_size)[:, 0].tolist()
    return [{"input": t, "reward": round(r, 4)} for t, r in zip(texts, scores)]


def _policy_metrics(result: dict, model, tokenizer, data, cfg: RunConfig, acc, split: str) -> None:
    """For a policy: the reward of its samples on held-out prompts and the KL to the reference (when
    the config names a reward), and the alignment tax (perplexity on pref.tax_data)."""
    if cfg.pref.reward_model or cfg.pref.reward_fn:
        policy = evaluate_policy(model, tokenizer, data.splits[split].examples[: cfg.eval.max_examples], cfg, acc,
                                 data.chat)
        result["metrics"].update(policy["metrics"])
        result["generations"] = policy["samples"]
        result.setdefault("rows", []).append({"name": "policy", "unit": "prompt",
                                              "keys": [unit_key(p) for p in policy["prompts"]], **policy["rows"]})
    if cfg.pref.tax_data:
        result["metrics"]["tax_perplexity"] = alignment_tax(model, tokenizer, cfg, acc)


def _score_reference(model, tokenizer, data, cfg: RunConfig, acc, say) -> None:
    """The frozen reference's log-probs of every row, once, before the first step."""
    say("scoring the data with the reference policy ...")
    # Under the training precision: a bf16 policy measured against an fp32 reference would start
    # with a nonzero margin (DPO's loss 0.699, not log 2) and spend its first steps on rounding.
    with acc.autocast():
        for split in data.splits.values():
            add_reference_logps(model, split.features, tokenizer.pad_token_id, acc.device, cfg.eval.batch_size)


def _needs_reward(cfg: RunConfig) -> list[str]:
    problems = []
    if not (cfg.pref.reward_model or cfg.pref.reward_fn):
        problems.append(f"pref.reward_model / pref.reward_fn: task {cfg.task} needs a reward (a reward-model run, "
                        "a Python function, or both)")
    if cfg.train.ema_decay is not None:
        problems.append(f"train.ema_decay: not supported for task {cfg.task} (its rollouts sample from the raw policy)")
    return problems


def _as_lm_rows(feats: list[dict]) -> list[dict]:
    """The policy's own LM loss on its prompts: do the trainable weights reach it?"""
    return [{"input_ids": f["prompt_ids"], "labels": f["prompt_ids"]} for f in feats]


_COMMON = dict(detect=lambda fields, cfg: detect_pref_format(fields),
               describe=lambda examples, feats: {"preference": pref_report(examples, feats)})
_OFFLINE = dict(_COMMON, count_items=count_weights, summarise=_summarise_pairs, per_example=_pair_rows)
_POLICY = dict(predicts="generate", serves=GENERATE, head=None, chat=_chat(True), predict=generate_replies,
               sample_inputs=_prompt_text, evaluate_more=_policy_metrics)


def _online(name: str, how: str) -> Task:
    return Task(name=name, **_POLICY, **_COMMON, formats=PAIRS | {"prompt", "unpaired"}, online=how,
                metrics={"reward": True}, best_metric="reward", read=_read(PAIRS | {"prompt", "unpaired"}),
                encode=lambda examples, fmt, cfg, tokenizer, chat: encode_prompts(examples, cfg, tokenizer, chat),
                objective=lambda cfg: causal_lm, count_items=count_targets, probe=_as_lm_rows,
                summarise=lambda s, labels: lm_metrics(s.loss, s.count, s.correct), check=_needs_reward,
                per_example=lm_rows)


def _pairs(examples, fmt, cfg, tokenizer, chat):
    return encode_pairs(examples, cfg, tokenizer, chat)


TASKS = (
    Task(name="reward", predicts="score", serves=frozenset({"score", "embeddings"}), head="scalar", **_OFFLINE,
         formats=PAIRS, metrics=PAIR_METRICS, best_metric="accuracy", read=_read(PAIRS), chat=_chat(False),
         encode=lambda examples, fmt, cfg, tokenizer, chat: encode_pairs(examples, cfg, tokenizer, chat, scored=True),
         objective=lambda cfg: partial(reward_objective, pref=cfg.pref), predict=_score,
         sample_inputs=lambda cfg, examples: [reward_text(e.prompt, e.responses[0]) for e in examples]),
    Task(name="dpo", **_POLICY, **_OFFLINE, formats=PAIRS, metrics=PAIR_METRICS, best_metric="loss", read=_read(PAIRS),
         encode=_pairs, objective=lambda cfg: partial(dpo_objective, pref=cfg.pref), before_fit=_score_reference),
    Task(name="orpo", **_POLICY, **_OFFLINE, formats=PAIRS, metrics=PAIR_METRICS, best_metric="loss",
         read=_read(PAIRS), encode=_pairs, objective=lambda cfg: partial(orpo_objective, pref=cfg.pref)),
    Task(name="kto", **_POLICY, **_OFFLINE, formats=frozenset({"unpaired", "preference"}),
         metrics={"loss": False, "margin": True}, best_metric="loss", read=_read_unpaired,
         encode=lambda examples, fmt, cfg, tokenizer, chat: encode_unpaired(examples, cfg, tokenizer, chat),
         objective=lambda cfg: partial(kto_objective, pref=cfg.pref), before_fit=_score_reference),
    _online("ppo", "critic"),
    _online("grpo", "group"),
)
_BY_NAME = {t.name: t for t in TASKS}


# ---------------------------------------------------------------- for tests and make-pairs
def load_pref_examples(cfg: RunConfig) -> tuple[str, dict[str, list[PrefExample]]]:
    """Read, validate and split a preference task's data (no tokenizer needed): (format, splits)."""
    fmt, _, splits = split_examples(cfg, _BY_NAME[cfg.task].read)
    return fmt, splits


def tokenize_pref(examples: list[PrefExample], cfg: RunConfig, tokenizer, chat: bool) -> tuple[list[dict], object]:
    """Features for the config's preference task (see pref/data.py for their shapes)."""
    return _BY_NAME[cfg.task].encode(examples, "", cfg, tokenizer, chat)
