"""Side by side with the official SQLAlchemy and FastAPI instrumentors: each keeps working,
nothing is counted twice, and our wait span sits under FastAPI's request span."""

from __future__ import annotations

import asyncio

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from sqlalchemy.ext.asyncio import create_async_engine
from tests.uvicorn_thread import UvicornThread


def test_with_official_instrumentors(otel, async_url):
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=5,
                                 pool_logging_name="both")  # fmt: skip
    official = SQLAlchemyInstrumentor()
    official.instrument(
        engine=engine.sync_engine,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        skip_dep_check=True,  # it refuses SQLAlchemy 2.1 otherwise
    )
    otel.instrument(wait_span_threshold_ms=20)
    app = FastAPI()

    @app.get("/slow")
    async def slow():
        async with engine.connect() as conn:
            await conn.execute(sa.text("select pg_sleep(0.2)"))
        return {"ok": True}

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    try:
        with UvicornThread(app) as server:

            async def two_requests():
                async with httpx.AsyncClient() as client:
                    first = asyncio.create_task(client.get(f"{server.url}/slow"))
                    await asyncio.sleep(0.1)  # the first request holds the only connection
                    second = asyncio.create_task(client.get(f"{server.url}/slow"))
                    return await asyncio.gather(first, second)

            responses = asyncio.run(two_requests())
            assert [r.status_code for r in responses] == [200, 200]
    finally:
        official.uninstrument()
        FastAPIInstrumentor.uninstrument_app(app)
        engine.sync_engine.dispose(close=False)

    assert otel.count("both") == (0, 1)
    # each checkout recorded exactly once by us
    assert (
        otel.value("db.client.connection.wait_time", db__client__connection__pool__name="both") == 2
    )
    assert (
        otel.value("db.client.connection.use_time", db__client__connection__pool__name="both") == 2
    )
    spans = otel.exporter.get_finished_spans()
    server_spans = {s.context.span_id: s for s in spans if s.kind.name == "SERVER"}
    assert len(server_spans) == 2
    assert len([s for s in spans if s.name == "select"]) == 2  # the official one still traces
    (wait,) = otel.spans("sqlalchemy.pool.wait")  # only the second request waited
    by_id = {s.context.span_id: s for s in spans}
    ancestor = by_id[wait.parent.span_id]  # the official "connect" span, or the request span
    while ancestor.kind.name != "SERVER":
        ancestor = by_id[ancestor.parent.span_id]
    assert ancestor.context.span_id in server_spans
    assert wait.attributes["sqlalchemy.pool.checked_out"] == 1
    # the official instrumentor's own (deprecated) usage metric is untouched by ours
    names = {
        m.name
        for rm in otel.reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "db.client.connection.count" in names
