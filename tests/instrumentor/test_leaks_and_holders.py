"""Long holds, GC-reclaimed and open-transaction checkins, holders forensics, pg_stat_activity."""

from __future__ import annotations

import gc
import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session
from tests.waiting import wait_for

from opentelemetry.instrumentation.sqlalchemy_pool import holders

LEAK = "sqlalchemy.pool.leaks"


def _leaks(otel, pool, kind):
    return (
        otel.value(LEAK, db__client__connection__pool__name=pool, sqlalchemy__pool__leak__kind=kind)
        or 0
    )


def take_and_hold(engine):  # the code site a leak report must name
    return engine.connect()


def test_long_hold_reported_once_while_held(otel, make_sync_engine, caplog):
    caplog.set_level(logging.INFO, logger="opentelemetry.instrumentation.sqlalchemy_pool")
    otel.instrument(leak_threshold_s=0.2)
    engine = make_sync_engine(pool_logging_name="hold")
    tracer = otel.tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("job") as job:
        conn = take_and_hold(engine)
        assert wait_for(lambda: _leaks(otel, "hold", "long_hold") == 1)
        time.sleep(0.3)
        assert _leaks(otel, "hold", "long_hold") == 1  # once, not every check
        events = [e for e in job.events if e.name == "sqlalchemy.pool.long_hold"]
        assert len(events) == 1
        assert events[0].attributes["code.function.name"] == "take_and_hold"
        conn.close()
    warning = [
        r for r in caplog.records if r.levelno == logging.WARNING and "still held" in r.getMessage()
    ]
    assert len(warning) == 1
    assert "'hold'" in warning[0].getMessage() and "take_and_hold" in warning[0].getMessage()
    assert any("was returned after" in r.getMessage() for r in caplog.records)


def test_short_holds_are_not_reported(otel, make_sync_engine):
    otel.instrument(leak_threshold_s=0.5)
    engine = make_sync_engine(pool_logging_name="short")
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    time.sleep(0.3)
    assert _leaks(otel, "short", "long_hold") == 0


def leak_a_session(engine):
    session = Session(engine)
    session.execute(sa.text("select 1"))
    # returned without close(): the GC reclaims the session and its connection


def test_garbage_collected_sync_session(otel, make_sync_engine, caplog):
    otel.instrument(session_spans="all")
    engine = make_sync_engine(pool_logging_name="gcs")
    gc.disable()
    try:
        leak_a_session(engine)
        gc.collect()
    finally:
        gc.enable()
    assert otel.count("gcs")[0] == 0  # exact at once
    # Telemetry produced inside a GC is done at the next safe point: here, a checkout.
    with engine.connect():
        pass
    assert _leaks(otel, "gcs", "garbage_collected") == 1
    (span,) = otel.spans("sqlalchemy.session")
    assert span.attributes["sqlalchemy.session.outcome"] == "garbage_collected"
    assert span.attributes["code.function.name"] == "leak_a_session"
    assert "leak_a_session" in caplog.text


def test_open_transaction_at_checkin(otel, make_sync_engine):
    otel.instrument(statement_timing="all")  # raw DBAPI use: no Session times this engine
    engine = make_sync_engine(pool_logging_name="opentx")
    raw = engine.raw_connection()  # a DBAPI-level transaction the Connection never sees
    cursor = raw.cursor()
    cursor.execute("select 1")
    cursor.close()
    raw.close()
    assert _leaks(otel, "opentx", "open_transaction_at_checkin") == 1
    with engine.connect() as conn:  # a normal Core connection does not count
        conn.execute(sa.text("select 1"))
    assert _leaks(otel, "opentx", "open_transaction_at_checkin") == 0 + 1


def busy_holder(engine, started, release):  # the holder's code site
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        started.set()
        release.wait(10)


def test_timeout_wait_span_links_to_holders_and_logs_once(otel, make_sync_engine, caplog):
    engine = make_sync_engine(
        pool_size=2, max_overflow=0, pool_timeout=0.2, pool_logging_name="forensics"
    )
    otel.instrument(engines=[engine], statement_timing="all")  # Core: statement counts
    tracer = otel.tracer_provider.get_tracer("t")
    release = threading.Event()
    holder_spans = []

    def holder_thread():
        started = threading.Event()
        with tracer.start_as_current_span("GET /slow") as span:
            span.set_attribute("http.route", "/slow")
            holder_spans.append(span)
            busy_holder(engine, started, release)

    threads = [threading.Thread(target=holder_thread) for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: otel.count("forensics")[0] == 2)
    snapshot = holders(engine)
    assert len(snapshot) == 2 == engine.pool.checkedout()
    assert {row["code_function"] for row in snapshot} == {"busy_holder"}
    assert {row["http_route"] for row in snapshot} == {"/slow"}
    assert all(row["statements"] == 1 for row in snapshot)
    for _ in range(3):
        with tracer.start_as_current_span("GET /victim"):
            try:
                engine.connect()
            except sa.exc.TimeoutError:
                pass
    release.set()
    for t in threads:
        t.join()
    spans = otel.spans("sqlalchemy.pool.wait")
    assert len(spans) == 3
    span = spans[0]
    holder_ids = {s.get_span_context().span_id for s in holder_spans}
    assert {link.context.span_id for link in span.links} == holder_ids
    link = span.links[0]
    assert link.attributes["code.function.name"] == "busy_holder"
    assert link.attributes["http.route"] == "/slow"
    assert link.attributes["sqlalchemy.pool.holder.statements"] == 1
    assert link.attributes["sqlalchemy.pool.holder.age"] > 0
    assert span.attributes["sqlalchemy.pool.holders.count"] == 2
    assert "busy_holder" in span.attributes["sqlalchemy.pool.holders.top_code_sites"][0]
    logs = [r for r in caplog.records if "checkout timed out" in r.getMessage()]
    assert len(logs) == 1  # rate-limited: one per burst
    assert "busy_holder" in logs[0].getMessage() and "/slow" in logs[0].getMessage()
    assert holders(engine) == []
    # nothing retained once the holders are gone
    recorder = engine.pool.__dict__["_otel_sqlalchemy_pool_recorder"]
    assert recorder.holders == {}


def test_pg_activity_shows_idle_in_transaction(otel, make_sync_engine):
    otel.instrument(pg_activity=True, pg_activity_interval_s=0.2)
    engine = make_sync_engine(pool_logging_name="pg")
    conn = engine.connect()
    conn.execute(sa.text("select 1"))  # autobegin: idle in transaction from now on

    def idle_in_tx():
        points = otel.points("sqlalchemy.pool.pg.backends")
        return [
            p.value for p in points
            if p.attributes["sqlalchemy.pool.pg.state"] == "idle in transaction"
            and p.attributes["sqlalchemy.pool.pg.scope"] == "application"
            and p.attributes["db.client.connection.pool.name"] == "pg"
        ]  # fmt: skip

    assert wait_for(lambda: idle_in_tx() == [1], timeout=10)

    def app_xact_ages():
        return [p.value for p in otel.points("sqlalchemy.pool.pg.oldest_transaction_age")
                if p.attributes["sqlalchemy.pool.pg.scope"] == "application"]  # fmt: skip

    assert wait_for(lambda: app_xact_ages() and app_xact_ages()[0] > 0.2, timeout=10)
    (max_connections,) = [p.value for p in otel.points("sqlalchemy.pool.pg.max_connections")]
    assert max_connections >= 10
    conn.close()
    assert wait_for(lambda: idle_in_tx() == [0], timeout=10)
