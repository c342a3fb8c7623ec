"""OpenAI's fine-tuning file formats: validation with OpenAI's error codes, and conversion.

Two record shapes, one JSON object per line (https://platform.openai.com/docs/guides/fine-tuning):
  chat  {"messages": [{"role": "system"|"user"|"assistant", "content": str, "name"?, "weight"?}, ...]}
  dpo   {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": str}],
         "non_preferred_output": [{"role": "assistant", "content": str}]}

The chat checks and their codes are those of OpenAI's cookbook "Data preparation and analysis for
chat model fine-tuning": data_type, missing_messages_list, message_missing_key,
message_unrecognized_key, unrecognized_role, missing_content, example_missing_assistant_message.
Ours, for what OpenAI's API refuses elsewhere or tunesmith cannot train: invalid_json (a line
that does not parse), insufficient_examples (fewer than 10, OpenAI's minimum), example_too_long
(over the token limit), unsupported_role / unsupported_tool_calls / unsupported_weight (valid for
OpenAI, not trained by tunesmith: refused rather than silently dropped),
last_message_not_assistant, and for DPO missing_input, missing_preferred_output,
missing_non_preferred_output.

One code serves `tunesmith data check`, the service's upload validation (tunesmith/service/files.py)
and the preference reader (pref/data.py reads the DPO shape as prompt/chosen/rejected).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunesmith.errors import Location, Problem

Kind = Literal["chat", "dpo"]
MIN_EXAMPLES = 10  # OpenAI refuses a training file with fewer examples
ROLES = ("system", "user", "assistant")  # what tunesmith trains
OPENAI_ROLES = ROLES + ("function", "tool", "developer")  # recognised by OpenAI's API
MESSAGE_KEYS = ("role", "content", "name", "weight", "function_call", "tool_calls", "tool_call_id")
TOP_LEVEL_TOOLS = ("tools", "functions")


@dataclass(frozen=True)
class Finding:
    """One problem in a file: OpenAI's code (or ours), where, and what to fix."""

    code: str
    message: str
    line: int | None = None  # 1-based line of the file; None for the whole file
    field: str | None = None  # e.g. "messages[2].role"

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        what = f"{self.field}: " if self.field else ""
        return f"{where}{self.code}: {what}{self.message}"

    def problem(self, path: str) -> Problem:
        """As tunesmith's data Problem (file, line, field), the code leading the message."""
        return Problem(Location(path, self.line), f"[{self.code}] {self.message}", self.field)


@dataclass
class Report:
    """What validating a file found: its shape, examples, tokens and every finding."""

    kind: Kind | None = None
    examples: int = 0  # valid examples
    lines: int = 0  # non-blank lines read
    tokens: int | None = None  # total tokens of the valid examples, when a tokenizer counted them
    max_tokens_seen: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> dict[str, int]:
        return dict(Counter(f.code for f in self.findings))

    def summary(self, limit: int = 5) -> str:
        """One line for a file object's status_details: the first findings, code and line."""
        shown = "; ".join(str(f) for f in self.findings[:limit])
        more = f" (and {len(self.findings) - limit} more)" if len(self.findings) > limit else ""
        return shown + more

    def as_dict(self) -> dict[str, Any]:
        return {"format": f"openai_{self.kind}" if self.kind else None, "n_examples": self.examples,
                "n_tokens": self.tokens, "max_example_tokens": self.max_tokens_seen, "codes": self.codes(),
                "findings": [{"code": f.code, "message": f.message, "line": f.line, "field": f.field}
                             for f in self.findings[:100]]}


# ---------------------------------------------------------------- shape detection
def detect_kind(obj: Any) -> Kind | None:
    """'dpo' for OpenAI's preference shape, 'chat' for a messages record, else None (not OpenAI's)."""
    if not isinstance(obj, dict):
        return None
    if {"input", "preferred_output", "non_preferred_output"} & set(obj):
        return "dpo"
    if "messages" in obj:
        return "chat"
    return None


def is_openai_dpo(fields: dict[str, Any]) -> bool:
    return detect_kind(fields) == "dpo"


# ---------------------------------------------------------------- one example
Issue = tuple[str, str, str | None]  # (code, message, field)


