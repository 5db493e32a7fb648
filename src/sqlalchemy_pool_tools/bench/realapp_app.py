"""The app of the ``realapp`` benchmark: what a user runs, under ``opentelemetry-instrument``.

A FastAPI service with per-request CPU work and one PK lookup: ``GET /me`` verifies an HS256
JWT from the ``Authorization`` header (signature, expiry), then loads the token's user with
``session.get(User, id)`` through a request-scoped ``AsyncSession`` (asyncpg, pool 5 + 10) and
returns it through a response model. Nothing here knows about OpenTelemetry: the FastAPI and
SQLAlchemy instrumentations, the SDK, the Prometheus exporter and our instrumentor are all
brought in by ``opentelemetry-instrument`` (see :mod:`.realapp`), ours switched off with
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=sqlalchemy_pool`` in the reference runs.

The only benchmark-specific parts: a batch span processor feeding a span counter (standing in
for the OTLP exporter a user would configure: spans are created, batched and exported on the
processor's thread) and ``GET /bench/stats`` (requests served, spans by name, whether our
instrumentor is active), which the runner reads after each run.

Environment: ``SQLA_POOL_BENCH_DB_URL`` (a ``postgresql+asyncpg://`` URL),
``SQLA_POOL_BENCH_POOL_SIZE`` (5), ``SQLA_POOL_BENCH_MAX_OVERFLOW`` (10).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .realapp_data import User, UserOut, verify_token


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------
def _count_spans() -> Any:
    """A batch span processor into a counter on the global (SDK) tracer provider, if any."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if not hasattr(provider, "add_span_processor"):
        return None
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from .harness import CountingSpanExporter

    exporter = CountingSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return exporter


def _official_sqlalchemy_instrumentation() -> None:
    """The official SQLAlchemy instrumentation, as a user on SQLAlchemy 2.0 gets it from
    ``opentelemetry-instrument``. Its package declares ``sqlalchemy < 2.1``, so on 2.1 the
    auto-instrumentation skips it (a dependency conflict): then it is switched on here, with
    its dependency check skipped, before the engine exists (it wraps ``create_async_engine``).
    Only when some OTel SDK is configured, i.e. under ``opentelemetry-instrument``."""
    from opentelemetry import trace

    if not hasattr(trace.get_tracer_provider(), "add_span_processor"):
        return
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(skip_dep_check=True)


class GcPauses:
    """Collections per generation and the time the process spent in them (gc.callbacks):
    what a latency tail made of garbage-collection pauses looks like."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        generation = info["generation"]
        elapsed = time.perf_counter() - self._start
        self.count[generation] += 1
        self.total_s[generation] += elapsed
        self.max_s[generation] = max(self.max_s[generation], elapsed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": list(self.count),
            "total_ms": [round(t * 1000, 3) for t in self.total_s],
            "max_ms": [round(t * 1000, 3) for t in self.max_s],
            "objects": len(gc.get_objects()),
        }


gc_pauses = GcPauses()
spans = _count_spans()
_official_sqlalchemy_instrumentation()
engine = sa_asyncio.create_async_engine(  # looked up now: the official wrapper is in place
    os.environ["SQLA_POOL_BENCH_DB_URL"],
    pool_size=int(os.environ.get("SQLA_POOL_BENCH_POOL_SIZE", "5")),
    max_overflow=int(os.environ.get("SQLA_POOL_BENCH_MAX_OVERFLOW", "10")),
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
served = {"me": 0}
app = FastAPI()


class FloorRecords:
    """``SQLA_POOL_BENCH_FLOOR=1`` (with ours off): the two ``Histogram.record`` calls the
    semantic conventions require per checkout (wait_time; use_time with ``http.route``), made
    by the app in the request's context -- the floor no pool instrumentation can go below."""

    def __init__(self) -> None:
        from opentelemetry import metrics

        from .harness import FLOOR_A, FLOOR_ATTRS, FLOOR_B, semconv

        meter = metrics.get_meter("sqlalchemy_pool_tools.bench.floor")
        buckets = list(semconv.DURATION_BUCKETS)
        self.wait, self.use = (
            meter.create_histogram(name, unit="s", explicit_bucket_boundaries_advisory=buckets)
            for name in (FLOOR_A, FLOOR_B)
        )
        self.attrs = FLOOR_ATTRS
        self.route_attrs = {**FLOOR_ATTRS, semconv.HTTP_ROUTE: "/me"}


floor = FloorRecords() if os.environ.get("SQLA_POOL_BENCH_FLOOR") == "1" else None


async def get_db() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        if floor is None:
            yield session
            return
        start = time.perf_counter()
        floor.wait.record(0.0001, floor.attrs)
        yield session
        floor.use.record(time.perf_counter() - start, floor.route_attrs)


async def current_user(
    db: Annotated[AsyncSession, Depends(get_db)],
    authorization: Annotated[str, Header()] = "",
) -> User:
    scheme, _, token = authorization.partition(" ")
    try:
        if scheme.lower() != "bearer":
            raise ValueError("not a bearer token")
        claims = verify_token(token)
    except ValueError as error:
        raise HTTPException(status_code=401, detail=str(error)) from None
    user = await db.get(User, int(claims["sub"]))
    if user is None or not user.active:
        raise HTTPException(status_code=401, detail="unknown user")
    return user


@app.get("/me", response_model=UserOut)
async def me(user: Annotated[User, Depends(current_user)]) -> User:
    served["me"] += 1
    return user


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/bench/stats")
async def stats() -> dict[str, Any]:
    # The load generator stops with requests in flight: let them return their connections, so
    # "requests served" and the checkouts recorded describe the same set.
    deadline = time.monotonic() + 30
    while engine.pool.checkedout() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush()
    return {
        "requests": served["me"],
        "spans": dict(spans.by_name) if spans is not None else {},
        "ours_active": _ours_active(),
        "gc": gc_pauses.as_dict(),
        "ours_file": _ours_file(),
    }


def _ours_active() -> bool:
    try:
        from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor
    except ImportError:
        return False
    return bool(SQLAlchemyPoolInstrumentor().is_instrumented_by_opentelemetry)


def _ours_file() -> str | None:
    try:
        import opentelemetry.instrumentation.sqlalchemy_pool as ours
    except ImportError:
        return None
    return os.path.dirname(ours.__file__)
