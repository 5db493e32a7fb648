"""The reference FastAPI + SQLAlchemy (async) application, in a leaky and a fixed build.

The FIXED build is the pattern to copy:

* one ``AsyncEngine`` per process, with every pool setting spelled out;
* ``async_sessionmaker(expire_on_commit=False)``: committed objects stay readable without
  a lazy refresh (which async sessions cannot do implicitly);
* a request-scoped ``get_db`` dependency: ``async with SessionLocal() as session: yield``;
* short, explicit transactions (``async with session.begin():``) that end before any slow
  I/O, so a connection is checked out only while SQL actually runs;
* background tasks open their own session; they never borrow the request's.

The LEAKY build differs only in ``GET /orders/report``: it hands the request's session to a
background task, which keeps the transaction open across a slow HTTP call (simulated with
``asyncio.sleep``) after the response was sent. Under load the pool runs dry although every
query is fast: connections sit "idle in transaction" in sessions that outlived their
response.

Routes: ``GET /orders`` (a short query), ``GET /orders/report`` (the two builds differ),
``GET /metrics`` (Prometheus), ``GET /healthz`` and ``GET /_debug/pool-holders`` (who holds
the pool's connections right now). Start it with ``python -m sqlalchemy_pool_tools.demo.server``
or the ``sqlalchemy-pool demo --serve`` command.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import DateTime, ForeignKey, Integer, String, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_pool_tools.demo import HOLDERS_PATH

Build = Literal["fixed", "leaky"]
BUILDS: tuple[Build, ...] = ("fixed", "leaky")
ORDER_ROWS = 1000


# --- schema ----------------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    total_cents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReportLog(Base):
    """One row per report sent: the write the background task makes."""

    __tablename__ = "report_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    orders: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def create_schema(database_url: str | URL, rows: int = ORDER_ROWS) -> None:
    """Create the tables and a little data (sync, psycopg): run once before the app starts."""
    import sqlalchemy as sa

    url = make_url(database_url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        now = datetime.now(timezone.utc)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(Customer), [{"id": i, "name": f"customer {i}"} for i in range(1, 101)]
            )
            conn.execute(
                sa.insert(Order),
                [
                    {"customer_id": i % 100 + 1, "total_cents": 100 + i * 7, "created_at": now}
                    for i in range(1, rows + 1)
                ],
            )
    finally:
        engine.dispose()


# --- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    database_url: str
    build: Build = "fixed"
    pool_size: int = 10
    max_overflow: int = 5
    pool_timeout: float = 5.0  # seconds a request waits for a connection before failing
    pool_recycle: int = 1800  # below any server/proxy idle timeout
    pool_pre_ping: bool = True  # survive database restarts and dropped idle connections
    work_ms: float = 5.0  # server-side time of the short queries (pg_sleep)
    slow_io_ms: float = 500.0  # the "slow HTTP call" made by the report task
    pool_name: str = "demo"
    pg_activity_interval_s: float = 1.0
    leak_threshold_s: float = 5.0
    sqlalchemy_spans: bool = False  # also run the official SQLAlchemy instrumentor


def create_async_engine(settings: Settings) -> AsyncEngine:
    """The process's one engine. Every pool knob is explicit: the defaults are rarely right."""
    url = make_url(settings.database_url).set(drivername="postgresql+asyncpg")
    return sa_create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=settings.pool_pre_ping,
    )


