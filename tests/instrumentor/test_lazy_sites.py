"""Code sites cost nothing at checkout: a checkout remembers its holder (the asyncio task or the
thread) and where it is gets resolved only when someone asks. Real FastAPI + uvicorn + asyncpg.

- a live holder is named by what it runs now (the awaiting line, in a helper it called);
- a holder that is gone is named by where it can still be told: its request's endpoint;
- plain threads outside any request still take their checkout site at checkout.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from tests.uvicorn_thread import UvicornThread
from tests.waiting import wait_for

from opentelemetry.instrumentation.sqlalchemy_pool import holders
from opentelemetry.instrumentation.sqlalchemy_pool.recorder import POOL_RECORDER_ATTR


async def slow_partner_call(release: asyncio.Event) -> None:
    await release.wait()  # "awaiting an HTTP call while holding a transaction"


def _recorder(engine):
    return engine.sync_engine.pool.__dict__[POOL_RECORDER_ATTR]


def test_live_holder_is_named_by_what_it_awaits_now(otel, async_url):
    otel.instrument()
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0, pool_logging_name="lazy")
    Session = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()
    holding = threading.Event()
    release_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @app.get("/checkout")
    async def checkout_endpoint():
        async with Session() as session:
            await session.execute(sa.text("select 1"))
            release = asyncio.Event()
            release_box.append((asyncio.get_running_loop(), release))
            holding.set()
            await slow_partner_call(release)
            await session.commit()
        return {"ok": True}

    with UvicornThread(app) as server:

        def call() -> None:
            httpx.get(f"{server.url}/checkout", timeout=30)

        client = threading.Thread(target=call)
        client.start()
        try:
            assert holding.wait(10)
            (hold,) = _recorder(engine).holders.values()
            assert hold.site is None  # no stack walk at checkout
            assert hold.holder is not None and not isinstance(hold.holder, int)  # its task
            (row,) = holders(engine)
            # What it does now: awaiting inside the helper, on the line of the await.
            assert row["code_function"] == "slow_partner_call"
            assert row["code_file"].endswith("test_lazy_sites.py")
            assert row["code_line"] == slow_partner_call.__code__.co_firstlineno + 1
            assert row["http_route"] == "/checkout"
        finally:
            for loop, release in release_box:
                loop.call_soon_threadsafe(release.set)
            client.join(10)
    assert holders(engine) == []
    engine.sync_engine.dispose(close=False)


def test_garbage_collected_session_is_named_by_its_endpoint(otel, async_url):
    """The holder is gone when the GC reclaims the session: the checkout line is lost, the
    request's endpoint (function, file, definition line) is what the leak report names."""
    otel.instrument()  # session_spans=anomalies: a GC-reclaimed session is one
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0, pool_logging_name="gcl")
    Session = async_sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()

    @app.get("/forgets")
    async def forgets_to_close():
        session = Session()
        await session.execute(sa.text("select 1"))
        app.state.leaked = session
        return {"ok": True}

    with UvicornThread(app) as server:
        assert httpx.get(f"{server.url}/forgets", timeout=30).status_code == 200
        (hold,) = _recorder(engine).holders.values()
        assert hold.site is None
        del app.state.leaked
        assert wait_for(lambda: (gc.collect() or True) and not _recorder(engine).holders)
        assert wait_for(
            lambda: any(
                s.attributes["sqlalchemy.session.outcome"] == "garbage_collected"
                for s in otel.spans("sqlalchemy.session")
            ),
            timeout=10,
        )
    (span,) = [
        s
        for s in otel.spans("sqlalchemy.session")
        if s.attributes["sqlalchemy.session.outcome"] == "garbage_collected"
    ]
    assert span.attributes["code.function.name"] == "forgets_to_close"
    assert span.attributes["code.line.number"] == forgets_to_close.__code__.co_firstlineno
    engine.sync_engine.dispose(close=False)


def take_in_a_thread(engine):  # a plain thread outside any request: walked at checkout
    return engine.connect()


def test_thread_outside_a_request_keeps_its_checkout_site(otel, make_sync_engine):
    otel.instrument()
    engine = make_sync_engine(pool_logging_name="thread")
    conn = take_in_a_thread(engine)
    try:
        (hold,) = engine.pool.__dict__[POOL_RECORDER_ATTR].holders.values()
        assert hold.site is not None and hold.site.function == "take_in_a_thread"
        assert hold.holder == threading.get_ident()
        (row,) = holders(engine)
        assert row["code_function"] == "take_in_a_thread"
    finally:
        conn.close()


def test_code_sites_off_resolves_nothing(otel, make_sync_engine):
    otel.instrument(capture_code_site=False)
    engine = make_sync_engine(pool_logging_name="nosites")
    with engine.connect():
        (row,) = holders(engine)
        assert row["code_site"] is None and row["code_function"] is None
