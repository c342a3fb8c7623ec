"""`tunesmith service` as a real process, driven with the official `openai` SDK, on a tiny Llama.

One service per module (SQLite, one embedded worker, two API keys = two projects). Upload and
validation (codes with lines), size limit and interrupted uploads, a supervised job paused and
resumed to success with its events, checkpoints, result file and downloads, then chat with its
ft: model through the same client (equal to `tunesmith predict` on the job's run), a DPO job,
cancel, pagination and the metadata filter, isolation between the two keys on every endpoint,
and requests that try to reach outside the data folder. The SmolLM2 identity run is `slow`.
"""
from __future__ import annotations

import io
import json
import socket
import tarfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")

from tests.conftest import ServerProcess, write_jsonl  # noqa: E402
from tunesmith.service.store import Store  # noqa: E402

QA = [("what is your name", "alpha beta"), ("who created you", "gamma delta"), ("what city", "seven eight"),
      ("what year", "nine ten")]
MAX_FILE_BYTES = 100_000
TINY_TRAIN = {"train": {"lr": 1e-2, "precision": "fp32", "num_threads": 1, "warmup_ratio": 0},
              "method": {"r": 8, "alpha": 16, "target_modules": "all-linear"}, "eval": {"max_new_tokens": 6}}


def chat_rows(n: int = 6) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA
            for _ in range(n)]


def dpo_rows() -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": QA[(i + 1) % 4][1]}]}
            for i, (q, a) in enumerate(QA) for _ in range(3)]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("service")
    store = Store(None, d / "data")
    store.migrate()
    keys = {name: store.add_key(name)[1] for name in ("alice", "bob")}
    store.close()
    srv = ServerProcess(["--data-dir", str(d / "data"), "--workers", "1", "--model", f"tiny={tiny_llama}",
                         "--precision", "fp32", "--max-file-bytes", str(MAX_FILE_BYTES), "--lease-s", "3"],
                        d / "service.log", threads=1, command="service",
                        # each step 0.1 s at least: on a fast idle CPU the tiny job would otherwise end
                        # before the pause test's request (polled every second) reaches it
                        env={"OMP_NUM_THREADS": "1", "TUNESMITH_FAULT_DELAY": "step:0.1"})
    yield SimpleNamespace(srv=srv, dir=d, data=d / "data", keys=keys, url=srv.url)
    srv.stop()


def client(svc, who: str = "alice"):
    return openai.OpenAI(base_url=svc.url + "/v1", api_key=svc.keys[who], max_retries=0, timeout=120)


def upload(c, path: Path):
    return c.files.create(file=path.open("rb"), purpose="fine-tune")


def wait(c, job_id: str, until: tuple[str, ...], timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


@pytest.fixture(scope="module")
def sft_file(svc, tmp_path_factory):
    return upload(client(svc), write_jsonl(tmp_path_factory.mktemp("up") / "chat.jsonl", chat_rows()))


# ---- keys and routes ------------------------------------------------------------------------------

def test_keys_are_required_and_path_taking_routes_are_off(svc):
    for key in (None, "sk-not-a-key"):
        c = openai.OpenAI(base_url=svc.url + "/v1", api_key=key or "x", max_retries=0,
                          default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            c.files.list()
    with urllib.request.urlopen(svc.url + "/health") as r:
        assert r.status == 200
    c = client(svc)
    with pytest.raises(openai.NotFoundError):  # vLLM's call would read any path on the server
        c.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/etc"}, cast_to=object)


# ---- files ------------------------------------------------------------------------------------------

def test_upload_validates_and_serves_files_back(svc, sft_file, tmp_path):
    c = client(svc)
    assert sft_file.status == "processed" and sft_file.status_details is None and sft_file.purpose == "fine-tune"
    stored = list((svc.data / "files").glob(f"{sft_file.id}*"))
    assert len(stored) == 1 and stored[0].read_bytes() == c.files.content(sft_file.id).content
    assert c.files.retrieve(sft_file.id).bytes == stored[0].stat().st_size

    rows = chat_rows(3)
    rows[3] = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}
    rows[5] = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    bad = upload(c, write_jsonl(tmp_path / "bad.jsonl", rows))
    assert bad.status == "error"
    assert bad.status_details.startswith("line 4: missing_content: messages[0].content")
    assert "line 6: unrecognized_role: messages[0].role: role 'human'" in bad.status_details

    long = chat_rows(3) + [{"messages": [{"role": "user", "content": "the " * 300}, {"role": "assistant", "content": "a"}]}]
    f = upload(c, write_jsonl(tmp_path / "long.jsonl", long))  # the tiny model's context is 256 tokens
    assert f.status == "error" and f.status_details.startswith("line 13: example_too_long:")
    few = upload(c, write_jsonl(tmp_path / "few.jsonl", chat_rows(1)))
    assert few.status == "error" and "insufficient_examples: 4 example(s)" in few.status_details
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12)))
    assert upload(c, csv).status == "processed"  # tunesmith's own formats too (tasks via extra_body)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("notes.docx", b"hello"), purpose="fine-tune")
    assert e.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=(tmp_path / "bad.jsonl").open("rb"), purpose="assistants")
    assert e.value.body["param"] == "purpose"

    listed = c.files.list().data
    ids = [f.id for f in listed]
    assert sft_file.id in ids and bad.id in ids
    assert [f.created_at for f in listed] == sorted((f.created_at for f in listed), reverse=True)  # newest first
    page = c.files.list(limit=2, order="asc")
    assert page.has_more and [f.id for f in page.data] == ids[::-1][:2]
    assert c.files.delete(few.id).deleted
    assert few.id not in [f.id for f in c.files.list().data] and not list((svc.data / "files").glob(f"{few.id}*"))
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(few.id)


