"""Preference data: pairs, rankings, unpaired feedback and prompts -> validated examples -> features.

Record shapes (the field's usual JSONL layouts, trl's included; `data.columns` renames):
  preference  {"prompt"?, "chosen", "rejected"}            text, or chat messages; also OpenAI's DPO
              {"input": {"messages"}, "preferred_output", "non_preferred_output"} (data/openai_format.py)
  ranking     {"prompt", "responses": [best, ..., worst], "scores"?, "weight"?}
              expanded into all K(K-1)/2 (better, worse) pairs as in InstructGPT; with "scores",
              responses are ranked by score and equal scores are ties (no pair).
  unpaired    {"prompt", "completion", "label": true|false}  thumbs up/down, for KTO
  prompt      {"prompt"} or {"text"} (with pref.prompt_words: the text's first N words)  for PPO / GRPO
A "margin" field on a preference record is used by the reward model's margin loss.
Splits are taken per record, before expansion, so one prompt's pairs never straddle train and test.
tunesmith/tasks/preference.py says which task reads which shape and how it encodes them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.formats import Example, rename_columns
from tunesmith.data.openai_format import is_openai_dpo, preference_fields
from tunesmith.data.readers import Record
from tunesmith.data.tokenize import IGNORE, TokenStats, encode_sft, use_chat_template
from tunesmith.errors import DataError, Problem, TunesmithError

Messages = list[dict[str, str]]


@dataclass
class PrefExample:
    where: Any  # Location
    prompt: str | Messages  # text, or the conversation before the response
    responses: list[str] = field(default_factory=list)  # best first (preference: [chosen, rejected])
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse) indices into responses
    ties: int = 0  # pairs skipped because neither response is preferred
    desirable: bool | None = None  # unpaired feedback
    weight: float = 1.0
    margin: float | None = None


def detect_pref_format(fields: dict[str, Any]) -> str:
    keys = set(fields)
    if {"chosen", "rejected"} <= keys or is_openai_dpo(fields):  # OpenAI's DPO shape reads as a pair
        return "preference"
    if "responses" in keys:
        return "ranking"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if "prompt" in keys or "text" in keys:
        return "prompt"
    raise TunesmithError(f"cannot detect the preference data format from columns {sorted(keys)}: expected "
                         "prompt+chosen+rejected, prompt+responses (ranked), prompt+completion+label, or prompt; "
                         "map your columns with data.columns")


def _text_or_messages(v: Any, where, name: str, problems: list[Problem], allow_empty: bool = False) -> str | Messages | None:
    if isinstance(v, str):
        if not allow_empty and not v.strip():
            problems.append(Problem(where, "empty", field=name))
            return None
        return v
    if isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                         and m.get("role") in ("system", "user", "assistant") for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    problems.append(Problem(where, "expected a string or a list of {role, content} messages", field=name))
    return None


def _split_response(prompt: str | Messages | None, resp: str | Messages, where, name: str,
                    problems: list[Problem]) -> tuple[str | Messages | None, str | None]:
    """A response given as messages: earlier turns extend the prompt (trl's implicit-prompt layout),
    the final assistant message is the response."""
    if isinstance(resp, str):
        return prompt, resp
    if resp[-1]["role"] != "assistant":
        problems.append(Problem(where, "the last message must be the assistant's response", field=name))
        return prompt, None
    before = resp[:-1]
    if before:
        prompt = (prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])) + before
    elif isinstance(prompt, str) and prompt is not None:
        prompt = [{"role": "user", "content": prompt}] if prompt else []
    return prompt, resp[-1]["content"]


def _pref_example(f: dict[str, Any], fmt: str, w, cfg: RunConfig, problems: list[Problem]) -> PrefExample | None:
    n0 = len(problems)
    prompt_raw = f.get("prompt")
    if fmt == "prompt":
        if prompt_raw is None and isinstance(f.get("text"), str):
            words = cfg.pref.prompt_words
            prompt_raw = " ".join(f["text"].split()[:words]) if words else f["text"]
        prompt = _text_or_messages(prompt_raw, w, "prompt", problems)
        return PrefExample(w, prompt) if len(problems) == n0 else None
    prompt = _text_or_messages(prompt_raw, w, "prompt", problems, allow_empty=True) if prompt_raw is not None else ""
    if fmt == "preference":
        c = _text_or_messages(f.get("chosen"), w, "chosen", problems)
        r = _text_or_messages(f.get("rejected"), w, "rejected", problems)
        if len(problems) > n0:
            return None
        pc, c = _split_response(prompt, c, w, "chosen", problems)
        pr, r = _split_response(prompt, r, w, "rejected", problems)
        if pc != pr:
            problems.append(Problem(w, "chosen and rejected continue different conversations", field="rejected"))
        if len(problems) > n0:
            return None
        margin = f.get("margin")
        if margin is not None and not isinstance(margin, (int, float)):
            problems.append(Problem(w, f"expected a number, got {type(margin).__name__}", field="margin"))
            return None
        tie = c == r
        return PrefExample(w, pc, [c, r], [] if tie else [(0, 1)], ties=int(tie), margin=margin)
    if fmt == "ranking":
        resps = f.get("responses")
        if not isinstance(resps, list) or len(resps) < 2 or not all(isinstance(x, str) and x.strip() for x in resps):
            problems.append(Problem(w, "expected a list of at least 2 non-empty strings, best first", field="responses"))
            return None
        scores = f.get("scores")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != len(resps) or not all(isinstance(s, (int, float)) for s in scores):
                problems.append(Problem(w, f"expected {len(resps)} numbers, one per response", field="scores"))
                return None
            order = sorted(range(len(resps)), key=lambda i: -scores[i])
            resps, scores = [resps[i] for i in order], [scores[i] for i in order]
        pairs, ties = [], 0
        for i in range(len(resps)):
            for j in range(i + 1, len(resps)):
                if (scores is not None and scores[i] == scores[j]) or resps[i] == resps[j]:
                    ties += 1
                else:
                    pairs.append((i, j))
        weight = f.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight < 0:
            problems.append(Problem(w, "expected a number >= 0", field="weight"))
            return None
        return PrefExample(w, prompt, resps, pairs, ties=ties, weight=float(weight))
    # unpaired
    comp = _text_or_messages(f.get("completion"), w, "completion", problems)
    label = f.get("label")
    if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
        label = label.lower() in ("true", "1")
    if not isinstance(label, (bool, int)) or label not in (0, 1):
        problems.append(Problem(w, f"expected true/false (desirable or not), got {label!r}", field="label"))
    if len(problems) > n0:
        return None
    prompt, comp = _split_response(prompt, comp, w, "completion", problems)
    return PrefExample(w, prompt, [comp], desirable=bool(label)) if len(problems) == n0 else None


def to_pref_examples(records: list[Record], cfg: RunConfig, formats: frozenset[str]) -> tuple[str, list[PrefExample]]:
    """Validate records for a preference task that reads `formats`. Raises DataError listing every bad record."""
    fmt = detect_pref_format(rename_columns(records[0], cfg.data.columns))
    if fmt not in formats:
        raise TunesmithError(f"{records[0].where.path}: data looks like '{fmt}', which task '{cfg.task}' cannot use "
                             f"(it needs {' or '.join(sorted(formats))})")
    problems: list[Problem] = []
    out = []
    for rec in records:
        f = rename_columns(rec, cfg.data.columns)
        if is_openai_dpo(f):  # {input: {messages}, preferred_output, non_preferred_output}
            f = preference_fields(f, rec.where, problems)
            if f is None:
                continue
        ex = _pref_example(f, fmt, rec.where, cfg, problems)
        if ex is not None:
            out.append(ex)
    if problems:
        raise DataError(problems)
    return fmt, out


# ---------------------------------------------------------------- tokenisation
def use_chat(cfg: RunConfig, examples: list[PrefExample], tokenizer, default: bool = True) -> bool:
    """Chat template on or off, by SFT's rule (data/tokenize.use_chat_template): data.chat_template,
    else on for messages, else `default` where the tokenizer has a template and no prompt template
    is set (a reward model reads plain text)."""
    messages = any(isinstance(e.prompt, list) for e in examples)
    # plain prompt + response reads as SFT's prompt_completion (template where there is one) or as text (none)
    return use_chat_template(cfg.data, "chat" if messages else "prompt_completion" if default else "text", tokenizer)


def _as_example(prompt: str | Messages, response: str) -> Example:
    if isinstance(prompt, list):
        return Example(where=None, messages=prompt + [{"role": "assistant", "content": response}])
    return Example(where=None, prompt=prompt, plain_prompt=prompt, completion=response)


def encode_response(prompt: str | Messages, response: str, cfg: RunConfig, tokenizer, chat: bool, stats: TokenStats
                    ) -> dict[str, list[int]]:
    """Prompt + response as one LM row with loss/log-prob only on the response."""
    ids, labels, _ = encode_sft(_as_example(prompt, response), cfg.data, tokenizer, chat, stats)
    return {"input_ids": ids, "labels": labels}


def encode_prompt(prompt: str | Messages, cfg: RunConfig, tokenizer, chat: bool) -> list[int]:
    """Token ids a policy continues from (the chat template's generation prompt when chat)."""
    if isinstance(prompt, list) or chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if cfg.data.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": cfg.data.system_prompt}] + msgs
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return ids[-cfg.data.max_length:]


def reward_text(prompt: str | Messages, response: str) -> str:
    """What a reward model reads: the prompt's text followed by the response."""
    if isinstance(prompt, list):
        prompt = "\n".join(m["content"] for m in prompt if m["role"] != "system") + "\n"
    return prompt + response


def _encode_reward(text: str, cfg: RunConfig, tokenizer, stats: TokenStats) -> dict[str, list[int]]:
    ids = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    stats.lengths.append(len(ids))
    if len(ids) > cfg.data.max_length:
        stats.truncated += 1
        tokenizer.truncation_side = cfg.data.truncation_side
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    return {"input_ids": ids}


def encode_prompts(examples: list[PrefExample], cfg: RunConfig, tokenizer, chat: bool) -> tuple[list[dict], TokenStats]:
    """Prompts a policy continues (PPO, GRPO): {"prompt_ids", "prompt"}."""
    return [{"prompt_ids": encode_prompt(e.prompt, cfg, tokenizer, chat), "prompt": e.prompt} for e in examples], TokenStats()


def encode_unpaired(examples: list[PrefExample], cfg: RunConfig, tokenizer, chat: bool) -> tuple[list[dict], TokenStats]:
    """KTO: {"rows": [response, mismatched response for the KL estimate], "desirable", "weight"}."""
    stats = TokenStats()
    feats: list[dict] = []
    n = len(examples)
    for i, e in enumerate(examples):
        other = examples[(i + 1) % n] if n > 1 else e  # KTO's z0: this prompt with another example's answer
        row = encode_response(e.prompt, e.responses[0], cfg, tokenizer, chat, stats)
        kl_row = encode_response(e.prompt, other.responses[0], cfg, tokenizer, chat, TokenStats())
        feats.append({"rows": [row, kl_row], "desirable": float(bool(e.desirable)), "weight": e.weight})
    return feats, stats


def encode_pairs(examples: list[PrefExample], cfg: RunConfig, tokenizer, chat: bool, scored: bool = False
                 ) -> tuple[list[dict], TokenStats]:
    """Pairs, {"rows": [better, worse], "weight", "margin"} (collate_rows pads them): rows of prompt +
    response with labels on the response (DPO, ORPO), or with `scored` plain text for a reward model."""
    stats = TokenStats()
    feats: list[dict] = []
    problems = []
    for e in examples:
        if not e.pairs:
            continue
        if scored:
            rows = [_encode_reward(reward_text(e.prompt, r), cfg, tokenizer, stats) for r in e.responses]
        else:
            rows = [encode_response(e.prompt, r, cfg, tokenizer, chat, stats) for r in e.responses]
            if any(all(lab == IGNORE for lab in row["labels"]) for row in rows):
                stats.dropped += 1
                problems.append(Problem(e.where, f"no response tokens left within max_length={cfg.data.max_length}",
                                        field="chosen"))
                continue
        # InstructGPT: a prompt's K(K-1)/2 pairs count as one example (ranking_weight: prompt), so
        # prompts with many responses do not dominate; or each pair counts once (pair).
        w = e.weight / len(e.pairs) if cfg.pref.ranking_weight == "prompt" else e.weight
        for i, j in e.pairs:
            feats.append({"rows": [rows[i], rows[j]], "weight": w, "margin": float(e.margin or 0.0)})
    if not feats:
        raise DataError(problems) if problems else TunesmithError("no preference pairs left (every pair is a tie)")
    return feats, stats


def pref_report(examples: list[PrefExample], feats: list[dict]) -> dict[str, Any]:
    """What `data check` and the run log say about preference data: pairs, ties, duplicates and
    length bias (a reward model can learn "longer is better" instead of the preference)."""
    report: dict[str, Any] = {"records": len(examples)}
    keys = Counter((str(e.prompt), tuple(e.responses), e.desirable) for e in examples)
    report["duplicates"] = sum(c - 1 for c in keys.values())
    if any(e.desirable is not None for e in examples):
        report["desirable"] = sum(bool(e.desirable) for e in examples)
        report["undesirable"] = sum(e.desirable is False for e in examples)
        return report
    if not any(e.responses for e in examples):
        return report
    report["pairs"] = sum(len(e.pairs) for e in examples)
    report["ties"] = sum(e.ties for e in examples)
    lens = [(len(f["rows"][0]["input_ids"]), len(f["rows"][1]["input_ids"])) for f in feats if "rows" in f]
    if lens:
        report["mean_tokens_chosen"] = round(sum(c for c, _ in lens) / len(lens), 1)
        report["mean_tokens_rejected"] = round(sum(r for _, r in lens) / len(lens), 1)
        report["chosen_longer_share"] = round(sum(c > r for c, r in lens) / len(lens), 3)
    return report
