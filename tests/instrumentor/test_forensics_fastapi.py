"""Pool-timeout forensics on a real FastAPI + uvicorn + asyncpg app: victims' ERROR wait spans
link to the requests holding the pool, the links name the holding handler and route, one
WARNING per burst, holders() agrees with the pool, and nothing is retained afterwards."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from sqlalchemy.ext.asyncio import create_async_engine
from tests.uvicorn_thread import UvicornThread

from opentelemetry.instrumentation.sqlalchemy_pool import holders


def test_timeouts_link_to_holding_requests(otel, async_url, caplog):
    caplog.set_level(logging.WARNING, logger="opentelemetry.instrumentation.sqlalchemy_pool")
    engine = create_async_engine(
        async_url, pool_size=2, max_overflow=0, pool_timeout=0.3, pool_logging_name="api"
    )
    otel.instrument(engines=[engine])
    app = FastAPI()
    snapshots = []
    hold_refs: list[weakref.ref] = []

    @app.get("/reports/{report_id}")
    async def slow_report(report_id: int):
        async with engine.connect() as conn:
            await conn.execute(sa.text("select 1"))
            await asyncio.sleep(1.0)  # holds the connection doing something else
        return {"id": report_id}

    @app.get("/orders")
    async def orders():
        snapshots.append((holders(engine), engine.pool.checkedout()))
        recorder = engine.sync_engine.pool.__dict__["_otel_sqlalchemy_pool_recorder"]
        hold_refs.extend(weakref.ref(hold) for hold in recorder.holders.values())
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1"))
        except sa.exc.TimeoutError:
            return {"timeout": True}
        return {"timeout": False}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)
    try:
        with UvicornThread(app) as server:

            async def scenario():
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                    holders_ = [asyncio.create_task(client.get(f"/reports/{i}")) for i in (1, 2)]
                    # Both holders have their connection (first connects are slow on a busy box;
                    # a connection counts as held once its checkout, connect included, returned).
                    for _ in range(250):
                        if len(holders(engine)) == 2:
                            break
                        await asyncio.sleep(0.02)
                    victims = await asyncio.gather(*(client.get("/orders") for _ in range(3)))
                    await asyncio.gather(*holders_)
                    return [v.json()["timeout"] for v in victims]

            assert asyncio.run(scenario()) == [True, True, True]
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    spans = otel.exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    waits = otel.spans("sqlalchemy.pool.wait")
    assert len(waits) == 3
    holder_servers = {
        s.context.span_id for s in spans if s.kind.name == "SERVER" and "reports" in s.name
    }
    assert len(holder_servers) == 2
    for wait in waits:
        assert wait.status.status_code.name == "ERROR"
        assert by_id[wait.parent.span_id].name.startswith("GET /orders")
        assert {link.context.span_id for link in wait.links} == holder_servers
        for link in wait.links:
            assert link.attributes["code.function.name"] == "slow_report"
            assert link.attributes["code.file.path"].endswith("test_forensics_fastapi.py")
            assert link.attributes["http.route"] == "/reports/{report_id}"
            assert link.attributes["sqlalchemy.pool.holder.age"] > 0.2
        assert wait.attributes["sqlalchemy.pool.holders.count"] == 2
    table = [r for r in caplog.records if "checkout timed out" in r.getMessage()]
    assert len(table) == 1
    assert (
        "slow_report" in table[0].getMessage() and "/reports/{report_id}" in table[0].getMessage()
    )
    # holders() agreed with the pool while the victims waited
    for snapshot, checked_out in snapshots:
        assert (len(snapshot), checked_out) == (2, 2)
        assert {row["http_route"] for row in snapshot} == {"/reports/{report_id}"}
    # nothing is retained once the holders are done
    recorder = engine.sync_engine.pool.__dict__["_otel_sqlalchemy_pool_recorder"]
    assert recorder.holders == {} and holders(engine) == []
    assert len(hold_refs) == 6
    gc.collect()
    assert [ref for ref in hold_refs if ref() is not None] == []
    engine.sync_engine.dispose(close=False)