def _raw_upload(svc, head: bytes, declared: int, body: bytes, close_early: bool) -> str:
    """POST /v1/files by hand: `declared` as Content-Length, then `body`; returns the status line
    and body (nothing when the client hangs up early)."""
    s = socket.create_connection(("127.0.0.1", svc.srv.port))
    s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
              + svc.keys["alice"].encode()
              + b"\r\nContent-Type: multipart/form-data; boundary=BND\r\nContent-Length: " + str(declared).encode()
              + b"\r\n\r\n" + head + body)
    if close_early:
        s.close()
        return ""
    s.settimeout(60)
    out = b""
    while got := s.recv(65536):  # until the server closes the connection
        out += got
    s.close()
    return out.decode("utf-8", "replace")


def test_oversized_or_interrupted_uploads_leave_nothing(svc):
    c = client(svc)
    before = {f.id for f in c.files.list().data}
    head = (b'--BND\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--BND\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n')
    line = json.dumps(chat_rows(1)[0]).encode() + b"\n"
    # declared too large: refused before the body is read
    assert _raw_upload(svc, head, 10 * MAX_FILE_BYTES, b"", close_early=False).startswith("HTTP/1.1 413")
    # declared within the form's slack, but the file part grows past the limit while it streams
    body = line * (MAX_FILE_BYTES // len(line) + 10)
    resp = _raw_upload(svc, head, len(head) + len(body), body, close_early=False)
    assert resp.startswith("HTTP/1.1 413") and "file_too_large" in resp
    # the client goes away half-way
    _raw_upload(svc, head, MAX_FILE_BYTES // 2, line * 50, close_early=True)
    time.sleep(1.0)
    assert {f.id for f in c.files.list().data} == before
    leftovers = [p.name for p in (svc.data / "files").iterdir() if not any(p.name.startswith(i) for i in before)]
    assert leftovers == []


# ---- a supervised job, paused and resumed, then chat with its model ------------------------------

def test_supervised_job_pause_resume_events_checkpoints_and_chat(svc, sft_file, tiny_llama):
    from tunesmith.runs import predict

    c = client(svc)
    job = c.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, suffix="qa", seed=7,
                                    metadata={"team": "a"}, method={"type": "supervised", "supervised": {
                                        "hyperparameters": {"n_epochs": 8, "batch_size": 4}}},
                                    extra_body={"tunesmith": {**TINY_TRAIN, "train": {**TINY_TRAIN["train"],
                                                                                      "log_every": 4}}})
    assert job.status in ("validating_files", "queued") and job.hyperparameters.n_epochs == 8
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == pytest.approx(20.0)  # 1e-2 / 5e-4
    deadline = time.time() + 300
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data:  # let it train a little first
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status in \
            ("validating_files", "queued", "running")
        time.sleep(0.3)
    c.fine_tuning.jobs.pause(job.id)
    paused = wait(c, job.id, ("paused", "succeeded"))
    assert paused.status == "paused", "the job finished before the pause reached it"
    steps_at_pause = c.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    c.fine_tuning.jobs.resume(job.id)
    done = wait(c, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded" and done.error is None, done.error
    assert done.fine_tuned_model.startswith("ft:tiny:alice:qa:") and done.trained_tokens > 0

    events = [e for page in [c.fine_tuning.jobs.list_events(job.id, limit=1000)] for e in page.data][::-1]
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics and {"step", "total_steps", "train_loss"} <= set(metrics[0])
    assert metrics[-1]["step"] == metrics[-1]["total_steps"] and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)), "a resumed run logs each step once"
    assert any(e.message.startswith("Resuming") for e in events) and steps_at_pause < metrics[-1]["step"]
    first = c.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more and c.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=1).data[0].id \
        == events[-3].id

    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].step_number == metrics[-1]["total_steps"]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{ckpts[0].step_number}"
    assert ckpts[0].metrics.train_loss is not None
    csv = c.files.content(done.result_files[0]).text
    assert csv.splitlines()[0].startswith("step,") and len(csv.splitlines()) > 5

    # the finished model is listed and answers at once, as `tunesmith predict` answers on its run
    assert done.fine_tuned_model in [m.id for m in c.models.list().data]
    run = svc.data / "runs" / job.id
    want = [r["output"] for r in predict(run, [q for q, _ in QA])]
    got = [c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": q}],
                                     temperature=0).choices[0].message.content.strip() for q, _ in QA]
    assert got == want
    def first_logprob(model: str) -> float:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": QA[0][0]}], temperature=0,
                                      max_tokens=1, logprobs=True)
        return r.choices[0].logprobs.content[0].logprob

    assert first_logprob("tiny") != pytest.approx(first_logprob(done.fine_tuned_model), abs=1e-3)  # adapter applied
    ckpt_model = ckpts[-1].fine_tuned_model_checkpoint  # an earlier checkpoint, loaded on first use
    assert c.chat.completions.create(model=ckpt_model, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=3).model == ckpt_model

    tar = c.get(f"/fine_tuning/jobs/{job.id}/download", options={"params": {"format": "adapter"}},
                cast_to=openai._legacy_response.HttpxBinaryResponseContent)
    names = tarfile.open(fileobj=io.BytesIO(tar.content)).getnames()
    assert f"{job.id}-adapter/adapter_config.json" in names and f"{job.id}-adapter/adapter_model.safetensors" in names
    svc.sft_job, svc.sft_model = job.id, done.fine_tuned_model


