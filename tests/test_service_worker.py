"""Jobs and workers of the fine-tuning service: OpenAI job requests -> tunesmith configs (auto
hyperparameters, validation with `param`, the model allow-list), then real workers training a tiny
model in child processes: events, checkpoints, results, cancel, pause/resume, a crashed training."""
from __future__ import annotations

import csv
import http.server
import io
import os
import signal
import threading

import pytest

from tests.service_jobs import add_file, chat_rows, data_dir_with_model, dpo_rows, wait_for
from tunesmith.service import jobs
from tunesmith.service.store import Store, StoreError
from tunesmith.service.store import jobs as job_table
from tunesmith.service.webhooks import new_secret
from tunesmith.service.worker import Worker

CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def service(tmp_path, tiny_llama):
    data_dir = data_dir_with_model(tmp_path / "data", tiny_llama)
    store = Store(None, data_dir)
    store.migrate()
    project, _ = store.add_key("alice")
    yield store, project["id"], data_dir
    store.close()


# ---- requests -> jobs (no training) ----------------------------------------------------------------

def test_auto_hyperparameters_follow_openais_rules():
    # cookbook: 3 epochs, raised to reach 100 example-passes (<= 25 epochs), lowered under 25,000 (>= 1)
    assert [jobs.auto_epochs(n) for n in (3, 10, 20, 30, 34, 100, 8333, 8334, 10_000, 50_000)] == \
        [25, 10, 5, 3, 3, 3, 3, 2, 2, 1]
    # ~0.2% of the examples, at least 1, at most 256
    assert [jobs.auto_batch_size(n) for n in (10, 249, 250, 1000, 10_000, 10**6)] == [1, 1, 1, 2, 20, 256]


def _body(file_id, **kw):
    return {"model": "tiny", "training_file": file_id, **kw}


def _error(store, project_id, data_dir, body, models=None) -> StoreError:
    with pytest.raises(StoreError) as e:
        jobs.create_job(store, project_id, body, data_dir, models or {})
    return e.value


def test_files_are_validated_with_the_jobs_own_config(service):
    """validating_files -> queued | failed: the files read as the job's config reads them (OpenAI's
    lifecycle). A chat file is a valid upload but no classification data."""
    store, pid, data_dir = service
    f = add_file(store, pid, data_dir, chat_rows(20))
    bad = jobs.create_job(store, pid, _body(f["id"], tunesmith={"task": "classification"}), data_dir, validate=False)
    assert bad["status"] == "validating_files"
    assert store.claim("w", 30) is None  # no worker takes a job whose files are not validated yet
    with pytest.raises(StoreError, match="cannot pause a job that is validating_files"):
        store.request(pid, bad["id"], "pause")
    failed = jobs.validate_job(store, bad, data_dir)
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert failed["error"]["code"] == "invalid_training_file" and failed["error"]["param"] == "training_file"
    assert "label" in failed["error"]["message"] and str(data_dir) not in failed["error"]["message"]
    events = [e["message"] for e in store.list_events(bad["id"])[0]]
    assert events[0].startswith("File validation failed: training_file " + f["id"])
    good = jobs.create_job(store, pid, _body(f["id"]), data_dir)
    assert good["status"] == "queued" and store.claim("w", 30)["id"] == good["id"]
    gone = jobs.create_job(store, pid, _body(f["id"]), data_dir, validate=False)
    store.request(pid, gone["id"], "cancel")  # cancelled while validating: stays cancelled
    assert jobs.validate_job(store, gone, data_dir)["status"] == "cancelled"


def test_a_restarted_service_validates_the_jobs_left_validating(service):
    """The API validates after answering; a service stopped before that validates at its next start."""
    import asyncio

    from tunesmith.service.api import ServiceApi
    from tunesmith.service.files import Files

    store, pid, data_dir = service
    f = add_file(store, pid, data_dir, chat_rows(20))
    left = [jobs.create_job(store, pid, _body(f["id"]), data_dir, validate=False) for _ in range(2)]
    api = ServiceApi(store, Files(store, data_dir), data_dir, {})

    async def start():
        await api.validate_leftovers()
        await asyncio.gather(*api._validating)
    asyncio.run(start())
    assert [store.job(j["id"])["status"] for j in left] == ["queued", "queued"]


