"""Session spans, held-idle time and 'outlived its response'.

Real FastAPI + uvicorn + asyncpg."""

from __future__ import annotations

import asyncio
import gc

import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from tests.uvicorn_thread import UvicornThread
from tests.waiting import wait_for

from opentelemetry.instrumentation.sqlalchemy_pool import semconv

LEAK = "sqlalchemy.pool.leaks"


def build_app(async_url) -> tuple[FastAPI, object]:
    engine = create_async_engine(async_url, pool_size=5, max_overflow=0, pool_timeout=5,
                                 pool_logging_name="app")  # fmt: skip
    SessionLocal = async_sessionmaker(engine, expire_on_commit=False)

    async def get_db():
        async with SessionLocal() as session:
            yield session

    app = FastAPI()

    @app.get("/normal")
    async def normal(db: AsyncSession = Depends(get_db)):
        return {"one": (await db.execute(sa.text("select 1"))).scalar()}

    async def use_request_session_later(db: AsyncSession) -> None:
        await db.execute(sa.text("select pg_sleep(0.05)"))
        await db.commit()

    @app.get("/leaky-background")
    async def leaky_background(background: BackgroundTasks, db: AsyncSession = Depends(get_db)):
        await db.execute(sa.text("select 1"))
        background.add_task(use_request_session_later, db)
        return {"ok": True}

    async def use_fresh_session() -> None:
        async with SessionLocal() as session:
            await session.execute(sa.text("select pg_sleep(0.05)"))
            await session.commit()

    @app.get("/fixed-background")
    async def fixed_background(background: BackgroundTasks, db: AsyncSession = Depends(get_db)):
        await db.execute(sa.text("select 1"))
        background.add_task(use_fresh_session)
        return {"ok": True}

    @app.get("/idle-in-transaction")
    async def idle_in_transaction():
        async with SessionLocal() as session:
            await session.execute(sa.text("select 1"))
            await asyncio.sleep(0.6)  # a slow HTTP call inside the transaction
            await session.commit()
        return {"ok": True}

    @app.get("/never-closed")
    async def never_closed():
        session = SessionLocal()
        await session.execute(sa.text("select 1"))
        app.state.leaked = session  # keeps it alive past the response
        return {"ok": True}

    @app.get("/create-task")
    async def create_task(db: AsyncSession = Depends(get_db)):
        await db.execute(sa.text("select 1"))
        app.state.task = asyncio.create_task(use_request_session_later(db))
        return {"ok": True}

    return app, engine


@pytest.fixture
def app_server(otel, async_url):
    otel.instrument(session_spans="all", leak_threshold_s=0)
    app, engine = build_app(async_url)
    with UvicornThread(app) as server:
        server.app = app
        yield server
    engine.sync_engine.dispose(close=False)


def _leaks(otel, kind):
    return (
        otel.value(
            LEAK, db__client__connection__pool__name="app", sqlalchemy__pool__leak__kind=kind
        )
        or 0
    )


def _session_spans(otel):
    return otel.spans("sqlalchemy.session")


def test_normal_request_scoped_session(otel, app_server):
    assert httpx.get(f"{app_server.url}/normal").json() == {"one": 1}
    assert wait_for(lambda: len(_session_spans(otel)) == 1)
    (span,) = _session_spans(otel)
    attrs = span.attributes
    assert attrs["sqlalchemy.session.statements"] >= 1
    assert attrs["sqlalchemy.session.outlived_response"] is False
    assert span.events == ()
    assert attrs["sqlalchemy.session.outcome"] in ("close", "rollback")
    assert attrs["sqlalchemy.session.async"] is True
    assert attrs["http.route"] == "/normal"
    assert attrs["code.function.name"] == "normal"
    assert attrs["code.file.path"].endswith("test_sessions.py")
    assert _leaks(otel, "outlived_response") == 0


def test_leaky_background_task_is_flagged(otel, app_server, caplog):
    assert httpx.get(f"{app_server.url}/leaky-background").status_code == 200
    assert wait_for(lambda: _leaks(otel, "outlived_response") == 1)
    assert wait_for(
        lambda: any(
            s.attributes["sqlalchemy.session.outlived_response"] for s in _session_spans(otel)
        )
    )
    flagged = [
        s for s in _session_spans(otel) if s.attributes["sqlalchemy.session.outlived_response"]
    ]
    assert flagged[0].attributes["code.function.name"] == "leaky_background"
    # The span event the collector's tail sampling keeps traces for, at the moment of the flag.
    (event,) = flagged[0].events
    assert event.name == semconv.OUTLIVED_RESPONSE_EVENT
    assert event.attributes[semconv.OUTLIVED_ACTION] == semconv.OUTLIVED_RAN_STATEMENT
    assert event.attributes[semconv.POOL_NAME] == "app"
    assert flagged[0].start_time < event.timestamp < flagged[0].end_time
    assert "after its HTTP response was sent" in caplog.text
    assert "leaky_background" in caplog.text


def test_fresh_session_in_background_task_is_not_flagged(otel, app_server):
    assert httpx.get(f"{app_server.url}/fixed-background").status_code == 200
    assert wait_for(lambda: len(_session_spans(otel)) == 2)
    assert _leaks(otel, "outlived_response") == 0
    functions = {s.attributes["code.function.name"] for s in _session_spans(otel)}
    assert functions == {"fixed_background", "use_fresh_session"}


def test_create_task_with_request_session_is_flagged(otel, app_server):
    assert httpx.get(f"{app_server.url}/create-task").status_code == 200
    assert wait_for(lambda: _leaks(otel, "outlived_response") >= 1)


def test_idle_in_transaction_held_idle_time(otel, app_server):
    assert httpx.get(f"{app_server.url}/idle-in-transaction").status_code == 200
    assert wait_for(lambda: len(_session_spans(otel)) == 1)
    (span,) = _session_spans(otel)
    assert span.attributes["sqlalchemy.session.held_idle"] >= 0.5
    assert span.attributes["sqlalchemy.session.outcome"] == "commit"
    assert span.attributes["code.function.name"] == "idle_in_transaction"
    (held_idle,) = otel.points("sqlalchemy.pool.connection.held_idle_time")
    (use,) = otel.points("db.client.connection.use_time")
    assert use.attributes["http.route"] == "/idle-in-transaction"  # hold time by route
    assert held_idle.sum >= 0.5
    assert held_idle.sum / use.sum > 0.8


def test_never_closed_session_outlives_response_and_is_garbage_collected(otel, app_server):
    assert httpx.get(f"{app_server.url}/never-closed").status_code == 200
    assert wait_for(lambda: _leaks(otel, "outlived_response") == 1)
    assert otel.count("app")[0] == 1
    del app_server.app.state.leaked
    assert wait_for(lambda: (gc.collect() or True) and otel.count("app")[0] == 0)
    # Work queued inside the GC is done by the leak watchdog (every <= 5 s) or a checkout.
    assert wait_for(lambda: _leaks(otel, "garbage_collected") == 1, timeout=10)
    gc_spans = [
        s
        for s in _session_spans(otel)
        if s.attributes["sqlalchemy.session.outcome"] == "garbage_collected"
    ]
    assert len(gc_spans) == 1
    assert gc_spans[0].attributes["code.function.name"] == "never_closed"
    assert gc_spans[0].attributes["sqlalchemy.session.outlived_response"] is True
    (event,) = gc_spans[0].events
    assert event.name == semconv.OUTLIVED_RESPONSE_EVENT
    assert event.attributes[semconv.OUTLIVED_ACTION] == semconv.OUTLIVED_HELD_AT_REQUEST_END
