"""`tunesmith serve` against the simple way of serving many adapters, in the same run, on SmolLM2.

Run: .venv/bin/python bench/serve.py [--requests 32] [--max-tokens 32] [--clients 8] [--precision fp32]
     .venv/bin/python bench/serve.py --only-hot   (step 3 alone: a few minutes instead of the whole run)

Adapters: peft LoRA r 16 / alpha 32 on all linear layers of SmolLM2-135M-Instruct (the shapes of
configs/sft-identity-lora.yaml's adapter), made here with random B matrices (std 0.01) instead of
trained: every figure below is speed, and an adapter's cost does not depend on its values.
Every request is greedy with the same `max_tokens`, so both sides generate the same tokens (the
bench checks that their replies are identical).

1. baseline: one request at a time on a peft model holding 4 adapters, `set_adapter` per request,
   `model.generate` (the way a script or a simple Flask wrapper serves them).
2. tunesmith serve (a real server process, the official `openai` client, streaming): 8 concurrent
   clients over 4 adapters; then over 8 distinct adapters; then all on one adapter (served folded);
   then on the bare base.
3. Hot loads: memory per extra adapter (server RSS before/after loading, against its parameter
   bytes) and the time from the load call to the first streamed token on the new adapter, split into
   the load call and the first request; once on the idle server, once while the clients of step 2
   (4 adapters) are being served.
Ratios are printed last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BASE = "builtin:SmolLM2-135M-Instruct"
QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a haiku about rain.",
             "Explain what a LoRA adapter is in two sentences.", "Name three colours.",
             "What is 12 times 7?", "Give me a tip for learning Python.", "Why is the sky blue?"]


def make_adapters(base_path: str, out: Path, n: int) -> list[Path]:
    """n LoRA adapters in peft's format (out/ad0 ... out/ad{n-1}), random B so each one matters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(100)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), cfg, adapter_name="ad0")
    for i in range(1, n):
        model.add_adapter(f"ad{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(str(out))  # adapters not named "default" go to out/<name>/
    return [out / f"ad{i}" for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) so far; this one by default. On a
    shared machine tokens per CPU-second compare the sides where wall time measures the neighbours."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def summary(name: str, tokens: int, wall: float, lat: list[float], ttft: list[float], cpu: float) -> dict:
    row = {"side": name, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
           "cpu_s": round(cpu, 1), "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9), 2),
           "latency_p50_s": round(pct(lat, 0.5), 3), "latency_p95_s": round(pct(lat, 0.95), 3),
           "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3)}
    print(json.dumps(row), flush=True)
    return row


def baseline(base_path: str, adapters: list[Path], jobs: list[tuple[int, str]], max_tokens: int) -> tuple[dict, dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapters[0]),
                                      adapter_name="a0")
    for i, p in enumerate(adapters[1:4], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    model.eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first call is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def one(adapter: int, q: str):
        t0 = time.perf_counter()
        model.set_adapter(f"a{adapter}")
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        streamer = FirstToken()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return tok.decode(new, skip_special_tokens=True), len(new), time.perf_counter() - t0, streamer.first - t0

    one(0, "warm up")
    lat, ttft, tokens, replies = [], [], 0, {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    for k, (adapter, q) in enumerate(jobs):
        text, n, dt, first = one(adapter, q)
        lat.append(dt)
        ttft.append(first)
        tokens += n
        replies[k] = text
    return summary("baseline: peft set_adapter, one request at a time (4 adapters)", tokens, time.perf_counter() - t0,
                   lat, ttft, cpu_seconds() - c0), replies


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _post(url: str, body: dict) -> str:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


async def drive(url: str, name: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int,
                pid: int) -> tuple[dict, dict]:
    """`clients` concurrent streaming clients working through `jobs` (model id, question); CPU time is
    the server process's (`pid`)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    todo = list(enumerate(jobs))
    lat, ttft, replies, usage = [], [], {}, [0]

    async def worker():
        while todo:
            k, (model, q) = todo.pop(0)
            t0 = time.perf_counter()
            first, parts = None, []
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(ch.choices[0].delta.content)
                if ch.usage:
                    usage[0] += ch.usage.completion_tokens
            lat.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)
            replies[k] = "".join(parts)

    t0, c0 = time.perf_counter(), cpu_seconds(pid)
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    await client.close()
    return summary(name, usage[0], wall, lat, ttft, cpu), replies


async def first_token(client, model: str) -> float:
    """Seconds from sending a short streamed chat request to its first token."""
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=2, temperature=0, stream=True)
    dt = None
    async for ch in stream:
        if dt is None and ch.choices and ch.choices[0].delta.content:
            dt = time.perf_counter() - t0
    return dt if dt is not None else time.perf_counter() - t0


async def hot_loads(url: str, adapters: list[Path], pid: int, prefix: str = "hot") -> dict:
    """Load each adapter, then stream the first token from it: load-call-to-first-token, split into
    the load call and the first request; the first token of the same request on the adapter, now
    loaded, for comparison (what any request's prefill costs at this moment); and resident memory
    growth per adapter (RSS after each load; the first load is the reference: the server hands freed
    heap back to the OS after every load, so earlier garbage does not count for or against it)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    times, calls, loaded, rss = [], [], [], []
    for i, p in enumerate(adapters):
        t0 = time.perf_counter()
        await asyncio.to_thread(_post, url + "/v1/load_lora_adapter", {"lora_name": f"{prefix}{i}", "lora_path": str(p)})
        calls.append(time.perf_counter() - t0)
        times.append(calls[-1] + await first_token(client, f"{prefix}{i}"))  # load call -> its first streamed token
        rss.append(_rss_kb(pid))
        loaded.append(await first_token(client, f"{prefix}{i}"))
    await client.close()
    from safetensors.torch import load_file

    param_bytes = sum(t.nbytes for t in load_file(str(adapters[0] / "adapter_model.safetensors")).values())
    per = (rss[-1] - rss[0]) * 1024 / max(len(adapters) - 1, 1)
    row = {"hot_loads": len(adapters), "load_to_first_token_p50_ms": round(pct(times, 0.5) * 1e3, 1),
           "load_to_first_token_p95_ms": round(pct(times, 0.95) * 1e3, 1),
           "load_call_p50_ms": round(pct(calls, 0.5) * 1e3, 1), "load_call_p95_ms": round(pct(calls, 0.95) * 1e3, 1),
           "first_token_already_loaded_p50_ms": round(pct(loaded, 0.5) * 1e3, 1),
           "rss_per_extra_adapter_mb": round(per / 2 ** 20, 2), "adapter_param_mb": round(param_bytes / 2 ** 20, 2),
           "memory_per_adapter_over_params": round(per / param_bytes, 2)}
    print(json.dumps(row), flush=True)
    return row


async def hot_loads_busy(url: str, adapters: list[Path], pid: int, jobs: list[tuple[str, str]], clients: int,
                         max_tokens: int) -> dict:
    """hot_loads while `clients` streaming clients keep the engine busy (the loads start once they run)."""
    busy = asyncio.create_task(drive(url, f"  (load under {clients} clients)", jobs, clients, max_tokens, pid))
    await asyncio.sleep(3.0)  # every client has a request in the running batch
    row = await hot_loads(url, adapters, pid, prefix="busy")
    if busy.done():
        print("note: the clients finished before the last load; the later loads ran on an idle server", flush=True)
    await busy
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--hot", type=int, default=6, help="adapters hot-loaded for the load and memory figures")
    ap.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's choice)")
    ap.add_argument("--only-hot", action="store_true",
                    help="only the hot loads (step 3), idle and busy: no baseline, no throughput phases")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process
    from tunesmith.models.load import resolve_model_path

    base_path = resolve_model_path(BASE)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    t0 = time.perf_counter()
    adapters = make_adapters(base_path, tmp, 8 + args.hot)
    print(f"made {len(adapters)} adapters in {time.perf_counter() - t0:.1f}s under {tmp}", flush=True)
    questions = [QUESTIONS[k % len(QUESTIONS)] for k in range(args.requests)]
    four = [(k % 4, q) for k, q in enumerate(questions)]

    if args.precision == "bf16":
        print("note: the baseline runs in fp32; use --precision fp32 for a like-for-like comparison")
    if not args.only_hot:
        base_row, base_replies = baseline(base_path, adapters, four, args.max_tokens)

    port = 8700 + os.getpid() % 200
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", f"base={base_path}",
           *[f"a{i}={p}" for i, p in enumerate(adapters[:8])], "--port", str(port), "--precision", args.precision]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit((tmp / "server.log").read_text())
                time.sleep(0.5)
        loads = {"4": [(f"a{a}", q) for a, q in four], "8": [(f"a{k % 8}", q) for k, q in enumerate(questions)],
                 "1": [("a0", q) for q in questions], "base": [("base", q) for q in questions]}
        names = {"4": "4 adapters", "8": "8 adapters", "1": "1 adapter (folded)", "base": "bare base"}
        rows = {}
        for key, jobs in ({} if args.only_hot else loads).items():
            # one short wave of the same mix first: steady state (a lone adapter is folded by then)
            asyncio.run(drive(url, f"  warm-up, {names[key]}", jobs[: args.clients], args.clients, 12, proc.pid))
            rows[key], replies = asyncio.run(drive(url, f"tunesmith serve: {args.clients} clients, {names[key]}",
                                                   jobs, args.clients, args.max_tokens, proc.pid))
            if key == "4":
                same = sum(replies[k] == base_replies[k] for k in replies)
                print(f"replies identical to the baseline's: {same}/{len(replies)}", flush=True)
        if args.only_hot:  # what the busy phase's clients ask, served once: every reply's adapter is warm
            asyncio.run(drive(url, "  warm-up, 4 adapters", loads["4"][: args.clients], args.clients, 12, proc.pid))
        print("hot loads on the idle server:", flush=True)
        hot = asyncio.run(hot_loads(url, adapters[8:], proc.pid))
        print(f"hot loads while {args.clients} clients are served (4 adapters):", flush=True)
        busy = asyncio.run(hot_loads_busy(url, adapters[8:], proc.pid, loads["4"], args.clients, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("\nratios (targets in brackets):")
    if not args.only_hot:
        ratios(base_row, rows, hot)
    for where, h in (("idle server", hot), (f"{args.clients} clients busy", busy)):
        print(f"  load call to first token, p95, {where + ':':<22}{h['load_to_first_token_p95_ms']:>6.0f} ms  [< 250 ms]"
              f"  (load call p95 {h['load_call_p95_ms']:.0f} ms; first token on a loaded adapter, p50 "
              f"{h['first_token_already_loaded_p50_ms']:.0f} ms)")


def ratios(base_row: dict, rows: dict, hot: dict) -> None:
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    tpc = {k: r["tokens_per_cpu_s"] for k, r in rows.items()}
    base_tpc = base_row["tokens_per_cpu_s"]
    print("  (each ratio from wall-clock tokens/s, then from tokens per CPU-second of the serving process)")
    print(f"  tunesmith serve 8 clients / 4 adapters vs baseline:  {tps['4'] / base_row['tokens_per_s']:.2f}x, "
          f"{tpc['4'] / base_tpc:.2f}x  [>= 3x]")
    print(f"  8 distinct adapters vs one adapter:                  {tps['8'] / tps['1']:.2f}x, {tpc['8'] / tpc['1']:.2f}x  [>= 0.8x]")
    print(f"  one adapter (folded) vs bare base:                   {tps['1'] / tps['base']:.2f}x, "
          f"{tpc['1'] / tpc['base']:.2f}x  [>= 0.85x]")
    print(f"  memory per extra adapter / its parameter bytes:              {hot['memory_per_adapter_over_params']:.2f}x  [<= 1.2x]")


if __name__ == "__main__":
    main()
