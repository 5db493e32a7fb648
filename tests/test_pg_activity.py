"""pg_stat_activity sampler against a real PostgreSQL (the session's embedded server)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from opentelemetry.instrumentation.sqlalchemy_pool import pg_activity
from opentelemetry.instrumentation.sqlalchemy_pool.pg_activity import (
    SAMPLER_APPLICATION_NAME,
    STANDARD_STATES,
    PgActivitySampler,
    PgActivitySnapshot,
    application_name_for,
    apply_application_name,
    observe,
)
from opentelemetry.instrumentation.sqlalchemy_pool.semconv import (
    PG_BACKENDS,
    PG_MAX_CONNECTIONS,
    PG_OLDEST_QUERY_AGE,
    PG_OLDEST_XACT_AGE,
    PG_RESERVED_CONNECTIONS,
    PG_SCOPE,
    PG_STATE,
    POOL_NAME,
)
from sqlalchemy_pool_tools.pg import create_database, with_driver

pytestmark = pytest.mark.timeout(30)

LOGGER_NAME = pg_activity.__name__
UNREACHABLE_PASSWORD = "s3cret-unreachable-pw"
UNREACHABLE_URL = f"postgresql+psycopg://app:{UNREACHABLE_PASSWORD}@127.0.0.1:1/nodb"


# --- helpers ---------------------------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _connect(url: URL, application_name: str, **kwargs: Any) -> psycopg.Connection:
    """A raw psycopg connection to ``url`` (not through any SQLAlchemy pool)."""
    url = with_driver(url, "psycopg")
    _, cparams = url.get_dialect()().create_connect_args(url)
    return psycopg.connect(**cparams, application_name=application_name, **kwargs)


def _idle_in_transaction(url: URL, application_name: str) -> psycopg.Connection:
    """BEGIN; SELECT 1; then leave the transaction open."""
    conn = _connect(url, application_name)
    conn.execute("SELECT 1")  # psycopg opens a transaction implicitly (autocommit off)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    return conn


def _wait_for(predicate: Callable[[], Any], timeout_s: float = 5.0, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every_s)


@pytest.fixture
def sampler_factory() -> Iterator[Callable[..., PgActivitySampler]]:
    samplers: list[PgActivitySampler] = []

    def factory(url: URL | str, **kwargs: Any) -> PgActivitySampler:
        sampler = PgActivitySampler(url, **kwargs)
        samplers.append(sampler)
        return sampler

    yield factory
    for sampler in samplers:
        sampler.stop()


def _sample(sampler: PgActivitySampler) -> PgActivitySnapshot:
    snapshot = sampler.sample_once()
    assert snapshot is not None, sampler.last_error
    return snapshot


# --- what is sampled -------------------------------------------------------------------------


def test_idle_in_transaction_is_seen_in_both_scopes(sync_url: URL, sampler_factory) -> None:
    name = _unique("idle-tx")
    conn = _idle_in_transaction(sync_url, name)
    try:
        time.sleep(0.3)
        sampler = sampler_factory(sync_url)  # default scope: same database and user
        snap = _sample(sampler)

        assert not snap.stale and snap.error is None
        assert time.time() - snap.taken_at < 5
        for scope in ("application", "server"):
            assert snap.backends_by_state[scope]["idle in transaction"] >= 1
            assert set(STANDARD_STATES) <= set(snap.backends_by_state[scope])
            age = snap.oldest_transaction_age_s[scope]
            assert age is not None and age >= 0.25
        assert snap.total_backends >= 1
        with _connect(sync_url, _unique("settings")) as other:
            settings = other.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"
                " + current_setting('reserved_connections')::int"
            ).fetchone()
        assert (snap.max_connections, snap.reserved_connections) == settings
        assert snap.database == sync_url.database

        [session] = [s for s in snap.idle_in_transaction if s.pid == conn.info.backend_pid]
        assert session.application_name == name
        assert session.state == "idle in transaction"
        assert session.query == "SELECT 1"
        assert session.transaction_age_s >= 0.25
        assert session.state_age_s >= 0.25
        assert session.in_application_scope

        # the transaction ends -> no longer idle in transaction
        conn.rollback()
        snap = _sample(sampler)
        assert conn.info.backend_pid not in {s.pid for s in snap.idle_in_transaction}
    finally:
        conn.close()


def test_aborted_transaction_is_counted_with_an_age(sync_url: URL, sampler_factory) -> None:
    name = _unique("aborted")
    conn = _connect(sync_url, name)
    try:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        time.sleep(0.3)
        snap = _sample(sampler_factory(sync_url, application_names={name}))
        assert snap.backends_by_state["application"]["idle in transaction (aborted)"] == 1
        age = snap.oldest_transaction_age_s["application"]
        assert age is not None and age >= 0.25  # lower bound: since the failed statement
        [session] = snap.idle_in_transaction
        assert session.state == "idle in transaction (aborted)"
        assert session.query == "SELECT 1/0" and session.transaction_age_s >= 0.25
    finally:
        conn.close()


def test_sampler_excludes_its_own_backend(sync_url: URL, sampler_factory) -> None:
    sampler = sampler_factory(sync_url, application_names={SAMPLER_APPLICATION_NAME})
    _sample(sampler)
    snap = _sample(sampler)  # its connection is open now, and still not counted
    assert snap.backends("application") == 0
    assert snap.oldest_query_age_s["application"] is None


def test_active_backend_counted_with_query_age(sync_url: URL, sampler_factory) -> None:
    name = _unique("sleeper")
    conn = _connect(sync_url, name, autocommit=True)
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("SELECT pg_sleep(8)")
        except psycopg.errors.QueryCanceled:
            pass
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    worker = threading.Thread(target=sleep, daemon=True)
    worker.start()
    try:
        sampler = sampler_factory(sync_url, application_names={name})

        def active_for_a_while() -> PgActivitySnapshot | None:
            snap = _sample(sampler)
            age = snap.oldest_query_age_s["application"]
            return snap if age is not None and age >= 0.3 else None

        snap = _wait_for(active_for_a_while)
        assert snap.backends_by_state["application"]["active"] == 1
        assert snap.backends_by_state["application"]["idle in transaction"] == 0
        assert snap.backends_by_state["server"]["active"] >= 1
        assert snap.oldest_query_age_s["server"] >= snap.oldest_query_age_s["application"]
        # a running statement is also an open transaction
        assert snap.oldest_transaction_age_s["application"] >= 0.3
    finally:
        conn.cancel_safe()
        worker.join(5)
        conn.close()
    assert not errors


# --- application_name mapping ----------------------------------------------------------------


def test_application_name_for_is_safe_and_deterministic() -> None:
    assert application_name_for("orders") == "orders"
    assert application_name_for("orders db\n(primary)") == "orders db (primary)"
    assert application_name_for("café\x00pool") == "caf__pool"
    assert application_name_for("") == "sqlalchemy-pool"

    long_a = "postgresql+asyncpg://app@db.internal.example.com:5432/orders?pool=" + "a" * 40
    long_b = long_a[:-1] + "b"
    name_a = application_name_for(long_a)
    assert len(name_a.encode()) <= 63
    assert name_a == application_name_for(long_a)
    assert name_a != application_name_for(long_b)
    for text in ("é" * 100, "x" * 63, "x" * 64, "日本語のプール"):
        name = application_name_for(text)
        assert len(name.encode()) <= 63 and name.isascii() and name.isprintable()


def test_apply_application_name_merges_driver_parameters() -> None:
    cparams: dict[str, Any] = {"server_settings": {"jit": "off"}}
    apply_application_name("asyncpg", cparams, "orders")
    assert cparams["server_settings"] == {"jit": "off", "application_name": "orders"}
    cparams = {}
    apply_application_name("psycopg", cparams, "orders")
    assert cparams == {"application_name": "orders"}


def _engine_with_application_name(url: URL, pool_name: str, **kwargs: Any) -> sa.Engine:
    engine = sa.create_engine(url, **kwargs)
    application_name = application_name_for(pool_name)

    @sa.event.listens_for(engine, "do_connect")
    def _set_name(dialect, _conn_rec, _cargs, cparams) -> None:
        apply_application_name(dialect.driver, cparams, application_name)

    return engine


def test_application_name_maps_server_rows_to_pools(sync_url: URL, sampler_factory) -> None:
    orders_pool, billing_pool = _unique("orders"), _unique("billing")
    orders = _engine_with_application_name(sync_url, orders_pool)
    billing = _engine_with_application_name(sync_url, billing_pool)
    held: list[sa.Connection] = []
    try:
        for _ in range(2):
            c = orders.connect()
            c.exec_driver_sql("SELECT 1")
            c.commit()  # checked out, idle
            held.append(c)
        c = billing.connect()
        c.exec_driver_sql("SELECT 1")  # autobegin: idle in transaction
        held.append(c)

        orders_sampler = sampler_factory(
            sync_url, application_names={application_name_for(orders_pool)}
        )
        billing_sampler = sampler_factory(
            sync_url, application_names=frozenset({application_name_for(billing_pool)})
        )
        snap = _sample(orders_sampler)
        assert snap.backends_by_state["application"]["idle"] == 2
        assert snap.backends_by_state["application"]["idle in transaction"] == 0
        assert snap.backends("application") == 2
        assert snap.backends_by_state["server"]["idle in transaction"] >= 1
        assert snap.oldest_transaction_age_s["application"] is None
        assert snap.oldest_transaction_age_s["server"] is not None
        billing_rows = [s for s in snap.idle_in_transaction if s.application_name]
        assert billing_rows and not any(s.in_application_scope for s in billing_rows)

        snap = _sample(billing_sampler)
        assert snap.backends("application") == 1
        assert snap.backends_by_state["application"]["idle in transaction"] == 1
        assert snap.oldest_transaction_age_s["application"] is not None
    finally:
        for c in held:
            c.close()
        orders.dispose()
        billing.dispose()


async def test_application_name_on_asyncpg_engine(async_url: URL, sync_url: URL) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    pool_name = _unique("async-orders")
    engine = create_async_engine(async_url, poolclass=NullPool)

    @sa.event.listens_for(engine.sync_engine, "do_connect")
    def _set_name(dialect, _conn_rec, _cargs, cparams) -> None:
        apply_application_name(dialect.driver, cparams, application_name_for(pool_name))

    sampler = PgActivitySampler(sync_url, application_names={application_name_for(pool_name)})
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")  # idle in transaction afterwards
            snap = await asyncio.to_thread(_sample, sampler)
            assert snap.backends_by_state["application"]["idle in transaction"] == 1
            await conn.rollback()
    finally:
        await asyncio.to_thread(sampler.stop)
        await engine.dispose()


# --- failures --------------------------------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME and r.levelno == level]


def test_unreachable_server_warns_once_and_never_raises(
    caplog: pytest.LogCaptureFixture, sampler_factory
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    sampler = sampler_factory(UNREACHABLE_URL, interval_s=0.05, connect_timeout_s=2)
    for _ in range(3):
        assert sampler.sample_once() is None
    assert sampler.latest() is None
    assert sampler.last_error and "\n" not in sampler.last_error

    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    assert sampler.latest() is None

    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "127.0.0.1" in warnings[0].getMessage()
    assert len(_records(caplog, logging.DEBUG)) >= 3
    assert UNREACHABLE_PASSWORD not in caplog.text
    assert all(UNREACHABLE_PASSWORD not in r.getMessage() for r in caplog.records)
    assert UNREACHABLE_PASSWORD not in repr(sampler)
    assert UNREACHABLE_PASSWORD not in sampler.last_error


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://u:pw-in-bad-url@host:notaport/db", "invalid database URL"),
        ("this is :// not a url", "invalid database URL"),
        ("sqlite:///somewhere.db", "not a PostgreSQL URL"),
    ],
)
def test_bad_url_never_raises(
    url: str, expected: str, caplog: pytest.LogCaptureFixture, sampler_factory
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    sampler = sampler_factory(url)
    assert sampler.sample_once() is None
    assert sampler.sample_once() is None
    assert expected in (sampler.last_error or "")
    assert len(_records(caplog, logging.WARNING)) == 1
    assert "pw-in-bad-url" not in caplog.text


def test_custom_logger_receives_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.pg_activity.custom")
    caplog.set_level(logging.DEBUG, logger="tests.pg_activity.custom")
    sampler = PgActivitySampler(UNREACHABLE_URL, logger=logger, connect_timeout_s=2)
    assert sampler.sample_once() is None
    sampler.stop()
    assert [r.levelno for r in caplog.records if r.name == logger.name] == [logging.WARNING]


def test_sampler_goes_stale_and_recovers(
    pg_server_url: URL, caplog: pytest.LogCaptureFixture, sampler_factory
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    url = create_database(pg_server_url, prefix="recover")
    admin = sa.create_engine(with_driver(pg_server_url, "psycopg"), isolation_level="AUTOCOMMIT")
    try:
        sampler = sampler_factory(with_driver(url, "psycopg"))
        first = _sample(sampler)
        assert not first.stale

        # The database disappears under the sampler (its connection is terminated).
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE "{url.database}" WITH (FORCE)')
        assert sampler.sample_once() is None
        assert sampler.sample_once() is None
        stale = sampler.latest()
        assert stale is not None and stale.stale and stale.error
        assert stale.taken_at == first.taken_at  # the figures are the old ones, flagged
        assert len(_records(caplog, logging.WARNING)) == 1

        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
        fresh = _sample(sampler)
        assert not fresh.stale and fresh.error is None and sampler.last_error is None
        assert sampler.latest() is fresh
        assert any("recovered" in r.getMessage() for r in _records(caplog, logging.INFO))
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        admin.dispose()


def test_reconnects_after_its_backend_is_terminated(sync_url: URL, sampler_factory) -> None:
    sampler = sampler_factory(sync_url)
    _sample(sampler)
    admin = sa.create_engine(sync_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            killed = c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = '{SAMPLER_APPLICATION_NAME}' "
                "AND datname = current_database()"
            ).all()
        assert killed
        snap = sampler.sample_once()  # retried at once on a fresh connection
        assert snap is not None and not snap.stale
        assert sampler.last_error is None
    finally:
        admin.dispose()


# --- background thread -----------------------------------------------------------------------


def _sampler_backends(url: URL) -> int:
    with _connect(url, "checker", autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = current_database()",
            (SAMPLER_APPLICATION_NAME,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_background_thread_samples_and_stops(sync_url: URL) -> None:
    sampler = PgActivitySampler(sync_url, interval_s=0.1)
    assert sampler.latest() is None
    with sampler:
        first = _wait_for(sampler.latest)
        later = _wait_for(
            lambda: (s := sampler.latest()) is not None and s.taken_at > first.taken_at and s
        )
        assert not later.stale
        threads = [t for t in threading.enumerate() if t.name.startswith("otel-pg-activity")]
        assert threads and all(t.daemon for t in threads)
        assert _sampler_backends(sync_url) == 1  # ONE connection of its own
    assert not any(t.name.startswith("otel-pg-activity") for t in threading.enumerate())
    _wait_for(lambda: _sampler_backends(sync_url) == 0)  # connection closed by stop()
    sampler.stop()  # idempotent


# --- OpenTelemetry observation ---------------------------------------------------------------


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    if data is None:  # nothing observed at all
        return out
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def _metric_units(reader: InMemoryMetricReader) -> dict[str, str]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: m.unit
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_observe_emits_expected_data_points(sync_url: URL, sampler_factory) -> None:
    name = _unique("otel")
    conn = _idle_in_transaction(sync_url, name)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        time.sleep(0.2)
        sampler = sampler_factory(sync_url, application_names={name})
        snap = _sample(sampler)
        down = sampler_factory(UNREACHABLE_URL, connect_timeout_s=2)
        down.sample_once()
        never = sampler_factory(sync_url)  # never sampled: latest() is None

        observe(
            provider.get_meter("test"),
            lambda: [("orders", sampler), ("down", down), ("never", never)],
        )
        points = _points(reader)

        backends = {
            (p.attributes[PG_SCOPE], p.attributes[PG_STATE]): p.value for p in points[PG_BACKENDS]
        }
        assert all(p.attributes[POOL_NAME] == "orders" for p in points[PG_BACKENDS])
        for scope in ("application", "server"):
            for state in STANDARD_STATES:
                assert (scope, state) in backends  # reported even when 0
        assert backends[("application", "idle in transaction")] == 1
        assert backends[("application", "active")] == 0
        assert backends[("application", "idle")] == 0
        assert backends[("server", "idle in transaction")] >= 1

        xact = {p.attributes[PG_SCOPE]: p.value for p in points[PG_OLDEST_XACT_AGE]}
        assert xact["application"] >= 0.15 and xact["server"] >= xact["application"]
        query = {p.attributes[PG_SCOPE]: p.value for p in points[PG_OLDEST_QUERY_AGE]}
        assert query == {"application": 0.0, "server": query["server"]}

        [max_conn] = points[PG_MAX_CONNECTIONS]
        assert max_conn.value == snap.max_connections
        assert dict(max_conn.attributes) == {POOL_NAME: "orders"}
        [reserved] = points[PG_RESERVED_CONNECTIONS]
        assert reserved.value == snap.reserved_connections

        for metric_points in points.values():
            for p in metric_points:
                assert p.attributes[POOL_NAME] == "orders"  # stale/None samplers skipped
                assert not any("SELECT" in str(v) for v in p.attributes.values())
        units = _metric_units(reader)
        assert units[PG_OLDEST_XACT_AGE] == "s" and units[PG_OLDEST_QUERY_AGE] == "s"
        assert units[PG_BACKENDS] == "{connection}"
    finally:
        conn.close()
        provider.shutdown()


def test_observe_skips_snapshots_gone_stale(sync_url: URL, sampler_factory) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        sampler = sampler_factory(sync_url, interval_s=0.05, connect_timeout_s=0.1)
        sampler.statement_timeout_s = 0.1
        _sample(sampler)
        observe(provider.get_meter("test"), lambda: [("p", sampler)])
        assert _points(reader)[PG_BACKENDS]
        time.sleep(sampler.max_snapshot_age_s + 0.1)  # no new sample since: too old
        assert PG_BACKENDS not in _points(reader)
    finally:
        provider.shutdown()


# --- async URLs ------------------------------------------------------------------------------


def test_asyncpg_url_uses_a_sync_driver_when_available(async_url: URL, sampler_factory) -> None:
    name = _unique("async-url")
    conn = _idle_in_transaction(async_url, name)
    try:
        sampler = sampler_factory(async_url, application_names={name})
        assert sampler.driver == "psycopg"
        snap = _sample(sampler)
        assert snap.backends_by_state["application"]["idle in transaction"] == 1
    finally:
        conn.close()


def test_asyncpg_driver_in_the_sampler_thread(async_url: URL) -> None:
    name = _unique("asyncpg-drv")
    conn = _idle_in_transaction(async_url, name)
    sampler = PgActivitySampler(
        async_url, application_names={name}, driver="asyncpg", interval_s=0.1
    )
    try:
        assert sampler.driver == "asyncpg"
        sampler.start()
        snap = _wait_for(sampler.latest)
        assert not snap.stale, snap.error
        assert snap.backends_by_state["application"]["idle in transaction"] == 1
        age = snap.oldest_transaction_age_s["application"]
        assert age is not None and age > 0
        assert snap.max_connections and snap.max_connections > 0
    finally:
        sampler.stop()
        conn.close()
    _wait_for(lambda: _sampler_backends(async_url) == 0)


async def test_asyncpg_sample_once_inside_a_running_loop(async_url: URL) -> None:
    sampler = PgActivitySampler(async_url, driver="asyncpg")
    try:
        first = sampler.sample_once()  # called from a coroutine: must not clash with our loop
        assert first is not None, sampler.last_error
        assert sampler.sample_once() is not None
    finally:
        sampler.stop()


def test_falls_back_to_asyncpg_without_a_sync_driver(
    async_url: URL, monkeypatch: pytest.MonkeyPatch, sampler_factory
) -> None:
    monkeypatch.setattr(pg_activity, "_importable", lambda module: module == "asyncpg")
    sampler = sampler_factory(async_url)
    assert sampler.driver == "asyncpg"
    assert _sample(sampler).max_connections


# --- permissions -----------------------------------------------------------------------------


def test_other_roles_backends_need_pg_read_all_stats(sync_url: URL, sampler_factory) -> None:
    role, password = f"lowpriv_{secrets.token_hex(4)}", secrets.token_hex(8)
    admin = sa.create_engine(sync_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    other = _idle_in_transaction(sync_url, _unique("superuser-app"))  # another role's session
    try:
        url = sync_url.set(username=role, password=password)
        snap = _sample(sampler_factory(url))
        assert snap.hidden_backends >= 1
        assert snap.backends_by_state["server"].get("unknown", 0) >= 1
        assert snap.backends("application") == 0  # scope is this role's own backends
        assert other.info.backend_pid not in {s.pid for s in snap.idle_in_transaction}

        with admin.connect() as c:
            c.exec_driver_sql(f"GRANT pg_read_all_stats TO {role}")
        snap = _sample(sampler_factory(url))
        assert snap.hidden_backends == 0
        assert snap.backends_by_state["server"]["idle in transaction"] >= 1
        assert other.info.backend_pid in {s.pid for s in snap.idle_in_transaction}
    finally:
        other.close()
        with admin.connect() as c:
            c.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            )
            _wait_for(
                lambda: (
                    not c.exec_driver_sql(
                        f"SELECT 1 FROM pg_stat_activity WHERE usename = '{role}'"
                    ).all()
                )
            )
            c.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()
