"""peft-backed methods: the LoRA family (LoRA, rsLoRA, DoRA, QLoRA, LoHa, LoKr), IA3 and the
prompt-learning methods (prefix tuning, prompt tuning, P-tuning).

We only translate our config into peft's and turn peft's failures into errors that say what
to change; the adapters themselves are peft's, so they save and load in peft's format.
"""
from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import LORA_FAMILY, PROMPT_METHODS, MethodConfig, Task
from tunesmith.errors import TunesmithError
from tunesmith.models.load import head_module_names
from tunesmith.config import HEAD_TASKS

# peft's own names for the prompt-learning task types and LoRA inits.
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def peft_config(model: nn.Module, cfg: MethodConfig, task: Task, tokenizer_path: str | None = None):
    """Build the peft config for `cfg.name` (one of PEFT_METHODS)."""
    import peft

    task_type = peft.TaskType.SEQ_CLS if task in HEAD_TASKS else peft.TaskType.CAUSAL_LM
    # A classifier's head starts random: it must train, and is saved with the adapter.
    to_save = head_module_names(model) if (task in HEAD_TASKS and cfg.train_head) else None
    name = cfg.name
    if name in LORA_FAMILY:
        common = dict(r=cfg.opt("r"), target_modules=_targets(model, cfg), layers_to_transform=cfg.layers,
                      modules_to_save=to_save, task_type=task_type)
        if name == "loha":
            return peft.LoHaConfig(alpha=cfg.opt("alpha"), rank_dropout=cfg.opt("dropout"), **common)
        if name == "lokr":
            return peft.LoKrConfig(alpha=cfg.opt("alpha"), rank_dropout=cfg.opt("dropout"), **common)
        init = cfg.opt("init")
        if init == "olora" and cfg.opt("quantize") != "none":
            raise TunesmithError("method.init: olora needs full-precision base weights; it cannot start from a "
                                 "quantised base (use init default, gaussian or pissa)")
        return peft.LoraConfig(lora_alpha=cfg.opt("alpha"), lora_dropout=cfg.opt("dropout"), use_rslora=cfg.opt("rslora"),
                               use_dora=(name == "dora"), init_lora_weights=_INIT[init], **common)
    if name == "ia3":
        return peft.IA3Config(target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules,
                              modules_to_save=to_save, task_type=task_type,
                              **({"layers_to_transform": cfg.layers} if cfg.layers else {}))
    if name in PROMPT_METHODS:
        common = dict(num_virtual_tokens=cfg.opt("num_virtual_tokens"), task_type=task_type)
        if name == "prefix":
            return peft.PrefixTuningConfig(prefix_projection=cfg.opt("prefix_projection"), **common)
        if name == "ptuning":
            return peft.PromptEncoderConfig(encoder_hidden_size=cfg.opt("encoder_hidden_size"), **common)
        if cfg.prompt_init_text:
            if tokenizer_path is None:
                raise TunesmithError("method.prompt_init_text needs the tokenizer's path")
            return peft.PromptTuningConfig(prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                           prompt_tuning_init_text=cfg.prompt_init_text,
                                           tokenizer_name_or_path=tokenizer_path, **common)
        return peft.PromptTuningConfig(prompt_tuning_init=peft.PromptTuningInit.RANDOM, **common)
    raise AssertionError(name)


def apply_peft(model: nn.Module, cfg: MethodConfig, task: Task, tokenizer_path: str | None = None) -> nn.Module:
    from peft import get_peft_model

    _check_fits(model, cfg, task)
    pcfg = peft_config(model, cfg, task, tokenizer_path)
    try:
        pm = get_peft_model(model, pcfg)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _explain(model, cfg, e) from None
    if cfg.name == "prefix" and cfg.prompt_init_text:
        _prefix_from_text(pm, cfg, tokenizer_path)
    if cfg.name in PROMPT_METHODS:
        _prompt_encoders_in_fp32(pm)
    if cfg.name == "lora":
        from tunesmith.methods.folded import install_training_fold

        install_training_fold(pm)  # dropout-0 layers: W + sBA in one matmul (methods/folded.py)
    return pm


def _prompt_encoders_in_fp32(pm: nn.Module) -> None:
    """Run each prompt encoder (P-tuning's MLP, prefix tuning's projection) outside autocast.

    peft saves a prompt method's virtual tokens as the encoder's output computed in fp32; a
    reloaded run uses those. Under bf16 autocast the training-time encoder would compute them in
    bf16, so the run's own final evaluation would differ from `tunesmith eval` on the saved run
    in the third digit. The encoders are a few small matrices: fp32 costs nothing measurable.
    """
    for enc in pm.prompt_encoder.values():
        # A hook pair, not a replaced forward: hooks survive deepcopy (weight averaging, references).
        enc.register_forward_pre_hook(_autocast_off)
        enc.register_forward_hook(_autocast_restore, always_call=True)


