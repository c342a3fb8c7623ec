"""Diff pruning (tunesmith/methods/diff_pruning.py): the gates and penalty against a hand
computation, the budget, save/load/merge equality, exact resume, and tiny classification, SFT
and CPT runs. fp32 is pinned wherever numbers are compared (bf16 autocast on AMX CPUs)."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from torch import nn

from tests.conftest import write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import TrainingCancelled, TunesmithError
from tunesmith.methods import diff_pruning as dp


def _cfg(model_dir, task, data, out, method=None, **train):
    return load_config({
        "task": task, "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "val_size": 8, "test_size": 8, "max_length": 32,
                 **({"chat_template": False} if task == "sft" else {})},
        "method": {"name": "diff_pruning", "density": 0.05, **(method or {})},
        "train": {"epochs": 4, "batch_size": 8, "lr": 3e-2, "warmup_ratio": 0, "precision": "fp32",
                  "group_by_length": False, "eval_every": 3, "log_every": 1, **train},
        "eval": {"before": False, "generate_metrics": False, "num_samples": 0},
        "output": {"dir": str(out)},
    })


# ---- the gates and the penalty, by hand -------------------------------------------------------

def test_hard_concrete_sample_and_expected_l0_by_hand():
    log_alpha = torch.tensor([-3.0, 0.0, 0.5, 5.0])
    u = torch.tensor([0.3, 0.5, 0.6, 0.5])
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = []
    for la, uu in zip(log_alpha.tolist(), u.tolist()):
        s = sig((math.log(uu) - math.log(1 - uu) + la) / beta)
        want.append(min(1.0, max(0.0, s * (zeta - gamma) + gamma)))
    got = dp.hard_concrete_sample(log_alpha, u)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0 and got[1] == pytest.approx(0.5) and 0 < got[2] < 1 and got[3] == 1.0  # clamped both ends
    l0 = sum(sig(la - beta * math.log(-gamma / zeta)) for la in log_alpha.tolist())
    assert float(dp.expected_l0(log_alpha)) == pytest.approx(l0, rel=1e-6)
    det = [min(1.0, max(0.0, sig(la) * (zeta - gamma) + gamma)) for la in log_alpha.tolist()]
    torch.testing.assert_close(dp.hard_concrete_mean(log_alpha), torch.tensor(det), rtol=1e-6, atol=1e-7)


def test_penalty_is_lambda_times_expected_l0_and_its_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    diffs = dp.add_diffs(model, "all-linear", "sft", gated=True)
    sched = dp.DiffSchedule(diffs, density=0.1, mask_at=0.5)
    with torch.no_grad():
        for d in diffs.values():
            d.log_alpha.uniform_(-2, 2)
    pen = sched.penalty()
    shift = 2 / 3 * math.log(0.1 / 1.1)
    hand = dp.L0_LAMBDA * sum(torch.sigmoid(d.log_alpha - shift).sum() for d in diffs.values())
    torch.testing.assert_close(pen, hand)
    pen.backward()
    for d in diffs.values():  # d/dx sigmoid = s (1 - s)
        s = torch.sigmoid(d.log_alpha.detach() - shift)
        torch.testing.assert_close(d.log_alpha.grad, dp.L0_LAMBDA * s * (1 - s))
        assert d.diff.grad is None  # the penalty is on the gates only


def test_gated_forward_is_base_plus_gate_times_diff():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    base = lin.weight.detach().clone()
    (d,) = dp.add_diffs(nn.Sequential(lin), "all-linear", "sft", gated=True).values()
    with torch.no_grad():
        d.diff.normal_()
        d.log_alpha.uniform_(-3, 3)
    d.eval()
    torch.testing.assert_close(lin.weight, base + d.diff * dp.hard_concrete_mean(d.log_alpha).view(3, 4))
    d.train()
    state = torch.get_rng_state()
    w = lin.weight
    torch.set_rng_state(state)
    u = torch.rand(12).clamp_(1e-6, 1 - 1e-6)
    torch.testing.assert_close(w, base + d.diff * dp.hard_concrete_sample(d.log_alpha, u).view(3, 4))


# ---- the budget -------------------------------------------------------------------------------

@pytest.mark.parametrize("gated", [False, True])
def test_mask_holds_exactly_the_budget_by_global_magnitude(gated):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 13), nn.Linear(13, 2))
    diffs = dp.add_diffs(model, "all-linear", "sft", gated=gated)
    with torch.no_grad():
        for i, d in enumerate(diffs.values()):
            d.diff.normal_(std=1.0 + i)  # the later layers' entries are larger: a global threshold favours them
            d.diff.view(-1)[:3] = 0.25  # ties around nothing in particular
    deltas = torch.cat([d.delta().detach().abs().flatten() for d in diffs.values()])
    n = deltas.numel()
    k, n2 = dp.budget(diffs, 0.1)
    assert (k, n2) == (round(0.1 * n), n)
    threshold = deltas.sort(descending=True).values[k - 1]
    idx = dp.fix_mask(diffs, 0.1)
    assert sum(v.numel() for v in idx.values()) == k
    assert sum(int(d.mask.sum()) for d in diffs.values()) == k
    kept = torch.cat([deltas_i[idx[name]] for name, deltas_i in
                      zip(diffs, torch.split(deltas, [d.diff.numel() for d in diffs.values()]))])
    assert float(kept.min()) >= float(threshold)  # every kept entry is at least the k-th largest
    sizes = [int(d.mask.sum()) for d in diffs.values()]
    assert sizes[2] / 26 > sizes[0] / 70  # global, not per tensor: larger diffs get a larger share
    for d in diffs.values():  # the forward now adds exactly the kept entries
        torch.testing.assert_close(d.delta(), d.diff * d.mask)
        assert d.log_alpha is None or not d.log_alpha.requires_grad


def test_fisher_probe_sums_squared_gradients_holds_the_body_and_ranks_by_them():
    """Mode fisher before the mask: each backward adds grad**2 (by hand below), the optimizer sees a zero
    gradient so w stays 0 (the body is the base model), and the mask keeps the k largest sums."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    diffs = dp.add_diffs(model, "all-linear", "sft", gated=False, fisher=True)
    opt = torch.optim.AdamW([d.diff for d in diffs.values()], lr=0.1, weight_decay=0.01)
    xs = [torch.randn(4, 6) for _ in range(3)]
    by_hand = {name: torch.zeros_like(d.diff) for name, d in diffs.items()}
    for x in xs:
        # The same gradient by hand: the loss through plain weights W (W + 0), autograd on W itself.
        ws = {name: m.parametrizations.weight.original.detach().clone().requires_grad_(True)
              for name, m in model.named_children()}
        y = torch.nn.functional.linear(torch.nn.functional.linear(x, ws["0"], model[0].bias), ws["1"], model[1].bias)
        y.square().sum().backward()
        for name in by_hand:
            by_hand[name] += ws[name].grad.square()
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    for name, d in diffs.items():
        torch.testing.assert_close(d.fisher, by_hand[name])
        assert torch.count_nonzero(d.diff) == 0 and torch.count_nonzero(d.delta()) == 0
    k, _ = dp.budget(diffs, 0.2)
    fisher = torch.cat([d.fisher.flatten() for d in diffs.values()])
    threshold = fisher.sort(descending=True).values[k - 1]
    idx = dp.fix_mask(diffs, 0.2)
    kept = torch.cat([d_f[idx[name]] for name, d_f in
                      zip(diffs, torch.split(fisher, [d.diff.numel() for d in diffs.values()]))])
    assert kept.numel() == k and float(kept.min()) >= float(threshold)
    assert all(d.fisher is None for d in diffs.values())
    model(xs[0]).square().sum().backward()  # from here on the kept entries get their gradient, the rest none
    for name, d in diffs.items():
        assert torch.count_nonzero(d.diff.grad) <= idx[name].numel()
        assert torch.count_nonzero(d.diff.grad.flatten()[idx[name]]) > 0


