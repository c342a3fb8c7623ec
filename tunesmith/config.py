"""The one typed run config.

Defaults live here and only here. A YAML file and `--section.key=value` overrides
fill it; `load_config` validates once and reports every problem together.
Each field's description is its documentation (`tunesmith config --doc` prints them).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunesmith.errors import ConfigError

Task = str  # a task's name; what it means is tunesmith.tasks' business


class TaskFacts(Protocol):
    """What the layers below tunesmith.tasks may ask of a task (tunesmith.tasks.Task has the rest).

    config sits at the bottom of the package, so it cannot import the tasks; the package wires
    `get_task` in through `provide_tasks` (tunesmith/__init__.py), and the layers in between
    (data, models, methods) ask `task_facts(name)` instead of comparing names.
    """

    name: str
    head: Literal["labels", "scalar"] | None  # a sequence classifier with a new head, or a causal LM (None)
    metrics: dict[str, bool]  # metric -> greater is better
    best_metric: str

    def check(self, cfg: "RunConfig") -> list[str]: ...


_task_lookup: Callable[[str], TaskFacts] | None = None


def provide_tasks(lookup: Callable[[str], TaskFacts]) -> None:
    global _task_lookup
    _task_lookup = lookup


def task_facts(name: str) -> TaskFacts:
    """The task called `name` (ConfigError for an unknown one)."""
    if _task_lookup is None:
        raise RuntimeError("no task registry: tunesmith/__init__.py provides it on import")
    return _task_lookup(name)


# train.lr when unset: full fine-tuning moves pretrained weights and wants a small step (the
# shipped full config measured 5e-5); adapters and new heads start at zero / random.
DEFAULT_LR = {"full": 5e-5, "*": 5e-4}
DEFAULT_MODEL = {"head": "builtin:all-MiniLM-L6-v2", "generate": "builtin:SmolLM2-135M-Instruct"}


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a config must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str | None = Field(
        None,
        description="Base model (default: builtin:all-MiniLM-L6-v2 for classification and reward, "
        "builtin:SmolLM2-135M-Instruct for the generative tasks): a local Hugging Face folder, a hub id, a .gguf file, a "
        "builtin: alias (builtin:all-MiniLM-L6-v2, builtin:SmolLM2-135M-Instruct) that ships offline, "
        "or a finished full/head/selective run folder (the model it saved; e.g. head first, then LoRA).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folder/hub.")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Override the base model's hidden/residual dropout (None: keep the model's)."
    )
    attention_dropout: float | None = Field(
        None, ge=0, lt=1,
        description="Override the base model's attention dropout. 0 made MiniLM + LoRA training 1.9x faster "
        "on CPU (bench/dropout_speed.py). None: keep the model's.",
    )


class TemplateConfig(_Section):
    prompt: str | None = Field(
        None,
        description="Python format string that renders the prompt from a record's fields, e.g. "
        "'Please answer the following question:\\nQ: {question}\\nA: '.",
    )
    completion: str | None = Field(None, description="Format string for the target text, e.g. '{answer}'.")


class TrainSource(_Section):
    """One source of a data mix (data.train as a list)."""

    path: str = Field(description="A data file, folder or builtin: alias.")
    weight: float = Field(1.0, gt=0, description="How much of this source one epoch sees, relative to its size: 1 = "
                          "each example once, 2 = twice, 0.5 = half of them (data.mix says which half).")


class DataConfig(_Section):
    train: str | list[str | TrainSource] | None = Field(
        None,
        description="Training data: .jsonl/.json, .csv, .parquet, .txt, a folder of .txt files, a folder "
        "saved by datasets.save_to_disk, or a builtin: alias (builtin:imdb, builtin:rotten-tomatoes, builtin:kjv). "
        "A list mixes several sources of the same format (e.g. your data + general data against forgetting); "
        "an item may be {path, weight} to give one source more or less of each epoch (data.mix).",
    )
    mix: Literal["repeat", "sample"] = Field(
        "repeat", description="How source weights act. repeat: a source of weight 2.5 appears twice plus a fixed "
        "random half once more, the same examples every epoch (an exact, reproducible dose). sample: every epoch "
        "draws weight x size examples of each source afresh (with replacement above 1), so a down-weighted source "
        "shows different examples each epoch.")
    order: Literal["random", "short_to_long", "score"] = Field(
        "random", description="Training order within an epoch. random: shuffled (batches of similar length when "
        "train.group_by_length). short_to_long: a curriculum from the fewest tokens to the most. score: ascending by "
        "data.score_column (e.g. a difficulty score), ties in random order.")
    score_column: str | None = Field(None, description="[order: score] The column whose number orders training.")
    validation: str | None = Field(None, description="Validation file (else split from train by val_size).")
    test: str | None = Field(None, description="Held-out test file (else split from train by test_size).")
    format: Literal["auto", "text", "classification", "prompt_completion", "instruction", "chat"] = Field(
        "auto", description="Record shape; 'auto' detects it from the columns."
    )
    reader: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "arrow"] = Field(
        "auto", description="File reader; 'auto' picks by extension / folder contents."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field -> column in your file, e.g. {text: review, label: sentiment}.",
    )
    where: dict[str, Any] = Field(
        default_factory=dict, description="Keep only records whose column equals the value, e.g. {source: imdb}."
    )
    labels: list[str] | None = Field(
        None,
        description="Class names in id order. Labels in the data may be these names or integer ids. "
        "If unset, the sorted distinct labels of the training data.",
    )
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    chat_template: bool | None = Field(
        None,
        description="Render prompts with the tokenizer's chat template. Default: on for chat data, and for "
        "prompt/completion data when the tokenizer has a chat template and no template.prompt is given.",
    )
    system_prompt: str | None = Field(None, description="System message prepended when the chat template is used.")
    loss_on: Literal["completion", "all"] = Field(
        "completion", description="SFT: compute loss on completion tokens only (default) or on all tokens."
    )
    add_eos: bool = Field(True, description="Append EOS to targets so generation learns to stop.")
    max_length: int = Field(256, ge=8, description="Maximum tokens per example (longer ones are truncated).")
    truncation_side: Literal["left", "right"] = Field(
        "right", description="Which end to cut when too long. 'left' keeps the end of a text (e.g. a review's verdict)."
    )
    packing: bool = Field(
        True, description="CPT: concatenate documents (EOS between) and cut into max_length blocks; else one block per document."
    )
    train_size: int | float | None = Field(
        None, description="Examples (int) or fraction (float) of the train file to use; default: all that is left."
    )
    val_size: int | float = Field(0.1, ge=0, description="Validation split from train when no validation file.")
    train_on_validation: bool = Field(
        False, description="Add the validation split (file or val_size) to the training data, once the settings are "
        "chosen (tunesmith search --retrain does). The run then has no validation split: no keep-best, no early "
        "stopping; the test split is the same as without it.")
    test_size: int | float = Field(0.1, ge=0, description="Test split from train when no test file.")
    stratify: bool = Field(True, description="Classification: keep label proportions in every split.")
    seed: int = Field(42, description="Seed for splitting and shuffling data.")

    def sources(self) -> list[TrainSource]:
        """data.train as a list of {path, weight} (a plain path weighs 1)."""
        items = [self.train] if isinstance(self.train, str) else list(self.train or [])
        return [x if isinstance(x, TrainSource) else TrainSource(path=x) for x in items]

    def train_name(self) -> str:
        """data.train in words: its path, or its sources' paths."""
        return ", ".join(s.path for s in self.sources())


