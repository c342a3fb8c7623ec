"""Real models and data from the offline packages (see ../shared/ASSETS.md).

The default suite runs one small real training (MiniLM + LoRA on IMDB, ~1-2 minutes on 2 cores).
`pytest -m slow` runs the shipped configs end to end and checks the acceptance figures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunesmith.cli import run
from tunesmith.errors import TunesmithError

ROOT = Path(__file__).parent.parent


def test_real_minilm_lora_learns_imdb(tmp_path):
    """A small but real run: 240 IMDB reviews, 2 epochs; accuracy must clearly beat the fresh head."""
    from tunesmith.train import train

    res = train(ROOT / "configs" / "sentiment-lora.yaml", {
        "data.train_size": 240, "data.val_size": 48, "data.test_size": 200, "data.max_length": 128,
        "train.epochs": 2, "train.batch_size": 8, "output.dir": str(tmp_path / "{name}")})
    before, after = res.before["metrics"]["accuracy"], res.after["metrics"]["accuracy"]
    assert 0.35 < before < 0.65, before  # a fresh random head is near chance
    assert after >= 0.70 and after > before + 0.15, (before, after)
    assert (res.run_dir / "adapter" / "adapter_config.json").is_file()
    size = sum(f.stat().st_size for f in (res.run_dir / "adapter").glob("*.safetensors"))
    assert size < 5e6  # LoRA + head only, not a model copy


def test_gguf_builtin_loads_and_generates():
    from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("builtin:SmolLM2-135M-Instruct")  # dequantised once into the cache
    assert (Path(path) / "config.json").is_file()
    tok = load_tokenizer(path)
    model = load_model(path, "sft", pad_token_id=tok.pad_token_id)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not hasattr(ids, "shape") else ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_hub_id_offline_is_a_clear_error():
    from tunesmith.models.load import load_tokenizer, resolve_model_path

    os.environ["HF_HUB_OFFLINE"] = "1"
    name = resolve_model_path("some-org/some-model-that-is-not-cached")
    with pytest.raises(TunesmithError, match="needs network access to the hub"):
        load_tokenizer(name)


def test_builtin_data_aliases():
    from tunesmith.config import load_config
    from tunesmith.tasks import load_examples

    fmt, labels, splits = load_examples(load_config({"data": {"train": "builtin:imdb", "train_size": 100,
                                                              "val_size": 50, "test_size": 100}}))
    assert fmt == "classification" and labels == ["negative", "positive"]
    assert {k: len(v) for k, v in splits.items()} == {"test": 100, "validation": 50, "train": 100}
    assert sum(e.label for e in splits["test"]) == 50  # stratified: balanced


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_report.json").read_text())


@pytest.mark.slow
def test_main_job_reaches_target(tmp_path):
    """The README's main job: >= 0.87 accuracy on 1,000 held-out reviews (~10 minutes)."""
    assert run(["train", str(ROOT / "configs/sentiment-lora.yaml"), f"--output.dir={tmp_path}/{{name}}"]) == 0
    r = _report(tmp_path / "sentiment-lora")
    assert r["before"]["metrics"]["accuracy"] < 0.6 and r["after"]["metrics"]["accuracy"] >= 0.87


@pytest.mark.slow
def test_sft_identity_learns_new_facts(tmp_path):
    assert run(["train", str(ROOT / "configs/sft-identity-lora.yaml"), f"--output.dir={tmp_path}/{{name}}"]) == 0
    r = _report(tmp_path / "sft-identity-lora")
    assert r["before"]["metrics"]["contains"] < 0.10 and r["after"]["metrics"]["contains"] > 0.80


@pytest.mark.slow
def test_cpt_bible_lowers_perplexity(tmp_path):
    assert run(["train", str(ROOT / "configs/cpt-bible-lora.yaml"), f"--output.dir={tmp_path}/{{name}}"]) == 0
    r = _report(tmp_path / "cpt-bible-lora")
    assert r["after"]["metrics"]["perplexity"] < 0.8 * r["before"]["metrics"]["perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["head", "full"])
def test_head_and_full_beat_untrained_base(tmp_path, method):
    cfg = ROOT / f"configs/sentiment-{method}.yaml"
    assert run(["train", str(cfg), f"--output.dir={tmp_path}/{{name}}"]) == 0
    r = _report(tmp_path / f"sentiment-{method}")
    assert r["after"]["metrics"]["accuracy"] > r["before"]["metrics"]["accuracy"] + 0.10