def _autocast_off(module: nn.Module, args: tuple) -> None:
    ctx = torch.autocast(device_type=args[0].device.type, enabled=False)
    ctx.__enter__()
    module.__dict__.setdefault("_autocast_stack", []).append(ctx)


def _autocast_restore(module: nn.Module, args: tuple, output) -> None:
    module.__dict__["_autocast_stack"].pop().__exit__(None, None, None)


def _prefix_from_text(pm: nn.Module, cfg: MethodConfig, tokenizer_path: str | None) -> None:
    """Start prefix tuning from the keys and values the frozen model computes on a real text.

    peft's default start is N(0, 1) in every key/value dimension, far from anything the model's
    attention has seen: the SFT loss starts near 9 and the prefixes spend most of a short budget
    getting back into range. Li & Liang (2021) start from real words' activations instead; peft
    ships the conversion (`initialize_kv_prefix_from_text`), we supply the text at full length.
    """
    import torch
    from peft import initialize_kv_prefix_from_text
    from transformers import AutoTokenizer

    if tokenizer_path is None:
        raise TunesmithError("method.prompt_init_text needs the tokenizer's path")
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    n = cfg.opt("num_virtual_tokens")
    text = cfg.prompt_init_text
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    if n_tokens == 0:
        raise TunesmithError("method.prompt_init_text: the text has no tokens")
    # Like peft's prompt tuning from text: repeat a short text until it covers every virtual token.
    text = " ".join([text] * -(-n // n_tokens))
    was_training = pm.training
    pm.eval()  # the prefill must not apply dropout to the activations we keep
    with torch.no_grad():
        initialize_kv_prefix_from_text(pm, tok, text=text, use_chat_template=False)
    pm.train(was_training)


def _targets(model: nn.Module, cfg: MethodConfig) -> list[str] | str:
    """target_modules for peft. peft takes `layers_to_transform` only with a list of names, so
    with method.layers, 'all-linear' is spelled out as the linear layers inside the blocks."""
    targets = cfg.opt("target_modules")
    if not cfg.layers or not isinstance(targets, str):
        return targets
    if targets != "all-linear":
        raise TunesmithError(f"method.layers: give target_modules as a list of names or 'all-linear', not the "
                             f"pattern '{targets}' (peft cannot combine a pattern with chosen layers)")
    from tunesmith.methods import transformer_blocks

    return _linear_names(transformer_blocks(model))


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")})


def _check_fits(model: nn.Module, cfg: MethodConfig, task: Task) -> None:
    """Refuse combinations peft would crash on deep inside, or silently get wrong."""
    kinds = {type(m).__name__ for m in model.modules()}
    if cfg.name in ("loha", "lokr") and "Conv1D" in kinds:
        targets = cfg.opt("target_modules")
        conv1d = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
        if targets == "all-linear" or set(targets) & conv1d:
            raise TunesmithError(
                f"method {cfg.name} cannot adapt {type(model).__name__}'s transformers Conv1D layers "
                f"({', '.join(sorted(conv1d))}); peft's {cfg.name.upper()} supports nn.Linear/Conv1d/Conv2d only. "
                "Use method lora (which supports Conv1D), or target only nn.Linear modules.")
    if cfg.name in PROMPT_METHODS and not getattr(model.config, "is_encoder_decoder", False):
        if cfg.name == "prefix" and task in HEAD_TASKS and not _takes_past_key_values(model):
            raise TunesmithError(
                f"method prefix: {type(model).__name__} does not accept past_key_values, through which prefix "
                "tuning injects its per-layer prefixes; use method prompt or ptuning (input-level soft prompts), or lora")


def _takes_past_key_values(model: nn.Module) -> bool:
    import inspect

    body = getattr(model, model.base_model_prefix, model)
    return "past_key_values" in inspect.signature(body.forward).parameters


def _explain(model: nn.Module, cfg: MethodConfig, e: Exception) -> TunesmithError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ""
    if "target" in first.lower() or "not found" in first.lower():
        hint = f"\n  layer names in {type(model).__name__}: {_linear_names(model)}"
    return TunesmithError(f"method {cfg.name} cannot wrap {type(model).__name__}: {first}{hint}")
