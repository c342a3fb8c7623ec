"""Losses against references, and the loop's invariances (accumulation, exact resume)."""
import json

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import load_config
from tunesmith.data.collate import collate
from tunesmith.data.tokenize import IGNORE
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.objectives import causal_lm, classification
from tunesmith.tasks import count_items
from tests.conftest import write_jsonl


def test_causal_lm_matches_transformers_loss(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama), "sft", pad_token_id=tok.pad_token_id).eval()
    feats = [{"input_ids": [5, 9, 12, 7, 3], "labels": [IGNORE, IGNORE, 12, 7, 3]},
             {"input_ids": [8, 4, 6], "labels": [IGNORE, 4, 6]}]
    batch = collate(feats, tok.pad_token_id)
    out = causal_lm(model, batch)
    # transformers' own shifted loss, mean over the same target tokens
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert out.count == 5 == count_items("sft", batch)
    torch.testing.assert_close(out.loss_sum / out.count, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mask", "positions", "none"])
def test_causal_lm_skips_prompt_logits_with_same_loss_and_grads(tiny_llama, kind, monkeypatch):
    """Logits only where a loss is taken (a mask), or from the batch's first target on (positions):
    loss and gradients equal the full-logits computation."""
    from tunesmith import objectives

    tok = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama), "sft", pad_token_id=tok.pad_token_id)
    assert objectives.logits_to_keep_kind(model) == "mask"  # transformers 5's shared helper takes masks
    monkeypatch.setitem(objectives._KEEP_KIND, type(model), kind)
    feats = [{"input_ids": list(range(5, 17)), "labels": [IGNORE] * 9 + [14, 15, 16]},
             {"input_ids": list(range(20, 28)), "labels": [IGNORE] * 6 + [26, 27]}]
    batch = collate(feats, tok.pad_token_id)
    seen = []
    hook = model.register_forward_hook(lambda m, a, kw, out: seen.append((kw.get("logits_to_keep"), out.logits.shape)),
                                       with_kwargs=True)
    out = causal_lm(model, batch)
    hook.remove()
    (keep_arg, shape), = seen
    V = shape[-1]
    if kind == "mask":  # exactly the 5 positions that predict a target, as one (N, V) matrix
        assert keep_arg.dtype == torch.bool and keep_arg.nonzero().tolist() == [[0, 8], [0, 9], [0, 10], [1, 5], [1, 6]]
        assert tuple(shape) == (5, V)
    elif kind == "positions":  # the first target (token 6 of row 2) is predicted from position 5 of 12
        assert keep_arg.tolist() == list(range(-7, 0)) and tuple(shape) == (2, 7, V)
    else:
        assert keep_arg is None and tuple(shape) == (2, 12, V)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    assert out.count == 5
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_classification_matches_cross_entropy(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    model = load_model(str(tiny_bert), "classification", ["a", "b", "c"]).eval()
    batch = collate([{"input_ids": tok("good film")["input_ids"], "label": 2},
                     {"input_ids": tok("bad")["input_ids"], "label": 0}], tok.pad_token_id)
    out = classification(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out.loss_sum / 2, F.cross_entropy(logits, batch["label"]))


def _cfg(model_dir, data, out, val_size=0, **train):
    return load_config({
        "task": "sft", "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "val_size": val_size, "test_size": 4, "chat_template": False},
        "method": {"name": "full"},
        "train": {"epochs": 1, "lr": 1e-2, "group_by_length": False, "warmup_ratio": 0, "max_grad_norm": None, **train},
        "eval": {"before": False, "generate_metrics": False, "num_samples": 0},
        "output": {"dir": str(out)},
    })


def _final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Every stored activation and gradient of a
# bf16 forward/backward is rounded once per op; a 2-block model chains about 16 such roundings, so
# two mathematically equal schedules can promise agreement to about 16u in relative norm, no better.
BF16_U = 2.0 ** -8
BF16_TOL = 16 * BF16_U


def _first_step_grads(monkeypatch):
    """Record every trainable parameter's gradient at the first optimizer step of a run."""
    import tunesmith.train.loop as loop

    grads: list[dict] = []
    real = loop.make_optimizer

    def recording(model, *a, **k):
        opt = real(model, *a, **k)
        named, seen = [(n, p) for n, p in model.named_parameters() if p.requires_grad], []

        def first_step(optimizer, args, kwargs):
            if not seen:  # this run's first step
                seen.append(1)
                grads.append({n: p.grad.detach().float().clone() for n, p in named if p.grad is not None})
        opt.register_step_pre_hook(first_step)
        return opt
    monkeypatch.setattr(loop, "make_optimizer", recording)
    return grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_accumulation_invariance(tiny_llama, qa_rows, tmp_path, monkeypatch, precision):
    """batch 4 x accum 1 and batch 1 x accum 4 take the same optimizer step (token-weighted loss).

    fp32: the final weights after 2 steps agree to 1e-5. bf16: the first step's gradients agree to
    bf16's precision (above); weights after Adam are no test there, since Adam's first update is
    lr * sign(g) and flips for any element whose gradient is within rounding of zero."""
    from tunesmith.train import train

    rows = [dict(r, completion=r["completion"] + " one" * (i % 3)) for i, r in enumerate(qa_rows)]  # unequal lengths
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    grads = _first_step_grads(monkeypatch)
    a = train(_cfg(tiny_llama, data, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=2, precision=precision)).run_dir
    b = train(_cfg(tiny_llama, data, tmp_path / "b", batch_size=1, grad_accum=4, max_steps=2, precision=precision)).run_dir
    if precision == "fp32":
        wa, wb = _final_weights(a), _final_weights(b)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert len(grads) == 2
    ga, gb = grads
    assert ga.keys() == gb.keys() and ga
    flat_a = torch.cat([g.flatten() for g in ga.values()])
    flat_b = torch.cat([gb[k].flatten() for k in ga])
    rel = float((flat_a - flat_b).norm() / flat_a.norm())
    assert rel <= (1e-5 if precision == "fp32" else BF16_TOL), rel


def test_max_batch_tokens_cuts_micro_batches_without_changing_the_step(tiny_llama, qa_rows, tmp_path, monkeypatch):
    """train.max_batch_tokens bounds a piece's padded tokens; the pieces accumulate into the same
    step as the whole micro-batch (fp32: same weights to 1e-5), and the loop really cut them."""
    from tunesmith.data.collate import feature_length, split_by_tokens
    from tunesmith.train import loop, train

    rows = [dict(r, completion=r["completion"] + " one" * (i % 3)) for i, r in enumerate(qa_rows)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    pieces = []
    real = loop.split_by_tokens
    monkeypatch.setattr(loop, "split_by_tokens", lambda fs, n: pieces.append(out := real(fs, n)) or out)
    a = train(_cfg(tiny_llama, data, tmp_path / "a", batch_size=4, max_steps=2, precision="fp32")).run_dir
    assert all(len(p) == 1 for p in pieces)  # no budget: whole micro-batches
    pieces.clear()
    budget = 40
    b = train(_cfg(tiny_llama, data, tmp_path / "b", batch_size=4, max_steps=2, precision="fp32",
                   max_batch_tokens=budget)).run_dir
    cut = [piece for p in pieces for piece in p]
    assert len(cut) > len(pieces)  # the budget did cut
    assert all(len(piece) == 1 or len(piece) * max(map(feature_length, piece)) <= budget for piece in cut)
    assert sum(len(piece) for piece in cut) == 4 * 2  # every example of both steps, once
    wa, wb = _final_weights(a), _final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    f = [{"input_ids": [0] * n} for n in (5, 9, 2, 7)]
    assert [[feature_length(x) for x in p] for p in split_by_tokens(f, 18)] == [[9, 7], [5, 2]]
    assert split_by_tokens(f, None) == [f] and len(split_by_tokens(f, 1)) == 4


def test_gradient_checkpointing_takes_the_same_steps(tiny_llama, qa_rows, tmp_path, monkeypatch):
    """Recomputing activations in backward changes memory, not the result (LoRA: frozen inputs)."""
    import transformers.modeling_utils
    from tunesmith.train import train

    calls = []
    real = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    runs = []
    for name, gc in (("plain", False), ("gc", True)):
        cfg = _cfg(tiny_llama, data, tmp_path / name, batch_size=4, max_steps=3, gradient_checkpointing=gc)
        cfg.method = type(cfg.method).model_validate({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
        runs.append(train(cfg).run_dir)
        assert bool(calls) == gc  # the blocks really ran under torch's checkpoint only when asked
    from safetensors.torch import load_file
    wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_equals_uninterrupted(tiny_llama, qa_rows, tmp_path, ema_decay):
    """Stop after 2 evaluations' worth of steps, resume, and land on the same weights and losses
    (with a weight average too: its state must resume, or the final, averaged weights differ)."""
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    kw = dict(batch_size=4, eval_every=2, keep_checkpoints=5, log_every=3, epochs=3, val_size=4, ema_decay=ema_decay)
    full = train(_cfg(tiny_llama, data, tmp_path / "full", **kw)).run_dir
    cut = _cfg(tiny_llama, data, tmp_path / "cut", **kw)
    # the same run, interrupted: run to step 4 by cancelling, then resume
    import threading
    cancel = threading.Event()

    def on_event(e):
        if e["kind"] == "checkpoint" and e["step"] == 4:
            cancel.set()
    from tunesmith.errors import TrainingCancelled
    with pytest.raises(TrainingCancelled):
        train(cut, on_event=on_event, cancel=cancel)
    resumed = train(cut, resume=True).run_dir
    wf, wr = _final_weights(full), _final_weights(resumed)
    for k in wf:
        torch.testing.assert_close(wf[k], wr[k], rtol=1e-5, atol=1e-6)
    lf = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    lr = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(lf) > 6 and any(r["kind"] == "eval" for r in lf)
    evals = [r for r in lf if r["kind"] == "eval"]  # the time-to-accuracy clock runs forward
    assert all(0 < a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(evals, evals[1:]))
    summary = json.loads((full / "run.json").read_text())
    assert 0 < summary["train_peak_rss_mb"] <= summary["peak_rss_mb"]
    assert [(r["kind"], r["step"], round(r["loss"], 5)) for r in lf] == [(r["kind"], r["step"], round(r["loss"], 5)) for r in lr]


def test_weight_average_recursion_and_swap():
    from tunesmith.train.averaging import WeightAverage

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    ema = WeightAverage([p], decay=0.5)
    expect = p.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            p.add_(torch.randn(3, 4))  # an "optimizer step"
        ema.update()
        d = min(0.5, (1 + n) / (10 + n))  # warm-up: 0.18, 0.25, 0.31, 0.36, 0.4
        expect = d * expect + (1 - d) * p.detach()
    torch.testing.assert_close(ema.shadow[0], expect)
    raw = p.detach().clone()
    with ema.applied():
        torch.testing.assert_close(p.detach(), expect)  # evaluation sees the average
    assert torch.equal(p.detach(), raw)  # training continues from the raw weights, bit for bit
    state = ema.state_dict()
    other = WeightAverage([p], decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 5 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(RuntimeError, match="does not match"):
        WeightAverage([torch.nn.Parameter(torch.zeros(2))], 0.5).load_state_dict(state)


def test_weight_average_is_what_the_run_evaluates_and_keeps(tiny_llama, qa_rows, tmp_path):
    """With train.ema_decay, the logged validation loss is the averaged model's, and the saved model
    is that average: scoring the saved model reproduces the last logged validation loss."""
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    runs = {}
    for name, decay in (("raw", None), ("ema", 0.9)):
        cfg = _cfg(tiny_llama, data, tmp_path / name, batch_size=4, max_steps=4, eval_every=2, val_size=4,
                   ema_decay=decay, load_best=False)
        runs[name] = train(cfg).run_dir
    last = {k: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines() if '"eval"' in l][-1]
            for k, r in runs.items()}
    assert last["raw"]["loss"] != pytest.approx(last["ema"]["loss"], rel=1e-4)
    wr, we = _final_weights(runs["raw"]), _final_weights(runs["ema"])
    assert any(not torch.allclose(wr[k], we[k]) for k in wr)
    # score the saved averaged model on the same validation split
    from tunesmith.tasks import prepare_data
    from tunesmith.evaluate import score_features
    from tunesmith.train.runtime import make_accelerator
    cfg = load_config(str(runs["ema"] / "config.yaml"))
    tok = load_tokenizer(str(runs["ema"] / "model"))
    model = load_model(str(runs["ema"] / "model"), "sft", pad_token_id=tok.pad_token_id)
    val = prepare_data(cfg, tok).splits["validation"]
    m = score_features(model, val.features, cfg, None, tok.pad_token_id, make_accelerator(cfg.train)[0])
    assert m["loss"] == pytest.approx(last["ema"]["loss"], rel=1e-4)


def test_resume_refuses_a_changed_config(tiny_llama, qa_rows, tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    train(_cfg(tiny_llama, data, tmp_path / "r", batch_size=4, max_steps=2))
    with pytest.raises(TunesmithError, match=r"differs from the run's config.yaml in train.lr"):
        train(_cfg(tiny_llama, data, tmp_path / "r", batch_size=4, max_steps=2, lr=0.5), resume=True)
    # a speed-only setting may change: the frozen-bottom cache is exact
    train(_cfg(tiny_llama, data, tmp_path / "r", batch_size=4, max_steps=2, frozen_cache_gb=0), resume=True)


def test_overwrite_keeps_old_run_when_new_config_is_bad(tiny_llama, qa_rows, tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    first = train(_cfg(tiny_llama, data, tmp_path / "r", batch_size=4, max_steps=1)).run_dir
    bad = _cfg(tiny_llama, tmp_path / "missing.jsonl", tmp_path / "r", batch_size=4, max_steps=1)
    bad.output.overwrite = True
    with pytest.raises(TunesmithError, match="data file not found"):
        train(bad)
    assert (first / "run.json").is_file()


def test_binary_roc_auc_is_the_pairwise_accuracy_of_the_score():
    """The classifier-as-reward-model figure: share of (positive, negative) pairs ranked correctly."""
    import itertools
    import random

    from tunesmith.tasks.metrics import classification_metrics

    rng = random.Random(0)
    y = [rng.randint(0, 1) for _ in range(60)]
    score = [rng.gauss(0.8 * t, 1.0) for t in y]
    pairs = [(p, n) for p, n in itertools.product(range(60), range(60)) if y[p] == 1 and y[n] == 0]
    by_hand = sum(score[p] > score[n] for p, n in pairs) / len(pairs)
    m = classification_metrics(y, [int(s > 0) for s in score], ["negative", "positive"], score)
    assert m["roc_auc"] == pytest.approx(by_hand)
    assert "roc_auc" not in classification_metrics(y, y, ["negative", "positive"])


def test_preference_logps_from_target_logits_only_equal_the_full_computation(tiny_llama, monkeypatch):
    """DPO/KTO/ORPO's summed response log-probs: logits only at response positions give the same
    values and gradients as full logits."""
    from tunesmith import objectives
    from tunesmith.pref.objectives import lm_logps

    tok = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama), "sft", pad_token_id=tok.pad_token_id)
    batch = collate([{"input_ids": list(range(5, 15)), "labels": [IGNORE] * 6 + [11, 12, 13, 14]},
                     {"input_ids": list(range(20, 26)), "labels": [IGNORE] * 3 + [23, 24, 25]},
                     {"input_ids": list(range(30, 34)), "labels": [IGNORE] * 4}], tok.pad_token_id)
    results = {}
    for kind in ("mask", "positions", "none"):
        monkeypatch.setitem(objectives._KEEP_KIND, type(model), kind)
        model.zero_grad()
        lp, n = lm_logps(model, batch)
        lp.sum().backward()
        results[kind] = lp.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    (lp_f, n_f, g_f) = results["none"]
    for kind in ("mask", "positions"):
        lp_m, n_m, g_m = results[kind]
        assert n_m.tolist() == n_f.tolist() == [4, 3, 0] and lp_m[2] == 0
        torch.testing.assert_close(lp_m, lp_f, rtol=1e-5, atol=1e-5)
        for k in g_f:
            torch.testing.assert_close(g_m[k], g_f[k], rtol=1e-4, atol=1e-6, msg=k)


def test_logits_to_keep_kind_sees_through_peft_and_a_ddp_style_wrapper(tiny_llama):
    """LoRA keeps the mask path; prompt tuning (virtual tokens shift positions) falls back to
    positions; both also when wrapped the way DDP wraps a model (`.module`)."""
    from torch import nn

    from tunesmith.config import MethodConfig
    from tunesmith.methods import apply_method
    from tunesmith.objectives import logits_to_keep_kind

    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    lora = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(name="lora", r=2), "sft")
    prompt = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(name="prompt", num_virtual_tokens=3), "sft")
    assert logits_to_keep_kind(lora) == logits_to_keep_kind(Wrapped(lora)) == "mask"
    assert logits_to_keep_kind(prompt) == logits_to_keep_kind(Wrapped(prompt)) == "positions"


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_online_policy_forward_with_response_logits_only_equals_full_logits(tiny_llama, method, monkeypatch):
    """PPO/GRPO's log-probs, values and entropies of the response tokens are the same whether the
    model computes logits everywhere or only at the response positions (also behind virtual tokens)."""
    from torch import nn

    from tunesmith import objectives
    from tunesmith.config import MethodConfig
    from tunesmith.methods import apply_method
    from tunesmith.pref.rollout import policy_forward

    opts = {"r": 2} if method == "lora" else {"num_virtual_tokens": 3}
    model = apply_method(load_model(str(tiny_llama), "sft"), MethodConfig(name=method, **opts), "sft").eval()
    head = nn.Linear(model.get_base_model().config.hidden_size, 1)
    ids = torch.randint(5, 60, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :2] = 0  # a left-padded prompt, as sampling produces
    outs = {}
    for kind in ("keep", "none"):
        if kind == "none":
            monkeypatch.setitem(objectives._KEEP_KIND, type(model.get_base_model()), "none")
        with torch.no_grad():
            outs[kind] = policy_forward(model, ids, attn, 4, 0.7, method, head, with_entropy=True)
    for a, b in zip(outs["keep"], outs["none"]):
        assert a.shape == (2, 5)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
