"""The service's tables and the only code that talks SQL.

SQLAlchemy Core, the same statements on SQLite (the embedded default, WAL mode) and PostgreSQL
(several workers on several machines). The schema is created and upgraded by alembic
(migrations/), run by `Store.migrate()` at startup. Rows go in and out as plain dicts.

Every write that must be atomic is ONE conditional statement (UPDATE ... WHERE status = ...,
INSERT ... SELECT max(seq) + 1): on SQLite a single statement holds the database's write lock
for its whole run, on PostgreSQL a row lock, so two workers or two requests can never both win.
Claiming a job adds `FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent claimers pass over a
row another one is taking instead of queueing behind it (SQLite has one writer anyway).
"""
from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tunesmith.errors import TunesmithError
from tunesmith.service import keys as keymod

metadata = sa.MetaData()

projects = sa.Table(
    "projects", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", sa.Integer, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("revoked_at", sa.Integer, nullable=True),
)

files = sa.Table(
    "files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.String(64), nullable=False, index=True),
    sa.Column("filename", sa.String(1000), nullable=False),
    sa.Column("purpose", sa.String(64), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),  # uploaded | processed | error
    sa.Column("status_details", sa.Text, nullable=True),
    sa.Column("path", sa.String(1000), nullable=False),  # relative to the data dir
    sa.Column("info", sa.JSON, nullable=True),  # format, n_examples, n_tokens ...
    # Insertion order, for the list endpoints (created_at has one-second resolution); migration 0003
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.String(64), nullable=False, index=True),
    sa.Column("model", sa.String(1000), nullable=False),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Integer, nullable=True),
    sa.Column("finished_at", sa.Integer, nullable=True),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64), nullable=True),
    sa.Column("method", sa.JSON, nullable=False),
    sa.Column("hyperparameters", sa.JSON, nullable=False),
    sa.Column("tunesmith", sa.JSON, nullable=False),  # the resolved tunesmith RunConfig sections
    sa.Column("suffix", sa.String(64), nullable=True),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("fine_tuned_model", sa.String(1000), nullable=True, index=True),
    sa.Column("error", sa.JSON, nullable=True),  # {code, message, param}
    sa.Column("result_files", sa.JSON, nullable=False),
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("estimated_finish", sa.Integer, nullable=True),
    sa.Column("run_dir", sa.String(1000), nullable=True),  # relative to the data dir
    sa.Column("worker_id", sa.String(200), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),  # unix seconds, on the database's clock
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("requested", sa.String(16), nullable=True),  # cancel | pause, acted on by the worker
    sa.Column("total_steps", sa.Integer, nullable=True),
    sa.Column("webhook", sa.JSON, nullable=True),  # {url, secret}: optional, per job
    sa.Column("model_deleted_at", sa.Integer, nullable=True),  # DELETE /v1/models/{ft:...} (migration 0002)
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),  # insertion order, as files.seq (migration 0003)
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),  # info | warn | error
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),  # message | metrics
    sa.Column("data", sa.JSON, nullable=True),
    # The training step the event belongs to (metrics: its step; messages: the last step reached):
    # a run resumed from step S drops the rows past S, as the train loop drops its log lines.
    sa.Column("step", sa.Integer, nullable=True),
    sa.UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("path", sa.String(1000), nullable=False),  # relative to the data dir
    sa.Column("fine_tuned_model_checkpoint", sa.String(1000), nullable=False),
    sa.UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),
)

# Where a job may go from where (the API's cancel / pause / resume). A running job is not
# changed at once: `requested` tells its worker, which stops training at the next step boundary.
TERMINAL = ("succeeded", "failed", "cancelled")


