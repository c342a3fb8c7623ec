"""`tunesmith service`: a self-hosted fine-tuning service that speaks the OpenAI fine-tuning API.

store.py is the only code that talks SQL (SQLAlchemy Core + alembic migrations, SQLite by default,
PostgreSQL for several workers); jobs.py turns an OpenAI job request into a tunesmith RunConfig;
worker.py claims queued jobs and runs each in a child process (runner.py) that calls `train()`;
keys.py makes API keys; files.py, api.py and app.py are the HTTP side.

This package sits above runs/serve and below the CLI; nothing below imports it. Importing it is
cheap: the database and web dependencies load with the modules that need them.
"""
from __future__ import annotations

from tunesmith.errors import TunesmithError


def require_store_deps() -> None:
    """Fail with an install hint when the store's packages are missing."""
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        raise TunesmithError(f"tunesmith service needs the database packages ({e.name} is missing): "
                             "pip install 'tunesmith[service]'") from None
