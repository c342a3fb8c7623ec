"""Examples -> token ids and labels; each task picks the encoder that fits it.

Feature dicts (no padding here; collate pads per batch):
  classification: {"input_ids": [...], "label": int}  (regression: a float label)
  sft / cpt:      {"input_ids": [...], "labels": [...]} with -100 where no loss is taken
  sft also keeps  "prompt_len" (tokens before the last assistant reply) for generation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example
from tunesmith.errors import DataError, Problem, TunesmithError

IGNORE = -100  # label value that cross-entropy skips (torch's ignore_index default)


@dataclass
class TokenStats:
    lengths: list[int] = field(default_factory=list)  # untruncated lengths, one per example (or document)
    truncated: int = 0  # examples that lost tokens to max_length
    dropped: int = 0  # examples left with no trainable token after truncation


def use_chat_template(cfg: DataConfig, fmt: str, tokenizer) -> bool:
    if cfg.chat_template is not None:
        if cfg.chat_template and not tokenizer.chat_template:
            raise TunesmithError("data.chat_template is on, but this tokenizer has no chat template")
        return cfg.chat_template
    if fmt == "chat":
        if not tokenizer.chat_template:
            raise TunesmithError("chat (messages) data needs a tokenizer with a chat template; this one has none")
        return True
    return fmt in {"prompt_completion", "instruction"} and not cfg.template.prompt and bool(tokenizer.chat_template)


def chat_messages(ex: Example, cfg: DataConfig) -> list[dict[str, str]]:
    """The conversation an example stands for (system prompt added if configured)."""
    msgs = ex.messages or [{"role": "user", "content": ex.prompt or ""}, {"role": "assistant", "content": ex.completion or ""}]
    if cfg.system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": cfg.system_prompt}] + msgs
    return msgs


def render_prompt(ex_or_text: Example | str, cfg: DataConfig, tokenizer, chat: bool) -> str:
    """The text a model sees before it answers: used for training masks, generation and predict."""
    if isinstance(ex_or_text, str):
        ex_or_text = Example(where=None, prompt=ex_or_text, plain_prompt=_plain(ex_or_text, cfg), completion="")
    if chat:
        msgs = chat_messages(ex_or_text, cfg)
        return tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    return ex_or_text.plain_prompt or ""


def _plain(text: str, cfg: DataConfig) -> str:
    """A bare prompt through data.template.prompt when it has a single field (predict on raw text)."""
    tpl = cfg.template.prompt
    if not tpl:
        return text
    import string
    names = {n for _, n, _, _ in string.Formatter().parse(tpl) if n}
    if len(names) == 1:
        return tpl.format(**{names.pop(): text})
    return text


def _chat_segments(msgs: list[dict[str, str]], tokenizer, train_all: bool) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained?) pieces: assistant replies are trained.

    Renders growing prefixes with the tokenizer's own template, so the pieces are exactly the
    template's text; the template's end-of-turn marker after a reply is trained too, which is
    what teaches the model to stop.
    """
    segs: list[tuple[str, bool]] = []
    consumed = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not prefix.startswith(consumed) or not full.startswith(prefix):
            raise TunesmithError("this tokenizer's chat template does not render conversations prefix by prefix; "
                                 "use a prompt template (data.template.prompt) instead")
        segs.append((prefix[len(consumed):], train_all))
        segs.append((full[len(prefix):], True))
        consumed = full
    return segs


def encode_sft(ex: Example, cfg: DataConfig, tokenizer, chat: bool, stats: TokenStats) -> tuple[list[int], list[int], int]:
    """Prompt + answer as ids, labels (IGNORE where no loss is taken) and the prompt's length, cut
    to max_length; the untruncated length and any cut are counted in `stats`."""
    train_all = cfg.loss_on == "all"
    if chat:
        segs = _chat_segments(chat_messages(ex, cfg), tokenizer, train_all)
        specials = False  # the template writes its own special tokens
    else:
        segs = [(ex.plain_prompt or "", train_all), (ex.completion or "", True)]
        specials = True
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    for k, (text, trained) in enumerate(segs):
        if k == len(segs) - 1:
            prompt_len = len(ids)  # the last segment is the final reply: generation starts here
        piece = tokenizer(text, add_special_tokens=specials and k == 0)["input_ids"] if text else []
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if not chat and cfg.add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    stats.lengths.append(len(ids))
    if len(ids) > cfg.max_length:
        stats.truncated += 1
        ids, labels, prompt_len = _truncate_sft(ids, labels, prompt_len, cfg.max_length)
    return ids, labels, prompt_len