def test_create_job_resolves_auto_and_echoes_it(service):
    store, pid, data_dir = service
    f = add_file(store, pid, data_dir, chat_rows(20))
    job = jobs.create_job(store, pid, _body(f["id"], suffix="me", seed=7, metadata={"team": "x"}), data_dir)
    hyper = {"n_epochs": 5, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert job["hyperparameters"] == hyper and job["status"] == "queued"
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    cfg = job["tunesmith"]["config"]
    assert (cfg["task"], cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["train"]["seed"]) == ("sft", 5, 1, 7)
    assert cfg["train"]["lr"] == 5e-4  # multiplier 1 x tunesmith's lora default
    given = jobs.create_job(store, pid, _body(f["id"], method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}}}), data_dir)
    assert given["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert given["tunesmith"]["config"]["train"]["lr"] == pytest.approx(1e-3)
    # tunesmith's own absolute learning rate, echoed as the multiplier it amounts to
    own = jobs.create_job(store, pid, _body(f["id"], tunesmith={"train": {"lr": 1e-4}, "method": {"name": "full"}}),
                          data_dir)
    assert own["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(2.0)  # full's default is 5e-5
    d = add_file(store, pid, data_dir, dpo_rows(12), kind="dpo")
    dpo = jobs.create_job(store, pid, _body(d["id"], method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}),
                          data_dir)
    assert dpo["hyperparameters"] == {"n_epochs": 8, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": 0.3}
    assert dpo["tunesmith"]["config"]["task"] == "dpo" and dpo["tunesmith"]["config"]["pref"]["beta"] == 0.3

    from openai.types.fine_tuning import FineTuningJob

    parsed = FineTuningJob.model_validate(jobs.job_object(store.get_job(pid, job["id"])))
    assert parsed.hyperparameters.n_epochs == 5 and parsed.method.type == "supervised"
    assert parsed.metadata == {"team": "x"} and parsed.error is None and parsed.fine_tuned_model is None
    assert parsed.organization_id == pid and parsed.seed == 7


@pytest.mark.parametrize("change, param, code", [
    ({"method": {"type": "reinforcement"}}, "method.type", "unsupported_method"),
    ({"method": {"type": "magic"}}, "method.type", "invalid_request"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
     "method.supervised.hyperparameters.beta", "invalid_request"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_request"),
    ({"hyperparameters": {"batch_size": 2.5}}, "hyperparameters.batch_size", "invalid_request"),
    ({"hyperparameters": {"n_epochs": 2}, "tunesmith": {"train": {"epochs": 3}}}, "hyperparameters.n_epochs",
     "invalid_request"),
    ({"tunesmith": {"method": {"name": "lora", "r": -1}}}, "tunesmith.method.r", "invalid_config"),
    ({"tunesmith": {"method": {"rr": 4}}}, "tunesmith.method.rr", "invalid_config"),
    ({"tunesmith": {"task": "nope"}}, "tunesmith.task", "invalid_config"),
    ({"tunesmith": {"output": {"dir": "/tmp/x"}}}, "tunesmith.output", "invalid_request"),
    ({"tunesmith": {"data": {"train": "/etc/passwd"}}}, "tunesmith.data.train", "invalid_request"),
    ({"tunesmith": {"model": {"name_or_path": "/"}}}, "tunesmith.model.name_or_path", "invalid_request"),
    ({"tunesmith": {"pref": {"reward_fn": "os:system"}}}, "tunesmith.pref.reward_fn", "invalid_request"),
    ({"tunesmith": {"webhook": {"url": "http://x"}}}, "tunesmith.webhook.secret", "invalid_request"),
    ({"model": "/etc"}, "model", "model_not_available"),
    ({"model": "../models/tiny"}, "model", "model_not_available"),
    ({"model": "builtin:nope"}, "model", "model_not_available"),
    ({"model": "ft:tiny:other:x:12345678"}, "model", "model_not_available"),
    ({"suffix": "a:b"}, "suffix", "invalid_request"),
    ({"seed": -1}, "seed", "invalid_request"),
    ({"metadata": {"k": 1}}, "metadata.k", "invalid_request"),
    ({"training_file": "file-nope"}, "training_file", "invalid_file"),
    ({"validation_file": "file-nope"}, "validation_file", "invalid_file"),
    ({"unknown_thing": 1}, "unknown_thing", "unknown_parameter"),
])
def test_bad_requests_name_their_param(service, change, param, code):
    store, pid, data_dir = service
    f = add_file(store, pid, data_dir, chat_rows(12))
    err = _error(store, pid, data_dir, _body(f["id"]) | change)
    assert (err.param, err.code) == (param, code), str(err)
    assert store.list_jobs(pid)[0] == []  # nothing half-made


def test_files_and_models_are_the_projects_own(service):
    store, pid, data_dir = service
    other, _ = store.add_key("bob")
    theirs = add_file(store, other["id"], data_dir, chat_rows(12))
    assert _error(store, pid, data_dir, _body(theirs["id"])).param == "training_file"
    mine = add_file(store, pid, data_dir, chat_rows(12))
    store.update_file(mine["id"], status="error", status_details="line 3: missing_content")
    err = _error(store, pid, data_dir, _body(mine["id"]))
    assert err.code == "invalid_training_file" and "line 3: missing_content" in str(err)
    pairs = add_file(store, pid, data_dir, dpo_rows(12), kind="dpo")
    err = _error(store, pid, data_dir, _body(pairs["id"]))  # supervised on a DPO file
    assert err.code == "invalid_training_file" and "DPO" not in str(err) and "chat format" in str(err)
    chat = add_file(store, pid, data_dir, chat_rows(12))
    # a model the service was started with, by name; an ft: model of this project only
    job = jobs.create_job(store, pid, _body(chat["id"], model="base"), data_dir, {"base": str(data_dir / "models/tiny")})
    assert job["tunesmith"]["base"] == {"path": str(data_dir / "models/tiny")}
    store.update_job(job["id"], status="succeeded", fine_tuned_model="ft:tiny:alice::12345678", run_dir="runs/x")
    child = jobs.create_job(store, pid, _body(chat["id"], model="ft:tiny:alice::12345678"), data_dir)
    assert child["tunesmith"]["base"] == {"job": job["id"]}
    bobs = add_file(store, other["id"], data_dir, chat_rows(12))
    err = _error(store, other["id"], data_dir, _body(bobs["id"], model="ft:tiny:alice::12345678"))
    assert err.code == "model_not_available" and "tiny" in str(err)  # the message lists what there is


# ---- workers training a tiny model ---------------------------------------------------------------

def _start_worker(store, data_dir, **kw):
    stop = threading.Event()
    worker = Worker(None, data_dir, lease_s=kw.pop("lease_s", 6), poll_s=0.2, env=CHILD_ENV, **kw)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return worker, stop, thread


def _metrics_events(store, job_id):
    rows, _ = store.list_events(job_id, limit=10_000)
    return [r for r in reversed(rows) if r["type"] == "metrics"]


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        self.got.append((body, dict(self.headers)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_job_runs_to_success_with_events_checkpoints_and_results(service):
    store, pid, data_dir = service
    train = add_file(store, pid, data_dir, chat_rows(20))
    val = add_file(store, pid, data_dir, chat_rows(10))
    receiver = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = {"url": f"http://127.0.0.1:{receiver.server_port}/hook", "secret": new_secret()}
    job = jobs.create_job(store, pid, _body(train["id"], validation_file=val["id"], suffix="id", seed=3,
                                            hyperparameters={"n_epochs": 3, "batch_size": 2},
                                            tunesmith={"method": {"name": "lora", "r": 4}, "webhook": hook,
                                                       "train": {"lr": 5e-3, "log_every": 2}}),
                          data_dir)
    worker, stop, thread = _start_worker(store, data_dir)
    try:
        done = wait_for(lambda: (j := store.job(job["id"]))["status"] in ("succeeded", "failed") and j, 240, "the job")
        wait_for(lambda: _Receiver.got, 30, "the webhook")
    finally:
        stop.set()
        thread.join(60)
        receiver.shutdown()
    log = (data_dir / "logs" / f"{job['id']}.log").read_text()
    assert done["status"] == "succeeded", (done["error"], log[-3000:])
    assert done["fine_tuned_model"] == f"ft:tiny:alice:id:{job['id'][-8:]}"
    assert done["total_steps"] == 30 and done["trained_tokens"] > 0 and done["finished_at"] >= done["started_at"]
    assert done["error"] is None and done["worker_id"] is None and done["attempts"] == 1

    metrics = _metrics_events(store, job["id"])
    train_ev = [m["data"] for m in metrics if "train_loss" in m["data"]]
    assert [d["step"] for d in train_ev] == list(range(2, 31, 2))  # one per logged step, in order
    assert all(d["total_steps"] == 30 and 0 <= d["train_mean_token_accuracy"] <= 1 for d in train_ev)
    assert train_ev[-1]["train_loss"] < train_ev[0]["train_loss"]  # it learned
    valid = [m["data"] for m in metrics if "full_valid_loss" in m["data"]]
    assert [d["step"] for d in valid] == [10, 20, 30] and all("full_valid_mean_token_accuracy" in d for d in valid)

    ckpts = sorted(store.list_checkpoints(job["id"])[0], key=lambda c: c["step"])
    assert [c["step"] for c in ckpts] == [10, 20, 30]  # each epoch's evaluation
    for c in ckpts:
        assert c["fine_tuned_model_checkpoint"] == f"{done['fine_tuned_model']}:ckpt-step-{c['step']}"
        assert c["metrics"]["full_valid_loss"] == next(d["full_valid_loss"] for d in valid if d["step"] == c["step"])
        assert (data_dir / c["path"] / "adapter" / "adapter_config.json").is_file()  # servable as is
    from safetensors.torch import load_file
    last = load_file(data_dir / ckpts[-1]["path"] / "adapter" / "adapter_model.safetensors")
    final = load_file(data_dir / done["run_dir"] / "adapter" / "adapter_model.safetensors")
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in last)  # load_best off: last step

    [result] = done["result_files"]
    rfile = store.get_file(pid, result)
    rows = list(csv.DictReader(io.StringIO((data_dir / rfile["path"]).read_text())))
    assert rfile["purpose"] == "fine-tune-results" and [int(r["step"]) for r in rows] == list(range(2, 31, 2))
    assert float(rows[-1]["full_valid_loss"]) == pytest.approx(valid[-1]["full_valid_loss"])
    messages = [e["message"] for e in reversed(store.list_events(job["id"], limit=10_000)[0]) if e["type"] == "message"]
    assert messages[:4] == [f"Created fine-tuning job: {job['id']}",  # OpenAI's lifecycle, its event texts
                            f"Validating training file: {train['id']} and validation file: {val['id']}",
                            "Files validated, moving job to queued state", "Fine-tuning job started"]
    assert "The job has successfully completed" in messages
    assert len(messages) == len(set(messages))

    # the webhook, verified and parsed by the openai SDK as an OpenAI webhook would be
    from openai import InvalidWebhookSignatureError, OpenAI

    [(body, headers)] = _Receiver.got
    event = OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks.unwrap(body, headers, secret=hook["secret"])
    assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", job["id"])
    with pytest.raises(InvalidWebhookSignatureError):
        OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks.unwrap(body.replace(b"succeeded", b"failed"),
                                                                                headers, secret=hook["secret"])


@pytest.mark.slow  # five training processes: a few minutes on the 2-core CPU (the API tests pause and cancel too)
def test_pause_resume_cancel_and_a_crashed_training(service):
    """Pause a running job, resume it (it continues from its checkpoint), cancel another while it
    trains, and kill a third one's training process: that job fails, the worker goes on."""
    store, pid, data_dir = service
    f = add_file(store, pid, data_dir, chat_rows(40))
    slow = {"hyperparameters": {"n_epochs": 2, "batch_size": 1}, "seed": 1,
            "tunesmith": {"method": {"name": "lora", "r": 4}, "train": {"log_every": 2, "save_every": 10}}}
    a = jobs.create_job(store, pid, _body(f["id"], **slow), data_dir)
    worker, stop, thread = _start_worker(store, data_dir)
    try:
        wait_for(lambda: any(m["data"]["step"] >= 12 for m in _metrics_events(store, a["id"])), 240, "job a to train")
        assert store.request(pid, a["id"], "pause")["requested"] == "pause"
        paused = wait_for(lambda: (j := store.job(a["id"]))["status"] == "paused" and j, 60, "the pause")
        step = max(c["step"] for c in store.list_checkpoints(a["id"])[0])
        assert step >= 12 and paused["worker_id"] is None
        assert store.request(pid, a["id"], "resume")["status"] == "queued"
        done = wait_for(lambda: (j := store.job(a["id"]))["status"] in ("succeeded", "failed") and j, 240, "job a")
        assert done["status"] == "succeeded", done["error"]
        steps = [m["data"]["step"] for m in _metrics_events(store, a["id"])]
        assert steps == list(range(2, 81, 2)), "each step's metrics once, none lost"
        messages = [e["message"] for e in store.list_events(a["id"], limit=10_000)[0]]
        assert any(m.startswith(f"Resuming from the checkpoint at step {step}") for m in messages)

        b = jobs.create_job(store, pid, _body(f["id"], **slow), data_dir)
        wait_for(lambda: _metrics_events(store, b["id"]), 240, "job b to train")
        store.request(pid, b["id"], "cancel")
        cancelled = wait_for(lambda: (j := store.job(b["id"]))["status"] == "cancelled" and j, 60, "the cancel")
        assert cancelled["fine_tuned_model"] is None and cancelled["finished_at"]

        c = jobs.create_job(store, pid, _body(f["id"], **slow), data_dir)
        wait_for(lambda: _metrics_events(store, c["id"]), 240, "job c to train")
        os.kill(worker.child.pid, signal.SIGKILL)  # a training crash (OOM killer, segfault ...)
        failed = wait_for(lambda: (j := store.job(c["id"]))["status"] == "failed" and j, 60, "the failure")
        assert failed["error"]["code"] == "training_crashed" and "-9" in failed["error"]["message"]
        assert thread.is_alive()  # the worker goes on
        # the next job starts from job a's model (an adapter: merged once into a whole model)
        d = jobs.create_job(store, pid, _body(f["id"], model=done["fine_tuned_model"], hyperparameters={"n_epochs": 1},
                                              tunesmith={"train": {"max_steps": 2}}), data_dir)
        after = wait_for(lambda: (j := store.job(d["id"]))["status"] in ("succeeded", "failed") and j, 240, "job d")
        assert after["status"] == "succeeded", after["error"]
        assert (data_dir / done["run_dir"] / "merged" / "config.json").is_file()
        assert after["fine_tuned_model"].startswith("ft:tiny:alice::")

        # a worker that lost its lease without dying: its training stops writing; the job is resumed
        e = jobs.create_job(store, pid, _body(f["id"], **slow), data_dir)
        wait_for(lambda: _metrics_events(store, e["id"]), 240, "job e to train")
        child = worker.child.pid
        with store.engine.begin() as conn:  # as if another worker had claimed it
            conn.execute(job_table.update().where(job_table.c.id == e["id"]).values(worker_id="someone-else"))
        wait_for(lambda: worker.child is None or worker.child.pid != child, 60, "the training to stop")
        resumed = wait_for(lambda: (j := store.job(e["id"]))["status"] in ("succeeded", "failed") and j, 300, "job e")
        assert resumed["status"] == "succeeded" and resumed["attempts"] == 2
        assert [m["data"]["step"] for m in _metrics_events(store, e["id"])] == list(range(2, 81, 2))
    finally:
        stop.set()
        thread.join(60)