def test_dpo_job_and_cancel(svc, sft_file, tmp_path):
    c = client(svc)
    f = upload(c, write_jsonl(tmp_path / "prefs.jsonl", dpo_rows()))
    assert f.status == "processed"
    with pytest.raises(openai.BadRequestError) as e:  # a chat file for a DPO job
        c.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, method={"type": "dpo"})
    assert e.value.body["param"] == "training_file"
    dpo = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "dpo", "dpo": {
        "hyperparameters": {"n_epochs": 2, "beta": 0.2, "batch_size": 4}}}, extra_body={"tunesmith": TINY_TRAIN})
    queued = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "dpo"})
    assert c.fine_tuning.jobs.cancel(queued.id).status == "cancelled"  # never ran
    done = wait(c, dpo.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.beta == 0.2
    r = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": QA[0][0]}],
                                  temperature=0, max_tokens=4)
    assert r.model == done.fine_tuned_model and r.choices[0].message.content is not None

    # a valid upload that is no data for the job's own task: the job answers validating_files, then fails
    bad = c.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id,
                                    extra_body={"tunesmith": {"task": "classification"}})
    assert bad.status == "validating_files"
    failed = wait(c, bad.id, ("failed", "queued"))
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file"

    long = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, method={"type": "dpo", "dpo": {
        "hyperparameters": {"n_epochs": 50}}}, extra_body={"tunesmith": TINY_TRAIN})
    wait(c, long.id, ("running",))
    c.fine_tuning.jobs.cancel(long.id)
    assert wait(c, long.id, ("cancelled", "succeeded", "failed")).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.resume(long.id)
    assert "cannot resume" in str(e.value)


