"""The serving engine in-process, against serving each request alone: continuous batching with left
padding, prompts of different lengths, requests joining a running batch, and rows of different
LoRA adapters (of different ranks) and the base in one forward pass. fp32: greedy output must be
identical to the request's reply alone (tunesmith.evaluate.generate on the peft model)."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tokenizer

# TUNESMITH_TEST_DEVICE=cuda runs the same checks on a GPU (engine and reference both there).
DEVICE = os.environ.get("TUNESMITH_TEST_DEVICE", "cpu")
PROMPTS = ["good movie was", "hello world it is the story of a film and the plot",
           "one two three four five six seven eight nine ten alpha beta gamma delta", "the"]


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("engine")
    adapters = {}
    for i, r in enumerate([4, 8]):  # different ranks: the bank pads the smaller one with exact zeros
        torch.manual_seed(10 + i)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama),
                            LoraConfig(r=r, lora_alpha=64 * r, target_modules="all-linear", init_lora_weights=False))
        pm.save_pretrained(tmp / f"ad{i}")
        adapters[f"a{i}"] = tmp / f"ad{i}"
    return tiny_llama, adapters


def _reference(base_path: Path, adapters: dict, tok, ids: list[list[int]], max_new: int) -> dict:
    """Each (adapter, prompt) generated alone, greedy, with peft (the way tunesmith predict does)."""
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tunesmith.evaluate import generate

    acc = Accelerator(cpu=DEVICE == "cpu")
    model = None
    for name, path in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_path), str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.to(acc.device)
    want = {}
    for name in [None, *adapters]:
        for j, p in enumerate(ids):
            if name is None:
                with model.disable_adapter():
                    want[(name, j)] = generate(model, tok, [p], acc, max_new)[0]
            else:
                model.set_adapter(name)
                want[(name, j)] = generate(model, tok, [p], acc, max_new)[0]
    return want


def test_batched_mixed_adapters_equal_each_request_alone(setup):
    from transformers import LlamaForCausalLM

    from tunesmith.serve.engine import Engine, GenModel, GenRequest, SamplingParams

    base_path, adapters = setup
    tok = make_tokenizer("llama")
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    want = _reference(base_path, adapters, tok, ids, 20)
    assert len({w for w in want.values()}) >= 6  # adapters really change the replies

    gen = GenModel(LlamaForCausalLM.from_pretrained(base_path).to(DEVICE), None, {tok.eos_token_id}, 256)
    for name, path in adapters.items():
        gen.bank.add(name, path)
    engine = Engine(gen)
    engine.start()
    steps = []
    engine.on_stats = lambda running, waiting: steps.append(running)

    def submit(name, j, n=1):
        res = {"text": {}, "done": threading.Event()}

        def emit(ev):
            if ev["type"] == "token":
                res["text"][ev["index"]] = res["text"].get(ev["index"], "") + ev["text"]
            if ev["type"] in ("done", "error"):
                res["end"] = ev
                res["done"].set()
        engine.submit(GenRequest(ids[j], SamplingParams(max_tokens=20, temperature=0, n=n), name, tok, emit))
        return res

    def check(results):
        for key, res in results.items():
            assert res["done"].wait(60) and res["end"]["type"] == "done", key
            assert all(t.strip() == want[key] for t in res["text"].values()), (key, res["text"], want[key])

    try:
        keys = [(name, j) for name in [None, *adapters] for j in range(len(ids))]
        check({k: submit(*k) for k in keys})  # all at once: 12 rows, 3 adapters, 4 lengths
        assert max(steps) >= 8  # they really ran as one batch
        staggered = {}
        for k in keys[::-1]:  # joining a running batch one by one, shorter and longer than it
            staggered[k] = submit(*k)
            time.sleep(0.002)
        check(staggered)
        check({("a1", 2): submit("a1", 2, n=3)})  # n copies of one prompt's cache
        for k in keys:  # one adapter alone: served folded into the weights
            check({k: submit(*k)})
        assert gen.bank.folded == "a1"
    finally:
        engine.stop()


def test_bank_refuses_an_adapter_of_another_shape(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.errors import TunesmithError
    from tunesmith.serve.lora_bank import LoraBank

    base_path, _ = setup
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "ad")
    bank = LoraBank(LlamaForCausalLM.from_pretrained(base_path))
    with pytest.raises(TunesmithError, match="another base"):
        bank.add("x", tmp_path / "ad")
    assert bank.slots == [None] and not bank.banks


def test_bank_grows_past_capacity_and_removes_in_place(setup, monkeypatch):
    """Slots past the preallocated capacity, a larger rank arriving later, and removing a middle slot
    (the last one moves into it) leave every other adapter's rows exactly as they were."""
    from transformers import LlamaForCausalLM

    from tunesmith.serve import lora_bank

    base_path, adapters = setup
    monkeypatch.setattr(lora_bank, "INITIAL_SLOTS", 2)
    bank = lora_bank.LoraBank(LlamaForCausalLM.from_pretrained(base_path).eval().to(DEVICE))
    ids = torch.tensor([[5, 6, 7, 8]] * 4, device=DEVICE)

    def logits(names):
        bank.use(names)
        with torch.no_grad():
            return bank.model(input_ids=ids).logits

    bank.add("x", adapters["a0"])  # rank 4
    before = logits([None, "x", "x", None])
    bank.add("y", adapters["a1"])  # rank 8: every slot re-laid out, capacity doubled
    bank.add("z", adapters["a0"])
    assert bank.capacity == 4 and bank.rank == 8
    mixed = logits([None, "x", "y", "z"])
    assert torch.allclose(mixed[1], before[1], atol=1e-5) and torch.equal(mixed[0], before[0])
    bank.remove("x")
    assert bank.slots == [None, "z", "y"]
    after = logits(["y", "z", None, "y"])
    assert torch.allclose(after[0], mixed[2], atol=1e-5) and torch.allclose(after[1], mixed[3], atol=1e-5)
    assert torch.allclose(mixed[3], before[1], atol=1e-5)  # z is x's adapter file


