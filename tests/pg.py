"""A throwaway PostgreSQL database per test module, on the server at 127.0.0.1:5432.

The project's machines and CI run PostgreSQL there (user postgres, trust auth); override with
TUNESMITH_TEST_PG=postgresql://user@host:port. With no server, tests that need one fail with
the reason, unless TUNESMITH_TEST_NO_POSTGRES=1 marks them skipped.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import Iterator

import pytest

SERVER = os.environ.get("TUNESMITH_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def temp_database(prefix: str) -> Iterator[str]:
    """Create database PREFIX_<random>, yield its URL, drop it (and its connections) after."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(SERVER + "/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        if os.environ.get("TUNESMITH_TEST_NO_POSTGRES") == "1":
            pytest.skip(f"no PostgreSQL at {SERVER}: {e}")
        raise RuntimeError(f"these tests need PostgreSQL at {SERVER} (see docs/SERVICE.md; "
                           f"TUNESMITH_TEST_NO_POSTGRES=1 skips them): {e}") from e
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{SERVER}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