MethodName = Literal["full", "head", "lora", "dora", "qlora", "loha", "lokr", "ia3", "prefix", "prompt", "ptuning",
                     "adapter", "bitfit", "selective", "diff_pruning"]
LORA_FAMILY = frozenset({"lora", "dora", "qlora", "loha", "lokr"})
PEFT_METHODS = LORA_FAMILY | {"ia3", "prefix", "prompt", "ptuning"}
PROMPT_METHODS = frozenset({"prefix", "prompt", "ptuning"})

# Which methods each option belongs to, and its default when unset. Options are None in the
# config until a user sets them, so a saved config round-trips and an option given to a method
# it does not belong to (r for prompt tuning, say) is an error instead of being ignored.
_METHOD_OPTIONS: dict[str, tuple[frozenset[str], Any]] = {
    "r": (LORA_FAMILY, 8),
    "alpha": (LORA_FAMILY, 16.0),
    "dropout": (LORA_FAMILY | {"adapter"}, None),  # resolved per method below
    "target_modules": (LORA_FAMILY | {"ia3", "diff_pruning"}, "all-linear"),
    "layers": (LORA_FAMILY | {"ia3", "adapter", "selective"}, None),
    "rslora": (frozenset({"lora", "dora", "qlora"}), False),
    "init": (frozenset({"lora", "dora", "qlora"}), "default"),
    "quantize": (frozenset({"lora", "dora", "qlora"}), None),
    "double_quant": (frozenset({"lora", "dora", "qlora"}), True),
    "lr_ratio": (frozenset({"lora", "dora", "qlora"}), 1.0),
    "feedforward_modules": (frozenset({"ia3"}), None),
    "num_virtual_tokens": (PROMPT_METHODS, 20),
    "prompt_init_text": (frozenset({"prompt", "prefix"}), None),
    "encoder_hidden_size": (frozenset({"ptuning"}), 128),
    "prefix_projection": (frozenset({"prefix"}), False),
    "adapter_size": (frozenset({"adapter"}), 64),
    "placement": (frozenset({"adapter"}), "pfeiffer"),
    "modules": (frozenset({"selective"}), None),
    "unfreeze_top_layers": (frozenset({"head", "selective"}), 0),
    "density": (frozenset({"diff_pruning"}), 0.005),
    "mode": (frozenset({"diff_pruning"}), "fisher"),
    "mask_at": (frozenset({"diff_pruning"}), None),  # resolved per mode below
}