def _message_issues(m: Any, at: str, roles: tuple[str, ...] = ROLES) -> list[Issue]:
    """The cookbook's per-message checks, in its order, for one message at field `at`."""
    if not isinstance(m, dict):
        return [("data_type", f"expected a message object, got {type(m).__name__}", at)]
    out: list[Issue] = []
    tool = [k for k in ("function_call", "tool_calls") if m.get(k)]
    missing = [k for k in ("role", "content") if k not in m and not (k == "content" and tool)]
    if missing:
        out.append(("message_missing_key", f"missing {' and '.join(repr(k) for k in missing)}", at))
    unknown = sorted(k for k in m if k not in MESSAGE_KEYS)
    if unknown:
        out.append(("message_unrecognized_key", f"unrecognized key(s) {', '.join(map(repr, unknown))}; a message "
                    f"has {', '.join(MESSAGE_KEYS[:4])}", at))
    role = m.get("role")
    if "role" in m and role not in OPENAI_ROLES:
        out.append(("unrecognized_role", f"role {role!r} is not one of {', '.join(OPENAI_ROLES)}", f"{at}.role"))
    elif role is not None and role not in roles:
        out.append(("unsupported_role", f"role {role!r}: tunesmith trains {', '.join(roles)} messages here",
                    f"{at}.role"))
    if tool:
        out.append(("unsupported_tool_calls", f"{tool[0]}: tunesmith trains text replies, not tool calls", at))
    elif "content" in m:
        content = m["content"]
        if not isinstance(content, str) or not content.strip():
            what = "empty" if isinstance(content, str) or content is None else f"a {type(content).__name__}"
            out.append(("missing_content", f"content must be a non-empty string, got {what}", f"{at}.content"))
    if "weight" in m:
        w = m["weight"]
        if w not in (0, 1) or isinstance(w, bool):
            out.append(("unsupported_weight", f"weight must be 0 or 1, got {w!r}", f"{at}.weight"))
        elif w == 0:
            out.append(("unsupported_weight", "weight 0 (do not train this reply) is not supported: tunesmith "
                        "trains every assistant reply; remove the message or its weight", f"{at}.weight"))
    return out


def _messages_issues(msgs: Any, at: str, roles: tuple[str, ...] = ROLES) -> list[Issue]:
    if not msgs or not isinstance(msgs, list):
        got = "missing" if msgs is None else "empty" if not msgs else f"a {type(msgs).__name__}, not a list"
        return [("missing_messages_list", f"expected a non-empty list of messages, got {got}", at)]
    return [i for k, m in enumerate(msgs) for i in _message_issues(m, f"{at}[{k}]", roles)]


def chat_issues(obj: Any) -> list[Issue]:
    """Every problem of one chat-format example (empty: it is fine)."""
    if not isinstance(obj, dict):
        return [("data_type", f"expected a JSON object, got {type(obj).__name__}", None)]
    out = _tool_issues(obj) + _messages_issues(obj.get("messages"), "messages")
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs:
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
        if "assistant" not in roles:
            out.append(("example_missing_assistant_message", "no message has role 'assistant' (nothing to learn)",
                        "messages"))
        elif roles[-1] != "assistant" and not out:
            out.append(("last_message_not_assistant", f"the conversation ends with a {roles[-1]!r} message after the "
                        "last assistant reply; tunesmith trains conversations that end with the reply", "messages"))
    return out


def _tool_issues(obj: dict) -> list[Issue]:
    return [("unsupported_tool_calls", f"{k}: tunesmith trains text replies, not tool calls", k)
            for k in TOP_LEVEL_TOOLS if obj.get(k)]


def _output_issues(out: Any, name: str) -> list[Issue]:
    if not isinstance(out, list) or len(out) != 1:
        got = "missing" if out is None else f"a list of {len(out)}" if isinstance(out, list) else type(out).__name__
        return [(f"missing_{name}", f"expected a list of exactly one assistant message, got {got}", name)]
    issues = _message_issues(out[0], f"{name}[0]", roles=("assistant",))
    return issues


def dpo_issues(obj: Any) -> list[Issue]:
    """Every problem of one DPO-format example (empty: it is fine)."""
    if not isinstance(obj, dict):
        return [("data_type", f"expected a JSON object, got {type(obj).__name__}", None)]
    inp = obj.get("input")
    if not isinstance(inp, dict):
        out: list[Issue] = [("missing_input", "expected an object {\"messages\": [...]}, got "
                             + ("nothing" if inp is None else type(inp).__name__), "input")]
    else:
        out = _tool_issues(inp) + _messages_issues(inp.get("messages"), "input.messages")
    out += _output_issues(obj.get("preferred_output"), "preferred_output")
    out += _output_issues(obj.get("non_preferred_output"), "non_preferred_output")
    return out


def issues(obj: Any, kind: Kind) -> list[Issue]:
    return dpo_issues(obj) if kind == "dpo" else chat_issues(obj)


# ---------------------------------------------------------------- conversion
def to_chat(obj: dict) -> dict[str, Any]:
    """A valid chat example as tunesmith's chat record: {"messages": [{role, content}, ...]}."""
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]}


