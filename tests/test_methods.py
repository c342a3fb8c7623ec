import pytest

from tunesmith.config import MethodConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods import apply_method, param_report, trainable_state
from tunesmith.models.load import load_model


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_head_trains_pooler_and_classifier_only(tiny_bert):
    m = apply_method(load_model(str(tiny_bert), "classification", ["a", "b"]), MethodConfig(name="head"), "classification")
    assert _trainable(m) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    rep = param_report(m)
    assert rep.trainable == 32 * 32 + 32 + 32 * 2 + 2 and 0 < rep.percent < 100


def test_head_with_top_layers(tiny_bert):
    m = apply_method(load_model(str(tiny_bert), "classification", ["a", "b"]),
                     MethodConfig(name="head", unfreeze_top_layers=1), "classification")
    names = _trainable(m)
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.0.") or "embeddings" in n for n in names)
    with pytest.raises(TunesmithError, match="has 2 blocks"):
        apply_method(load_model(str(tiny_bert), "classification", ["a", "b"]),
                     MethodConfig(name="head", unfreeze_top_layers=3), "classification")


def test_lora_targets_layers_and_checkpoint_holds_only_trainable(tiny_llama):
    m = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(r=4, target_modules=["q_proj", "v_proj"], layers=[1]), "sft")
    names = _trainable(m)
    assert names and all("lora_" in n and ".layers.1." in n for n in names)
    assert set(trainable_state(m)) == names


def test_lora_unknown_target_lists_the_real_names(tiny_llama):
    with pytest.raises(TunesmithError, match="q_proj"):
        apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(target_modules=["query"]), "sft")
