"""methods/lean_dropout.py: LoRA dropout that keeps a bool mask gives peft's numbers, bit for bit,
and keeps less for backward."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from tunesmith.methods.lean_dropout import install_lean_dropout


def _pair(dropout: float = 0.1):
    """peft's LoRA model and a copy with the lean forward: same weights, every linear layer adapted."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    base = BertForSequenceClassification(cfg)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="SEQ_CLS",
                                                 target_modules=["query", "key", "value", "dense"]))
    for n, p in peft_model.named_parameters():  # B starts at zero: give it values so every gradient flows
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(peft_model)
    return peft_model, lean, install_lean_dropout(lean)


def _step(model, precision: str, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    ids = torch.randint(5, 100, (3, 20))
    mask = torch.ones_like(ids)
    mask[1:, 12:] = 0  # padded rows, as in a real batch
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lean_dropout_gives_peft_numbers_bit_for_bit(precision):
    peft_model, lean, n = _pair()
    assert n == 13  # 2 blocks x (query, key, value, 3 dense) and the pooler's dense
    for _ in range(2):  # two steps: the random stream stays in step too
        loss_a, grads_a = _step(peft_model, precision)
        loss_b, grads_b = _step(lean, precision)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_lean_dropout_keeps_less_for_backward():
    peft_model, lean, _ = _pair()

    def saved_bytes(model) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            model(input_ids=torch.randint(5, 100, (4, 48)), attention_mask=torch.ones(4, 48, dtype=torch.long))
        return sum(v for k, v in seen.items() if k not in params)
    assert saved_bytes(lean) < 0.75 * saved_bytes(peft_model)


def test_lean_dropout_leaves_eval_and_dropout_zero_to_peft():
    peft_model, lean, _ = _pair()
    ids = torch.randint(5, 100, (2, 10))
    peft_model.eval(), lean.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert _pair(dropout=0.0)[2] == 0  # no dropout: the training fold's case (methods/folded.py), not this one
