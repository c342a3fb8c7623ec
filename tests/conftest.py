"""Shared fixtures: tiny models built from config, a tokenizer trained on the spot, small data files.

Tiny models make the full CLI testable in seconds; real-model tests live in test_real_models.py.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WORDS = ("good great fine lovely superb bad awful poor boring dull the a movie film plot actor was is very "
         "quite really story who are you name created what city year answer question hello world it and of "
         "to in alpha beta gamma delta one two three four five six seven eight nine ten").split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]


def make_tokenizer(kind: str):
    """A small byte-level BPE tokenizer; 'bert' adds [CLS]/[SEP], 'llama' has ChatML and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<|im_end|>", "<|im_start|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if kind == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder (no head) saved as a normal local model folder."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = make_tokenizer("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_tiny_llama(out: Path, hidden: int = 32, intermediate: int = 64) -> Path:
    """A 2-layer Llama causal LM with a ChatML chat template, saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=intermediate, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    # Random std-0.02 embeddings tied to a frozen output layer cap the logits near zero, so an
    # adapter could never make a confident prediction; pretrained embeddings have real scale.
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sentiment_rows() -> list[dict]:
    """A learnable toy task: the label is whether a positive or a negative word appears."""
    rng = random.Random(1)
    pos, neg, filler = ["good", "great", "superb", "lovely"], ["bad", "awful", "boring", "dull"], WORDS[10:30]
    rows = []
    for i in range(160):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randrange(len(words)), rng.choice(pos if label else neg))
        rows.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return rows


@pytest.fixture
def qa_rows() -> list[dict]:
    facts = [("what is your name", "alpha beta"), ("who created you", "gamma delta"),
             ("what city", "seven eight"), ("what year", "nine ten")]
    return [{"prompt": q, "completion": a} for q, a in facts for _ in range(6)]


# ---- a real `tunesmith serve` process for the server tests ---------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tunesmith.cli serve ARGS` (or another `command`: service) on a free port of 127.0.0.1,
    up once /health answers."""

    def __init__(self, args: list[str], log: Path, timeout: float = 180, threads: int | None = None,
                 command: str = "serve", env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        if threads:  # tiny models: one thread, as the test suite shares its cores
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", command, *args, "--port", str(self.port)],
                                     cwd=Path(__file__).parent.parent, env=env, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {timeout}s:\n{log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