def _truncate_sft(ids: list[int], labels: list[int], prompt_len: int, max_len: int) -> tuple[list[int], list[int], int]:
    """Cut the prompt from the left first (recent context matters most), then the answer's end."""
    excess = len(ids) - max_len
    if excess <= 0:
        return ids, labels, prompt_len
    cut = min(excess, max(prompt_len - 1, 0))
    ids, labels, prompt_len = ids[cut:], labels[cut:], prompt_len - cut
    return ids[:max_len], labels[:max_len], prompt_len


def tokenize_texts(examples: list[Example], cfg: DataConfig, tokenizer) -> tuple[list[dict[str, Any]], TokenStats]:
    """Text + label examples (classification, regression): {"input_ids", "label"}, cut by data.truncation_side."""
    stats = TokenStats()
    feats: list[dict[str, Any]] = []
    # Untruncated on purpose (to count lengths and cut by our own rule); verbose=False drops the
    # tokenizer's "longer than the maximum ... indexing errors" warning, which does not apply.
    enc = tokenizer([e.text for e in examples], add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    tokenizer.truncation_side = cfg.truncation_side
    specials = set(tokenizer.all_special_ids)  # a property that builds a list: once, not per example
    for e, ids in zip(examples, enc):
        stats.lengths.append(len(ids))
        if len(ids) > cfg.max_length:
            stats.truncated += 1
            ids = _truncate_keep_specials(ids, cfg.max_length, cfg.truncation_side, specials)
        feats.append({"input_ids": ids, "label": e.label})
    return feats, stats


def tokenize_sft(examples: list[Example], fmt: str, cfg: DataConfig, tokenizer) -> tuple[list[dict[str, Any]], TokenStats]:
    """Prompt + answer examples: loss on the answer only.

    Raises:
        DataError if every example is dropped (e.g. max_length leaves no answer tokens).
    """
    stats = TokenStats()
    feats: list[dict[str, Any]] = []
    chat = use_chat_template(cfg, fmt, tokenizer)
    problems = []
    for e in examples:
        ids, labels, plen = encode_sft(e, cfg, tokenizer, chat, stats)
        if all(lab == IGNORE for lab in labels):
            stats.dropped += 1
            problems.append(Problem(e.where, f"no answer tokens left within max_length={cfg.max_length}", field="completion"))
            continue
        answer = e.completion if e.messages is None else e.messages[-1]["content"]
        reference = e.expected or answer
        question = e.prompt if e.messages is None else e.messages[-2]["content"] if len(e.messages) > 1 else ""
        # question: what was asked, for the report's per-question table; answer: the data's whole
        # answer, which ROUGE-L and chrF compare with (reference may be a phrase it must contain)
        feats.append({"input_ids": ids, "labels": labels, "prompt_len": plen, "reference": reference,
                      "question": question, "answer": answer})
    if not feats:
        raise DataError(problems)
    return feats, stats


def _truncate_keep_specials(ids: list[int], max_len: int, side: str, specials: set[int]) -> list[int]:
    """Truncate while keeping a leading CLS/BOS and trailing SEP/EOS the tokenizer added."""
    head = ids[:1] if ids and ids[0] in specials else []
    tail = ids[-1:] if ids and ids[-1] in specials else []
    body = ids[len(head): len(ids) - len(tail)]
    keep = max_len - len(head) - len(tail)
    body = body[-keep:] if side == "left" else body[:keep]
    return head + body + tail


def tokenize_cpt(examples: list[Example], cfg: DataConfig, tokenizer) -> tuple[list[dict[str, Any]], TokenStats]:
    """Documents packed (or cut) into max_length blocks, loss on every token."""
    stats = TokenStats()
    eos = tokenizer.eos_token_id
    docs = tokenizer([e.text for e in examples], add_special_tokens=True, verbose=False)["input_ids"]
    stats.lengths = [len(d) for d in docs]
    block = cfg.max_length
    blocks: list[list[int]] = []
    if cfg.packing:
        # Concatenate documents with EOS between and cut into full blocks (run_clm's "group texts").
        stream = [t for d in docs for t in d + ([eos] if eos is not None else [])]
        blocks = [stream[i: i + block] for i in range(0, len(stream), block)]
        if len(blocks) > 1 and len(blocks[-1]) < block // 4:
            blocks.pop()  # a tiny tail block adds noise, not signal
    else:
        for d in docs:
            d = d + ([eos] if cfg.add_eos and eos is not None else [])
            stats.truncated += len(d) > block
            blocks.extend(d[i: i + block] for i in range(0, len(d), block))
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1], stats
