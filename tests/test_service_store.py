"""The service's store on SQLite (the default) and on a real PostgreSQL: migrations, project
scoping, pagination, job state moves, atomic claims, leases, events and checkpoints."""
from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from tests.pg import temp_database
from tunesmith.service.store import Store, StoreError, database_url, metadata


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"store-{request.param}")
    if request.param == "sqlite":
        store = Store(None, data_dir)
        store.migrate()
        yield store
        store.close()
        return
    with temp_database("ts_store") as url:
        store = Store(url, data_dir)
        store.migrate()
        yield store
        store.close()


@pytest.fixture
def store(backend):
    with backend.engine.begin() as c:  # each test starts from empty tables
        for t in reversed(metadata.sorted_tables):
            c.execute(t.delete())
    return backend


def test_urls_and_migrations(store, tmp_path):
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/service.db"
    assert database_url("postgresql://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    assert database_url("postgresql+psycopg://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    store.migrate()  # a second start: nothing to do, nothing broken
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        names = set(sa.inspect(c).get_table_names())
    assert {"projects", "api_keys", "files", "jobs", "events", "checkpoints"} <= names
    if not store.postgres:
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_upgrade_from_the_first_schema_keeps_rows(tmp_path):
    """A database made by an older tunesmith (migration 0001) upgrades in place at the next start."""
    from tunesmith.service.migrations import upgrade

    old = Store(None, tmp_path)
    upgrade(old.engine, "0001")
    with old.engine.begin() as c:
        c.execute(sa.text("INSERT INTO projects (id, name, created_at) VALUES ('proj_1', 'p', 1)"))
    old.migrate()
    assert old.project("proj_1")["name"] == "p"
    with old.engine.connect() as c:
        assert "model_deleted_at" in {col["name"] for col in sa.inspect(c).get_columns("jobs")}
    old.close()


def test_concurrent_first_start_migrates_once(tmp_path):
    """Several processes starting on a fresh SQLite file (the service and its workers) must not
    both create the tables."""
    stores = [Store(None, tmp_path) for _ in range(4)]
    errors: list[BaseException] = []

    def go(s):
        try:
            s.migrate()
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    project, _ = stores[0].add_key("p")
    assert project["id"].startswith("proj_")
    [s.close() for s in stores]


def test_keys(store):
    project, key = store.add_key("alice")
    assert key.startswith("sk-ts-") and len(key) > 40
    assert store.project_for_key(key) == project
    assert store.project_for_key(key + "x") is None
    with pytest.raises(StoreError, match="already has an active key"):
        store.add_key("alice")
    listed = store.list_keys()
    assert [k["name"] for k in listed] == ["alice"]
    assert key not in str(listed) and listed[0]["prefix"] == key[:10]
    assert [k["name"] for k in store.revoke_key("alice")] == ["alice"]
    assert store.project_for_key(key) is None
    with pytest.raises(StoreError, match="no active key"):
        store.revoke_key("alice")
    again, key2 = store.add_key("alice")  # a new key for the same project: its jobs stay its own
    assert again["id"] == project["id"] and store.project_for_key(key2) == project


def test_files_are_scoped_and_paged(store):
    a, _ = store.add_key("a")
    b, _ = store.add_key("b")
    made = []
    for i in range(5):
        made.append(store.add_file(a["id"], f"f{i}.jsonl", "fine-tune", 100 + i, f"files/x{i}"))
        time.sleep(0.01)
    other = store.add_file(b["id"], "b.jsonl", "fine-tune", 1, "files/b")
    assert store.get_file(a["id"], other["id"]) is None and store.get_file(b["id"], other["id"])["bytes"] == 1
    ids = [f["id"] for f in store.list_files(a["id"])]
    assert set(ids) == {f["id"] for f in made} and other["id"] not in ids
    page1 = store.list_files(a["id"], limit=2)
    page2 = store.list_files(a["id"], after=page1[-1]["id"], limit=10)
    assert [f["id"] for f in page1 + page2] == ids  # the pages join up, no gap, no repeat
    asc = [f["id"] for f in store.list_files(a["id"], order="asc")]
    assert asc == ids[::-1]
    assert store.list_files(a["id"], after=other["id"]) == []  # another project's id is no cursor
    store.update_file(made[0]["id"], status="processed", info={"n_examples": 10})
    assert store.get_file(a["id"], made[0]["id"])["info"] == {"n_examples": 10}
    assert not store.delete_file(b["id"], made[0]["id"])
    assert store.delete_file(a["id"], made[0]["id"]) and store.get_file(a["id"], made[0]["id"]) is None


def test_lists_keep_insertion_order_within_one_second(store, monkeypatch):
    """created_at has one-second resolution: 30 files and 30 jobs made in the same second must come
    back newest first in the order they were made, and `after` pages must join up exactly."""
    import tunesmith.service.store as store_mod

    monkeypatch.setattr(store_mod, "now", lambda: 1_700_000_000)  # every row in the same second
    a, _ = store.add_key("a")
    made_files = [store.add_file(a["id"], f"f{i}.jsonl", "fine-tune", i, f"files/x{i}")["id"] for i in range(30)]
    made_jobs = [_job(store, a["id"])["id"] for _ in range(30)]
    assert [f["id"] for f in store.list_files(a["id"])] == made_files[::-1]
    assert [f["id"] for f in store.list_files(a["id"], order="asc")] == made_files
    paged, after = [], None
    while True:
        page = store.list_files(a["id"], after=after, limit=8)
        paged += [f["id"] for f in page]
        if len(page) < 8:
            break
        after = page[-1]["id"]
    assert paged == made_files[::-1]
    paged, after, more = [], None, True
    while more:
        rows, more = store.list_jobs(a["id"], after=after, limit=7)
        paged += [r["id"] for r in rows]
        after = rows[-1]["id"]
    assert paged == made_jobs[::-1]
    # a page taken, then newer jobs arrive: the next page continues where the first stopped
    first, _ = store.list_jobs(a["id"], limit=5)
    newer = [_job(store, a["id"])["id"] for _ in range(3)]
    rest, _ = store.list_jobs(a["id"], after=first[-1]["id"], limit=100)
    assert [r["id"] for r in first + rest] == made_jobs[::-1] and newer[0] not in {r["id"] for r in rest}
    claimed = store.claim("w", 30)  # the oldest queued job first, by insertion
    assert claimed["id"] == made_jobs[0]


def test_upgrade_numbers_existing_rows_in_creation_order(tmp_path):
    """Migration 0003 gives the rows of an older database seq in (created_at, id) order."""
    from tunesmith.service.migrations import upgrade

    old = Store(None, tmp_path)
    upgrade(old.engine, "0002")
    with old.engine.begin() as c:
        for id_, t in (("file-b", 5), ("file-a", 5), ("file-c", 3)):
            c.execute(sa.text("INSERT INTO files (id, project_id, filename, purpose, bytes, created_at, status, path) "
                              "VALUES (:id, 'p', 'f', 'fine-tune', 1, :t, 'processed', 'files/f')"), {"id": id_, "t": t})
    old.migrate()
    assert [f["id"] for f in old.list_files("p", order="asc")] == ["file-c", "file-a", "file-b"]
    new = old.add_file("p", "g", "fine-tune", 1, "files/g")
    assert old.list_files("p")[0]["id"] == new["id"]
    old.close()


def _job(store, project_id, **cols):
    return store.add_job(project_id, model="builtin:tiny", training_file="file-x", seed=1, **cols)


def test_jobs_list_pages_and_metadata(store):
    a, _ = store.add_key("a")
    b, _ = store.add_key("b")
    jobs = [_job(store, a["id"], metadata={"team": "x" if i % 2 else "y"}) for i in range(5)]
    _job(store, b["id"])
    rows, more = store.list_jobs(a["id"], limit=3)
    assert more and len(rows) == 3
    rest, more2 = store.list_jobs(a["id"], after=rows[-1]["id"], limit=3)
    assert not more2 and {r["id"] for r in rows + rest} == {j["id"] for j in jobs}
    xs, _ = store.list_jobs(a["id"], metadata={"team": "x"})
    assert sorted(r["id"] for r in xs) == sorted(j["id"] for j in jobs[1::2])
    assert store.get_job(b["id"], jobs[0]["id"]) is None
    assert store.get_job(a["id"], jobs[0]["id"])["result_files"] == []


def test_state_moves(store):
    p, _ = store.add_key("a")
    j = _job(store, p["id"])
    assert store.request(p["id"], j["id"], "pause")["status"] == "paused"
    with pytest.raises(StoreError, match="cannot pause a job that is paused"):
        store.request(p["id"], j["id"], "pause")
    assert store.request(p["id"], j["id"], "resume")["status"] == "queued"
    claimed = store.claim("w1", 30)
    assert claimed["id"] == j["id"] and claimed["status"] == "running"
    r = store.request(p["id"], j["id"], "pause")
    assert (r["status"], r["requested"]) == ("running", "pause")  # the worker acts on it
    assert store.request(p["id"], j["id"], "resume")["requested"] is None
    assert store.request(p["id"], j["id"], "cancel")["requested"] == "cancel"
    with pytest.raises(StoreError, match="cancel requested"):
        store.request(p["id"], j["id"], "pause")
    assert store.finish(j["id"], "w1", "cancelled")
    done = store.get_job(p["id"], j["id"])
    assert done["status"] == "cancelled" and done["finished_at"] and done["worker_id"] is None
    with pytest.raises(StoreError, match="cannot cancel a job that is cancelled"):
        store.request(p["id"], j["id"], "cancel")
    other, _ = store.add_key("b")
    with pytest.raises(StoreError, match="no fine-tuning job") as e:
        store.request(other["id"], j["id"], "cancel")
    assert e.value.code == "not_found"


def test_claim_lease_heartbeat(store):
    p, _ = store.add_key("a")
    first = _job(store, p["id"])
    time.sleep(1.1)  # created_at is whole seconds: the second job is younger
    second = _job(store, p["id"])
    got = store.claim("w1", lease_s=0.5)
    assert got["id"] == first["id"] and got["attempts"] == 1 and got["worker_id"] == "w1"
    assert store.heartbeat(first["id"], "w1", 0.5)
    assert not store.heartbeat(first["id"], "w2", 0.5)
    assert store.claim("w2", 5)["id"] == second["id"]
    assert store.claim("w3", 5) is None  # nothing queued, no lease ran out
    time.sleep(0.7)  # w1 stopped heart-beating: its lease ran out, the job goes to the next claimer
    again = store.claim("w3", 5)
    assert again["id"] == first["id"] and again["attempts"] == 2 and again["started_at"] == got["started_at"]
    assert not store.heartbeat(first["id"], "w1", 5)  # w1 learns it lost the job
    assert not store.finish(first["id"], "w1", "succeeded")  # and cannot finish it
    assert not store.update_job(first["id"], "w1", total_steps=3)
    assert store.update_job(first["id"], "w3", total_steps=3)
    assert store.finish(first["id"], "w3", "succeeded", fine_tuned_model="ft:x", trained_tokens=12)
    row = store.job(first["id"])
    assert (row["status"], row["fine_tuned_model"], row["trained_tokens"], row["lease_until"]) == ("succeeded", "ft:x", 12, None)
    assert store.job_for_model(p["id"], "ft:x")["id"] == first["id"]
    assert [j["id"] for j in store.succeeded_jobs()] == [first["id"]]
    other, _ = store.add_key("b")
    assert not store.delete_model(other["id"], "ft:x")  # another project's model: no
    assert store.delete_model(p["id"], "ft:x") and not store.delete_model(p["id"], "ft:x")
    assert store.succeeded_jobs() == [] and store.job_for_model(p["id"], "ft:x") is None
    assert store.job(first["id"])["status"] == "succeeded"


def test_concurrent_claims_take_each_job_once(store):
    """8 threads (each its own connections) race for 12 jobs: every job is claimed exactly once."""
    p, _ = store.add_key("a")
    ids = {_job(store, p["id"])["id"] for _ in range(12)}
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        s = Store(store.url, store.data_dir)
        start.wait()
        while (job := s.claim(f"w{n}", 60)) is not None:
            with lock:
                claimed.append((job["id"], f"w{n}"))
        s.close()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(j for j, _ in claimed) == sorted(ids)
    for job_id, w in claimed:
        assert store.job(job_id)["worker_id"] == w


def test_events_and_checkpoints(store):
    p, _ = store.add_key("a")
    j = _job(store, p["id"])
    for step in range(1, 7):
        store.add_event(j["id"], "info", f"step {step}", type="metrics", data={"step": step}, step=step)
    rows, more = store.list_events(j["id"], limit=4)
    assert more and [r["data"]["step"] for r in rows] == [6, 5, 4, 3]  # newest first
    older, more = store.list_events(j["id"], after=rows[-1]["id"], limit=4)
    assert not more and [r["data"]["step"] for r in older] == [2, 1]
    assert [r["seq"] for r in rows + older] == [6, 5, 4, 3, 2, 1]
    for step in (2, 4, 6):
        store.add_checkpoint(j["id"], step, {"valid_loss": 1.0 / step}, f"runs/x/checkpoints/step-{step}", f"ft:x:ckpt-step-{step}")
    store.add_checkpoint(j["id"], 6, {"valid_loss": 0.1}, "runs/x/checkpoints/step-6", "ft:x:ckpt-step-6")  # replaced
    cks, more = store.list_checkpoints(j["id"], limit=2)
    assert more and [c["step"] for c in cks] == [6, 4] and cks[0]["metrics"] == {"valid_loss": 0.1}
    assert store.checkpoint_by_name(j["id"], "ft:x:ckpt-step-4")["step"] == 4
    # a worker died after step 6; the next resumes from the checkpoint at step 4
    assert store.rewind(j["id"], 4) == (2, 1)
    assert [r["data"]["step"] for r in store.list_events(j["id"], limit=50)[0]] == [4, 3, 2, 1]
    assert [c["step"] for c in store.list_checkpoints(j["id"])[0]] == [4, 2]
    assert store.add_event(j["id"], "info", "resumed")["seq"] == 5


def test_concurrent_events_get_distinct_seqs(store):
    p, _ = store.add_key("a")
    j = _job(store, p["id"])

    def writer(n: int) -> None:
        s = Store(store.url, store.data_dir)
        for i in range(10):
            s.add_event(j["id"], "info", f"{n}-{i}")
        s.close()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    rows, _ = store.list_events(j["id"], limit=100)
    assert sorted(r["seq"] for r in rows) == list(range(1, 41))


def test_keys_cli(tmp_path, capsys):
    from tunesmith.cli import run

    args = ["--data-dir", str(tmp_path)]
    assert run(["keys", "add", "team-a", *args]) == 0
    key = capsys.readouterr().out.split()[0]
    store = Store(None, tmp_path)
    assert store.project_for_key(key)["name"] == "team-a"
    assert run(["keys", "list", *args]) == 0
    listed = capsys.readouterr().out
    assert "team-a" in listed and "active" in listed and key not in listed
    assert run(["keys", "revoke", "team-a", *args]) == 0
    assert store.project_for_key(key) is None
    store.close()


def test_a_named_model_may_be_a_builtin_alias(tmp_path):
    """`tunesmith service --model smol=builtin:SmolLM2-135M-Instruct`: the name resolves to the alias,
    not to a folder called 'builtin:...' under the working directory; a request path is refused."""
    from tunesmith.service.jobs import resolve_model

    models = {"smol": "builtin:SmolLM2-135M-Instruct", "local": str(tmp_path / "m")}
    assert resolve_model(None, "p", "smol", tmp_path, models) == {"builtin": "builtin:SmolLM2-135M-Instruct"}
    assert resolve_model(None, "p", "local", tmp_path, models) == {"path": str(tmp_path / "m")}
    with pytest.raises(StoreError, match="not available"):
        resolve_model(None, "p", "/etc", tmp_path, models)