def test_try_attach_fills_a_free_slot_and_leaves_a_relayout_to_the_engine(setup, monkeypatch):
    """A hot load writes a free slot from any thread (no wait for the running step) only when the stacks
    need no new layout; the slot then computes exactly what attach() on the engine thread gives."""
    from transformers import LlamaForCausalLM

    from tunesmith.serve import lora_bank

    base_path, adapters = setup
    monkeypatch.setattr(lora_bank, "INITIAL_SLOTS", 3)
    banks = [lora_bank.LoraBank(LlamaForCausalLM.from_pretrained(base_path).eval().to(DEVICE)) for _ in range(2)]
    small, big = banks[0].read(adapters["a0"]), banks[0].read(adapters["a1"])  # ranks 4 and 8
    assert not banks[0].try_attach("x", small) and banks[0].slots == [None]  # nothing laid out yet
    for bank in banks:
        bank.attach("y", big)
    assert banks[0].try_attach("x", small)  # rank 4 into the rank-8 stacks' free slot
    banks[1].attach("x", small)
    assert banks[0].slots == banks[1].slots == [None, "y", "x"]
    ids = torch.tensor([[5, 6, 7, 8]] * 4, device=DEVICE)

    def logits(bank):
        bank.use(["x", "y", None, "x"])
        with torch.no_grad():
            return bank.model(input_ids=ids).logits

    assert torch.equal(logits(banks[0]), logits(banks[1]))
    assert not banks[0].try_attach("z", small) and banks[0].slots == [None, "y", "x"]  # full: the engine's job


@pytest.mark.parametrize("when", [2, 3, 4])
def test_prepare_grows_the_stacks_ahead_while_loads_and_removes_go_on(setup, monkeypatch, when):
    """Once a quarter of the slots or fewer are free, prepare() (a worker thread after each load) lays
    the stacks out at twice the slots without stopping the engine or other loads: a slot filled or
    moved while it copies (here: a load, then a removal whose last slot moves into the hole, both
    run after its first copy, its second, or just before its swap: `when` = the lock taking they
    precede) is copied again, so every adapter computes what a bank laid out in one go computes;
    the next loads then fit without the engine thread."""
    from transformers import LlamaForCausalLM

    from tunesmith.serve import lora_bank

    base_path, adapters = setup
    monkeypatch.setattr(lora_bank, "INITIAL_SLOTS", 4)
    bank, ref = (lora_bank.LoraBank(LlamaForCausalLM.from_pretrained(base_path).eval().to(DEVICE)) for _ in range(2))
    small, big = bank.read(adapters["a0"]), bank.read(adapters["a1"])  # ranks 4 and 8
    bank.attach("x", big)
    bank.attach("y", small)  # 3 of 4 slots taken (slot 0 is the base)
    lock = bank._lock

    class Between:  # a load and a removal, run as prepare() takes the lock for the `when`-th time
        taken = 0

        def __enter__(self):
            Between.taken += 1
            if Between.taken == when:
                assert bank.try_attach("z", small)  # into slot 3, past what was copied
                bank.remove("x")  # slot 3 (z) moves into slot 1, already copied
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    bank._lock = Between()
    bank.prepare()
    bank._lock = lock
    assert bank.capacity == 8 and bank.slots == [None, "z", "y"]
    ref.attach("z", small)
    ref.attach("y", small)
    ids = torch.tensor([[5, 6, 7, 8]] * 4, device=DEVICE)

    def logits(b):
        b.use(["z", "y", None, "z"])
        with torch.no_grad():
            return b.model(input_ids=ids).logits

    assert torch.allclose(logits(bank), logits(ref), atol=1e-5)
    assert bank.try_attach("w", big) and bank.try_attach("v", small)  # 5 of 8: no engine needed
    bank.prepare()
    assert bank.capacity == 8  # 3 free of 8: not yet
    assert bank.try_attach("u", small)
    bank.prepare()
    assert bank.capacity == 16


