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


# ---- methods that do not fit a model fail early, with a message that says what to do ----

def test_option_of_another_method_is_a_config_error():
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.r: not an option of method 'prompt'"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "prompt", "r": 8}})
    with pytest.raises(ConfigError, match="qlora means a 4-bit base"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "qlora", "quantize": "int8"}})
    with pytest.raises(ConfigError, match="say what trains"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "selective"}})
    cfg = load_config({"data": {"train": "x.jsonl"}, "method": {"name": "qlora"}})
    assert cfg.method.opt("quantize") == "nf4" and cfg.method.opt("r") == 8 and cfg.method.opt("double_quant") is True


def test_bitfit_on_a_model_without_biases(tiny_llama):
    with pytest.raises(TunesmithError, match="no bias terms"):
        apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(name="bitfit"), "sft")


def test_loha_on_gpt2_conv1d_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(TunesmithError, match="Conv1D"):
        apply_method(model, MethodConfig(name="loha"), "sft")
    apply_method(GPT2LMHeadModel(model.config), MethodConfig(name="lora", target_modules=["c_attn"]), "sft")  # LoRA fits


def test_prefix_on_a_classifier_without_past_key_values():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(TunesmithError, match="past_key_values"):
        apply_method(model, MethodConfig(name="prefix"), "classification")


def test_gradient_check_catches_a_method_that_never_reaches_the_loss(tiny_bert):
    import torch

    from tunesmith.methods import check_gradients_reach
    from tunesmith.objectives import classification

    m = apply_method(load_model(str(tiny_bert), "classification", ["a", "b"]), MethodConfig(name="head"), "classification")
    m.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    m.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(True)
    dead = torch.nn.Parameter(torch.zeros(3))  # a parameter the forward never uses
    m.register_parameter("unused", dead)
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "label": torch.tensor([1])}
    with pytest.raises(TunesmithError, match="1 of .* get no gradient"):
        check_gradients_reach(m, batch, classification, "head")
    assert all(p.grad is None for p in m.parameters())


def test_bottleneck_adapter_starts_as_identity_and_targets_each_sublayer(tiny_bert, tiny_llama):
    import torch

    from tunesmith.methods.bottleneck import AdaptedProjection

    for path, task, houlsby in ((tiny_bert, "classification", 4), (tiny_llama, "sft", 4)):
        labels = ["a", "b"] if task == "classification" else None
        base = load_model(str(path), task, labels).eval()
        ids = torch.tensor([[2, 5, 6, 7]])
        ref = base(input_ids=ids).logits
        m = apply_method(base, MethodConfig(name="adapter", placement="houlsby", adapter_size=4), task)
        assert sum(isinstance(x, AdaptedProjection) for x in m.modules()) == houlsby  # 2 blocks x (attention, ffn)
        torch.testing.assert_close(m(input_ids=ids).logits, ref)  # up-projection starts at zero
        assert all(("adapter" in n) or ("classifier" in n) for n, p in m.named_parameters() if p.requires_grad)


def test_paged_optimizer_on_cpu_falls_back_with_a_note():
    from tunesmith.models.quant import make_optimizer_class

    cls, note = make_optimizer_class("paged_adamw_8bit", "cpu")
    assert "needs a CUDA GPU" in note and cls.__name__ == "AdamW8bit"