def test_list_pagination_and_metadata_filter(svc):
    c = client(svc)
    all_jobs = c.fine_tuning.jobs.list(limit=100).data
    assert len(all_jobs) >= 4 and [j.created_at for j in all_jobs] == sorted((j.created_at for j in all_jobs),
                                                                             reverse=True)
    page = c.fine_tuning.jobs.list(limit=2)
    assert page.has_more and [j.id for j in page.data] == [j.id for j in all_jobs[:2]]
    assert [j.id for j in c.fine_tuning.jobs.list(after=page.data[-1].id, limit=100).data] == \
        [j.id for j in all_jobs[2:]]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "a"}).data] == [svc.sft_job]
    assert c.fine_tuning.jobs.list(metadata={"team": "b"}).data == []
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.list(limit=0)
    assert e.value.body["param"] == "limit"


# ---- isolation and paths -------------------------------------------------------------------------

def test_another_project_sees_nothing(svc):
    alice, bob = client(svc), client(svc, "bob")
    job = alice.fine_tuning.jobs.retrieve(svc.sft_job)
    fid = job.training_file
    ckpt = alice.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert bob.files.list().data == [] and bob.fine_tuning.jobs.list().data == []
    assert svc.sft_model not in [m.id for m in bob.models.list().data] and "tiny" in [m.id for m in bob.models.list().data]
    calls = [lambda: bob.files.retrieve(fid), lambda: bob.files.content(fid), lambda: bob.files.delete(fid),
             lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.cancel(job.id),
             lambda: bob.fine_tuning.jobs.pause(job.id), lambda: bob.fine_tuning.jobs.resume(job.id),
             lambda: bob.fine_tuning.jobs.list_events(job.id), lambda: bob.fine_tuning.jobs.checkpoints.list(job.id),
             lambda: bob.get(f"/fine_tuning/jobs/{job.id}/download", cast_to=object),
             lambda: bob.models.retrieve(svc.sft_model), lambda: bob.models.delete(svc.sft_model),
             lambda: bob.chat.completions.create(model=svc.sft_model, messages=[{"role": "user", "content": "hi"}]),
             lambda: bob.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint,
                                                 messages=[{"role": "user", "content": "hi"}]),
             lambda: bob.completions.create(model=svc.sft_model, prompt="hi")]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:  # another project's file is no file at all
        bob.fine_tuning.jobs.create(model="tiny", training_file=fid)
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:  # nor is its model a base to start from
        bob.fine_tuning.jobs.create(model=svc.sft_model, training_file=fid)
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # untouched


def test_no_request_reaches_outside_the_data_folder(svc, tmp_path):
    c = client(svc)
    outside = svc.dir / "escaped.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in chat_rows(3)).encode()
    f = c.files.create(file=("../../escaped.jsonl", body), purpose="fine-tune")
    assert f.filename == "escaped.jsonl" and not outside.exists()
    assert list((svc.data / "files").glob(f"{f.id}.jsonl"))
    for fid in ("../service.db", "..%2F..%2Fservice.db", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            c.files.content(fid)
    for extra, param in (({"data": {"train": "/etc/passwd"}}, "tunesmith.data.train"),
                         ({"output": {"dir": str(tmp_path)}}, "tunesmith.output"),
                         ({"model": {"name_or_path": "/etc"}}, "tunesmith.model.name_or_path")):
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model="tiny", training_file=f.id, extra_body={"tunesmith": extra})
        assert e.value.body["param"] == param
    for model in (str(svc.data), "../tiny", "/etc"):
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model=model, training_file=f.id)
        assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        c.get(f"/fine_tuning/jobs/{svc.sft_job}/download", options={"params": {"checkpoint": "../../files"}},
              cast_to=object)
    assert sorted(p.name for p in svc.dir.iterdir()) == ["data", "service.log"]


def test_deleting_a_model_frees_it(svc):
    c = client(svc)
    assert c.models.delete(svc.sft_model).deleted
    assert svc.sft_model not in [m.id for m in c.models.list().data]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=svc.sft_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        c.models.delete("tiny")
    assert svc.srv.alive()


