"""Fixtures for the reliability suite: hook-error capture, PostgreSQL admin, gauge checks.

The ``otel`` fixture (in-memory metric reader and span exporter, instrumentor uninstrumented
at teardown) is the instrumentor suite's, re-exported here.
"""

from __future__ import annotations

import gc
import logging
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL

from instrumentor.conftest import Telemetry, otel  # noqa: F401  (fixture re-export)

OUR_LOGGER = "opentelemetry.instrumentation.sqlalchemy_pool"
POOL_ATTR = "db.client.connection.pool.name"


# -- hook errors ------------------------------------------------------------------------------
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class HookErrors:
    """Every record our package logged; ``errors()`` are those that carry an exception."""

    capture: _Capture

    @property
    def records(self) -> list[logging.LogRecord]:
        return list(self.capture.records)

    def errors(self) -> list[logging.LogRecord]:
        return [
            r
            for r in self.capture.records
            if r.exc_info is not None or "internal error" in r.getMessage()
        ]

    def describe(self) -> str:
        lines = []
        for record in self.errors():
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            lines.append(f"{record.name} {record.levelname}: {text}")
        return "\n".join(lines)

    def assert_none(self) -> None:
        assert not self.errors(), "our hooks swallowed exceptions:\n" + self.describe()

    def messages(self, contains: str) -> list[str]:
        return [r.getMessage() for r in self.capture.records if contains in r.getMessage()]


@pytest.fixture
def hook_errors() -> Iterator[HookErrors]:
    """Capture everything our package logs (DEBUG included) for the duration of the test.

    Our hooks never raise into the application; they log the swallowed exception with
    ``exc_info`` (a WARNING the first time per hook, DEBUG afterwards), so any record with
    an exception attached means an exception escaped from the instrumentation's own code.
    """
    logger = logging.getLogger(OUR_LOGGER)
    handler = _Capture()
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield HookErrors(handler)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# -- PostgreSQL admin (a raw psycopg connection: no SQLAlchemy pool, no events) ---------------
def libpq_uri(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Admin:
    def __init__(self, url: URL):
        self.url = url
        self.conn = psycopg.connect(libpq_uri(url), autocommit=True, connect_timeout=5)

    def backends(self) -> list[int]:
        """Client backends of this database, except our own."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
        return [row[0] for row in rows]

    def terminate(self, pids: list[int], wait_s: float = 5.0) -> int:
        """pg_terminate_backend each pid and wait until they are gone; returns how many."""
        if not pids:
            return 0
        killed = self.conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
            "FROM unnest(%s::int[]) AS pid",
            (list(pids),),
        ).fetchone()[0]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            alive = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
            ).fetchone()[0]
            if not alive:
                break
            time.sleep(0.01)
        return killed

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def admin(sync_url: URL) -> Iterator[Admin]:
    admin = Admin(sync_url)
    yield admin
    admin.close()


# -- gauges -----------------------------------------------------------------------------------
def gauges(telemetry: Telemetry, pool: str) -> dict[str, Any]:
    """used, idle, pending (and max) of one pool from a single collection."""
    data = telemetry.reader.get_metrics_data()
    found: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    if point.attributes.get(POOL_ATTR) != pool:
                        continue
                    if metric.name == "db.client.connection.count":
                        state = point.attributes["db.client.connection.state"]
                        found[state] = point.value
                    elif metric.name == "db.client.connection.pending_requests":
                        found["pending"] = point.value
                    elif metric.name == "db.client.connection.max":
                        found["max"] = point.value
    return found


def counter(telemetry: Telemetry, name: str, pool: str, **attrs: Any) -> int:
    """Sum of a counter's points for a pool (0 when it never fired)."""
    total = 0
    for point in telemetry.points(name):
        if point.attributes.get(POOL_ATTR) != pool:
            continue
        if all(point.attributes.get(k.replace("__", ".")) == v for k, v in attrs.items()):
            total += point.value
    return total


def queued_records(pool: Any) -> list[Any]:
    """The idle records of a QueuePool or AsyncAdaptedQueuePool (read without side effects)."""
    queue = pool._pool
    items = getattr(queue, "queue", None)  # sqlalchemy.util.queue.Queue
    if items is None:  # AsyncAdaptedQueue wraps an asyncio.Queue (created lazily)
        items = getattr(queue.__dict__.get("_queue"), "_queue", ())
    return list(items)


def queue_open_records(pool: Any) -> int:
    """Idle records that still hold an open DBAPI connection (what "idle" must count)."""
    return sum(1 for record in queued_records(pool) if record.dbapi_connection is not None)


# -- memory -----------------------------------------------------------------------------------
@dataclass
class MemoryCheck:
    limit_bytes: int
    before: int = 0
    after: int = 0
    started_here: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.after - self.before


def _traced() -> int:
    gc.collect()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@contextmanager
def bounded_memory(limit_bytes: int) -> Iterator[MemoryCheck]:
    """Assert that traced memory (after full GC) grew by less than ``limit_bytes``."""
    check = MemoryCheck(limit_bytes)
    if not tracemalloc.is_tracing():
        tracemalloc.start()
        check.started_here = True
    try:
        check.before = _traced()
        yield check
        check.after = _traced()
    finally:
        if check.started_here:
            tracemalloc.stop()
    assert check.growth < limit_bytes, f"memory grew by {check.growth} bytes (limit {limit_bytes})"