def to_preference(obj: dict) -> dict[str, Any]:
    """A valid DPO example as tunesmith's preference record: the input's messages are the prompt
    (rendered with the chat template, as tunesmith renders message prompts), the two outputs'
    assistant texts are chosen and rejected."""
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in obj["input"]["messages"]],
            "chosen": obj["preferred_output"][0]["content"], "rejected": obj["non_preferred_output"][0]["content"]}


def preference_fields(fields: dict[str, Any], where: Location, problems: list[Problem]) -> dict[str, Any] | None:
    """For pref/data.py: one record in OpenAI's DPO shape as prompt/chosen/rejected fields, or None
    with its problems (OpenAI's codes in the messages) added."""
    found = dpo_issues(fields)
    problems += [Finding(code, msg, where.line, fld).problem(where.path) for code, msg, fld in found]
    return None if found else to_preference(fields)


# ---------------------------------------------------------------- tokens
def example_tokens(obj: dict, kind: Kind, tokenizer) -> int:
    """Tokens of one valid example as the model reads it: through the chat template when the
    tokenizer has one (DPO: the prompt with the longer of its two replies)."""
    if kind == "dpo":
        msgs = [{"role": m["role"], "content": m["content"]} for m in obj["input"]["messages"]]
        outs = [obj[k][0]["content"] for k in ("preferred_output", "non_preferred_output")]
        return max(_conversation_tokens(msgs + [{"role": "assistant", "content": o}], tokenizer) for o in outs)
    return _conversation_tokens(to_chat(obj)["messages"], tokenizer)


def _conversation_tokens(msgs: list[dict[str, str]], tokenizer) -> int:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer("\n".join(m["content"] for m in msgs))["input_ids"])


# ---------------------------------------------------------------- a whole file
def iter_jsonl(path: Path) -> Iterator[tuple[int, Any | Finding]]:
    """(line number, parsed object or an invalid_json Finding) for every non-blank line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, Finding("invalid_json", f"not UTF-8 text (byte {e.start})", n)
            except json.JSONDecodeError as e:
                yield n, Finding("invalid_json", f"malformed JSON: {e.msg} at column {e.colno}", n)


def validate_objects(items: Iterable[tuple[int | None, Any]], kind: Kind | None = None, tokenizer=None,
                     max_tokens: int | None = None, min_examples: int = MIN_EXAMPLES,
                     count_tokens: Callable[[dict, Kind], int] | None = None) -> Report:
    """Validate (line, object) pairs as OpenAI's chat or DPO format.

    Args:
        kind: the expected shape; None: the first object's shape (chat when unclear).
        tokenizer: count each valid example's tokens with it (chat template included); with
            `max_tokens`, longer examples are `example_too_long`.
        min_examples: fewer valid examples is `insufficient_examples` (0: no minimum).
    Returns:
        A Report with every finding, each with its line and field.
    """
    rep = Report(kind=kind)
    counted: list[int] = []
    for line, obj in items:
        rep.lines += 1
        if isinstance(obj, Finding):
            rep.findings.append(obj)
            continue
        if rep.kind is None:
            rep.kind = detect_kind(obj) or "chat"
        found = issues(obj, rep.kind)
        rep.findings += [Finding(code, msg, line, fld) for code, msg, fld in found]
        if found:
            continue
        rep.examples += 1
        if tokenizer is not None or count_tokens is not None:
            n = count_tokens(obj, rep.kind) if count_tokens else example_tokens(obj, rep.kind, tokenizer)
            counted.append(n)
            if max_tokens is not None and n > max_tokens:
                rep.findings.append(Finding("example_too_long", f"{n} tokens, over the limit of {max_tokens}", line,
                                            "messages" if rep.kind == "chat" else "input"))
    if counted:
        rep.tokens, rep.max_tokens_seen = sum(counted), max(counted)
    if rep.lines == 0:
        rep.findings.append(Finding("insufficient_examples", "the file has no examples (it is empty)"))
    elif rep.examples < min_examples and not rep.findings:
        rep.findings.append(Finding("insufficient_examples", f"{rep.examples} example(s); a training file needs at "
                                    f"least {min_examples}"))
    return rep


def validate_file(path: str | Path, kind: Kind | None = None, tokenizer=None, max_tokens: int | None = None,
                  min_examples: int = MIN_EXAMPLES) -> Report:
    """Validate a JSONL file in OpenAI's chat or DPO format (see validate_objects)."""
    return validate_objects(iter_jsonl(Path(path)), kind, tokenizer, max_tokens, min_examples)


def first_object(path: str | Path, limit: int = 50) -> Any | None:
    """The first parseable JSON value of a JSONL file (to tell its shape), or None."""
    for i, (_, obj) in enumerate(iter_jsonl(Path(path))):
        if not isinstance(obj, Finding):
            return obj
        if i >= limit:
            break
    return None
