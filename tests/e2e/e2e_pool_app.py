"""A small FastAPI + asyncpg app for the end-to-end tests (run under uvicorn).

The pool is deliberately tiny by default (2 + 1 overflow, 0.3 s pool_timeout, 2 s recycle) so
that a handful of concurrent requests saturates it, checkouts time out, connections get recycled
and overflow connections get closed. Extra endpoints produce the other signals the dashboards
show: a long hold (leak kind long_hold), a transaction left idle (pg_stat_activity "idle in
transaction"), an AsyncSession (session metrics), a request session used by a background task
after the response (outlived_response) and a session left to the garbage collector.

Environment: E2E_DATABASE_URL (postgresql+asyncpg://...), E2E_POOL_SIZE / E2E_MAX_OVERFLOW /
E2E_POOL_TIMEOUT / E2E_POOL_RECYCLE (pool settings), E2E_TELEMETRY:

* ``prometheus`` (default; tests/e2e/test_prometheus_e2e.py): providers set up here, the pool
  and FastAPI instrumentations configured in code, metrics on GET /metrics
  (opentelemetry-exporter-prometheus, the direct-scrape naming path);
* ``otlp`` (tests/e2e/test_collector_e2e.py): nothing here; the app runs under
  ``opentelemetry-instrument`` as a user's app would, configured by OTEL_* environment
  variables, and exports OTLP to the collector.
"""

from __future__ import annotations

import asyncio
import gc
import os

import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

SLOW_QUERY_S = 0.4
HOLD_S = 1.5  # > leak_threshold_s below
IDLE_IN_TRANSACTION_S = 1.5
DIRECT_SCRAPE = os.environ.get("E2E_TELEMETRY", "prometheus") == "prometheus"

engine = create_async_engine(
    os.environ["E2E_DATABASE_URL"],
    pool_size=int(os.environ.get("E2E_POOL_SIZE", "2")),
    max_overflow=int(os.environ.get("E2E_MAX_OVERFLOW", "1")),
    pool_timeout=float(os.environ.get("E2E_POOL_TIMEOUT", "0.3")),
    pool_recycle=int(os.environ.get("E2E_POOL_RECYCLE", "2")),
    pool_pre_ping=True,
)
Session = async_sessionmaker(engine, expire_on_commit=True)

if DIRECT_SCRAPE:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

    resource = Resource.create({"service.name": "e2e-pool-app"})
    meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    tracer_provider = TracerProvider(resource=resource)
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


async def get_db():
    async with Session() as db:
        yield db


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
async def idle_in_transaction(seconds: float = IDLE_IN_TRANSACTION_S):
    async with engine.begin() as conn:
        await conn.execute(sa.text("select 1"))
        await asyncio.sleep(seconds)  # "idle in transaction" on the server
    return {"ok": True}


@app.get("/session/{item}")
async def session(item: int):
    async with Session() as db:
        value = await db.scalar(sa.text("select cast(:v as integer)"), {"v": item})
        await db.commit()
    return {"value": value}


async def _query_after_response(db: AsyncSession) -> None:
    await db.execute(sa.text("select 1"))


@app.get("/outlived")
async def outlived(background: BackgroundTasks, db: AsyncSession = Depends(get_db)):
    """The classic leak: the request's session handed to a task that runs after the response."""
    await db.execute(sa.text("select 1"))
    background.add_task(_query_after_response, db)
    return {"ok": True}


@app.get("/garbage-collected")
async def garbage_collected():
    """A session that takes a connection and is dropped without being closed."""
    db = Session()
    await db.execute(sa.text("select 1"))
    del db
    gc.collect()
    return {"ok": True}


if DIRECT_SCRAPE:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    FastAPIInstrumentor.instrument_app(
        app,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        excluded_urls="metrics,healthz",
    )
