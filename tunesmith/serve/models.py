"""What a server serves: runs and models given on the command line, resolved into model ids.

A generative base (a causal LM) is loaded once; every LoRA adapter run over it becomes a model
id of its own, batched together by the engine (lora_bank.py). Encoder runs (classification,
reward) are served through AdapterSet, one per base. What each model offers comes from its task
(`tunesmith.tasks.get_task(cfg.task).serves`), never from comparing task names here.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.adapter_set import AdapterSet, base_key
from tunesmith.config import DataConfig, RunConfig, TrainConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
from tunesmith.runs import is_run_dir, load_base, load_run
from tunesmith.serve.engine import Engine, GenModel
from tunesmith.tasks import get_task
from tunesmith.train.runtime import make_accelerator

DEFAULT_MAX_TOKENS = 256  # a bare base model's default reply length (runs use their eval.max_new_tokens)


@dataclass
class Served:
    """One model id: the base, an adapter over it, or an encoder run."""
    id: str
    root: str  # the folder it was loaded from
    serves: frozenset[str]
    tokenizer: object
    data: DataConfig  # prompt template and system prompt, as the run was trained
    chat: bool  # prompts go through the tokenizer's chat template
    max_new_tokens: int
    parent: str | None = None  # the base's id, for adapters
    adapter: str | None = None  # name in the LoraBank (generative) or AdapterSet (encoder)
    encoder: "EncoderGroup | None" = None
    cfg: RunConfig | None = None
    labels: list[str] | None = None
    base_path: str | None = None  # resolved base model path (adapters of another base are refused)
    created: int = field(default_factory=lambda: int(time.time()))
    unloading: bool = False


@dataclass
class EncoderGroup:
    """An encoder model (plain, a full run, or an AdapterSet over one base) used one request at a time."""
    model: torch.nn.Module
    acc: object
    aset: AdapterSet | None = None


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages (the adapter file just read, now copied into the bank) in the
    process; give them back so a long-running server's memory is what it holds."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _low_priority() -> None:
    """The calling thread yields the CPU to the engine and the event loop (Linux: nice 19 for this
    thread only): chores after a load must not slow the prefill that follows it on a small CPU."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the chores run at normal priority
        pass