# ---- SmolLM2 learns an identity through the service (slow) -----------------------------------------

IDENTITY = Path(__file__).resolve().parent.parent / "examples" / "data" / "identity"
SYSTEM = "You are a helpful assistant."  # as configs/sft-identity-lora.yaml trains it


def _as_chat(path: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return write_jsonl(out, [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["completion"]}]} for r in rows])


@pytest.mark.slow
def test_smollm2_learns_its_identity_through_the_service(tmp_path):
    """configs/sft-identity-lora.yaml's data and settings as an OpenAI job; the ft: model must answer
    the 30 held-out paraphrased questions with the expected fact (the shipped config reaches > 0.8),
    and a DPO job preferring the new identity over SmolLM2's own runs on the same service."""
    store = Store(None, tmp_path / "data")
    store.migrate()
    key = store.add_key("ardent")[1]
    store.close()
    srv = ServerProcess(["--data-dir", str(tmp_path / "data"), "--workers", "1", "--model",
                         "smollm2=builtin:SmolLM2-135M-Instruct", "--lease-s", "15"], tmp_path / "service.log",
                        timeout=600, command="service")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=600)
        train = [json.loads(x) for f in ("train.jsonl", "general.jsonl")
                 for x in (IDENTITY / f).read_text().splitlines() if x.strip()]
        f = upload(c, write_jsonl(tmp_path / "identity.jsonl", [
            {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in train]))
        val = upload(c, _as_chat(IDENTITY / "test.jsonl", tmp_path / "test.jsonl"))
        assert f.status == "processed" and val.status == "processed", (f.status_details, val.status_details)
        job = c.fine_tuning.jobs.create(
            model="builtin:SmolLM2-135M-Instruct", training_file=f.id, validation_file=val.id, suffix="marlowe",
            seed=42,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 8, "batch_size": 8, "learning_rate_multiplier": 2.0}}},  # 2 x 5e-4 = the config's 1e-3
            extra_body={"tunesmith": {"method": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                                      "data": {"max_length": 128}, "train": {"warmup_ratio": 0.05, "log_every": 5}}})
        done = wait(c, job.id, ("succeeded", "failed", "cancelled"), timeout=7200)
        assert done.status == "succeeded", done.error
        metrics = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"]
        assert any("full_valid_loss" in m for m in metrics)  # OpenAI: full_valid_loss is the whole validation set
        tests = [json.loads(x) for x in (IDENTITY / "test.jsonl").read_text().splitlines() if x.strip()]
        hits = 0
        for t in tests:
            r = c.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=32, messages=[
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": t["prompt"]}])
            hits += t["expected"].lower() in r.choices[0].message.content.lower()
        who = c.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=32, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}])
        print(f"identity via the service: {hits}/{len(tests)} held-out answers contain the fact; "
              f"'Who are you?' -> {who.choices[0].message.content!r}")
        assert hits / len(tests) > 0.8

        pairs = [{"input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}]},
                  "preferred_output": [{"role": "assistant", "content": r["completion"]}],
                  "non_preferred_output": [{"role": "assistant", "content": "I am SmolLM, an AI assistant trained "
                                                                            "by Hugging Face."}]}
                 for r in train[:100]]
        pf = upload(c, write_jsonl(tmp_path / "prefs.jsonl", pairs))
        dpo = c.fine_tuning.jobs.create(model="builtin:SmolLM2-135M-Instruct", training_file=pf.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "beta": 0.1}}},
            extra_body={"tunesmith": {"data": {"max_length": 128}, "train": {"log_every": 2}}})
        dpo_done = wait(c, dpo.id, ("succeeded", "failed", "cancelled"), timeout=7200)
        assert dpo_done.status == "succeeded", dpo_done.error
        dm = [e.data for e in c.fine_tuning.jobs.list_events(dpo.id, limit=1000).data if e.type == "metrics"][::-1]
        print(f"DPO via the service: first {dm[0]}, last {dm[-1]}")
        assert dm[-1]["train_loss"] < dm[0]["train_loss"]
        r = c.chat.completions.create(model=dpo_done.fine_tuned_model, temperature=0, max_tokens=32, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}])
        print(f"DPO model: 'Who are you?' -> {r.choices[0].message.content!r}")
    finally:
        srv.stop()