# ---- whole runs on tiny models ----------------------------------------------------------------

def _diff_entries(run_dir) -> int:
    from safetensors.torch import load_file

    t = load_file(str(run_dir / "diff" / dp.DIFF_FILE))
    return sum(v.numel() for k, v in t.items() if k.endswith(".indices"))


@pytest.mark.parametrize("mode", ["magnitude", "l0", "fisher"])
def test_classification_trains_saves_loads_and_merges(tiny_bert, sentiment_rows, tmp_path, mode, capsys):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.adapters import adapter_info
    from tunesmith.cli import run as cli
    from tunesmith.runs import load_run, predict
    from tunesmith.train import train

    data = write_jsonl(tmp_path / "s.jsonl", sentiment_rows)
    # A few steps: this checks the plumbing (a tiny random encoder needs hundreds of steps to learn
    # this task with any method; learning is checked on the causal LM below and on MiniLM in docs).
    res = train(_cfg(tiny_bert, "classification", data, tmp_path / "run", {"mode": mode}, max_steps=6, lr=1e-2))
    run = res.run_dir
    meta = json.loads((run / "diff" / dp.CONFIG_FILE).read_text())
    assert meta["changed_entries"] == _diff_entries(run) == round(0.05 * meta["chosen_entries"])
    # the new head (classifier + BERT pooler, as for BitFit) trains in full and is saved beside the diff
    assert meta["head"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    assert not any("pooler" in w for w in meta["weights"]) and len(meta["weights"]) == 2 * 6  # q k v o in out
    info = adapter_info(run)
    assert info["method"] == "diff_pruning" and info["mergeable"] and info["density"] == 0.05
    capsys.readouterr()
    assert cli(["adapters", "info", str(run)]) == 0
    text = capsys.readouterr().out
    k, n = meta["changed_entries"], meta["chosen_entries"]
    assert "density:     0.05" in text and f"changed:     {k:,} of {n:,} entries" in text and "diff file" in text
    # the loaded run (base + diff added in) computes what the training-time parametrization did
    loaded = load_run(run)
    enc = loaded.tokenizer(["good film", "the plot was dull and boring"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = loaded.model(**enc).logits
    trained = _parametrized_model(run, res)
    with torch.no_grad():
        want = trained(**enc).logits
    assert torch.equal(got, want)
    out = tmp_path / "merged"
    assert cli(["merge", str(run), "--out", str(out)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, want)  # merged == unmerged, bit for bit in fp32
    preds = predict(run, ["good film"])
    assert preds[0]["label"] in ("negative", "positive")
    # The run folder itself is a base: its diff is merged once into RUN/merged, and the next run starts
    # from exactly the trained model (its "before" is this run's "after" on the same split).
    nxt_cfg = _cfg(run, "classification", data, tmp_path / "next", method={"name": "full", "density": None},
                   max_steps=1)
    nxt_cfg.eval.before = True
    nxt = train(nxt_cfg)
    assert (run / "merged" / "config.json").is_file()
    assert nxt.before["metrics"]["loss"] == pytest.approx(res.after["metrics"]["loss"], abs=1e-6)
    assert predict(nxt.run_dir, ["good film"])[0]["label"] in ("negative", "positive")
    train(_cfg(out, "classification", data, tmp_path / "next2", method={"name": "bitfit", "density": None}, max_steps=1))


def _parametrized_model(run, res):
    """Rebuild the training-time model: the base, parametrized W + m * w, with the saved entries."""
    from safetensors.torch import load_file

    from tunesmith.models.load import load_model

    cfg = load_config(run / "config.yaml")
    model = load_model(json.loads((run / "run.json").read_text())["resolved_base"], cfg.task, res.summary["labels"])
    diffs = dp.add_diffs(model, "all-linear", cfg.task, gated=False)
    t = load_file(str(run / "diff" / dp.DIFF_FILE))
    with torch.no_grad():
        for name, d in diffs.items():
            idx = t[f"{name}.weight.indices"].long()
            d.diff.view(-1)[idx] = t[f"{name}.weight.values"]
            mask = torch.zeros(d.diff.numel())
            mask[idx] = 1.0
            d.mask = mask.view_as(d.diff)
    model.load_state_dict(load_file(str(run / "diff" / dp.HEAD_FILE)), strict=False)
    return model.eval()


@pytest.mark.parametrize("task", ["sft", "cpt"])
def test_sft_and_cpt_train_and_reload(tiny_llama, qa_rows, tmp_path, task):
    from tunesmith.runs import load_run
    from tunesmith.train import train

    rows = qa_rows if task == "sft" else [{"text": f"{r['prompt']} {r['completion']}"} for r in qa_rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run = train(_cfg(tiny_llama, task, data, tmp_path / "run", {"mode": "l0"}, epochs=6, lr=1e-2)).run_dir
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    meta = json.loads((run / "diff" / dp.CONFIG_FILE).read_text())
    assert meta["head"] == [] and not (run / "diff" / dp.HEAD_FILE).exists()
    assert not any("lm_head" in w for w in meta["weights"])  # tied to the embeddings: never diffed
    assert meta["changed_entries"] == _diff_entries(run) == round(0.05 * meta["chosen_entries"])
    load_run(run)


@pytest.mark.parametrize("mode", ["magnitude", "l0", "fisher"])
def test_resume_after_interruption_is_bitwise_exact(tiny_llama, qa_rows, tmp_path, mode):
    """Cut before the mask step (l0: gates and their noise must resume; fisher: the sums so far) or
    after it (magnitude: the mask must come back from the checkpoint); all land on the same bits."""
    from safetensors.torch import load_file

    from tunesmith.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    kw = dict(eval_every=2, keep_checkpoints=5, epochs=3, batch_size=4, lr=1e-2)
    method = {"mode": mode, "mask_at": 0.2 if mode == "magnitude" else 0.8}  # mask at step 1 or step 5 of 6
    full = train(_cfg(tiny_llama, "sft", data, tmp_path / "full", method, **kw)).run_dir
    cut = _cfg(tiny_llama, "sft", data, tmp_path / "cut", method, **kw)
    cancel = threading.Event()

    def on_event(e):
        if e["kind"] == "checkpoint" and e["step"] == 4:
            cancel.set()
    with pytest.raises(TrainingCancelled):
        train(cut, on_event=on_event, cancel=cancel)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert (state["method"]["indices"] is None) == (mode != "magnitude")  # the cut falls before / after the mask step
    assert ("fisher" in state["method"]) == (mode == "fisher")
    resumed = train(cut, resume=True).run_dir
    a, b = (load_file(str(r / "diff" / dp.DIFF_FILE)) for r in (full, resumed))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in la] == [(r["kind"], r["step"], r["loss"]) for r in lb]


def test_options_belong_to_diff_pruning():
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="method.density: not an option of method 'lora'"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "lora", "density": 0.01}})
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "diff_pruning"},
                     "train": {"early_stopping_patience": 2}})
    m = load_config({"data": {"train": "x.jsonl"}, "method": {"name": "diff_pruning", "mode": "l0"}}).method
    assert (m.opt("density"), m.opt("mask_at"), m.opt("target_modules")) == (0.005, 0.5, "all-linear")