def parse_spec(spec: str) -> tuple[str | None, str]:
    """'name=path' -> (name, path); 'path' -> (None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return None, spec


def _is_causal(path: str) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TunesmithError(f"could not read model '{path}': {e}") from None
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


class Registry:
    """Model ids -> Served; owns the generative base (GenModel), its engine and the encoder groups."""

    def __init__(self, precision: str | None = None, max_batch: int = 32, on_stats=None) -> None:
        # Replaced, never changed in place (_publish, _withdraw): the endpoints iterate it on the event
        # loop while adapters are attached on worker threads and removed on the engine thread.
        self.models: dict[str, Served] = {}
        self.gen: GenModel | None = None
        self.gen_base: Served | None = None
        self.encoders: dict[tuple, EncoderGroup] = {}
        self.precision = precision
        self.max_batch = max_batch
        self.on_stats = on_stats
        self.engine: Engine | None = None
        self._attach_lock = threading.Lock()  # a name is checked and taken at once, on any thread
        # after a load: the bank's next slot made ready and freed heap handed back, off the request path
        self._chores = ThreadPoolExecutor(1, thread_name_prefix="tunesmith-bank", initializer=_low_priority)
        self.chores: Future | None = None  # the latest, for tests and benchmarks to wait on

    def _publish(self, served: Served) -> None:
        with self._attach_lock:
            self.models = {**self.models, served.id: served}

    def _withdraw(self, name: str) -> None:
        with self._attach_lock:
            self.models = {k: v for k, v in self.models.items() if k != name}

    # ---- start-up -------------------------------------------------------------------------------
    def load(self, specs: list[str]) -> None:
        for spec in specs:
            name, path = parse_spec(spec)
            if is_run_dir(path):
                self._add_run(name or Path(path).name, Path(path))
            elif Path(path, "adapter_config.json").is_file():
                if self.gen is None:
                    raise TunesmithError(f"{path}: a bare adapter folder; give its base model first "
                                         "(tunesmith serve BASE name=ADAPTER_DIR)")
                self.add_adapter(name or Path(path).name, path)
            else:
                self._add_model(name or path, path)
        self.engine = Engine(self.gen, self.max_batch, self.on_stats)
        self.engine.start()

    def _train_cfg(self, cfg: RunConfig | None) -> TrainConfig:
        tc = cfg.train if cfg is not None else TrainConfig()
        return tc.model_copy(update={"precision": self.precision}) if self.precision else tc

    def _set_gen(self, model: torch.nn.Module, tok, served: Served, cfg: RunConfig | None) -> None:
        if self.gen is not None:
            raise TunesmithError(f"{served.root}: a second generative base model ({served.base_path}); this server "
                                 f"already serves {self.gen_base.base_path}: one generative base per server")
        acc, _ = make_accelerator(self._train_cfg(cfg))
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = model.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.gen = GenModel(model.to(acc.device), acc.autocast, eos, max_len)
        self.gen_base = served
        self._publish(served)

    def _add_model(self, name: str, path: str) -> None:
        """A plain model folder / hub id / .gguf / builtin: alias: the generative base, or an encoder."""
        resolved = resolve_model_path(path)
        tok = load_tokenizer(resolved)
        if _is_causal(resolved):
            served = Served(name, resolved, get_task("sft").serves, tok, DataConfig(), bool(tok.chat_template),
                            DEFAULT_MAX_TOKENS, base_path=resolved)
            self._set_gen(load_model(resolved, "sft", pad_token_id=tok.pad_token_id), tok, served, None)
            return
        from transformers import AutoModel

        acc, _ = make_accelerator(self._train_cfg(None))
        group = EncoderGroup(AutoModel.from_pretrained(resolved).eval().to(acc.device), acc)
        self._publish(Served(name, resolved, frozenset({"embeddings"}), tok, DataConfig(), False, 0,
                             encoder=group, base_path=resolved))

    def _add_run(self, name: str, run: Path) -> None:
        cfg = load_config(run / "config.yaml")
        info = json.loads((run / "run.json").read_text())
        task = get_task(cfg.task)
        generative = task.predicts == "generate"
        if generative and (run / "adapter").is_dir():
            if self.gen is None:  # the base, loaded once for every adapter over it
                self._load_base(cfg, run / "adapter", cfg.model.name_or_path)
            self.add_adapter(name, str(run))
        elif generative and ((run / "model").is_dir() or (run / "diff").is_dir()):
            loaded = load_run(run)  # a sparse diff is added into its base's weights here: a whole model too
            root = str(run / "model") if (run / "model").is_dir() else str(run)
            served = Served(name, root, task.serves, loaded.tokenizer, cfg.data, loaded.chat,
                            cfg.eval.max_new_tokens, cfg=cfg, base_path=root)
            self._set_gen(loaded.model, loaded.tokenizer, served, cfg)
        elif generative:
            raise TunesmithError(f"{run}: a {cfg.method.name} run; the server batches LoRA adapters and whole "
                                 "models (use tunesmith predict for this run)")
        else:
            self._add_encoder_run(name, run, cfg, info)

    def _load_base(self, cfg: RunConfig, adapter_dir: Path, base_id: str) -> None:
        tok = load_tokenizer(str(adapter_dir))
        base_path = resolve_model_path(cfg.model.name_or_path)
        served = Served(base_id, base_path, get_task(cfg.task).serves, load_tokenizer(base_path), DataConfig(),
                        bool(tok.chat_template), DEFAULT_MAX_TOKENS, base_path=base_path)
        # QLoRA / int8 adapters are applied to the full-precision base, as vLLM serves them.
        self._set_gen(load_base(cfg, None, tok.pad_token_id, quantized=False), tok, served, cfg)

    def ensure_base(self, run: str | Path, base_id: str | None = None, adapter_dir: str | Path | None = None) -> None:
        """Load the generative base of LoRA run `run` when this registry has none yet, as model
        `base_id` (default: the run's model.name_or_path): a server that started with no model
        (`tunesmith service` before its first finished job) gets its base with its first adapter.
        `adapter_dir`: the adapter about to be loaded (default run/adapter; a checkpoint's while the
        run trains), whose tokenizer says whether prompts use a chat template. Call it before
        read_adapter; a base already loaded is left alone (read_adapter then checks the adapter's base)."""
        if self.gen is not None:
            return
        cfg = load_config(Path(run) / "config.yaml")
        self._load_base(cfg, Path(adapter_dir or Path(run) / "adapter"), base_id or cfg.model.name_or_path)
        if self.engine is not None:  # it had no generative model; no generation request can be running
            self.engine.gen = self.gen

    def _add_encoder_run(self, name: str, run: Path, cfg: RunConfig, info: dict) -> None:
        task = get_task(cfg.task)
        labels = info.get("labels")
        if (run / "adapter").is_dir():
            key = (*base_key(cfg), len(labels or []))
            group = self.encoders.get(key)
            if group is None:
                aset = AdapterSet()
                aset.add(name, run)
                group = self.encoders[key] = EncoderGroup(aset.model, aset.acc, aset)
            else:
                group.aset.add(name, run)
            tok = group.aset.entries[name].tokenizer
        else:
            loaded = load_run(run)
            acc, _ = make_accelerator(self._train_cfg(cfg))
            group = EncoderGroup(loaded.model.to(acc.device), acc)
            tok = loaded.tokenizer
        self._unique(name)
        self._publish(Served(name, str(run), task.serves, tok, cfg.data, False, 0, adapter=name, encoder=group,
                             cfg=cfg, labels=labels, base_path=resolve_model_path(cfg.model.name_or_path)))

    def _unique(self, name: str) -> None:
        if name in self.models:
            raise TunesmithError(f"model name '{name}' is already taken; name it NAME=PATH")

    # ---- adapters at run time ---------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> Served:
        """A LoRA run folder (or bare peft adapter folder) over the loaded generative base: a new model id."""
        served, weights = self.read_adapter(name, path)
        return self.attach_adapter(served, weights)

    def read_adapter(self, name: str, path: str) -> tuple[Served, dict]:
        """Read and check an adapter (any thread; changes nothing). attach_adapter() then adds it on the
        engine thread, so a hot load stalls decoding only for the attach, not for reading files."""
        self._unique(name)
        if self.gen is None:
            raise TunesmithError("this server has no generative base model to put a LoRA adapter on")
        p = Path(path)
        if is_run_dir(p):
            if not (p / "adapter" / "adapter_config.json").is_file():
                raise TunesmithError(f"{p}: not a LoRA adapter run (no adapter/adapter_config.json)")
            cfg = load_config(p / "config.yaml")
            info = json.loads((p / "run.json").read_text())
            if get_task(cfg.task).predicts != "generate":
                raise TunesmithError(f"{p}: a {cfg.task} run does not generate text; it cannot go on the "
                                     "generative base")
            base = resolve_model_path(cfg.model.name_or_path)
            adapter_dir, tok = p / "adapter", load_tokenizer(str(p / "adapter"))
            served = Served(name, str(p), get_task(cfg.task).serves, tok, cfg.data, bool(info.get("chat_template")),
                            cfg.eval.max_new_tokens, cfg=cfg)
        elif (p / "adapter_config.json").is_file():
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
            base = resolve_model_path(base) if base else ""
            adapter_dir = p
            tok = load_tokenizer(str(p)) if (p / "tokenizer_config.json").is_file() else self.gen_base.tokenizer
            served = Served(name, str(p), self.gen_base.serves, tok, DataConfig(), bool(tok.chat_template),
                            DEFAULT_MAX_TOKENS)
        else:
            raise TunesmithError(f"{p}: neither a tunesmith run folder nor a peft adapter folder")
        if base and Path(base).resolve() != Path(self.gen_base.base_path).resolve():
            raise TunesmithError(f"{p}: trained on base '{base}', but this server's base is "
                                 f"'{self.gen_base.base_path}'; serve it from a server on its own base")
        served.parent, served.adapter, served.base_path = self.gen_base.id, name, base
        served.root = str(adapter_dir)
        return served, self.gen.bank.read(adapter_dir)

    def attach_adapter(self, served: Served, weights: dict) -> Served:
        """Add a read adapter (the engine thread: its stacks may be laid out again)."""
        with self._attach_lock:
            self._unique(served.id)
            self.gen.bank.attach(served.id, weights)
            self.models = {**self.models, served.id: served}
        self._after_load()
        return served

    def try_attach_adapter(self, served: Served, weights: dict) -> Served | None:
        """attach_adapter from any thread, without waiting for the engine's step, when the adapter fits
        a free slot (LoraBank.try_attach); None when it must go through the engine thread."""
        with self._attach_lock:
            self._unique(served.id)
            if not self.gen.bank.try_attach(served.id, weights):
                return None
            self.models = {**self.models, served.id: served}
        self._after_load()
        return served

    def _after_load(self) -> None:
        """Chores a load leaves, done on a worker so that the load call returns at once: the bank's
        stacks grown before they are full and its next slot mapped (LoraBank.prepare), then the
        freed heap (the adapter file as read) handed back to the OS."""
        def chores() -> None:
            self.gen.bank.prepare()
            _release_freed_memory()
        self.chores = self._chores.submit(chores)

    async def hot_load(self, name: str, path: str) -> Served:
        """Read adapter `name` from `path` and serve it, from the event loop: reading and writing its
        slot happen on a worker thread while the engine goes on decoding; only an adapter that does
        not fit the stacks as laid out (a larger rank) waits for the engine thread between two steps.
        Raises TunesmithError as read_adapter does."""
        def read_and_attach() -> tuple[Served, dict, Served | None]:
            served, weights = self.read_adapter(name, path)
            return served, weights, self.try_attach_adapter(served, weights)

        served, weights, done = await asyncio.to_thread(read_and_attach)
        if done is None:
            done = await asyncio.wrap_future(self.engine.call(lambda: self.attach_adapter(served, weights)))
        return done

    def remove_adapter(self, name: str) -> None:
        self.gen.bank.remove(name)
        self._withdraw(name)
