"""`tunesmith serve` as a real process, driven with the official `openai` SDK, on tiny models.

One server per module (started once): a tiny Llama base with two LoRA runs trained here (in
fp32, so greedy replies compare exactly), a tiny BERT classification run, a reward run and the
plain BERT for embeddings. Each adapter's greedy reply over HTTP must equal `tunesmith predict`
on the same run, alone, with the other adapter's requests in flight, and streamed.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from tests.conftest import ServerProcess, write_jsonl  # noqa: E402
from tunesmith.runs import predict  # noqa: E402
from tunesmith.train import train  # noqa: E402

KEY = "sk-test-1"
QUESTIONS = ["what is your name", "who created you", "what city", "what year"]
ANSWERS = {"A": ["alpha beta", "gamma delta", "seven eight", "nine ten"],
           "B": ["one two", "three four", "five six", "good great"],
           "C": ["the plot", "the film", "the actor", "the story"]}


def _sft_run(tmp, base, name: str, **data) -> str:
    rows = [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, ANSWERS[name]) for _ in range(6)]
    cfg = {"task": "sft", "model": {"name_or_path": str(base)},
           "data": {"train": str(write_jsonl(tmp / f"{name}.jsonl", rows)), "val_size": 0, "test_size": 0, **data},
           "method": {"name": "lora", "r": 8 if name != "B" else 4, "alpha": 16, "target_modules": "all-linear"},
           "train": {"epochs": 30, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0, "precision": "fp32", "seed": 0,
                     "num_threads": 1},
           "eval": {"max_new_tokens": 6, "samples": QUESTIONS[:1]},
           "output": {"dir": str(tmp / "runs" / "{name}"), "name": name}}
    return str(train(cfg).run_dir)


def _encoder_runs(tmp, bert) -> tuple[str, str]:
    rng = random.Random(1)
    pos, neg, fill = ["good", "great", "superb"], ["bad", "awful", "dull"], ["the", "movie", "film", "plot", "was"]
    rows = [{"text": " ".join(rng.choice(fill) for _ in range(4)) + " " + rng.choice(pos if i % 2 else neg),
             "label": "positive" if i % 2 else "negative"} for i in range(64)]
    common = {"model": {"name_or_path": str(bert)},
              "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
              "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "precision": "fp32", "seed": 0, "num_threads": 1},
              "eval": {"num_samples": 1}}
    cls = train({**common, "task": "classification", "output": {"dir": str(tmp / "runs" / "{name}"), "name": "cls"},
                 "data": {"train": str(write_jsonl(tmp / "cls.jsonl", rows)), "val_size": 0, "test_size": 8}})
    pairs = [{"prompt": "the movie", "chosen": f" {rng.choice(pos)}", "rejected": f" {rng.choice(neg)}"} for _ in range(32)]
    rw = train({**common, "task": "reward", "output": {"dir": str(tmp / "runs" / "{name}"), "name": "rw"},
                "data": {"train": str(write_jsonl(tmp / "pairs.jsonl", pairs)), "val_size": 0, "test_size": 8}})
    return str(cls.run_dir), str(rw.run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_bert):
    tmp = tmp_path_factory.mktemp("serve")
    out = {"tmp": tmp, "A": _sft_run(tmp, tiny_llama, "A"),
           "B": _sft_run(tmp, tiny_llama, "B", system_prompt="be brief")}
    out["cls"], out["rw"] = _encoder_runs(tmp, tiny_bert)
    return out


@pytest.fixture(scope="module")
def server(runs, tiny_llama, tiny_bert):
    srv = ServerProcess([f"base={tiny_llama}", f"A={runs['A']}", f"B={runs['B']}", f"cls={runs['cls']}",
                         f"rw={runs['rw']}", f"emb={tiny_bert}", "--api-key", KEY, "--api-key", "sk-test-2",
                         "--precision", "fp32", "--request-log", str(runs["tmp"] / "requests.jsonl")],
                        runs["tmp"] / "server.log", threads=1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _chat(client, model: str, q: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0, **kw)
    return r.choices[0].message.content.strip()


# ---- models, generation, parity with tunesmith predict ---------------------------------------------------

def test_models_list_base_and_adapters(client, runs):
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert {"base", "A", "B", "cls", "rw", "emb"} <= set(cards)
    assert cards["A"]["parent"] == "base" and cards["A"]["root"].endswith("A/adapter")
    assert cards["B"]["parent"] == "base" and "parent" not in cards["base"]
    assert set(cards["cls"]["serves"]) == {"classify", "embeddings"} and "score" in cards["rw"]["serves"]


def test_each_adapter_answers_as_tunesmith_predict(client, runs):
    for name in ("A", "B"):
        want = [r["output"] for r in predict(runs[name], QUESTIONS)]
        assert want[:2] != ["", ""]  # the adapters learned their answers: a reply to compare
        got = [_chat(client, name, q) for q in QUESTIONS]  # default max_tokens = the run's eval.max_new_tokens
        assert got == want, name
    assert [r["output"] for r in predict(runs["A"], QUESTIONS)] != [r["output"] for r in predict(runs["B"], QUESTIONS)]


def test_two_adapters_in_flight_together_and_streamed_equal_predict(server, runs):
    want = {n: [r["output"] for r in predict(runs[n], QUESTIONS)] for n in ("A", "B")}
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(name: str, q: str, stream: bool) -> str:
        msgs = [{"role": "user", "content": q}]
        if not stream:
            r = await aclient.chat.completions.create(model=name, messages=msgs, temperature=0)
            return r.choices[0].message.content.strip()
        s = await aclient.chat.completions.create(model=name, messages=msgs, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices]).strip()

    async def all_at_once():
        jobs = [(n, i, st) for st in (False, True) for n in ("A", "B") for i in range(len(QUESTIONS))]
        random.Random(0).shuffle(jobs)  # A, B, streamed and not, interleaved in one running batch
        out = await asyncio.gather(*(one(n, QUESTIONS[i], st) for n, i, st in jobs))
        await aclient.close()
        return jobs, out

    jobs, out = asyncio.run(all_at_once())
    for (n, i, st), got in zip(jobs, out):
        assert got == want[n][i], (n, i, st)


def test_streaming_usage_n_and_logprobs(client):
    s = client.chat.completions.create(model="A", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                                       max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens

    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], n=3,
                                       temperature=1.0, seed=7, max_tokens=5, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    lp = r.choices[0].logprobs.content
    assert len(lp) >= 1 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0
    assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[-1].logprob
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], n=3,
                                           temperature=1.0, seed=7, max_tokens=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded

    c = client.completions.create(model="A", prompt=["alpha", "the movie was"], max_tokens=3, temperature=0,
                                  logprobs=2, stop=["zzz"])
    assert len(c.choices) == 2 and c.choices[1].logprobs.tokens and c.usage.prompt_tokens > 2
    assert all(len(t) <= 2 for t in c.choices[0].logprobs.top_logprobs)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="A", prompt="alpha", max_tokens=3, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text


def test_stop_strings_cut_the_reply(client):
    full = client.completions.create(model="A", prompt="what is your name", max_tokens=8, temperature=0).choices[0]
    assert len(full.text) > 2
    stop = full.text[1:3]
    cut = client.completions.create(model="A", prompt="what is your name", max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].text == full.text[: full.text.find(stop)] and cut.choices[0].finish_reason == "stop"


# ---- encoder runs --------------------------------------------------------------------------------------

def test_embeddings_classify_and_score(client, server, runs):
    e = client.embeddings.create(model="emb", input=["a good movie", "the plot"])  # the SDK asks for base64
    v = np.array(e.data[0].embedding)
    assert len(e.data) == 2 and abs(np.linalg.norm(v) - 1) < 1e-4 and e.usage.prompt_tokens > 0
    f = client.embeddings.create(model="emb", input="a good movie", encoding_format="float")
    assert np.allclose(f.data[0].embedding, v, atol=1e-6)

    status, body = _post(server, "/classify", {"model": "cls", "input": ["the movie superb", "the film awful"]})
    assert status == 200
    want = predict(runs["cls"], ["the movie superb", "the film awful"])
    for row, w in zip(body["data"], want):
        assert row["label"] == w["label"] and abs(max(row["probs"]) - w["probability"]) < 1e-3
        assert set(row["probabilities"]) == {"negative", "positive"}
    status, body = _post(server, "/score", {"model": "rw", "input": ["the movie great", "the movie dull"]})
    assert status == 200
    want = predict(runs["rw"], ["the movie great", "the movie dull"])
    assert [round(d["score"], 4) for d in body["data"]] == [w["reward"] for w in want]


# ---- adapters at run time ------------------------------------------------------------------------------

def test_hot_load_a_run_trained_after_start_then_unload(server, client, runs, tiny_llama):
    c_run = _sft_run(runs["tmp"], tiny_llama, "C")  # trained while the server runs
    status, body = _post(server, "/v1/load_lora_adapter", {"lora_name": "C", "lora_path": c_run})
    assert status == 200, body
    assert "C" in {m.id for m in client.models.list().data}
    assert _chat(client, "C", QUESTIONS[1]) == predict(c_run, [QUESTIONS[1]])[0]["output"]
    status, body = _post(server, "/v1/load_lora_adapter", {"lora_name": "C", "lora_path": c_run})
    assert status == 400 and "already" in body["error"]["message"]

    # unload while a request on C is in flight (its first token is out): that request finishes first,
    # later ones get a 404
    async def inflight_then_unload():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        stream = await aclient.completions.create(model="C", prompt="the", max_tokens=60, temperature=0, stream=True)
        chunks = stream.__aiter__()
        first = await chunks.__anext__()
        unload = asyncio.create_task(asyncio.to_thread(_post, server, "/v1/unload_lora_adapter", {"lora_name": "C"}))
        rest = [c async for c in chunks]
        await aclient.close()
        return [c.choices[0].finish_reason for c in [first, *rest] if c.choices], await unload

    finish, (status, body) = asyncio.run(inflight_then_unload())
    assert finish[-1] in ("stop", "length") and status == 200, body
    with pytest.raises(openai.NotFoundError):
        _chat(client, "C", QUESTIONS[0])
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "C"})[0] == 404


def test_adapter_of_another_base_is_refused(server, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(other)
    torch.manual_seed(0)
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "other-adapter")
    status, body = _post(server, "/v1/load_lora_adapter", {"lora_name": "X", "lora_path": str(tmp_path / "other-adapter")})
    assert status == 400 and "trained on base" in body["error"]["message"] and body["error"]["param"] == "lora_path"
    status, body = _post(server, "/v1/load_lora_adapter", {"lora_name": "Y", "lora_path": str(tmp_path / "nothing")})
    assert status == 400 and "neither" in body["error"]["message"]


# ---- errors, auth, fuzz, metrics -----------------------------------------------------------------------

def test_errors_in_openai_envelope(server, client):
    msg = {"model": "A", "messages": [{"role": "user", "content": "hi"}]}
    for key, status in ((None, 401), ("sk-wrong", 401)):
        code, body = _post(server, "/v1/chat/completions", msg, key=key)
        assert code == status and body["error"]["code"] == "invalid_api_key" and set(body["error"]) == {
            "message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "no-such-model", "hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    code, body = _post(server, "/v1/chat/completions", None, raw=b"{not json")
    assert code == 400 and body["error"]["code"] == "invalid_json"
    code, body = _post(server, "/v1/chat/completions", {"model": "A", "messages": "hi"})
    assert code == 400 and body["error"]["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "A", "hi", max_tokens=10 ** 9)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "A", "alpha " * 400)  # longer than the model's 256 positions
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="A", input="hi")  # a generative adapter has no embeddings
    assert e.value.body["param"] == "model"
    code, body = _post(server, "/v1/nowhere", {})
    assert code == 404 and body["error"]["code"] == "not_found"


def _hostile(rng: random.Random) -> tuple[str, object, str | None]:
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/classify", "/score",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    junk = [None, 0, -1, 2 ** 70, 1e308, "x" * 3000, [], {}, [1, "a"], {"a": [{}]}, True, "\u0000\ud7ff"]
    body: dict = {"model": rng.choice(["A", "B", "base", "cls", "emb", "rw", "nope", rng.choice(junk)]),
                  "messages": rng.choice([[{"role": "user", "content": "hi"}], [{"role": "wizard"}], rng.choice(junk)]),
                  "prompt": rng.choice(["hi", [99999], [], [[1]], rng.choice(junk)]),
                  "input": rng.choice(["hi", [], [1, 2], rng.choice(junk)])}
    for field in ("max_tokens", "temperature", "top_p", "n", "seed", "stop", "logprobs", "top_logprobs", "stream",
                  "lora_name", "lora_path", "tools", "unknown_field"):
        if rng.random() < 0.3:
            body[field] = rng.choice(junk + [10 ** 9, 1, 0.5, "../../etc"])
    if rng.random() < 0.2:
        body = rng.choice(junk)
    key = rng.choice([KEY, KEY, None, "sk-bad", "x" * 500])
    return rng.choice(paths), body, key


def test_200_hostile_requests_leave_the_server_healthy(server, client, runs):
    rng = random.Random(42)
    statuses = []
    for i in range(200):
        path, body, key = _hostile(rng)
        raw = rng.choice([None, None, None, b"\xff\xfe", b"[1,2", b'{"model": "A", "messages": [']) if i % 5 == 0 else None
        code, reply = _post(server, path, body, key=key, raw=raw)
        statuses.append(code)
        assert code < 500, (path, body, reply)
        if code >= 400:
            assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert server.alive() and {400, 401, 404} <= set(statuses)
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200
    assert _chat(client, "A", QUESTIONS[0]) == predict(runs["A"], [QUESTIONS[0]])[0]["output"]


def test_metrics_per_adapter_and_key(server, client):
    _chat(client, "B", QUESTIONS[0])
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    from tunesmith.serve.metrics import key_label

    assert f'tunesmith_requests_total{{api_key="{key_label(KEY)}",endpoint="/v1/chat/completions",model="B",status="200"}}' in text
    assert KEY not in text  # keys are labelled by a hash prefix, never exported
    for name in ("tunesmith_generation_tokens_total{api_key", "tunesmith_time_to_first_token_seconds_bucket",
                 "tunesmith_request_latency_seconds_bucket", "tunesmith_running_requests", "tunesmith_waiting_requests",
                 'tunesmith_prompt_tokens_total{api_key'):
        assert name in text, name
    assert "tunesmith_adapters_loaded 2.0" in text


def test_request_log_has_one_line_per_finished_input(server, client, runs):
    """--request-log: chat (plain and streamed), completions with n=2 and classify each append their
    inputs and replies; a refused request appends nothing."""
    log = runs["tmp"] / "requests.jsonl"
    start = len(log.read_text().splitlines()) if log.exists() else 0
    plain = _chat(client, "A", QUESTIONS[1])
    s = client.chat.completions.create(model="B", messages=[{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": QUESTIONS[2]}],
                                       temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    c = client.completions.create(model="A", prompt=["what city", "what year"], max_tokens=3, temperature=0, n=2)
    status, _ = _post(server, "/classify", {"model": "cls", "input": ["the movie superb"]})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        _chat(client, "nope", "hi")
    lines = [json.loads(x) for x in log.read_text().splitlines()[start:]]
    assert [(x["model"], x["endpoint"]) for x in lines] == [
        ("A", "/v1/chat/completions"), ("B", "/v1/chat/completions"), ("A", "/v1/completions"),
        ("A", "/v1/completions"), ("cls", "/classify")]
    assert lines[0]["input"] == QUESTIONS[1] and lines[0]["output"].strip() == plain
    assert lines[1]["input"] == QUESTIONS[2] and lines[1]["output"] == streamed
    assert lines[1]["messages"] == f"system: be brief\nuser: {QUESTIONS[2]}"
    assert [x["input"] for x in lines[2:4]] == ["what city", "what year"]
    assert [x["outputs"] for x in lines[2:4]] == [[ch.text for ch in c.choices[:2]], [ch.text for ch in c.choices[2:]]]
    assert lines[4]["input"] == "the movie superb" and lines[4]["label"] == predict(runs["cls"], ["the movie superb"])[0]["label"]
    assert all(x["time"].endswith("Z") for x in lines)


def test_engine_vllm_prints_the_vllm_command(runs, tiny_llama, capsys):
    import importlib.util

    from tunesmith.cli import run
    from tunesmith.serve.vllm import vllm_command

    cmd = vllm_command([f"A={runs['A']}", runs["B"]], port=9000, api_keys=["k"])
    assert cmd[:3] == ["vllm", "serve", str(tiny_llama)] and "--enable-lora" in cmd
    mods = cmd[cmd.index("--lora-modules") + 1: cmd.index("--api-key")]
    assert mods == [f"A={runs['A']}/adapter", f"B={runs['B']}/adapter"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and cmd[cmd.index("--port") + 1] == "9000"
    if importlib.util.find_spec("vllm") is None:
        assert run(["serve", "--engine", "vllm", runs["A"]]) == 1
        out = capsys.readouterr()
        assert out.out.startswith("vllm serve ") and "pip install vllm" in out.err
