"""`tunesmith serve` on SmolLM2 with two real adapters from the shipped configs (slow: `pytest -m slow`).

configs/sft-identity-lora.yaml (a chat-template run with a system prompt) and
configs/sentiment-smollm2-lora.yaml (a prompt-template run without the chat template), trained here
for a few steps only, without the before/after generation metrics (the parity checked here does not
need a good adapter, and the full configs take 5-15 min each on 2 cores), in fp32 so greedy replies
compare exactly. One server holds both over one base; each adapter's greedy reply over HTTP equals
`tunesmith predict` on its run, one at a time, with both adapters' requests in flight together,
and streamed.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from tests.conftest import ServerProcess  # noqa: E402
from tunesmith.runs import predict  # noqa: E402
from tunesmith.train import train  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
INPUTS = {"identity": ["Who are you?", "Who created you?", "What is the capital of France?"],
          "sentiment": ["An absolute delight from start to finish; the cast is superb.",
                        "I walked out halfway through. Boring, predictable and badly acted.",
                        "A decent film with a few slow moments."]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    out = ["--train.precision=fp32", "--train.max_steps=6", "--eval.before=false", "--eval.generate_metrics=false",
           "--eval.max_examples=8", f"--output.dir={tmp}/{{name}}"]
    runs = {"identity": train(str(ROOT / "configs/sft-identity-lora.yaml"), out).run_dir,
            "sentiment": train(str(ROOT / "configs/sentiment-smollm2-lora.yaml"),
                               ["--data.train_size=64", "--data.test_size=16", *out]).run_dir}
    srv = ServerProcess([f"identity={runs['identity']}", f"sentiment={runs['sentiment']}"], tmp / "server.log")
    yield srv, runs
    srv.stop()


def test_two_real_adapters_answer_as_predict_alone_together_and_streamed(served):
    srv, runs = served
    want = {name: [r["output"] for r in predict(runs[name], INPUTS[name])] for name in runs}
    assert all(any(outs) for outs in want.values())  # each adapter says something to compare
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert models["identity"].model_dump()["parent"] == models["sentiment"].model_dump()["parent"]
    for name, texts in INPUTS.items():
        got = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": t}], temperature=0)
               .choices[0].message.content.strip() for t in texts]
        assert got == want[name], name

    aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

    async def one(name: str, i: int, stream: bool) -> str:
        msgs = [{"role": "user", "content": INPUTS[name][i]}]
        if not stream:
            r = await aclient.chat.completions.create(model=name, messages=msgs, temperature=0)
            return r.choices[0].message.content.strip()
        s = await aclient.chat.completions.create(model=name, messages=msgs, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices]).strip()

    async def together():
        jobs = [(n, i, st) for st in (False, True) for i in range(3) for n in INPUTS]
        return jobs, await asyncio.gather(*(one(*j) for j in jobs))

    jobs, out = asyncio.run(together())
    for (name, i, stream), got in zip(jobs, out):
        assert got == want[name][i], (name, i, stream)