def test_admit_prefills_a_request_that_arrives_during_a_prefill_before_the_next_step(setup):
    """A request submitted while the engine prefills another is prefilled before the next decoding
    step of the batch, not after it: its first token waits for no step."""
    from transformers import LlamaForCausalLM

    from tunesmith.serve.engine import Engine, GenModel, GenRequest, SamplingParams

    base_path, _ = setup
    tok = make_tokenizer("llama")
    gen = GenModel(LlamaForCausalLM.from_pretrained(base_path).to(DEVICE), None, set(), 256)
    engine = Engine(gen)
    order, done = [], threading.Event()
    prefill, step = engine._prefill, engine._step

    def req(name):
        return GenRequest(tok(PROMPTS[0])["input_ids"], SamplingParams(max_tokens=3, temperature=0), None, tok,
                          lambda ev: done.set() if ev["type"] == "done" and name == "late" else None)

    def traced_prefill(r):
        order.append(("prefill", len(order)))
        if len(order) == 1:
            engine.submit(req("late"))  # arrives during the first prefill
        prefill(r)

    def traced_step():
        order.append(("step", len(order)))
        step()

    engine._prefill, engine._step = traced_prefill, traced_step
    engine.start()
    try:
        engine.submit(req("first"))
        assert done.wait(60)
    finally:
        engine.stop()
    assert [kind for kind, _ in order[:3]] == ["prefill", "prefill", "step"]


@pytest.fixture
def registry(setup):
    """A Registry over the tiny base with adapter a1 (rank 8) loaded, its engine running."""
    from tunesmith.serve.models import Registry

    base_path, adapters = setup
    reg = Registry("fp32")
    reg.load([f"base={base_path}", f"a1={adapters['a1']}"])
    yield reg
    reg.engine.stop()


def test_models_table_is_a_snapshot_while_adapters_come_and_go(registry, setup):
    """/v1/models iterates the model table on the event loop while a hot load adds to it on a worker
    thread and an unload removes from it on the engine thread: a reader keeps the table it started
    with (changed in place, a reader saw another table half-way, or raised 'dictionary changed size
    during iteration' when the sizes differed)."""
    _, adapters = setup
    reading = iter(registry.models.values())
    first = next(reading)
    served, weights = registry.read_adapter("new", str(adapters["a0"]))
    assert registry.try_attach_adapter(served, weights) is served
    registry.engine.call(lambda: registry.remove_adapter("a1")).result(30)
    assert [first.id] + [s.id for s in reading] == ["base", "a1"]
    assert list(registry.models) == ["base", "new"]


def test_hot_load_does_not_wait_for_the_engine_thread(registry, setup, tmp_path):
    """A hot load into a free slot (the server's /v1/load_lora_adapter and the job service's loads
    alike) completes while the engine thread is busy, as during a long decoding step; an adapter of
    a larger rank than the stacks' waits for the engine, which lays them out again."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tunesmith.service.app import ModelHost

    base_path, adapters = setup
    get_peft_model(LlamaForCausalLM.from_pretrained(base_path), LoraConfig(r=16, target_modules="all-linear")
                   ).save_pretrained(tmp_path / "r16")
    host = ModelHost(registry, None, adapters["a0"].parent, {})
    gate = threading.Event()
    busy = registry.engine.call(gate.wait)  # the engine thread is taken
    try:
        assert asyncio.run(asyncio.wait_for(registry.hot_load("x", str(adapters["a0"])), 30)).id == "x"
        asyncio.run(asyncio.wait_for(host.load("ft:y", "proj", adapters["a0"].name), 30))
        assert {"x", "ft:y"} <= set(registry.models) and host.owners == {"ft:y": "proj"} and not busy.done()

        async def bigger():
            task = asyncio.create_task(registry.hot_load("r16", str(tmp_path / "r16")))
            await asyncio.sleep(0.5)
            assert not task.done()  # the stacks are rank 8: laid out again on the engine thread
            gate.set()
            return await asyncio.wait_for(task, 30)
        assert asyncio.run(bigger()).id == "r16" and registry.gen.bank.rank == 16
    finally:
        gate.set()
    registry.chores.result(30)