class StoreError(TunesmithError):
    """A request the job's state does not allow (e.g. resuming a job that is not paused).

    `param` names the request field for the API's error envelope."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def new_id(prefix: str, nbytes: int = 12) -> str:
    """OpenAI-style ids: 'ftjob-' + 24 hex characters (projects: 'proj_' + 16)."""
    return prefix + secrets.token_hex(nbytes)


def now() -> int:
    return int(time.time())


def database_url(url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL: SQLite in the data dir by default; plain postgresql:// URLs use psycopg 3."""
    if not url:
        return f"sqlite:///{(Path(data_dir) / 'service.db').resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            # WAL: readers never wait for the writer (the API answers while a worker writes events)
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, fast commits
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _row(r: sa.Row | None) -> dict[str, Any] | None:
    return dict(r._mapping) if r is not None else None


class Store:
    """The service's tables. One Store per process; it is thread-safe (a connection per call).

    Args:
        url: a SQLAlchemy URL, or a plain postgresql://user@host/db; None -> SQLite at
            DATA_DIR/service.db.
        data_dir: the service's data folder (files, runs, the SQLite database).
    """

    def __init__(self, url: str | None, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.url = database_url(url, self.data_dir)
        if self.url.startswith("sqlite"):
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.url)
        self.postgres = self.engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)})"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ---- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Create or upgrade the tables to the newest migration (safe to call at every start,
        from several processes at once: PostgreSQL serialises them with an advisory lock, SQLite
        with its write lock)."""
        from tunesmith.service.migrations import upgrade

        upgrade(self.engine)

    def _next_seq(self, table: sa.Table) -> dict[str, Any]:
        """The `seq` of a row being inserted: PostgreSQL's sequence fills it (the column's default,
        migration 0003); on SQLite max + 1, computed inside the INSERT under its one writer lock."""
        if self.postgres:
            return {}
        return {"seq": sa.select(sa.func.coalesce(sa.func.max(table.c.seq), 0) + 1).scalar_subquery()}

    # ---- projects and keys ----------------------------------------------------------------------

    def add_key(self, name: str) -> tuple[dict, str]:
        """A new API key for project `name` (made if new). Returns (project, plaintext key): the
        key is shown once; only its hash is stored. A name has at most one active key."""
        if not name or len(name) > 200:
            raise StoreError("a key name is 1 to 200 characters", param="name")
        key = keymod.new_key()
        with self._tx() as c:
            project = _row(c.execute(sa.select(projects).where(projects.c.name == name)).first())
            if project is None:
                project = {"id": new_id("proj_", 8), "name": name, "created_at": now()}
                c.execute(projects.insert().values(**project))
            active = c.execute(sa.select(api_keys.c.id).where(api_keys.c.project_id == project["id"],
                                                              api_keys.c.revoked_at.is_(None))).first()
            if active is not None:
                raise StoreError(f"project {name!r} already has an active key ({active.id}); "
                                 f"revoke it first (tunesmith keys revoke {name})", param="name")
            c.execute(api_keys.insert().values(id=new_id("key_", 8), project_id=project["id"], name=name,
                                               key_hash=keymod.hash_key(key), prefix=keymod.key_prefix(key),
                                               created_at=now()))
        return project, key

    def project(self, id: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(projects).where(projects.c.id == id)).first())

    def project_for_key(self, key: str) -> dict | None:
        """The project an active key belongs to, or None (unknown or revoked key)."""
        q = (sa.select(projects).join(api_keys, api_keys.c.project_id == projects.c.id)
             .where(api_keys.c.key_hash == keymod.hash_key(key), api_keys.c.revoked_at.is_(None)))
        with self.engine.connect() as c:
            return _row(c.execute(q).first())

    def list_keys(self) -> list[dict]:
        """Every key (revoked too), oldest first, with its project; never a hash or a key."""
        q = (sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.prefix, api_keys.c.created_at,
                       api_keys.c.revoked_at, api_keys.c.project_id)
             .order_by(api_keys.c.created_at, api_keys.c.id))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def revoke_key(self, name_or_id: str) -> list[dict]:
        """Revoke the active key with this id, or the active key(s) of this project name.
        Returns the revoked keys; raises StoreError when there is none."""
        cond = sa.or_(api_keys.c.id == name_or_id, api_keys.c.name == name_or_id)
        with self._tx() as c:
            rows = c.execute(api_keys.update().where(cond, api_keys.c.revoked_at.is_(None)).values(revoked_at=now())
                             .returning(api_keys.c.id, api_keys.c.name, api_keys.c.prefix)).all()
        if not rows:
            raise StoreError(f"no active key named or with id {name_or_id!r} (see tunesmith keys list)",
                             param="name")
        return [dict(r._mapping) for r in rows]

    # ---- files ----------------------------------------------------------------------------------

    def add_file(self, project_id: str, filename: str, purpose: str, bytes: int, path: str,
                 **cols: Any) -> dict:
        row = {"id": new_id("file-"), "project_id": project_id, "filename": filename, "purpose": purpose,
               "bytes": bytes, "created_at": now(), "status": "uploaded", "status_details": None, "path": path,
               "info": None, **cols}
        with self._tx() as c:
            c.execute(files.insert().values(**row, **self._next_seq(files)))
        return row

    def update_file(self, id: str, **cols: Any) -> dict | None:
        with self._tx() as c:
            return _row(c.execute(files.update().where(files.c.id == id).values(**cols).returning(files)).first())

    def get_file(self, project_id: str, id: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(files).where(files.c.id == id, files.c.project_id == project_id)).first())

    def list_files(self, project_id: str, purpose: str | None = None, after: str | None = None,
                   limit: int = 10000, order: str = "desc") -> list[dict]:
        """The project's files, newest first ('desc') or oldest first ('asc'); `after`: a file id,
        the page continues past it. Ask for limit + 1 to learn whether there are more."""
        q = sa.select(files).where(files.c.project_id == project_id)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        with self.engine.connect() as c:
            q = _page(c, q, files, after, order, extra=(files.c.project_id == project_id))
            return [dict(r._mapping) for r in c.execute(q.limit(limit))]

    def delete_file(self, project_id: str, id: str) -> bool:
        with self._tx() as c:
            return c.execute(files.delete().where(files.c.id == id, files.c.project_id == project_id)).rowcount == 1

    # ---- jobs -----------------------------------------------------------------------------------

    def add_job(self, project_id: str, messages: tuple[str, ...] | list[str] = (), **cols: Any) -> dict:
        """Insert a job (status 'queued' unless given) and its first info events (`messages`, in one
        transaction: a commit per event was a third of a job create's time on SQLite, and each is
        a round trip and a WAL flush on PostgreSQL); `cols` fill the other columns."""
        row = {"id": new_id("ftjob-"), "project_id": project_id, "status": "queued", "created_at": now(),
               "result_files": [], "attempts": 0, "method": {}, "hyperparameters": {}, "tunesmith": {},
               "seed": 0, **cols}
        with self._tx() as c:
            c.execute(jobs.insert().values(**row, **self._next_seq(jobs)))
            for seq, message in enumerate(messages, 1):  # a new job has no events yet: seq 1, 2 ...
                c.execute(events.insert().values(id=new_id("ftevent-"), job_id=row["id"], seq=seq, created_at=row["created_at"],
                                                 level="info", message=message, type="message", data=None, step=None))
            return _row(c.execute(sa.select(jobs).where(jobs.c.id == row["id"])).first())

    def get_job(self, project_id: str, id: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(jobs).where(jobs.c.id == id, jobs.c.project_id == project_id)).first())

    def job(self, id: str) -> dict | None:
        """A job by id whatever its project: for workers and the service's own bookkeeping, never
        for an API request (those go through get_job with the caller's project)."""
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(jobs).where(jobs.c.id == id)).first())

    def list_jobs(self, project_id: str, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        """The project's jobs newest first; `after`: a job id; `metadata`: every key/value must match.
        Returns (rows, has_more)."""
        out: list[dict] = []
        with self.engine.connect() as c:
            q = _page(c, sa.select(jobs).where(jobs.c.project_id == project_id), jobs, after, "desc",
                      extra=(jobs.c.project_id == project_id))
            if not metadata:  # without a filter, only the page: psycopg fetched every job of the project
                q = q.limit(limit + 1)
            # JSON filtering differs per dialect; a project's job list is small, so filter here.
            for r in c.execute(q).mappings():
                meta = r["metadata"] or {}
                if metadata and any(meta.get(k) != v for k, v in metadata.items()):
                    continue
                out.append(dict(r))
                if len(out) > limit:
                    break
        return out[:limit], len(out) > limit

    def job_for_model(self, project_id: str, fine_tuned_model: str) -> dict | None:
        """The project's job that produced `fine_tuned_model` (an ft: name, not deleted), or None."""
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(jobs).where(jobs.c.project_id == project_id,
                                                        jobs.c.fine_tuned_model == fine_tuned_model,
                                                        jobs.c.model_deleted_at.is_(None))).first())

    def succeeded_jobs(self) -> list[dict]:
        """Every project's succeeded jobs whose model is not deleted (what the inference side serves),
        oldest first."""
        with self.engine.connect() as c:
            q = (sa.select(jobs).where(jobs.c.status == "succeeded", jobs.c.model_deleted_at.is_(None))
                 .order_by(jobs.c.finished_at, jobs.c.id))
            return [dict(r._mapping) for r in c.execute(q)]

    def delete_model(self, project_id: str, fine_tuned_model: str) -> bool:
        """Mark the project's ft: model deleted (the job and its files stay). False when there is no
        such model, or it is already deleted."""
        with self._tx() as c:
            r = c.execute(jobs.update().where(jobs.c.project_id == project_id, jobs.c.fine_tuned_model == fine_tuned_model,
                                              jobs.c.model_deleted_at.is_(None)).values(model_deleted_at=now()))
            return r.rowcount == 1

    def request(self, project_id: str, id: str, what: str) -> dict:
        """cancel / pause / resume a job. Jobs that no worker runs change at once (queued ->
        cancelled or paused, paused -> queued); a running one gets `requested`, which its worker
        sees at the next heartbeat. Returns the job; raises StoreError for a move its state forbids."""
        j = jobs.c
        mine = (j.id == id) & (j.project_id == project_id)
        if what == "cancel":
            moves = [((j.status.in_(("validating_files", "queued", "paused"))),
                      {"status": "cancelled", "finished_at": now(), "requested": None}),
                     ((j.status == "running"), {"requested": "cancel"})]
        elif what == "pause":
            # not while validating_files: a resume would queue a job whose files were never validated
            moves = [((j.status == "queued"), {"status": "paused"}),
                     ((j.status == "running") & (j.requested.is_(None) | (j.requested == "pause")),
                      {"requested": "pause"})]
        elif what == "resume":
            moves = [((j.status == "paused"), {"status": "queued", "requested": None}),
                     ((j.status == "running") & (j.requested == "pause"), {"requested": None})]
        else:
            raise ValueError(f"unknown request {what!r}")
        with self._tx() as c:
            for cond, values in moves:
                row = c.execute(jobs.update().where(mine, cond).values(**values).returning(jobs)).first()
                if row is not None:
                    return dict(row._mapping)
            job = _row(c.execute(sa.select(jobs).where(mine)).first())
        if job is None:
            raise StoreError(f"no fine-tuning job {id!r}", code="not_found", param="fine_tuning_job_id")
        state = job["status"] + (f" ({job['requested']} requested)" if job["requested"] else "")
        raise StoreError(f"cannot {what} a job that is {state}", code="invalid_state")

    def end_validation(self, job_id: str, error: dict | None = None) -> dict | None:
        """A job's files were validated: validating_files -> queued, or with `error` -> failed.
        A job cancelled meanwhile stays cancelled. Returns the job row after the move."""
        j = jobs.c
        values = {"status": "queued"} if error is None else {"status": "failed", "error": error, "finished_at": now()}
        with self._tx() as c:
            row = c.execute(jobs.update().where(j.id == job_id, j.status == "validating_files").values(**values)
                            .returning(jobs)).first()
            return dict(row._mapping) if row is not None else _row(c.execute(sa.select(jobs).where(j.id == job_id)).first())

    def jobs_validating(self) -> list[dict]:
        """Every project's jobs still in validating_files (a service that stopped mid-validation)."""
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(jobs).where(jobs.c.status == "validating_files")
                                                        .order_by(jobs.c.seq))]

    # ---- the worker side -------------------------------------------------------------------------

    def _clock(self):
        """The database's clock in unix seconds, as SQL: leases are set and compared on one clock,
        so workers on machines whose clocks disagree still see each other's leases right."""
        if self.postgres:
            return sa.func.extract("epoch", sa.func.clock_timestamp())
        return (sa.func.julianday("now") - 2440587.5) * 86400.0

    def claim(self, worker_id: str, lease_s: float) -> dict | None:
        """Atomically take the oldest queued job, or a running one whose worker's lease ran out
        (that worker died: resume it). Sets worker_id, the lease, status running, attempts + 1.
        Returns the claimed job, or None when there is nothing to do."""
        t = time.time()
        clock = self._clock()
        claimable = sa.or_(jobs.c.status == "queued", (jobs.c.status == "running") & (jobs.c.lease_until < clock))
        pick = (sa.select(jobs.c.id).where(claimable).order_by(jobs.c.seq).limit(1)
                .with_for_update(skip_locked=True))  # PostgreSQL only; SQLite's compiler leaves it out
        stmt = (jobs.update().where(jobs.c.id == pick.scalar_subquery(), claimable)
                .values(status="running", worker_id=worker_id, lease_until=clock + lease_s, attempts=jobs.c.attempts + 1,
                        started_at=sa.func.coalesce(jobs.c.started_at, int(t)))
                .returning(jobs))
        with self._tx() as c:
            return _row(c.execute(stmt).first())

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend this worker's lease; False when the job is no longer this worker's (its lease ran
        out and another worker took it, or it was finished): the caller must stop at once."""
        with self._tx() as c:
            r = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker_id == worker_id,
                                              jobs.c.status == "running")
                          .values(lease_until=self._clock() + lease_s))
            return r.rowcount == 1

    def update_job(self, job_id: str, worker_id: str | None = None, **cols: Any) -> bool:
        """Set columns of a job (run_dir, total_steps, estimated_finish ...); with `worker_id`, only
        while that worker holds it. Returns whether a row changed."""
        cond = jobs.c.id == job_id
        if worker_id is not None:
            cond = cond & (jobs.c.worker_id == worker_id) & (jobs.c.status == "running")
        with self._tx() as c:
            return c.execute(jobs.update().where(cond).values(**cols)).rowcount == 1

    def finish(self, job_id: str, worker_id: str, status: str, **cols: Any) -> bool:
        """Release a job this worker holds: a terminal status (succeeded/failed/cancelled, sets
        finished_at), or back to 'paused'/'queued'. False when the worker no longer held it."""
        values = {"status": status, "worker_id": None, "lease_until": None, "requested": None,
                  "estimated_finish": None, **cols}
        if status in TERMINAL:
            values.setdefault("finished_at", now())
        with self._tx() as c:
            r = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker_id == worker_id,
                                              jobs.c.status == "running").values(**values))
            return r.rowcount == 1

    # ---- events and checkpoints ------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, type: str = "message", data: dict | None = None,
                  step: int | None = None) -> dict:
        """Append an event; its seq is the job's next (one INSERT ... SELECT, retried on the rare
        collision of two writers)."""
        for attempt in range(20):
            row = {"id": new_id("ftevent-"), "job_id": job_id, "created_at": now(), "level": level,
                   "message": message, "type": type, "data": data, "step": step}
            next_seq = (sa.select(sa.func.coalesce(sa.func.max(events.c.seq), 0) + 1)
                        .where(events.c.job_id == job_id).scalar_subquery())
            try:
                with self._tx() as c:
                    seq = c.execute(events.insert().values(**row, seq=next_seq).returning(events.c.seq)).scalar_one()
                return row | {"seq": seq}
            except sa.exc.IntegrityError:
                time.sleep(0.01 * (attempt + 1))
        raise TunesmithError(f"could not append an event to {job_id}: the sequence kept colliding")

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first (as OpenAI lists them); `after`: an event id, the page continues with older ones."""
        q = sa.select(events).where(events.c.job_id == job_id)
        with self.engine.connect() as c:
            if after:
                seq = c.execute(sa.select(events.c.seq).where(events.c.id == after, events.c.job_id == job_id)).scalar()
                if seq is None:
                    return [], False
                q = q.where(events.c.seq < seq)
            rows = [dict(r._mapping) for r in c.execute(q.order_by(events.c.seq.desc()).limit(limit + 1))]
        return rows[:limit], len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str, name: str) -> dict:
        """Record a checkpoint (path relative to the data dir; name: its ft:...:ckpt-step-N model).
        A second call for the same step replaces the first (a resumed run re-saving it)."""
        row = {"job_id": job_id, "step": step, "created_at": now(), "metrics": metrics, "path": path,
               "fine_tuned_model_checkpoint": name}
        with self._tx() as c:
            old = c.execute(sa.select(checkpoints.c.id).where(checkpoints.c.job_id == job_id,
                                                              checkpoints.c.step == step)).scalar()
            if old is not None:
                c.execute(checkpoints.update().where(checkpoints.c.id == old).values(**row))
                return row | {"id": old}
            row["id"] = new_id("ftckpt-")
            c.execute(checkpoints.insert().values(**row))
        return row

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """Newest (highest step) first; `after`: a checkpoint id."""
        q = sa.select(checkpoints).where(checkpoints.c.job_id == job_id)
        with self.engine.connect() as c:
            if after:
                step = c.execute(sa.select(checkpoints.c.step).where(checkpoints.c.id == after,
                                                                     checkpoints.c.job_id == job_id)).scalar()
                if step is None:
                    return [], False
                q = q.where(checkpoints.c.step < step)
            rows = [dict(r._mapping) for r in c.execute(q.order_by(checkpoints.c.step.desc()).limit(limit + 1))]
        return rows[:limit], len(rows) > limit

    def checkpoint_by_name(self, job_id: str, name: str) -> dict | None:
        with self.engine.connect() as c:
            return _row(c.execute(sa.select(checkpoints).where(
                checkpoints.c.job_id == job_id, checkpoints.c.fine_tuned_model_checkpoint == name)).first())

    def rewind(self, job_id: str, step: int) -> tuple[int, int]:
        """Forget what a lost attempt wrote past `step` (the checkpoint it resumes from): events
        and checkpoint rows with a higher step. The resumed run writes them again, once.
        Returns (events deleted, checkpoints deleted)."""
        with self._tx() as c:
            ne = c.execute(events.delete().where(events.c.job_id == job_id, events.c.step > step)).rowcount
            nc = c.execute(checkpoints.delete().where(checkpoints.c.job_id == job_id,
                                                      checkpoints.c.step > step)).rowcount
        return ne, nc

    def delete_checkpoints(self, job_id: str, steps: list[int]) -> int:
        if not steps:
            return 0
        with self._tx() as c:
            return c.execute(checkpoints.delete().where(checkpoints.c.job_id == job_id,
                                                        checkpoints.c.step.in_(steps))).rowcount


def _page(c: Connection, q: sa.Select, table: sa.Table, after: str | None, order: str, extra) -> sa.Select:
    """Order by insertion (`seq`) and continue past the row `after`. (created_at has one-second
    resolution: rows of the same second came back in random-id order.) An unknown `after`, or
    another project's, gives an empty page."""
    if after:
        ref = c.execute(sa.select(table.c.seq).where(table.c.id == after, extra)).scalar()
        if ref is None:
            return q.where(sa.false())
        q = q.where(table.c.seq < ref if order == "desc" else table.c.seq > ref)
    return q.order_by(table.c.seq.desc() if order == "desc" else table.c.seq)
