"""Alembic migrations of the service's tables, run in-process by `Store.migrate()`.

A new schema change: `alembic -c <an ini with script_location=tunesmith/service/migrations>
revision -m "what"` (or copy versions/0001_initial.py), then write upgrade()/downgrade() with
op.*; every process upgrades to head when it starts.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy.engine import Engine

HERE = Path(__file__).parent
# Any fixed number: the PostgreSQL advisory lock that makes concurrent starts migrate one at a time.
_PG_LOCK = 22_2025


@contextmanager
def _sqlite_lock(engine: Engine) -> Iterator[None]:
    """Two processes starting on a fresh SQLite file would both create the tables: one file lock
    beside the database serialises them (fcntl: Linux and macOS)."""
    db = engine.url.database
    if not db or db == ":memory:":
        yield
        return
    import fcntl

    with open(db + ".migrate.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:  # PostgreSQL's DDL is transactional: lock, migrate, commit as one
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return
    with _sqlite_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
