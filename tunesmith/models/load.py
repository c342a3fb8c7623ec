"""Load a base model and tokenizer from a local folder, a hub id, a .gguf file or a builtin alias.

GGUF files are dequantised once (about 12 s for SmolLM2) into a normal transformers folder
under the cache, so later loads take well under a second and `save_pretrained` works.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tunesmith import assets
from tunesmith.config import Task, task_facts
from tunesmith.errors import TunesmithError
from tunesmith.models.quant import keep_one_cpu_4bit_path
from tunesmith.utils import atomic_folder


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve_model_path(name: str) -> str:
    """builtin alias / .gguf / folder / hub id -> something `from_pretrained` loads.

    Raises:
        TunesmithError: a local path that does not exist, or a folder with no config.json.
    """
    path_str = assets.model_path(name)
    p = Path(path_str).expanduser()
    if path_str.endswith(".gguf"):
        if not p.is_file():
            raise TunesmithError(f"model file not found: {p}")
        return str(gguf_to_folder(p))
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists() and (p / "run.json").is_file():
            return str(_run_model(p))
        if p.is_dir() and not (p / "config.json").exists():
            raise TunesmithError(f"{p}: not a model folder (no config.json)")
        return str(p)
    if path_str.startswith((".", "/", "~")) or path_str.count("/") > 1:
        raise TunesmithError(f"model path does not exist: {path_str}")
    return path_str  # a hub id such as 'org/name'; from_pretrained fetches it where the hub is reachable


MERGED_BASE = "merged"  # RUN/merged: a run's update folded into its base, when a later run starts from it


def _run_model(run: Path) -> Path:
    """A finished run as a base for the next one (continued training, or LP-FT: head first on the
    frozen-bottom cache, then LoRA): the whole model it saved, or its update merged into its base
    (RUN/merged, written once by `train` when a run starts from it). An adapter run that cannot be
    merged (prompt learning, bottleneck) has no whole model, and starting from its base would
    silently drop what it learned."""
    if (run / "model" / "config.json").is_file():
        return run / "model"
    if (run / MERGED_BASE / "config.json").is_file():
        return run / MERGED_BASE
    if (run / "adapter").is_dir() or (run / "bottleneck").is_dir() or (run / "diff").is_dir():
        raise TunesmithError(f"{run}: this run saved an adapter, not a whole model. `tunesmith train` from it merges a "
                             f"mergeable update (LoRA family, IA3, a sparse diff) into {run / MERGED_BASE} once; "
                             f"or merge it yourself (tunesmith merge {run} --out FOLDER). Prompt-learning and "
                             "bottleneck adapters cannot be merged: train from their base model instead")
    raise TunesmithError(f"{run}: a run folder without a saved model (no model/config.json)")


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint into a cached fp32 transformers folder (once)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_folder(out) as tmp:  # a crash never leaves a half-written cache entry
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _hub_error(name: str, e: Exception) -> TunesmithError:
    return TunesmithError(f"could not load model '{name}': {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
                          "  (a hub id needs network access to the hub; offline, use a local folder, a .gguf file "
                          "or a builtin: alias)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from None
    if tok.pad_token_id is None:
        # Causal LMs often ship without a pad token; EOS is the usual stand-in (padding is masked anyway).
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


# Config attribute names that hold dropout probabilities, across the common architectures.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout")


def load_model(path: str, task: Task, labels: list[str] | None = None, trust_remote_code: bool = False,
               pad_token_id: int | None = None, dtype: torch.dtype = torch.float32,
               dropout: float | None = None, attention_dropout: float | None = None,
               quantization=None, device: str = "cpu") -> torch.nn.Module:
    """Load the base for a task: a sequence classifier (a new head sized to `labels`, or one scalar output)
    or a causal LM, as the task's `head` says.

    `dropout` / `attention_dropout` override the model config's probabilities when not None.
    `quantization` (a BitsAndBytesConfig, models/quant.py) loads the weights quantised onto `device`.
    """
    extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the 'newly initialized head' warning is expected; we report it ourselves
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        for keys, value in ((ATTENTION_DROPOUT_KEYS, attention_dropout), (HIDDEN_DROPOUT_KEYS, dropout)):
            for key in keys if value is not None else ():
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, value)
        head = task_facts(task).head
        if head == "scalar":
            labels = [task]  # one output: the reward, the predicted value
            config.problem_type = "regression"
        if head is not None:
            assert labels is not None
            config.num_labels = len(labels)
            config.id2label = dict(enumerate(labels))
            config.label2id = {l: i for i, l in enumerate(labels)}
            if config.pad_token_id is None and pad_token_id is not None:
                config.pad_token_id = pad_token_id  # decoder classifiers pool the last non-pad token
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, **extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **extra)
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from None
    finally:
        transformers.logging.set_verbosity(prev)
    if quantization is not None and quantization.load_in_4bit:
        keep_one_cpu_4bit_path(model)
    if head is None and pad_token_id is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_token_id
    return model


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the freshly initialised classification head modules (classifier / score / ...)."""
    names = [n for n in ("classifier", "score", "classification_head", "logits_proj") if hasattr(model, n)]
    if not names:
        raise TunesmithError(f"{type(model).__name__}: cannot find its classification head module")
    return names