class MethodConfig(_Section):
    name: MethodName = Field(
        "lora",
        description="What trains. full: all weights. head: new classifier + pooler (transfer learning). "
        "lora / dora (weight-decomposed LoRA) / qlora (LoRA on a 4-bit NF4 base) / loha / lokr: low-rank updates. "
        "ia3: learned rescaling vectors. prefix: per-layer key/value prefixes. prompt: soft prompt tokens. "
        "ptuning: soft prompt from a small encoder. adapter: bottleneck adapters in each block. "
        "bitfit: bias terms only. selective: named parameters and/or chosen blocks. "
        "diff_pruning: a sparse diff added to the frozen linear weights (Guo et al. 2021).",
    )
    r: int | None = Field(None, ge=1, description="[lora family] Rank of the update (default 8).")
    alpha: float | None = Field(None, gt=0, description="[lora family] Scale: the update is multiplied by alpha/r "
                                "(alpha/sqrt(r) with rslora). Default 16.")
    dropout: float | None = Field(None, ge=0, lt=1, description="[lora family, adapter] Dropout on the adapter input "
                                  "(default 0.05 for LoRA, 0.0 for adapter).")
    target_modules: list[str] | str | None = Field(
        None, description="[lora family, ia3, diff_pruning] Module names to adapt (e.g. [query, value]) or 'all-linear' "
        "(default: every linear layer of the body, not the output layer or a new head; for ia3 the default is "
        "peft's per-architecture choice).")
    layers: list[int] | None = Field(None, description="[lora family, ia3, adapter, selective] Only these block indices (default: all).")
    rslora: bool | None = Field(None, description="[lora, dora, qlora] Rank-stabilised scaling alpha/sqrt(r) (default false).")
    init: Literal["default", "gaussian", "pissa", "olora"] | None = Field(
        None, description="[lora, dora, qlora] Adapter initialisation: default (Kaiming A, zero B), gaussian, "
        "pissa (principal singular vectors; moves them out of the base weight), olora (QR-based). Default: default.")
    quantize: Literal["none", "nf4", "fp4", "int8"] | None = Field(
        None, description="[lora, dora, qlora] Load the frozen base quantised with bitsandbytes: nf4/fp4 (4-bit) or "
        "int8. Default: nf4 for qlora, none otherwise.")
    double_quant: bool | None = Field(None, description="[4-bit] Also quantise the quantisation constants (default true).")
    lr_ratio: float | None = Field(
        None, gt=0, description="[lora, dora, qlora] LoRA+ (Hayou et al. 2024): the B matrices learn at train.lr times "
        "this (default 1, plain LoRA; the paper suggests 16). A is a random projection; B starts at zero and carries "
        "most of the update, so a larger step there speeds up learning.")
    feedforward_modules: list[str] | None = Field(
        None, description="[ia3] Which target modules are feed-forward (scaled on their input, not output).")
    num_virtual_tokens: int | None = Field(None, ge=1, description="[prefix, prompt, ptuning] Virtual tokens (default 20).")
    prompt_init_text: str | None = Field(
        None, description="[prompt, prefix] Start from this text instead of at random: prompt tuning takes the text's "
        "token embeddings; prefix tuning takes the key/value activations the frozen model computes on it in every "
        "layer (Li & Liang 2021; causal LMs, no prefix_projection). Repeated if shorter than num_virtual_tokens.")
    encoder_hidden_size: int | None = Field(None, ge=1, description="[ptuning] Hidden size of the prompt encoder MLP (default 128).")
    prefix_projection: bool | None = Field(None, description="[prefix] Reparametrise prefixes through an MLP (default false).")
    adapter_size: int | None = Field(None, ge=1, description="[adapter] Bottleneck width (default 64).")
    placement: Literal["houlsby", "pfeiffer"] | None = Field(
        None, description="[adapter] pfeiffer (default): one adapter after each feed-forward sublayer; "
        "houlsby: after both the attention and the feed-forward sublayer.")
    modules: list[str] | None = Field(
        None, description="[selective] Regular expressions; parameters whose name matches one train (e.g. ['LayerNorm', 'attention\\.output']).")
    train_head: bool = Field(True, description="Classification with a method other than full: also train the new head "
                             "(needed: it starts random).")
    unfreeze_top_layers: int | None = Field(None, ge=0, description="[head, selective] Also train the top N transformer blocks.")
    density: float | None = Field(
        None, gt=0, le=1, description="[diff_pruning] Fraction of the chosen weights' entries the diff may change: "
        "exactly round(density * n) entries, n counted over all chosen weights together, chosen by one global "
        "threshold as in the paper (default 0.005, the paper's 0.5%).")
    mode: Literal["magnitude", "l0", "fisher"] | None = Field(
        None, description="[diff_pruning] How the mask is found (fisher is the default). magnitude: the diff "
        "trains densely for mask_at of the steps, its largest entries are kept and the rest of the run trains "
        "them alone. l0: the paper's recipe: the diff trains behind hard-concrete gates with a relaxed L0 penalty, is then pruned to "
        "the budget by magnitude and trains on with the mask fixed. fisher: for mask_at of the steps the body "
        "stays at the base model while a new head trains and each entry sums its squared gradients (an empirical "
        "Fisher information, Sung et al. 2021); the entries with the largest sums then train from zero. "
        "fisher is the default: on the main IMDB job it reached 0.859 against magnitude's 0.786 at the same "
        "budget and the same cost per step (docs/METHODS.md).")
    mask_at: float | None = Field(
        None, gt=0, lt=1, description="[diff_pruning] Fraction of the training steps after which the diff is pruned "
        "to the budget and the mask is fixed (default 0.2 for magnitude, 0.5 for l0, 0.1 for fisher).")

    @model_validator(mode="after")
    def _options_belong_to_method(self) -> "MethodConfig":
        wrong = [f"method.{k}: not an option of method '{self.name}' (it belongs to {', '.join(sorted(methods))})"
                 for k, (methods, _) in _METHOD_OPTIONS.items()
                 if getattr(self, k) is not None and self.name not in methods]
        if self.name == "qlora" and self.quantize in ("none", "int8"):
            wrong.append("method.quantize: qlora means a 4-bit base; use nf4/fp4, or method lora with quantize int8")
        if self.double_quant is not None and self.opt("quantize") not in ("nf4", "fp4"):
            wrong.append("method.double_quant: only applies to a 4-bit base (quantize nf4 or fp4)")
        if self.name == "prefix" and self.prompt_init_text is not None and self.prefix_projection:
            wrong.append("method.prompt_init_text: prefix tuning can start from a text's activations only without "
                         "prefix_projection (the MLP's input cannot be solved for from them)")
        if self.name == "diff_pruning" and self.opt("target_modules") != "all-linear" and isinstance(self.target_modules, str):
            wrong.append("method.target_modules: a list of module names, or 'all-linear'")
        if self.name == "selective" and not (self.modules or self.layers or self.unfreeze_top_layers):
            wrong.append("method.selective: say what trains with modules, layers and/or unfreeze_top_layers")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    def opt(self, key: str) -> Any:
        """An option's value, or its default for this method."""
        value = getattr(self, key)
        if value is not None:
            return value
        if key == "dropout":
            return 0.0 if self.name == "adapter" else 0.05
        if key == "quantize":
            return "nf4" if self.name == "qlora" else "none"
        if key == "mask_at":
            return {"l0": 0.5, "fisher": 0.1}.get(self.opt("mode"), 0.2)
        return _METHOD_OPTIONS[key][1]


