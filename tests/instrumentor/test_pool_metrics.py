"""Pool metrics against a real PostgreSQL: exact counts through every pool path."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool.base import _ConnectionFairy

from opentelemetry.instrumentation.sqlalchemy_pool.recorder import POOL_RECORDER_ATTR
from opentelemetry.instrumentation.sqlalchemy_pool.wait import SpanBudget

POOL = "db.client.connection.pool.name"


def test_saturation_timeout_and_recovery(otel, make_sync_engine):
    engine = make_sync_engine(
        pool_size=2, max_overflow=1, pool_timeout=0.5, pool_logging_name="orders"
    )
    otel.instrument()
    held = [engine.connect() for _ in range(3)]
    assert otel.count("orders") == (3, 0)
    assert otel.value("db.client.connection.max", **{POOL.replace(".", "__"): "orders"}) == 3
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("GET /orders") as request_span:
        try:
            engine.connect()
        except sa.exc.TimeoutError:
            pass
        else:
            raise AssertionError("expected a pool timeout")
    assert (
        otel.value("db.client.connection.timeouts", db__client__connection__pool__name="orders")
        == 1
    )
    (wait_span,) = otel.spans("sqlalchemy.pool.wait")
    assert wait_span.parent.span_id == request_span.get_span_context().span_id
    assert wait_span.status.status_code.name == "ERROR"
    assert wait_span.attributes["error.type"] == "sqlalchemy.exc.TimeoutError"
    assert wait_span.attributes["sqlalchemy.pool.checked_out"] == 3
    assert wait_span.attributes["sqlalchemy.pool.size"] == 2
    assert (wait_span.end_time - wait_span.start_time) / 1e9 >= 0.45
    for conn in held:
        conn.close()
    used, idle = otel.count("orders")
    assert used == 0
    assert idle == 2  # the overflow connection was discarded
    assert (
        otel.value(
            "db.client.connection.pending_requests", db__client__connection__pool__name="orders"
        )
        == 0
    )
    assert (
        otel.value(
            "sqlalchemy.pool.connection.closes",
            db__client__connection__pool__name="orders",
            sqlalchemy__pool__close__reason="overflow",
        )
        == 1
    )


def _pool_attr(name: str) -> dict[str, str]:
    return {"db__client__connection__pool__name": name}


async def test_async_engine_counts_and_wait_span(otel, make_async_engine):
    otel.instrument(wait_span_threshold_ms=50)
    engine = make_async_engine(pool_size=1, max_overflow=0, pool_timeout=5, pool_logging_name="aio")
    import asyncio

    release = asyncio.Event()

    async def holder():
        async with engine.connect() as conn:
            await conn.execute(sa.text("select 1"))
            await release.wait()

    task = asyncio.create_task(holder())
    await asyncio.sleep(0.2)
    assert otel.count("aio") == (1, 0)

    async def waiter():
        async with engine.connect() as conn:
            return (await conn.execute(sa.text("select 2"))).scalar()

    wait_task = asyncio.create_task(waiter())
    await asyncio.sleep(0.2)
    assert otel.value("db.client.connection.pending_requests", **_pool_attr("aio")) == 1
    release.set()
    assert await wait_task == 2
    await task
    assert otel.count("aio") == (0, 1)
    assert otel.value("db.client.connection.pending_requests", **_pool_attr("aio")) == 0
    (span,) = otel.spans("sqlalchemy.pool.wait")
    assert span.status.status_code.name == "UNSET"
    assert span.attributes["sqlalchemy.pool.pending"] >= 1
    assert span.attributes["sqlalchemy.pool.checked_out"] == 1
    await engine.dispose()


def test_fast_checkouts_create_no_span_and_record_histograms(otel, make_sync_engine):
    engine = make_sync_engine(pool_logging_name="fast")
    otel.instrument(engines=[engine], statement_timing="all")  # held-idle for Core use
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    assert otel.spans("sqlalchemy.pool.wait") == []
    assert otel.value("db.client.connection.wait_time", **_pool_attr("fast")) == 20
    assert otel.value("db.client.connection.use_time", **_pool_attr("fast")) == 20
    # held-idle is recorded only from 1 ms up (below that it is overhead, not holding)
    before = otel.points("sqlalchemy.pool.connection.held_idle_time")
    count_before = before[0].count if before else 0
    sum_before = before[0].sum if before else 0.0
    assert count_before <= 20
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        time.sleep(0.02)  # holding the connection while doing something else
        conn.execute(sa.text("select pg_sleep(0.3)"))
    (held_idle,) = otel.points("sqlalchemy.pool.connection.held_idle_time")
    assert held_idle.count == count_before + 1
    # The 0.3 s pg_sleep was busy time, not idle (the margin absorbs a loaded machine).
    assert 0.02 <= held_idle.sum - sum_before < 0.25
    assert otel.value("db.client.connection.create_time", **_pool_attr("fast")) == 1
    (wait,) = otel.points("db.client.connection.wait_time")
    assert list(wait.explicit_bounds)[:2] == [0.0001, 0.00025]
    assert wait.sum < 1.0  # connect time is not counted as waiting


def _held_idle_count(otel, pool: str) -> int:
    points = [
        p
        for p in otel.points("sqlalchemy.pool.connection.held_idle_time")
        if p.attributes.get(POOL) == pool
    ]
    return sum(p.count for p in points)


def _hold_idle(engine: sa.Engine, session: bool = False) -> None:
    if session:
        with Session(engine) as db:
            db.execute(sa.text("select 1"))
            time.sleep(0.01)
        return
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        time.sleep(0.01)


def test_statement_timing_follows_sessions_by_default(otel, make_sync_engine):
    engine = make_sync_engine(pool_logging_name="lazy-timing")
    otel.instrument(engines=[engine])
    # The checkout/checkin hot path has no pool or engine event listeners of ours.
    assert not engine.pool.dispatch.checkin and not engine.pool.dispatch.reset
    _hold_idle(engine)
    assert _held_idle_count(otel, "lazy-timing") == 0  # unknown, so not recorded as zero
    assert "__wrapped__" not in vars(_ConnectionFairy._reset)
    _hold_idle(engine, session=True)  # a Session turns timing on for its engine
    # The open-transaction-at-checkin check comes with it: a wrapper, not a reset listener.
    assert "__wrapped__" in vars(_ConnectionFairy._reset) and not engine.pool.dispatch.reset
    assert not engine.dispatch.before_cursor_execute  # statements: a wrapper, no listeners
    assert _held_idle_count(otel, "lazy-timing") == 1
    _hold_idle(engine)  # from then on Core use of that engine is timed too
    assert _held_idle_count(otel, "lazy-timing") == 2
    otel.instrumentor.uninstrument()
    assert "__wrapped__" not in vars(_ConnectionFairy._reset)
    assert "__wrapped__" not in vars(sa.engine.Connection._execute_context)


def test_statement_timing_all_and_off(otel, make_sync_engine):
    otel.instrument(statement_timing="all")
    timed = make_sync_engine(pool_logging_name="timed-all")  # created after instrument()
    _hold_idle(timed)
    assert _held_idle_count(otel, "timed-all") == 1
    assert "__wrapped__" in vars(_ConnectionFairy._reset)
    otel.instrumentor.uninstrument()
    assert "__wrapped__" not in vars(_ConnectionFairy._reset)

    otel.instrument(statement_timing="off")
    untimed = make_sync_engine(pool_logging_name="timed-off")
    _hold_idle(untimed, session=True)
    assert "__wrapped__" not in vars(_ConnectionFairy._reset)
    assert "__wrapped__" not in vars(sa.engine.Connection._execute_context)  # not even wrapped
    assert _held_idle_count(otel, "timed-off") == 0
    assert otel.value("db.client.connection.use_time", **_pool_attr("timed-off")) == 1


def test_name_from_url_without_credentials(otel, make_sync_engine, sync_url):
    otel.instrument()
    engine = make_sync_engine()
    with engine.connect():
        pass
    (name,) = {
        p.attributes["db.client.connection.pool.name"]
        for p in otel.points("db.client.connection.count")
    }
    assert name.endswith(f"/{sync_url.database}")
    assert "postgres:" not in name and "@" not in name
    second = make_sync_engine()
    with second.connect():
        pass
    names = {
        p.attributes["db.client.connection.pool.name"]
        for p in otel.points("db.client.connection.count")
    }
    assert names == {name, f"{name}#2"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://app@/orders?host=/var/run/postgresql",
            "unix:/var/run/postgresql/orders",
        ),
        ("postgresql+psycopg://app@/orders", "local socket/orders"),
        ("postgresql+psycopg://app@db.internal:6432/orders", "db.internal:6432/orders"),
    ],
)
def test_unix_socket_pools_are_not_named_localhost(otel, url, expected):
    engine = sa.create_engine(url)  # never connects: explicit engines are named at instrument()
    otel.instrument(engine=engine)
    names = {
        p.attributes["db.client.connection.pool.name"]
        for p in otel.points("db.client.connection.max")
    }
    assert names == {expected}
    engine.dispose()


def test_pool_name_override_kwarg_and_env(otel, make_sync_engine, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_SQLALCHEMY_POOL_POOL_NAME", "from-env")
    otel.instrument()
    engine = make_sync_engine()
    with engine.connect():
        pass
    assert otel.count("from-env") == (0, 1)
    otel.instrumentor.uninstrument()
    otel.instrument(pool_name=lambda pool: "from-callable")
    engine2 = make_sync_engine()
    with engine2.connect():
        pass
    assert otel.count("from-callable") == (0, 1)


def test_invalidation_recycle_pre_ping_and_detach(otel, make_sync_engine):
    import time

    otel.instrument()
    engine = make_sync_engine(
        pool_size=3, max_overflow=0, pool_pre_ping=True, pool_logging_name="paths"
    )
    reason = "sqlalchemy__pool__close__reason"

    # invalidation of a checked-out connection
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    assert otel.count("paths") == (0, 0)
    assert (
        otel.value(
            "sqlalchemy.pool.connection.closes", **_pool_attr("paths"), **{reason: "invalidated"}
        )
        == 1
    )

    # pre-ping failure: the server kills an idle pooled connection
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("select pg_backend_pid()").scalar()
    assert otel.count("paths") == (0, 1)
    admin_engine = make_sync_engine(poolclass=sa.pool.NullPool)
    with admin_engine.connect() as admin:
        admin.exec_driver_sql(f"select pg_terminate_backend({pid})")
    time.sleep(0.2)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
    assert (
        otel.value(
            "sqlalchemy.pool.connection.closes",
            **_pool_attr("paths"),
            **{reason: "pre_ping_failed"},
        )
        == 1
    )
    assert otel.count("paths")[0] == 0

    # recycle
    engine.pool._recycle = 0.05
    time.sleep(0.1)
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
    assert (
        otel.value(
            "sqlalchemy.pool.connection.closes", **_pool_attr("paths"), **{reason: "recycle"}
        )
        >= 1
    )
    engine.pool._recycle = -1

    # detach: the connection leaves the pool, never checks in
    conn = engine.connect()
    conn.detach()
    assert otel.count("paths")[0] == 0
    conn.close()
    assert otel.count("paths")[0] == 0
    assert (
        otel.value(
            "sqlalchemy.pool.connection.closes", **_pool_attr("paths"), **{reason: "detached"}
        )
        == 1
    )
    assert engine.pool.checkedout() == 0


def test_dispose_and_recreate_keep_one_series_and_heal(otel, make_sync_engine):
    otel.instrument()
    engine = make_sync_engine(pool_size=2, max_overflow=2, pool_logging_name="disp")
    held = [engine.connect() for _ in range(3)]
    assert otel.count("disp") == (3, 0)
    engine.dispose()  # new pool; the three connections still belong to the old one
    assert otel.count("disp") == (3, 0)
    with engine.connect():
        assert otel.count("disp") == (4, 0)
    for conn in held:
        conn.close()
    used, idle = otel.count("disp")
    assert used == 0
    assert idle == 1  # the new pool keeps the one it opened
    names = {
        p.attributes["db.client.connection.pool.name"]
        for p in otel.points("db.client.connection.count")
    }
    assert names == {"disp"}


def test_other_pool_classes(otel, sync_url):
    from sqlalchemy.pool import AssertionPool, NullPool, SingletonThreadPool, StaticPool

    otel.instrument()
    engines = {
        cls.__name__: sa.create_engine(sync_url, poolclass=cls, pool_logging_name=cls.__name__)
        for cls in (NullPool, StaticPool, SingletonThreadPool, AssertionPool)
    }
    try:
        for name, engine in engines.items():
            conn = engine.connect()
            conn.execute(sa.text("select 1"))
            assert otel.count(name)[0] == 1, name
            conn.close()
            used, idle = otel.count(name)
            assert used == 0, name
            assert idle == (0 if name == "NullPool" else 1), name
        assert otel.value("db.client.connection.max", **_pool_attr("StaticPool")) == 1
        assert (
            otel.value(
                "sqlalchemy.pool.connection.closes",
                **_pool_attr("NullPool"),
                sqlalchemy__pool__close__reason="returned",
            )
            == 1
        )
    finally:
        for engine in engines.values():
            engine.dispose()


def test_explicit_engines_only(otel, make_sync_engine):
    mine = make_sync_engine(pool_logging_name="mine")
    other = make_sync_engine(pool_logging_name="other")
    otel.instrument(engines=[mine])
    for engine in (mine, other):
        with engine.connect():
            pass
    assert otel.count("mine") == (0, 1)
    assert otel.count("other") == (None, None)
    mine.dispose()  # the recreated pool of an explicit engine stays instrumented
    with mine.connect():
        assert otel.count("mine") == (1, 0)


def test_statement_timing_is_attached_per_engine_lazily(otel, make_sync_engine):
    """In global mode statements are timed on an engine only once a Session uses it; Core-only
    engines stay on the fast path."""
    from sqlalchemy.orm import Session

    otel.instrument()
    core_only = make_sync_engine(pool_logging_name="core")
    with_sessions = make_sync_engine(pool_logging_name="orm")
    with core_only.connect() as conn:
        conn.execute(sa.text("select 1"))
        time.sleep(0.02)
    assert not _recorder(core_only).statements_timed
    # statement time unknown there: no held-idle figure rather than a wrong one
    assert [
        p for p in otel.points("sqlalchemy.pool.connection.held_idle_time")
        if p.attributes["db.client.connection.pool.name"] == "core"
    ] == []  # fmt: skip
    with Session(with_sessions) as session:
        session.execute(sa.text("select 1"))
        time.sleep(0.02)
        session.execute(sa.text("select 1"))
    assert _recorder(with_sessions).statements_timed
    assert not _recorder(core_only).statements_timed
    (held_idle,) = [
        p for p in otel.points("sqlalchemy.pool.connection.held_idle_time")
        if p.attributes["db.client.connection.pool.name"] == "orm"
    ]  # fmt: skip
    assert held_idle.count == 1 and held_idle.sum >= 0.02


def _recorder(engine):
    return engine.pool.__dict__[POOL_RECORDER_ATTR]


def test_wait_span_budget_per_pool(otel, make_sync_engine):
    engine = make_sync_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.1, pool_logging_name="budget"
    )
    # Threshold 0: every checkout is a "slow wait"; one span per 100 s per pool.
    otel.instrument(wait_span_threshold_ms=0, wait_spans_per_s=0.01)
    for _ in range(10):
        with engine.connect():
            pass
    assert len(otel.spans("sqlalchemy.pool.wait")) == 1  # the burst allowance
    assert otel.value("db.client.connection.wait_time", **_pool_attr("budget")) == 10
    held = engine.connect()
    try:
        engine.connect()  # a timeout always gets its span, budget or not
    except sa.exc.TimeoutError:
        pass
    else:
        raise AssertionError("expected a pool timeout")
    finally:
        held.close()
    spans = otel.spans("sqlalchemy.pool.wait")
    assert len(spans) == 2 and spans[1].attributes["error.type"] == "sqlalchemy.exc.TimeoutError"
    # The timeout span counts the slow waits left without a span: 9 of the loop, and `held`.
    assert spans[1].attributes["sqlalchemy.pool.waits_without_span"] == 10
    with engine.connect():
        pass
    assert len(otel.spans("sqlalchemy.pool.wait")) == 2


def test_span_budget_refills_at_its_rate():
    budget = SpanBudget(2.0)  # burst of 2, then one every 0.5 s
    assert [budget.take(10.0) for _ in range(3)] == [True, True, False]
    assert budget.take(10.2) is False  # 0.4 of a token back
    assert budget.take(10.5) is True
    assert budget.take(10.4) is False  # an earlier end time (another thread) adds nothing
    assert budget.take_skipped() == 3 and budget.take_skipped() == 0
    assert all(SpanBudget(0).take(1.0) for _ in range(100))  # 0 = no limit