def test_qlora_with_bf16_compute_keeps_the_frozen_embedding_in_bf16(tiny_llama, qa_rows, tmp_path):
    """The QLoRA recipe: what 4-bit does not quantise (the embedding) is stored in the compute dtype,
    not upcast to fp32; training, evaluation and generation still run (under bf16 autocast)."""
    import torch

    from tests.conftest import write_jsonl
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.models.quant import prepare_for_training, quantization_config
    from tunesmith.train import train

    method = MethodConfig(name="qlora", r=4, target_modules="all-linear")
    tok = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama), "sft", pad_token_id=tok.pad_token_id, quantization=quantization_config(method, "bf16"))
    model = prepare_for_training(model, "bf16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16  # tied: the same tensor
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    res = train({"task": "sft", "model": {"name_or_path": str(tiny_llama)},
                 "data": {"train": str(data), "val_size": 0, "test_size": 4, "chat_template": False},
                 "method": {"name": "qlora", "r": 4, "target_modules": "all-linear"},
                 "train": {"epochs": 2, "batch_size": 4, "lr": 1e-2, "precision": "bf16"},
                 "eval": {"max_new_tokens": 3, "num_samples": 1}, "output": {"dir": str(tmp_path / "{name}")}})
    assert res.after["metrics"]["loss"] < res.before["metrics"]["loss"]


def test_4bit_layers_stay_on_the_portable_cpu_kernel(tiny_llama):
    """bitsandbytes' AVX512-BF16 repack (inference only) rejects small shapes and breaks training
    after an evaluation; tunesmith keeps every 4-bit layer on the kernel all CPUs share, so the
    same run gives the same numbers on AVX2 and AVX-512 machines (test_method_matrix's qlora cases
    train, evaluate, reload and merge on 32-wide layers the repack rejects)."""
    import bitsandbytes as bnb

    from tunesmith.models.quant import quantization_config

    model = load_model(str(tiny_llama), "sft", quantization=quantization_config(MethodConfig(name="qlora", r=4), "fp32"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_bitfit_trains_biases_and_the_head_with_the_pooler(tiny_bert):
    """BitFit on a BERT classifier: every bias, the new classifier, and the pooler in front of it.

    The pooler counts as head (as for `head`): on a mean-pooling encoder such as all-MiniLM-L6-v2
    its frozen output hardly varies, and BitFit stayed at chance on IMDB without it."""
    m = apply_method(load_model(str(tiny_bert), "classification", ["a", "b"]), MethodConfig(name="bitfit"), "classification")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= trainable
    assert all(n.endswith(".bias") or n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    assert not any("attention.self.query.weight" in n for n in trainable)


def test_prefix_from_text_equals_the_text_in_front(tiny_llama):
    """A prefix started from a text's activations makes the model act as if that text came first:
    the prefixed model's logits on x equal the base model's on (the text's first n tokens + x)."""
    import torch
    from transformers import AutoTokenizer

    text, n = "hello world the movie was very good", 5
    base = load_model(str(tiny_llama), "sft").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    lead = tok(text, return_tensors="pt")["input_ids"][:, :n]
    assert lead.shape[1] == n
    x = tok("who are you", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = base(input_ids=torch.cat([lead, x], 1)).logits[:, n:]
    m = apply_method(base, MethodConfig(name="prefix", num_virtual_tokens=n, prompt_init_text=text), "sft",
                     tokenizer_path=str(tiny_llama)).eval()
    with torch.no_grad():
        got = m(input_ids=x, attention_mask=torch.ones_like(x)).logits
        with m.disable_adapter():
            plain = m(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(plain, want, atol=1e-3)  # the prefix, not the base, changed the answer
    assert _trainable(m) == {"prompt_encoder.default.embedding.weight"}


def test_prefix_from_text_repeats_a_short_text(tiny_llama):
    import torch

    m = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(name="prefix", num_virtual_tokens=12,
                     prompt_init_text="hello world"), "sft", tokenizer_path=str(tiny_llama))
    w = m.prompt_encoder["default"].embedding.weight
    assert w.shape[0] == 12 and torch.isfinite(w).all()


def test_prefix_from_text_config_errors():
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="without prefix_projection"):
        load_config({"data": {"train": "x.jsonl"}, "task": "sft",
                     "method": {"name": "prefix", "prefix_projection": True, "prompt_init_text": "hi"}})
    with pytest.raises(ConfigError, match="only a causal LM"):
        load_config({"data": {"train": "x.jsonl"}, "task": "classification",
                     "method": {"name": "prefix", "prompt_init_text": "hi"}})
    with pytest.raises(ConfigError, match="not an option of method 'ptuning'"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "ptuning", "prompt_init_text": "hi"}})


def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tiny_llama):
    import torch

    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train.loop import make_optimizer

    cfg = load_config({"data": {"train": "x.jsonl"}, "train": {"lr": 1e-3},
                       "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "lr_ratio": 16}})
    m = apply_method(load_model(str(tiny_llama), "sft"), cfg.method, "sft")
    opt = make_optimizer(m, cfg)
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in opt.param_groups}
    b = {id(p) for n, p in m.named_parameters() if p.requires_grad and ".lora_B." in n}
    a = {id(p) for n, p in m.named_parameters() if p.requires_grad and ".lora_A." in n}
    assert b and a and by_lr[0.016] == b and a <= by_lr[0.001]
    # one step moves B by 16x what it would at the base lr (Adam's first step is lr * sign(grad))
    x = torch.randint(3, 50, (2, 8))
    m(input_ids=x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if ".lora_B." in n}
    opt.step()
    steps = [(p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters() if n in before]
    assert max(steps) == pytest.approx(16e-3, rel=1e-3)
    # by default every tensor learns at train.lr; a method without B matrices rejects the option
    plain = load_config({"data": {"train": "x.jsonl"}, "method": {"name": "lora"}})
    assert {g["lr"] for g in make_optimizer(m, plain).param_groups} == {plain.train.lr}
    with pytest.raises(ConfigError, match="method.lr_ratio: not an option of method 'ia3'"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "ia3", "lr_ratio": 16}})


def _lora_with_updates(model_dir, task, labels=None, **method):
    """A LoRA model whose B matrices are non-zero, so the adapters change the output."""
    import torch

    m = apply_method(load_model(str(model_dir), task, labels), MethodConfig(r=4, **method), task)
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    return m.eval()


def test_lora_folded_gives_the_same_outputs_without_the_adapter_matmuls_and_restores_the_base(tiny_bert):
    import torch

    from tunesmith.methods.folded import lora_folded

    m = _lora_with_updates(tiny_bert, "classification", ["a", "b"])
    ids = torch.tensor([[2, 7, 9, 4, 3], [2, 5, 6, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        with m.disable_adapter():  # the adapters must matter, or equality below proves nothing
            base_off = m(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ref, base_off, atol=1e-3)
    weights = {n: p for n, p in m.named_parameters() if "base_layer.weight" in n}
    saved = {n: p.detach().clone() for n, p in weights.items()}
    calls = []
    hooks = [mod.register_forward_hook(lambda *a: calls.append(1)) for n, mod in m.named_modules() if n.endswith("lora_A.default")]
    with torch.no_grad(), lora_folded(m) as n:
        folded = m(input_ids=ids, attention_mask=mask).logits
    assert n == len(hooks) > 0 and calls == []  # every adapted layer folded: no LoRA matmul ran
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    after = dict(m.named_parameters())
    for name, p in weights.items():  # the same tensors are back, bit for bit, and train on
        assert after[name] is p and torch.equal(p, saved[name]), name
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, ref) and len(calls) == len(hooks)
    with torch.no_grad(), lora_folded(m, max_bytes=1) as n:  # over the memory cap: runs unfolded
        assert n == 0 and torch.equal(m(input_ids=ids, attention_mask=mask).logits, ref)


def test_lora_folded_leaves_dora_layers_as_they_are(tiny_llama):
    import torch

    from tunesmith.methods.folded import lora_folded

    m = _lora_with_updates(tiny_llama, "sft", name="dora", target_modules=["q_proj", "v_proj"])
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        with lora_folded(m) as n:
            assert n == 0
            torch.testing.assert_close(m(input_ids=ids).logits, ref)


def test_lora_layers_with_all_linear_targets_every_linear_layer_of_those_blocks(tiny_llama):
    """peft refuses layers_to_transform with a str target; tunesmith spells 'all-linear' out."""
    m = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(r=4, layers=[1]), "sft")
    adapted = {n.split(".layers.1.")[1].split(".lora_A")[0] for n in _trainable(m) if "lora_A" in n}
    assert all(".layers.1." in n for n in _trainable(m))
    assert adapted == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with pytest.raises(TunesmithError, match="not the pattern"):
        apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(r=4, layers=[1], target_modules=".*proj"), "sft")


def test_folded_lora_function_matches_the_two_path_computation():
    import torch
    import torch.nn.functional as F

    from tunesmith.methods.folded import _FoldedLoRALinear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, requires_grad=True)
    w, bias = torch.randn(4, 6), torch.randn(4, requires_grad=True)
    a, b = torch.randn(3, 6, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    dy = torch.randn(2, 5, 4)
    ref = F.linear(x, w, bias) + (x @ a.t() @ b.t()) * 0.7
    grads_ref = torch.autograd.grad(ref, (x, bias, a, b), dy)
    out = _FoldedLoRALinear.apply(x, w, bias, a, b, 0.7)
    grads = torch.autograd.grad(out, (x, bias, a, b), dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_lora_without_dropout_trains_through_the_fold_with_peft_s_gradients(tiny_llama):
    import torch

    m = _lora_with_updates(tiny_llama, "sft", dropout=0.0).train()
    installed = [mod for mod in m.modules() if "forward" in mod.__dict__]
    assert len(installed) == 14  # 7 linear layers x 2 blocks
    ids = torch.tensor([[5, 9, 12, 7, 3, 8]])

    def loss_and_grads():
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    calls = []
    from tunesmith.methods import folded
    real = folded._FoldedLoRALinear.apply
    folded._FoldedLoRALinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        loss, grads = loss_and_grads()
    finally:
        folded._FoldedLoRALinear.apply = real
    assert len(calls) == 14
    for mod in installed:  # peft's own forward
        del mod.__dict__["forward"]
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    with_dropout = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(r=4, dropout=0.1), "sft")
    assert not [mod for mod in with_dropout.modules() if "forward" in mod.__dict__]