# --- dependencies ----------------------------------------------------------------------------
async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, closed when the request is done.

    Closing returns the connection to the pool -- but FastAPI runs this cleanup only after
    the response *and its background tasks* are finished. Handlers therefore end their
    transactions themselves (``async with session.begin():``); then the session holds no
    connection between statements, whatever the cleanup timing.
    """
    session_factory: async_sessionmaker[AsyncSession] = request.app.state.SessionLocal
    async with session_factory() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


DbSession = Annotated[AsyncSession, Depends(get_db)]
AppSettings = Annotated[Settings, Depends(get_settings)]


# --- shared routes ---------------------------------------------------------------------------
common = APIRouter()


def simulated_work(work_ms: float) -> Any:
    """A scalar subquery that keeps the server busy ``work_ms`` (evaluated once per
    statement): stands in for a heavier query, so the connection is busy, not idle."""
    return select(func.pg_sleep(work_ms / 1000)).scalar_subquery().label("work")


def order_summary_query(work_ms: float) -> Any:
    return select(
        func.count(Order.id).label("orders"),
        func.coalesce(func.sum(Order.total_cents), 0).label("total_cents"),
        simulated_work(work_ms),
    )


@common.get("/orders")
async def list_orders(session: DbSession, settings: AppSettings) -> dict[str, Any]:
    """A short query: one customer's latest orders."""
    customer_id = random.randint(1, 100)
    async with session.begin():  # the connection goes back to the pool at the end of the block
        rows = await session.execute(
            select(Order.id, Order.total_cents, simulated_work(settings.work_ms))
            .where(Order.customer_id == customer_id)
            .order_by(Order.id.desc())
            .limit(5)
        )
        orders = [{"id": row.id, "total_cents": row.total_cents} for row in rows]
    return {"customer_id": customer_id, "orders": orders}


async def call_reporting_service(summary: dict[str, Any], slow_io_ms: float) -> None:
    """Stand-in for a slow HTTP call to another service (no database involved)."""
    await asyncio.sleep(slow_io_ms / 1000)


# --- the FIXED build -------------------------------------------------------------------------
fixed = APIRouter()


@fixed.get("/orders/report")
async def orders_report(
    session: DbSession, settings: AppSettings, background: BackgroundTasks, request: Request
) -> dict[str, Any]:
    async with session.begin():
        row = (await session.execute(order_summary_query(settings.work_ms))).one()
    summary = {"orders": row.orders, "total_cents": int(row.total_cents)}
    # Hand the task the session *factory*, not the session: it outlives this request.
    background.add_task(send_report, request.app.state.SessionLocal, summary, settings.slow_io_ms)
    return summary


async def send_report(
    session_factory: async_sessionmaker[AsyncSession], summary: dict[str, Any], slow_io_ms: float
) -> None:
    """Slow I/O first, with no connection held; then one short transaction of its own."""
    await call_reporting_service(summary, slow_io_ms)
    async with session_factory() as session, session.begin():
        session.add(ReportLog(orders=summary["orders"]))


# --- the LEAKY build (the anti-pattern, for the demo) ----------------------------------------
leaky = APIRouter()


@leaky.get("/orders/report")
async def leaky_orders_report(
    session: DbSession, settings: AppSettings, background: BackgroundTasks
) -> dict[str, Any]:
    # BUG 1: autobegin opens a transaction that nothing ends before the response.
    row = (await session.execute(order_summary_query(settings.work_ms))).one()
    summary = {"orders": row.orders, "total_cents": int(row.total_cents)}
    # BUG 2: the request's session goes to a task that runs after the response is sent.
    background.add_task(leaky_send_report, session, summary, settings.slow_io_ms)
    return summary


async def leaky_send_report(
    session: AsyncSession, summary: dict[str, Any], slow_io_ms: float
) -> None:
    # BUG 3: a slow HTTP call inside the open transaction: the connection sits
    # "idle in transaction", unusable by anyone else, for the whole call.
    await call_reporting_service(summary, slow_io_ms)
    session.add(ReportLog(orders=summary["orders"]))
    await session.commit()


# --- operations routes -----------------------------------------------------------------------
ops = APIRouter()


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/metrics")
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@ops.get(HOLDERS_PATH)
def pool_holders(settings: AppSettings, request: Request) -> dict[str, Any]:
    """Who holds the pool's connections right now: age, idle-in-transaction time, code site,
    route (never SQL or parameters). Read by ``sqlalchemy-pool holders URL`` and the demo;
    keep such a route internal in a real service."""
    try:
        from opentelemetry.instrumentation.sqlalchemy_pool import holders
    except ImportError:
        return {"pools": {}}
    return {"pools": {settings.pool_name: holders(request.app.state.engine, limit=20)}}


