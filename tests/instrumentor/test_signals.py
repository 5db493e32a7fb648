"""The signals around the pool, through instrument() against the real PostgreSQL: failed
connects by error type and SQLSTATE, slow statements by code site, held-idle time split by
transaction, and the event-loop monitor attached to the app's loop."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from opentelemetry.instrumentation.sqlalchemy_pool import semconv


def test_failed_connects_are_counted_by_error_type_and_sqlstate(otel, sync_url) -> None:
    otel.instrument(pool_name="bad-password")
    engine = sa.create_engine(
        sync_url.set(database="no_such_database", password="secret-password"), pool_size=1
    )
    try:
        for _ in range(2):
            with pytest.raises(sa.exc.OperationalError), engine.connect():
                pass
    finally:
        engine.dispose()
    (point,) = otel.points(semconv.CONNECTION_CONNECT_ERRORS)
    assert point.value == 2
    assert point.attributes[semconv.POOL_NAME] == "bad-password"
    assert point.attributes[semconv.ERROR_TYPE] == "psycopg.OperationalError"
    # no credentials, no message: only the class and the server's code
    assert "secret-password" not in str(dict(point.attributes))


def test_async_failed_connects_carry_the_sqlstate(otel, async_url) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    otel.instrument(pool_name="async-bad")
    engine = create_async_engine(async_url.set(database="no_such_database"))

    async def main() -> None:
        # SQLAlchemy 2.1 wraps the driver's error in DBAPIError, 2.0 raises it as it is.
        with pytest.raises((sa.exc.DBAPIError, asyncpg.exceptions.InvalidCatalogNameError)):
            async with engine.connect():
                pass
        await engine.dispose()

    asyncio.run(main())
    (point,) = otel.points(semconv.CONNECTION_CONNECT_ERRORS)
    assert point.attributes[semconv.ERROR_TYPE] == ("asyncpg.exceptions.InvalidCatalogNameError")
    assert point.attributes[semconv.DB_RESPONSE_STATUS_CODE] == "3D000"


def run_report(session: Session) -> None:
    session.execute(sa.text("SELECT pg_sleep(0.15)"))
    session.execute(sa.text("SELECT 1"))


def test_slow_statements_are_recorded_by_code_site_only_above_the_threshold(
    otel, make_sync_engine
) -> None:
    otel.instrument(pool_name="reports", slow_statement_threshold_ms=100)
    engine = make_sync_engine(pool_size=1)
    with Session(engine) as session:
        session.execute(sa.text("SELECT 1"))  # times the engine (statement_timing=sessions)
        session.commit()
        run_report(session)
        session.commit()
    (point,) = otel.points(semconv.SLOW_STATEMENT_TIME)
    assert 0.15 <= point.value < 1.0  # the slow one only, not SELECT 1
    assert point.attributes[semconv.CODE_FUNCTION] == "run_report"  # took the connection
    assert point.attributes[semconv.POOL_NAME] == "reports"


def test_held_idle_time_says_whether_it_was_inside_a_transaction(otel, make_sync_engine) -> None:
    otel.instrument(pool_name="tx", statement_timing="all")
    engine = make_sync_engine(pool_size=1)
    with engine.connect() as conn:  # a statement, then idle inside its transaction
        conn.execute(sa.text("SELECT 1"))
        time.sleep(0.05)
        conn.commit()
    with engine.connect():  # idle without running anything: no transaction
        time.sleep(0.05)
    split = {
        p.attributes[semconv.HELD_IDLE_IN_TRANSACTION]: p.sum
        for p in otel.points(semconv.CONNECTION_HELD_IDLE_TIME)
    }
    assert split[True] >= 0.05 and split[False] >= 0.05, split


def blocking_call() -> None:
    time.sleep(0.06)


def test_the_event_loop_monitor_follows_instrument_and_uninstrument(otel) -> None:
    async def main() -> None:
        otel.instrument(event_loop_block_threshold_ms=20)  # inside the running loop
        loop = asyncio.get_running_loop()
        assert "select" in vars(loop._selector)  # the selector is timed
        for _ in range(3):
            blocking_call()
            await asyncio.sleep(0.01)
        otel.instrumentor.uninstrument()
        assert "select" not in vars(loop._selector)

    asyncio.run(main())
    blocked = {
        p.attributes.get(semconv.CODE_FUNCTION): p.value
        for p in otel.points(semconv.EVENT_LOOP_BLOCKED_TIME)
    }
    assert blocked.get("blocking_call", 0) >= 0.1, blocked
    assert {p.attributes[semconv.CPU_MODE] for p in otel.points(semconv.PROCESS_CPU_TIME)} == {
        "user",
        "system",
    }


def test_event_loop_monitor_can_be_turned_off(otel) -> None:
    async def main() -> None:
        otel.instrument(event_loop_monitor=False)
        assert "select" not in vars(asyncio.get_running_loop()._selector)

    asyncio.run(main())
    assert not otel.points(semconv.EVENT_LOOP_LAG)
