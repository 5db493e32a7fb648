"""Pool metrics against a real PostgreSQL: exact counts through every pool path."""

from __future__ import annotations

import sqlalchemy as sa

POOL = "db.client.connection.pool.name"


def test_saturation_timeout_and_recovery(otel, make_sync_engine):
    engine = make_sync_engine(pool_size=2, max_overflow=1, pool_timeout=0.5, pool_logging_name="orders")
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
    assert otel.value("db.client.connection.timeouts", db__client__connection__pool__name="orders") == 1
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
    assert otel.value("db.client.connection.pending_requests", db__client__connection__pool__name="orders") == 0
    assert otel.value(
        "sqlalchemy.pool.connection.closes",
        db__client__connection__pool__name="orders",
        sqlalchemy__pool__close__reason="overflow",
    ) == 1
