"""Rollouts for online RL and policy evaluation: the reward (a reward-model run, a classifier run, a
Python function), sampling, the policy's and the reference's log-probs. The loop is train/online.py."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import PROMPT_METHODS, RunConfig, task_facts
from tunesmith.data.collate import left_pad
from tunesmith.errors import TunesmithError
from tunesmith.objectives import logits_to_keep_kind
from tunesmith.pref.data import reward_text
from tunesmith.pref.losses import entropy
from tunesmith.pref.objectives import reference_context


# ---------------------------------------------------------------- reward
def _import_fn(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise TunesmithError(f"pref.reward_fn: '{spec}' should look like 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise TunesmithError(f"pref.reward_fn: file not found: {path}")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise TunesmithError(f"pref.reward_fn: cannot import '{target}': {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TunesmithError(f"pref.reward_fn: '{target}' has no function '{name}'")
    return fn


class RewardScorer:
    """The reward: a reward-model run, a classifier run (log-odds of a label), a Python function, or their sum."""

    def __init__(self, cfg: RunConfig, device):
        from tunesmith.methods.saved import load_run, to_device

        pref = cfg.pref
        self.fn = _import_fn(pref.reward_fn) if pref.reward_fn else None
        self.model = None
        self.is_classifier = False
        if pref.reward_model:
            loaded = load_run(pref.reward_model)
            head = task_facts(loaded.cfg.task).head
            if head is None:
                raise TunesmithError(f"pref.reward_model: {pref.reward_model} is a '{loaded.cfg.task}' run; "
                                     "use a reward or classification run")
            self.label = 0
            if head == "labels":
                labels = loaded.labels or []
                if pref.reward_label not in labels:
                    raise TunesmithError(f"pref.reward_label: {pref.reward_model} is a classifier; say which of its "
                                         f"labels {labels} is good (got {pref.reward_label!r})")
                self.label, self.is_classifier = labels.index(pref.reward_label), True
            self.model = to_device(loaded.model, device).eval()
            self.tokenizer = loaded.tokenizer
            self.tokenizer.truncation_side = loaded.cfg.data.truncation_side
            self.max_length = loaded.cfg.data.max_length
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], batch_size: int = 32) -> torch.Tensor:
        total = torch.zeros(len(completions))
        if self.model is not None:
            texts = [reward_text(p, c) for p, c in zip(prompts, completions)]
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i: i + batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()  # (B, C)
                if self.is_classifier:  # log-odds of the good label against all others
                    others = torch.cat([logits[:, :self.label], logits[:, self.label + 1:]], dim=-1)
                    r = logits[:, self.label] - torch.logsumexp(others, dim=-1)
                else:
                    r = logits[:, 0]
                total[i: i + len(r)] += r.cpu()
        if self.fn is not None:
            values = self.fn(list(prompts), list(completions))
            if len(values) != len(completions) or not all(isinstance(v, (int, float)) for v in values):
                raise TunesmithError(f"pref.reward_fn must return one number per completion "
                                     f"(got {type(values).__name__} of length {len(values)} for {len(completions)})")
            total += torch.tensor([float(v) for v in values])
        return total


# ---------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    ids: torch.Tensor  # (N, P + T) left-padded prompt, then the completion
    attn: torch.Tensor  # (N, P + T) 1 = real token (completion tokens after EOS are 0)
    width: int  # P: prompt width
    mask: torch.Tensor  # (N, T) completion tokens up to and including EOS
    prompts: list
    texts: list[str]
    scores: torch.Tensor  # (N,)
    logps: torch.Tensor | None = None  # (N, T) sampling policy
    ref_logps: torch.Tensor | None = None  # (N, T)
    values: torch.Tensor | None = None  # (N, T)
    entropy: torch.Tensor | None = None  # (N, T)


def completion_mask(completion: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it. (N, T) -> (N, T)."""
    if eos_id is None:
        return torch.ones_like(completion)
    is_eos = (completion == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], cfg: RunConfig, device) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Sample one completion per prompt: (ids, attention, prompt width, completion mask)."""
    p = cfg.pref
    ids, attn = left_pad(prompt_ids, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                         temperature=p.temperature, top_k=p.top_k or None, top_p=p.top_p,
                         max_new_tokens=p.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    width = ids.shape[1]
    mask = completion_mask(gen[:, width:].cpu(), tokenizer.eos_token_id)
    return gen.cpu(), torch.cat([attn, mask], dim=1), width, mask


def policy_forward(model, ids: torch.Tensor, attn: torch.Tensor, width: int, temperature: float, method: str,
                   value_head: nn.Module | None = None, with_entropy: bool = False):
    """Log-probs of the completion tokens (N, T), and optionally their values (N, T) and entropies (N, T)."""
    kwargs = {} if method in PROMPT_METHODS else {"position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
    L = ids.shape[1]
    # Logits only at the positions that predict a response token (width-1 .. L-2), indexed from
    # the end so that prompt-learning's virtual tokens in front do not shift them.
    keep = logits_to_keep_kind(model) != "none"
    if keep:
        kwargs["logits_to_keep"] = torch.arange(width - 1 - L, -1, device=ids.device)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=value_head is not None, **kwargs)
    logits = out.logits if keep else out.logits[:, -L:][:, width - 1:-1]
    logits = logits.float() / temperature  # (N, T, V): position t-1 predicts token t
    target = ids[:, width:].unsqueeze(-1)
    logps = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    values = value_head(out.hidden_states[-1][:, -L:][:, width - 1:-1].float()).squeeze(-1) if value_head is not None else None
    ent = entropy(logits.detach()) if with_entropy else None
    return logps, values, ent


@torch.no_grad()
def make_rollout(model, reference, tokenizer, prompts: list, prompt_ids: list[list[int]], scorer: RewardScorer,
                 cfg: RunConfig, acc, value_head=None) -> Rollout:
    # Rollouts are sampled and scored in fp32 even in a bf16 run, whose update pass runs under
    # autocast: PPO's ratio exp(logp - old) then starts near 1, not at exactly 1. Scoring under
    # the update's autocast makes it exact, but cut the tiny PPO test's reward gain from above 0.3
    # to 0.2 in bf16 (tests/test_pref.py), so that change waits for a measured real-model run.
    device = acc.device
    ids, attn, width, mask = sample(model, tokenizer, prompt_ids, cfg, device)
    texts = tokenizer.batch_decode([row[width:][m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
    ro = Rollout(ids, attn, width, mask, prompts, texts, scorer(prompts, texts))
    was_training = model.training
    model.eval()
    dev = (ids.to(device), attn.to(device))
    lp, v, ent = policy_forward(model, *dev, width, cfg.pref.temperature, cfg.method.name, value_head, with_entropy=True)
    with reference(model) as ref_model:
        ref_lp, _, _ = policy_forward(ref_model, *dev, width, cfg.pref.temperature, cfg.method.name)
    model.train(was_training)
    ro.logps, ro.ref_logps, ro.entropy = lp.cpu(), ref_lp.cpu(), ent.cpu()
    ro.values = v.cpu() if v is not None else None
    return ro


_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_reference(model):
    """`with reference(model) as ref:` gives the frozen reference policy: the same peft model with its
    adapter switched off (no second copy of the weights), else a frozen copy of the starting model."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        @contextmanager
        def adapter_off(m):
            with reference_context(m):
                yield m
        return adapter_off
    if model not in _FROZEN:  # full / bitfit / bottleneck: a frozen copy of the start point, made once
        _FROZEN[model] = copy.deepcopy(model).eval().requires_grad_(False)
    frozen = _FROZEN[model]

    @contextmanager
    def start_point(m):
        yield frozen
    return start_point


_SCORERS: dict = {}


def get_scorer(cfg: RunConfig, device) -> RewardScorer:
    """One reward scorer per (reward model, function) in a process: loaded once, shared by training and evaluation."""
    key = (cfg.pref.reward_model, cfg.pref.reward_label, cfg.pref.reward_fn, str(device))
    if key not in _SCORERS:
        _SCORERS[key] = RewardScorer(cfg, device)
    return _SCORERS[key]