async def pool_timeout_handler(request: Request, exc: Exception) -> Response:
    """No connection within ``pool_timeout``: a clear, retryable 503 instead of a 500 (and
    well before the proxy gives up on the request with a 504)."""
    return JSONResponse(
        {"detail": "database busy, retry later"}, status_code=503, headers={"Retry-After": "1"}
    )


# --- telemetry -------------------------------------------------------------------------------
@dataclass
class Telemetry:
    registry: Any
    tracer_provider: Any
    meter_provider: Any
    uninstrument: list[Any]


def instrument(app: FastAPI, engine: AsyncEngine, settings: Settings) -> Telemetry:
    """OpenTelemetry for this app only: private providers and a private Prometheus registry."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

    resource = Resource.create({"service.name": f"sqlalchemy-pool-demo-{settings.build}"})
    registry = CollectorRegistry()
    meter_provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)], resource=resource
    )
    tracer_provider = TracerProvider(resource=resource)
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls="metrics,healthz,_debug",
    )
    telemetry = Telemetry(registry, tracer_provider, meter_provider, [])
    pool_instrumentor = SQLAlchemyPoolInstrumentor()
    pool_instrumentor.instrument(
        engine=engine,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        pool_name=settings.pool_name,
        leak_threshold_s=settings.leak_threshold_s,
        pg_activity=True,
        pg_activity_interval_s=settings.pg_activity_interval_s,
        set_application_name=True,
    )
    telemetry.uninstrument.append(pool_instrumentor)
    if settings.sqlalchemy_spans:
        # Query spans from the official instrumentor; its dependency check predates
        # SQLAlchemy 2.1, which it handles fine.
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        sqlalchemy_instrumentor = SQLAlchemyInstrumentor()
        sqlalchemy_instrumentor.instrument(
            engine=engine.sync_engine,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            skip_dep_check=True,
        )
        telemetry.uninstrument.append(sqlalchemy_instrumentor)
    return telemetry


# --- the app factory -------------------------------------------------------------------------
def create_app(
    database_url: str | URL,
    build: Build = "fixed",
    *,
    pool_size: int = 10,
    max_overflow: int = 5,
    pool_timeout: float = 5.0,
    pool_recycle: int = 1800,
    work_ms: float = 5.0,
    slow_io_ms: float = 500.0,
    pool_name: str = "demo",
    pg_activity_interval_s: float = 1.0,
    leak_threshold_s: float = 5.0,
    sqlalchemy_spans: bool = False,
    telemetry: bool = True,
) -> FastAPI:
    """The demo app. In a real service the engine and ``SessionLocal`` are module globals
    built from configuration; a factory lets the demo run both builds side by side."""
    if build not in BUILDS:
        raise ValueError(f"build must be one of {BUILDS}, not {build!r}")
    settings = Settings(
        database_url=make_url(database_url).render_as_string(hide_password=False),
        build=build,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=pool_recycle,
        work_ms=work_ms,
        slow_io_ms=slow_io_ms,
        pool_name=pool_name,
        pg_activity_interval_s=pg_activity_interval_s,
        leak_threshold_s=leak_threshold_s,
        sqlalchemy_spans=sqlalchemy_spans,
    )
    engine = create_async_engine(settings)
    # expire_on_commit=False: after commit, attributes stay loaded; an async session cannot
    # lazily reload them (that would be implicit I/O, MissingGreenlet).
    session_local = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for instrumentor in app.state.telemetry.uninstrument if telemetry else ():
                instrumentor.uninstrument()
            await engine.dispose()  # close pooled connections cleanly on shutdown

    app = FastAPI(title=f"sqlalchemy-pool demo ({build})", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.SessionLocal = session_local
    app.include_router(common)
    app.include_router(fixed if build == "fixed" else leaky)
    app.include_router(ops)
    app.add_exception_handler(sa_exc.TimeoutError, pool_timeout_handler)
    if telemetry:
        app.state.telemetry = instrument(app, engine, settings)
        app.state.registry = app.state.telemetry.registry
    else:
        from prometheus_client import CollectorRegistry

        app.state.registry = CollectorRegistry()
    return app