class TrainConfig(_Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch, over all processes: with N data-parallel "
                            "processes each takes its share (batch_size / N), so the step is the same on 1 or N.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="Cut each micro-batch into pieces of at most this many padded tokens "
        "(examples x longest) and accumulate them within the step: the same update up to float rounding, with "
        "activation memory bounded by the piece (e.g. 2048 = 4 x 512). None: whole micro-batches.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate. Default: 5e-5 for method full (every "
                             "weight moves), 5e-4 for the others (adapters and new heads start from zero or random).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this norm (None: no clipping).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware runs it fast (CUDA bf16, CPU AVX512-BF16/AMX), else fp32."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward pass instead of storing them: "
        "less memory (activations grow with batch x length) for about a third more compute.")
    return_memory: Literal["keep", "step", "mmap"] = Field(
        "step", description="How freed tensors go back to the OS (glibc malloc, Linux; elsewhere nothing changes). "
        "keep: glibc's default, whose heap keeps what the steps freed (the main job: 5.8 GB after 20 steps with 0.2 GB "
        "in use); step: hand the heap's free pages back after every optimizer step and evaluation (malloc_trim); mmap: "
        "every allocation of 1 MB or more gets its own mapping, unmapped when freed (for the whole process): the lowest "
        "peak, but every new tensor's pages fault in (the main job: 0.66x the tokens/s of step). The same numbers "
        "whichever; bench/memory.py measures each.")
    lean_lora_dropout: bool = Field(
        True, description="LoRA with dropout: keep a 1-byte mask per input element for backward instead of two "
        "float copies of each adapted layer's input (methods/lean_dropout.py). The same numbers, bit for bit; the main "
        "job's saved activations fall by about a third. false: peft's own forward.")
    frozen_cache_gb: float = Field(
        4.0, ge=0, description="When only the top of the model trains (head; selective; LoRA/IA3/adapter with "
        "method.layers above block 0) and the model's dropout is 0, keep the frozen bottom's output for each example "
        "(up to this many GB) instead of recomputing it every epoch and evaluation. Exact. 0: off.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Evaluate, keep and save an exponential moving average of the trainable "
        "weights with this decay (e.g. 0.99; warmed up as min(decay, (1+n)/(10+n)) over the n steps taken). "
        "Smooths the step-to-step noise of small-data runs; costs one copy of the trainable weights. None: off.")
    eval_every: int | Literal["epoch"] = Field("epoch", description="Evaluate every N steps, or each epoch.")
    metric: str | None = Field(
        None, description="Validation metric for keep-best / early stopping (default: accuracy or loss)."
    )
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improvement.")
    load_best: bool = Field(True, description="At the end, restore the best validation checkpoint.")
    keep_checkpoints: int = Field(1, ge=1, description="How many recent checkpoints to keep (plus the best).")
    seed: int = Field(42, description="Seed for model init, dropout and batch order.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    log_every: int = Field(10, ge=1, description="Record training loss every N steps.")
    max_bad_steps: int = Field(
        10, ge=1, description="A step whose loss or gradient norm is not finite (inf/NaN) is skipped: no update, "
        "counted in the log (skipped_steps). This many in a row stop the run with an error; the newest checkpoint "
        "stays as the last good one.")
    save_every: int | None = Field(
        None, ge=1, description="Also write a resumable checkpoint every N optimizer steps (besides the ones at each "
        "evaluation), so a crash or a hard kill loses at most N steps. Ctrl-C / SIGTERM always checkpoint at the next step.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train. auto: a CUDA GPU if there is one, else the CPU; mps: Apple Silicon's GPU "
        "(chosen explicitly; precision auto means fp32 there).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch); adamw_8bit keeps optimizer state in 8 bits (bitsandbytes); paged_* "
        "page optimizer state to CPU memory under GPU memory pressure (CUDA only; on CPU the unpaged one is used, with a note).")


class EvalConfig(_Section):
    before: bool = Field(True, description="Evaluate the untrained base on the same data before training.")
    samples: list[str] = Field(
        default_factory=list,
        description="Inputs shown before/after in the report (texts to classify or prompts to complete).",
    )
    num_samples: int = Field(5, ge=0, description="If samples is empty, take this many from the test set.")
    max_new_tokens: int = Field(48, ge=1, description="Generation length for samples and generative metrics.")
    generate_metrics: bool = Field(
        True, description="SFT: generate answers for the test set and score exact match / containment."
    )
    batch_size: int = Field(32, ge=1, description="Evaluation batch size.")
    max_examples: int | None = Field(None, ge=1, description="Cap on test examples evaluated.")
    forgetting_text: str | None = Field(
        "builtin:kjv", description="[generative tasks] Held-out general text (a file or builtin: alias with a text "
        "column): its perplexity before vs after training shows forgetting. Pick text the run does not train on; "
        "null: skip.")
    forgetting_blocks: int = Field(32, ge=1, description="Blocks of data.max_length tokens of forgetting_text scored.")
    forgetting_questions: str | None = Field(
        "builtin:general-qa", description="[generative tasks] General-knowledge questions, JSONL {question, answers}: "
        "the share answered (greedy, an accepted answer contained) before vs after; null: skip.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Bootstrap resamples behind each 95% interval and "
                                     "paired test in the report (seeded with train.seed).")


class PreferenceConfig(_Section):
    """Settings of the preference tasks (reward, dpo, kto, orpo, ppo, grpo); see docs/PREFERENCES.md."""

    beta: float = Field(0.1, gt=0, description="[dpo, kto, grpo] Strength of the pull towards the reference "
                        "policy (DPO's beta; GRPO's KL coefficient).")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="[dpo] sigmoid: DPO; ipo: IPO's squared loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="[dpo] Conservative DPO: assume each preference "
                                   "label is flipped with this probability.")
    ranking_weight: Literal["prompt", "pair"] = Field(
        "prompt", description="[reward, dpo, orpo] Rankings: a prompt's K(K-1)/2 pairs count as one example "
        "(prompt, as InstructGPT) or each pair counts once (pair).")
    desirable_weight: float = Field(1.0, gt=0, description="[kto] Weight of desirable (thumbs-up) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="[kto] Weight of undesirable (thumbs-down) examples.")
    orpo_lambda: float = Field(0.1, gt=0, description="[orpo] Weight of the odds-ratio term added to the SFT loss.")
    prompt_words: int | None = Field(None, ge=1, description="[ppo, grpo] Prompts from a text column: its first N words "
                                     "(the classic 'continue this movie review' set-up).")
    reward_model: str | None = Field(None, description="[ppo, grpo] Run folder of a reward model (task reward) or a "
                                     "classifier (task classification, scored by reward_label's log-odds).")
    reward_label: str | None = Field(None, description="[ppo, grpo] With a classifier as reward model: the label that "
                                     "is good (reward = its logit minus the log-sum-exp of the others).")
    reward_fn: str | None = Field(None, description="[ppo, grpo] A Python reward 'module:function' or 'file.py:function' "
                                  "called as f(prompts, completions) -> list of floats; added to the model's reward.")
    max_new_tokens: int = Field(24, ge=1, description="[ppo, grpo] Length of sampled completions.")
    temperature: float = Field(1.0, gt=0, description="[ppo, grpo] Sampling temperature.")
    top_k: int = Field(0, ge=0, description="[ppo, grpo] Sample from the top k tokens (0: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="[ppo, grpo] Nucleus sampling mass.")
    rollout_prompts: int = Field(16, ge=1, description="[ppo, grpo] Prompts per rollout (one training step).")
    num_generations: int = Field(4, ge=2, description="[grpo] Samples per prompt (the group).")
    ppo_epochs: int = Field(4, ge=1, description="[ppo, grpo] Optimisation passes over each rollout.")
    mini_batch_size: int = Field(8, ge=1, description="[ppo, grpo] Sequences per optimisation step within a rollout.")
    kl_coef: float = Field(0.05, ge=0, description="[ppo] Per-token KL penalty to the reference policy (the start "
                           "value when kl_target is set).")
    kl_target: float | None = Field(None, gt=0, description="[ppo] Adapt kl_coef after each rollout to hold the KL to "
                                    "the reference near this many nats per sequence (Ziegler et al. 2019); unset: fixed.")
    kl_horizon: int = Field(10000, ge=1, description="[ppo] With kl_target: samples over which kl_coef may change by "
                            "about 20%; smaller reacts faster.")
    gamma: float = Field(1.0, gt=0, le=1, description="[ppo] Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="[ppo] GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="[ppo, grpo] Policy ratio clipping.")
    value_clip: float = Field(0.2, gt=0, description="[ppo] Value clipping.")
    vf_coef: float = Field(0.1, ge=0, description="[ppo] Weight of the value loss.")
    normalize_reward: bool = Field(True, description="[ppo] Scale scores by a running estimate of their std.")
    whiten_advantages: bool = Field(True, description="[ppo] Whiten advantages over each rollout.")
    tax_data: str | None = Field(None, description="Held-out neutral text (file or builtin:, e.g. builtin:kjv): its "
                                 "perplexity before vs after is the alignment tax.")
    tax_blocks: int = Field(32, ge=1, description="Blocks of data.max_length tokens of tax_data to score.")


class OutputConfig(_Section):
    dir: str = Field("runs/{name}", description="Run folder; {name} is replaced by `name`.")
    name: str = Field("run", description="Run name.")
    overwrite: bool = Field(False, description="Replace an existing run folder (else it is an error).")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking store, e.g. sqlite:///mlruns.db (relative to the working directory) or "
        "http://host:5000; set it to log the run to MLflow (needs: pip install 'tunesmith[mlflow]').")
    experiment: str = Field("tunesmith", description="MLflow experiment (created when missing).")
    run_name: str | None = Field(None, description="MLflow run name (default: output.name).")
    artifact_location: str | None = Field(
        None, description="Where a NEW experiment keeps its artifacts (default: MLflow's, ./mlruns for a local store).")
    max_model_mb: float = Field(
        100, ge=0, description="Upload the saved adapter/model folder as artifacts up to this size (MB); a larger "
        "one is linked by its path (tag tunesmith.model_path).")


class TrackConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files to RUN/tensorboard "
                              "(view: tensorboard --logdir runs/).")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class RunConfig(_Section):
    """A whole fine-tuning run."""

    task: str = Field("classification", description="classification, sft (supervised generative), cpt (continued "
                      "pre-training), regression (text -> a number); from preferences: reward (reward model), dpo "
                      "(also IPO, cDPO), kto, orpo, ppo, grpo. docs/TASKS.md says how to add one.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pref: PreferenceConfig = Field(default_factory=PreferenceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        problems: list[str] = []
        if self.model.name_or_path is None:  # task-aware default: an encoder to classify, a small LM to generate
            self.model.name_or_path = DEFAULT_MODEL["head" if task_facts(self.task).head is not None else "generate"]
        if self.train.lr is None:  # method-aware default; the saved config then states the value used
            self.train.lr = DEFAULT_LR.get(self.method.name, DEFAULT_LR["*"])
        if not self.data.train:
            problems.append("data.train: required (a data file, folder or builtin: alias)")
        try:
            task = task_facts(self.task)
        except ConfigError as e:
            raise ValueError(f"task: {e}") from None
        if self.method.name == "head" and task.head is None:
            problems.append("method.name: 'head' trains a new classification head; use it with a task that has one "
                            "(classification, regression, reward)")
        if self.method.name == "prefix" and self.method.prompt_init_text is not None and task.head is not None:
            problems.append("method.prompt_init_text: prefix tuning starts from a text's key/value cache, which only a "
                            "causal LM returns; on a classifier use a random start or method prompt with prompt_init_text")
        problems += task.check(self)
        if self.method.name == "diff_pruning" and self.train.early_stopping_patience is not None:
            problems.append("train.early_stopping_patience: not supported with diff_pruning (the run must reach the "
                            "step that fixes the mask; evaluations before it are of an unpruned diff)")
        if self.data.train_on_validation and self.train.early_stopping_patience is not None:
            problems.append("train.early_stopping_patience: needs a validation split, which data.train_on_validation "
                            "adds to the training data")
        if self.pref.reward_label is not None and not self.pref.reward_model:
            problems.append("pref.reward_label: only applies with pref.reward_model")
        if self.data.order == "score" and not self.data.score_column:
            problems.append("data.order: 'score' needs data.score_column (the column to order by)")
        if self.data.score_column and self.data.order != "score":
            problems.append("data.score_column: only used with data.order: score")
        for split in ("val_size", "test_size"):
            v = getattr(self.data, split)
            if isinstance(v, float) and v >= 1:
                problems.append(f"data.{split}: a fraction must be < 1 (got {v}); use an int for a count")
        if self.train.metric is not None and self.train.metric.removeprefix("eval_") not in task.metrics:
            problems.append(f"train.metric: '{self.train.metric}' is not computed for task {self.task}; "
                            f"choose one of {sorted(task.metrics)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.output.name))

    def best_metric(self) -> tuple[str, bool]:
        """(metric name, greater_is_better) used for keep-best and early stopping."""
        task = task_facts(self.task)
        metric = (self.train.metric or task.best_metric).removeprefix("eval_")
        return metric, task.metrics[metric]


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['--train.lr=1e-4', '--method.name', 'full'] into {'train.lr': 1e-4, 'method.name': 'full'}.

    Values are parsed as YAML, so numbers, booleans, lists ([q, v]) and null work.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            raw = args[i + 1]
            i += 1
        out[key] = _scalar(raw)
        i += 1
    return out


def _scalar(raw: str) -> Any:
    """YAML value, plus the floats YAML 1.1 leaves as strings ('1e-4' is a string to PyYAML)."""
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(
    source: str | Path | dict | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> RunConfig:
    """Build and validate a RunConfig from a YAML file (or dict) plus dotted overrides.

    Args:
        source: path to a YAML file, an already-parsed dict, or None for all defaults.
        overrides: {'train.lr': 1e-4} or CLI-style ['--train.lr=1e-4'].
    Returns:
        The validated config, with local paths made absolute: relative paths in a YAML file
        resolve against the file's folder (then the current directory, for older configs);
        those in a dict or an override against the current directory. A run's saved
        config.yaml therefore works from anywhere.
    Raises:
        ConfigError: listing every invalid or unknown field at once, with the closest field
            name for a typo and whether the value came from the file or an override.
    """
    if source is None:
        tree: dict = {}
        origin, base = "<defaults>", Path.cwd()
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)
        origin, base = "<dict>", Path.cwd()
    else:
        path = Path(source)
        origin, base = str(path), path.absolute().parent
        if not path.is_file():
            raise ConfigError(f"config file not found: {path.absolute()}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    _resolve_paths(tree, base)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = {k: _as_list_if_wanted(k, v) for k, v in (overrides or {}).items()}
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    if overrides:
        _resolve_paths(tree, Path.cwd(), only=set(overrides))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        lines = _explain_errors(e, set(overrides))
        where = f"{origin} + command-line overrides" if overrides else origin  # each line says which it was
        raise ConfigError(f"{where}: {len(lines)} config problem(s):\n" + "\n".join(lines)) from None


# Fields that name local files or folders. Each is a path, a builtin: alias, or (model only) a hub id.
_PATH_FIELDS = ("data.train", "data.validation", "data.test", "model.name_or_path", "pref.reward_model",
                "pref.tax_data", "pref.reward_fn")


def _resolve_paths(tree: dict, base: Path, only: set[str] | None = None) -> None:
    """Make the path fields of a raw config tree absolute (in place); see load_config."""
    for dotted in _PATH_FIELDS:
        if only is not None and dotted not in only:
            continue
        section, key = dotted.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or node.get(key) is None:
            continue
        value = node[key]
        if isinstance(value, list):  # data.train's sources: paths, or {path, weight}
            node[key] = [{**v, "path": _absolute(dotted, v.get("path"), base)} if isinstance(v, dict)
                         else _absolute(dotted, v, base) for v in value]
        else:
            node[key] = _absolute(dotted, value, base)


def _absolute(field: str, value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value or value.startswith("builtin:"):
        return value
    if field == "pref.reward_fn":  # 'module:function' or 'file.py:function'
        file, sep, fn = value.rpartition(":")
        return f"{_absolute('pref.reward_model', file, base)}:{fn}" if sep and file.endswith(".py") else value
    p = Path(value).expanduser()
    if p.is_absolute():
        return os.path.normpath(p)
    here, cwd = base / p, Path.cwd() / p
    if field == "model.name_or_path" and not (here.exists() or cwd.exists() or value.startswith(".")
                                              or value.endswith(".gguf")):
        return value  # a hub id such as 'org/name'
    return os.path.normpath(here if here.exists() or not cwd.exists() else cwd)  # no 'a/../b'; symlinks kept


def field_info(dotted: str):
    """The pydantic FieldInfo of a dotted name ('train.epochs'), or None."""
    model: type[BaseModel] = RunConfig
    info = None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return info


def _as_list_if_wanted(dotted: str, value: Any) -> Any:
    """`--method.target_modules=query,value` means the list [query, value] for a field that takes a list."""
    info = field_info(dotted)
    if info is None or not isinstance(value, str) or "," not in value:
        return value
    if "list[" not in str(info.annotation):
        return value
    return [_scalar(v.strip()) for v in value.split(",") if v.strip()]


def _names_in(dotted_prefix: str) -> list[str]:
    info = field_info(dotted_prefix) if dotted_prefix else None
    model = RunConfig if info is None else info.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _type_words(ann: Any) -> list[str]:
    """What a field accepts, in words: ['an integer', "'epoch'"]."""
    import types
    import typing

    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return [w for a in typing.get_args(ann) for w in _type_words(a)]
    if origin is Literal:
        return [repr(a) for a in typing.get_args(ann)]
    if origin is list:
        return ["a list (e.g. [a, b] or a,b)"]
    if origin is dict:
        return ["a mapping"]
    return [{int: "an integer", float: "a number", str: "a string", bool: "true/false",
             type(None): "null"}.get(ann, getattr(ann, "__name__", str(ann)))]


def _explain_errors(e: ValidationError, from_overrides: set[str]) -> list[str]:
    """pydantic's errors as one line per field: a union's branches merged, a typo's closest name."""
    import difflib

    by_field: dict[str, list[dict]] = {}
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        # The field is the longest prefix of loc that names a config field; the rest are union branches.
        n = len(loc)
        while n > 0 and field_info(".".join(loc[:n])) is None and err["type"] != "extra_forbidden":
            n -= 1
        by_field.setdefault(".".join(loc[:n]) if n else ".".join(loc), []).append(err)
    lines = []
    for name, errs in by_field.items():
        given = [k for k in from_overrides if k == name or k.startswith(name + ".")]
        where = f" (from --{given[0]})" if given else ""
        if not name:
            lines += [f"  - {err['msg'].removeprefix('Value error, ')}" for err in errs]
            continue
        err = errs[0]
        if err["type"] == "extra_forbidden":
            section, _, key = name.rpartition(".")
            close = difflib.get_close_matches(key, _names_in(section), n=1, cutoff=0.6)
            hint = f"; did you mean {section + '.' if section else ''}{close[0]}?" if close else \
                f"; {section or 'the top level'} has: {', '.join(_names_in(section))}"
            lines.append(f"  - {name}: unknown field{where}{hint}")
        elif len(errs) > 1 and field_info(name) is not None:
            words = " or ".join(dict.fromkeys(_type_words(field_info(name).annotation)))
            lines.append(f"  - {name}: expected {words}, got {err.get('input')!r}{where}")
        else:
            lines.append(f"  - {name}: {err['msg'].removeprefix('Value error, ')}{where}")
    return lines


def check_inputs_exist(cfg: RunConfig) -> None:
    """Fail fast, before any heavy import, when a data file named in the config is missing.

    Raises:
        ConfigError: naming each missing file by its field and resolved path.
    """
    d = cfg.data
    sources = [("data.train", s.path) for s in d.sources()]
    sources += [("data.validation", d.validation), ("data.test", d.test)]
    missing = [f"data file not found: {s} ({field})" for field, s in sources
               if s and not s.startswith("builtin:") and not Path(s).exists()]
    if len(missing) == 1:
        raise ConfigError(missing[0])
    if missing:
        raise ConfigError(f"{len(missing)} data files missing:\n" + "\n".join(f"  - {m}" for m in missing))


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default and description (for `tunesmith config --doc`)."""
    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"\n[{prefix}{name}]")
            lines.extend(describe_fields(ann, f"{prefix}{name}."))
            continue
        default = f.default_factory() if f.default_factory else f.default
        choices = [w for w in _type_words(ann) if w.startswith("'")]
        choice_line = f"\n    choices: {', '.join(c.strip(chr(39)) for c in choices)}" if choices else ""
        lines.append(f"{prefix}{name} = {default!r}\n    {f.description or ''}{choice_line}")
    return lines
