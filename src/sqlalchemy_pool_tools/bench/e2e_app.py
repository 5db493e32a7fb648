"""The end-to-end benchmark app: FastAPI + SQLAlchemy asyncpg, run by uvicorn in a subprocess.

Configured by environment variables (set by :mod:`.e2e`):

- ``SQLA_POOL_BENCH_DB_URL``: a ``postgresql+asyncpg://`` URL;
- ``SQLA_POOL_BENCH_MODE``: ``bare`` (FastAPI instrumentor only) or ``ours`` (FastAPI
  instrumentor + our instrumentor with its defaults);
- ``SQLA_POOL_BENCH_POOL_SIZE`` (5) and ``SQLA_POOL_BENCH_EXPORT_INTERVAL_MS`` (1000);
- ``SQLA_POOL_BENCH_OURS_OPTIONS``: a JSON object of extra ``instrument()`` keyword
  arguments in ``ours`` mode (for experiments; the suite uses the defaults).

Both modes use the same SDK providers: a periodic metric reader into an in-memory exporter
and a batch span processor into a counting exporter. ``GET /q`` runs ``SELECT 1`` in a
request-scoped ``AsyncSession``; ``GET /bench/stats`` reports how many ``/q`` requests were
served and how many checkouts the wait_time histogram recorded (they must be equal).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from .harness import WAIT_TIME, make_providers, ours_file

MODE = os.environ.get("SQLA_POOL_BENCH_MODE", "bare")
if MODE not in ("bare", "ours"):
    raise SystemExit(f"SQLA_POOL_BENCH_MODE must be bare or ours, not {MODE!r}")
POOL_SIZE = int(os.environ.get("SQLA_POOL_BENCH_POOL_SIZE", "5"))
INTERVAL_MS = float(os.environ.get("SQLA_POOL_BENCH_EXPORT_INTERVAL_MS", "1000"))

providers = make_providers(INTERVAL_MS)
engine = create_async_engine(
    os.environ["SQLA_POOL_BENCH_DB_URL"], pool_size=POOL_SIZE, max_overflow=0, pool_timeout=60
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
SELECT_1 = text("SELECT 1")
served = {"q": 0, "inflight": 0}

if MODE == "ours":
    from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

    SQLAlchemyPoolInstrumentor().instrument(
        engine=engine,
        meter_provider=providers.meter_provider,
        tracer_provider=providers.tracer_provider,
        **json.loads(os.environ.get("SQLA_POOL_BENCH_OURS_OPTIONS") or "{}"),
    )


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


app = FastAPI()


@app.get("/q")
async def query(session: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, Any]:
    served["q"] += 1
    served["inflight"] += 1
    try:
        value = (await session.execute(SELECT_1)).scalar_one()
    finally:
        served["inflight"] -= 1
    return {"value": value}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "mode": MODE}


@app.get("/bench/stats")
async def stats() -> dict[str, Any]:
    # The load generator stops with requests in flight: let them finish and return their
    # connections, so "requests served" and "checkouts recorded" describe the same set.
    deadline = time.monotonic() + 30
    while (served["inflight"] or engine.pool.checkedout()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    providers.flush_metrics()
    providers.tracer_provider.force_flush()
    return {
        "mode": MODE,
        "requests": served["q"],
        "recorded_checkouts": providers.metrics.histogram_count(WAIT_TIME),
        "exports": providers.metrics.exports,
        "spans": dict(providers.spans.by_name),
        "ours_file": ours_file(),
    }


FastAPIInstrumentor.instrument_app(
    app, tracer_provider=providers.tracer_provider, meter_provider=providers.meter_provider
)
