"""A small FastAPI + asyncpg app for tests/e2e/test_prometheus_e2e.py (run under uvicorn).

The pool is deliberately tiny (2 + 1 overflow, 0.3 s pool_timeout, 2 s recycle) so that a
handful of concurrent requests saturates it, checkouts time out, connections get recycled and
overflow connections get closed. Extra endpoints produce the other signals the dashboards show:
a long hold (leak kind long_hold), a transaction left idle (pg_stat_activity "idle in
transaction") and an AsyncSession (session metrics).

Environment: E2E_DATABASE_URL (postgresql+asyncpg://...), OTEL_SEMCONV_STABILITY_OPT_IN=http.
Metrics: GET /metrics (opentelemetry-exporter-prometheus, i.e. the direct-scrape naming path).
"""

from __future__ import annotations

import asyncio
import os

import sqlalchemy as sa
from fastapi import FastAPI, Response
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

SLOW_QUERY_S = 0.4
HOLD_S = 1.5  # > leak_threshold_s below
IDLE_IN_TRANSACTION_S = 1.5

resource = Resource.create({"service.name": "e2e-pool-app"})
meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
tracer_provider = TracerProvider(resource=resource)

engine = create_async_engine(
    os.environ["E2E_DATABASE_URL"],
    pool_size=2,
    max_overflow=1,
    pool_timeout=0.3,
    pool_recycle=2,
    pool_pre_ping=True,
)
Session = async_sessionmaker(engine, expire_on_commit=True)

SQLAlchemyPoolInstrumentor().instrument(
    meter_provider=meter_provider,
    tracer_provider=tracer_provider,
    engine=engine,
    pool_name="main",
    wait_span_threshold_ms=50,
    session_spans="all",
    leak_threshold_s=1,
    pg_activity=True,
    pg_activity_interval_s=1,
    set_application_name=True,
)

app = FastAPI()


@app.exception_handler(sa.exc.TimeoutError)
async def pool_timeout(_request, _exc):
    return Response("pool timeout", status_code=503)


@app.get("/healthz")
async def healthz():
    return {"ok": True}


@app.get("/slow")
async def slow():
    async with engine.connect() as conn:
        await conn.execute(sa.text("select pg_sleep(:s)"), {"s": SLOW_QUERY_S})
    return {"ok": True}


@app.get("/hold")
async def hold():
    async with engine.connect() as conn:
        await conn.execute(sa.text("select 1"))
        await asyncio.sleep(HOLD_S)  # held with no statement running
    return {"ok": True}


@app.get("/idle-in-transaction")
async def idle_in_transaction():
    async with engine.begin() as conn:
        await conn.execute(sa.text("select 1"))
        await asyncio.sleep(IDLE_IN_TRANSACTION_S)  # "idle in transaction" on the server
    return {"ok": True}


@app.get("/session/{item}")
async def session(item: int):
    async with Session() as db:
        value = await db.scalar(sa.text("select cast(:v as integer)"), {"v": item})
        await db.commit()
    return {"value": value}


@app.get("/metrics")
def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


FastAPIInstrumentor.instrument_app(
    app,
    meter_provider=meter_provider,
    tracer_provider=tracer_provider,
    excluded_urls="metrics,healthz",
)