def test_the_server_serves_diff_runs_as_predict_does(tiny_llama, tiny_bert, qa_rows, sentiment_rows, tmp_path):
    """A generative diff run is served as a whole model (its diff added into the base), a classification
    one as an encoder: a real server process, the official openai SDK, answers equal to tunesmith predict."""
    import urllib.request

    openai = pytest.importorskip("openai")
    from tests.conftest import ServerProcess
    from tunesmith.runs import predict
    from tunesmith.train import train

    sft = train(_cfg(tiny_llama, "sft", write_jsonl(tmp_path / "qa.jsonl", qa_rows), tmp_path / "sft",
                     epochs=6, lr=1e-2)).run_dir
    cls = train(_cfg(tiny_bert, "classification", write_jsonl(tmp_path / "s.jsonl", sentiment_rows),
                     tmp_path / "cls", max_steps=6, lr=1e-2)).run_dir
    srv = ServerProcess([f"D={sft}", f"C={cls}", "--precision", "fp32"], tmp_path / "server.log", threads=1)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        questions = [r["prompt"] for r in qa_rows[:3]]
        want = [r["output"] for r in predict(sft, questions)]
        got = [client.completions.create(model="D", prompt=q, temperature=0).choices[0].text  # max_tokens: the run's
               for q in questions] if not json.loads((sft / "run.json").read_text()).get("chat_template") else \
            [client.chat.completions.create(model="D", messages=[{"role": "user", "content": q}], temperature=0)
             .choices[0].message.content for q in questions]
        assert [g.strip() for g in got] == [w.strip() for w in want]
        texts = ["a good film", "an awful film"]
        req = urllib.request.Request(srv.url + "/classify", data=json.dumps({"model": "C", "input": texts}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        for row, w in zip(body["data"], predict(cls, texts)):
            assert row["label"] == w["label"] and abs(max(row["probs"]) - w["probability"]) < 1e-4
    finally:
        srv.stop()
