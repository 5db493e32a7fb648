"""Transparency: with the instrumentor on, SQLAlchemy behaves exactly as without it.

Each pool class runs the same scenario twice against a real PostgreSQL -- once before
``instrument()`` and once after -- and everything observable by the application is compared:
return values, exceptions (type and message, pool ``TimeoutError`` included), the sequence of
pool events seen by a user listener (connect/checkout/checkin/reset/invalidate/close/...), and
the pool's own bookkeeping at the end. Covered: reset-on-return, invalidation, pre-ping after
``pg_terminate_backend``, recycle, overflow and timeout, ``pool.dispose()``,
``engine.dispose()`` with a connection checked out, ``pool.recreate()``, the fork pattern
(``engine.dispose(close=False)`` in a child) and asyncio cancellation with asyncpg.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import (
    AssertionPool,
    AsyncAdaptedQueuePool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)
from sqlalchemy.pool.base import _ConnectionRecord

from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor
from opentelemetry.instrumentation.sqlalchemy_pool.hooks import Listen, set_application_name
from opentelemetry.instrumentation.sqlalchemy_pool.recorder import pool_records

from .conftest import counter, gauges

PACKAGE = "opentelemetry.instrumentation.sqlalchemy_pool"
SELECT_1 = sa.text("SELECT 1")
SELECT_PID = sa.text("SELECT pg_backend_pid()")
RECYCLE_S = 0.25

SYNC_POOLS = [QueuePool, NullPool, StaticPool, SingletonThreadPool, AssertionPool]
POOL_KWARGS: dict[type, dict[str, Any]] = {
    QueuePool: {"pool_size": 1, "max_overflow": 1, "pool_timeout": 0.2},
    SingletonThreadPool: {"pool_size": 2},
}
POOL_EVENTS = (
    "connect",
    "checkout",
    "checkin",
    "reset",
    "invalidate",
    "soft_invalidate",
    "close",
    "detach",
    "close_detached",
)


# -- recording what the application can observe ---------------------------------------------
class EventLog:
    """A user's pool listeners: the ordered event sequence, objects numbered by first sight."""

    def __init__(self, target: Any):
        self.events: list[tuple[Any, ...]] = []
        self._numbers: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps ids stable (no reuse) for the test's duration
        for name in POOL_EVENTS:
            event.listen(target, name, self._listener(name))

    def _n(self, obj: Any) -> int | None:
        if obj is None:
            return None
        key = id(obj)
        if key not in self._numbers:
            self._numbers[key] = len(self._numbers)
            self._keep.append(obj)
        return self._numbers[key]

    def _listener(self, name: str) -> Callable[..., None]:
        def listener(*args: Any) -> None:
            if name == "close_detached":
                self.events.append((name, self._n(args[0])))
                return
            entry: tuple[Any, ...] = (name, self._n(args[0]), self._n(args[1]))
            if name == "reset":
                state = args[2]
                entry += (state.transaction_was_reset, state.terminate_only, state.asyncio_safe)
            elif name in ("invalidate", "soft_invalidate"):
                entry += (type(args[2]).__name__ if args[2] is not None else None,)
            self.events.append(entry)

        return listener


_FRAME = re.compile(r'^  File "(?P<file>[^"]*)", line \d+, in .*\n(?: {4,}.*\n)*', re.MULTILINE)
_ASYNCPG_TERMINATED = ": terminating connection due to administrator command"
_OUR_FILES = "opentelemetry/instrumentation/sqlalchemy_pool/"
_SQLALCHEMY_FILES = "/sqlalchemy/"


def _frames(message: str) -> list[re.Match[str]]:
    return list(_FRAME.finditer(message))


def application_stack(message: str) -> str:
    """``message`` without the stack frames of SQLAlchemy and of this package."""
    kept = message
    for frame in reversed(_frames(message)):
        if _OUR_FILES in frame["file"] or _SQLALCHEMY_FILES in frame["file"]:
            kept = kept[: frame.start()] + kept[frame.end() :]
    return kept


def describe(error: BaseException) -> tuple[Any, ...]:
    """What the application sees of an exception: type, message, DBAPI details.

    The only normalisation: AssertionPool's message embeds the stack of the first checkout
    (SQLAlchemy trims its own trailing frames from it). With the instrumentor that stack also
    holds the checkout wrapper's frame, which stops the trimming, so SQLAlchemy-internal
    frames show up too. Those frames -- ours and SQLAlchemy's, never the application's -- are
    removed before comparing; see test_assertion_pool_stack_differs_only_by_library_frames and
    docs/guarantees.md.
    """
    message = str(error)
    if isinstance(error, AssertionError) and "checked out at:" in message:
        message = application_stack(message)
    details: tuple[Any, ...] = ()
    if isinstance(error, sa.exc.DBAPIError):
        details = (error.connection_invalidated, type(error.orig).__qualname__)
        # asyncpg reports a terminated backend with or without the server's FATAL text,
        # depending on whether it read the message before the socket closed (a race
        # between server and driver, seen without the instrumentor too).
        message = message.replace(_ASYNCPG_TERMINATED, "")
    return (f"{type(error).__module__}.{type(error).__qualname__}", message, details)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except Exception as error:
        return ("raised", describe(error))


async def aoutcome(awaitable: Any) -> tuple[str, Any]:
    try:
        return ("ok", await awaitable)
    except asyncio.CancelledError as error:
        return ("cancelled", describe(error))
    except Exception as error:
        return ("raised", describe(error))


def pool_state(pool: Pool) -> Any:
    if isinstance(pool, QueuePool):
        return pool.status()
    if isinstance(pool, SingletonThreadPool):
        return len(pool._all_conns)
    if isinstance(pool, StaticPool):
        record = pool.__dict__.get("connection")
        return record is not None and record.dbapi_connection is not None
    if isinstance(pool, AssertionPool):
        return pool._checked_out
    return pool.status()


# -- the synchronous scenario -----------------------------------------------------------------
def _query(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(SELECT_1).scalar()


def _pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(SELECT_PID).scalar()


def step_reset_on_return(engine: Engine) -> Any:
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("SELECT 1")
    cursor.fetchall()
    cursor.close()
    began = int(raw.driver_connection.info.transaction_status)
    raw.close()  # reset-on-return rolls the implicit transaction back
    raw = engine.raw_connection()
    after = int(raw.driver_connection.info.transaction_status)
    raw.close()
    return began, after


def step_transaction_closed_by_connection(engine: Engine) -> Any:
    conn = engine.connect()
    conn.begin()
    conn.execute(SELECT_1)
    conn.close()
    with engine.connect() as again:
        return int(again.connection.driver_connection.info.transaction_status)


def step_concurrent(engine: Engine) -> Any:
    held: list[sa.Connection] = []
    try:
        for _ in range(3):
            held.append(engine.connect())
            held[-1].execute(SELECT_1)
        return len(held)
    finally:
        for conn in reversed(held):
            conn.close()


def step_invalidate(engine: Engine) -> Any:
    with engine.connect() as conn:
        conn.execute(SELECT_1)
        conn.invalidate()
    return _query(engine)


def step_terminated_backend(engine: Engine, admin: Any) -> Any:
    admin.terminate([_pid(engine)])
    return [outcome(lambda: _query(engine)) for _ in range(2)]


def step_pool_dispose(engine: Engine) -> Any:
    _query(engine)
    engine.pool.dispose()
    return _query(engine)


def step_engine_dispose_while_held(engine: Engine) -> Any:
    conn = engine.connect()
    conn.execute(SELECT_1)
    engine.dispose()
    try:
        inner = outcome(lambda: conn.execute(SELECT_1).scalar())
    finally:
        closed = outcome(conn.close)
    return inner, closed, outcome(lambda: _query(engine))


def step_recreate(engine: Engine) -> Any:
    new_pool = engine.pool.recreate()
    fairy = new_pool.connect()
    cursor = fairy.cursor()
    cursor.execute("SELECT 1")
    value = cursor.fetchone()[0]
    cursor.close()
    fairy.close()
    new_pool.dispose()
    return value


def step_recycle(engine: Engine) -> Any:
    first = _pid(engine)
    time.sleep(RECYCLE_S + 0.15)
    return _pid(engine) != first


def run_sync_scenario(make_engine: Callable[..., Engine], poolclass: type, admin: Any, name: str):
    kwargs = POOL_KWARGS.get(poolclass, {})
    main = make_engine(poolclass=poolclass, pool_logging_name=name, **kwargs)
    pinged = make_engine(
        poolclass=poolclass, pool_logging_name=f"{name}-ping", pool_pre_ping=True, **kwargs
    )
    recycled = make_engine(
        poolclass=poolclass, pool_logging_name=f"{name}-recycle", pool_recycle=RECYCLE_S, **kwargs
    )
    logs = {engine: EventLog(engine) for engine in (main, pinged, recycled)}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("query", lambda: _query(main)),
        ("reset_on_return", lambda: step_reset_on_return(main)),
        ("transaction_closed", lambda: step_transaction_closed_by_connection(main)),
        ("concurrent", lambda: step_concurrent(main)),
        ("invalidate", lambda: step_invalidate(main)),
        ("terminated", lambda: step_terminated_backend(main, admin)),
        ("pool_dispose", lambda: step_pool_dispose(main)),
        ("recreate", lambda: step_recreate(main)),
        ("engine_dispose_held", lambda: step_engine_dispose_while_held(main)),
        ("pre_ping_query", lambda: _query(pinged)),
        ("pre_ping_terminated", lambda: step_terminated_backend(pinged, admin)),
        ("recycle", lambda: step_recycle(recycled)),
    ]
    outcomes = {label: outcome(fn) for label, fn in steps}
    states = [pool_state(engine.pool) for engine in (main, pinged, recycled)]
    events = [log.events for log in logs.values()]
    return outcomes, events, states


@pytest.mark.parametrize("poolclass", SYNC_POOLS, ids=lambda cls: cls.__name__)
def test_sync_pool_behaves_the_same(poolclass, otel, hook_errors, make_sync_engine, admin):
    runs = []
    for instrumented in (False, True):
        if instrumented:
            # Every engine timed: the statement and reset wrappers are active too.
            otel.instrument(statement_timing="all")
        name = f"tr-{poolclass.__name__}-{int(instrumented)}"
        runs.append(run_sync_scenario(make_sync_engine, poolclass, admin, name))
    (plain_out, plain_events, plain_state), (inst_out, inst_events, inst_state) = runs

    for label in plain_out:
        assert inst_out[label] == plain_out[label], label
    for plain, inst in zip(plain_events, inst_events, strict=True):
        assert inst == plain
    assert inst_state == plain_state

    # The scenario really exercised the paths it claims to (not a vacuous comparison).
    assert plain_out["query"] == ("ok", 1)
    assert plain_out["reset_on_return"] == ("ok", (2, 0))  # INTRANS, then IDLE after reset
    assert plain_out["pre_ping_terminated"] == ("ok", [("ok", 1), ("ok", 1)])
    assert plain_out["recycle"] == ("ok", True)
    terminated = plain_out["terminated"][1]
    if poolclass is NullPool:
        assert terminated == [("ok", 1), ("ok", 1)]
    else:
        kind, _message, (invalidated, _orig) = terminated[0][1]
        assert kind == "sqlalchemy.exc.OperationalError" and invalidated
        assert terminated[1] == ("ok", 1)
    concurrent = plain_out["concurrent"]
    if poolclass is QueuePool:
        assert concurrent[1][0] == "sqlalchemy.exc.TimeoutError"
        assert concurrent[1][1].startswith("QueuePool limit of size 1 overflow 1 reached")
    elif poolclass is AssertionPool:
        assert concurrent[1][0] == "builtins.AssertionError"
    else:
        assert concurrent == ("ok", 3)
    assert any(e[0] == "invalidate" for e in plain_events[0])
    assert any(e[0] == "reset" for e in plain_events[0])

    # And the instrumented run left exact, quiet telemetry behind.
    for suffix in ("", "-ping", "-recycle"):
        pool = f"tr-{poolclass.__name__}-1{suffix}"
        figures = gauges(otel, pool)
        assert figures.get("used") == 0, (pool, figures)
        assert figures.get("pending") == 0, (pool, figures)
    pool = f"tr-{poolclass.__name__}-1"
    expected_timeouts = 1 if poolclass is QueuePool else 0
    assert counter(otel, "db.client.connection.timeouts", pool) == expected_timeouts
    assert len(otel.spans("sqlalchemy.pool.wait")) == expected_timeouts
    hook_errors.assert_none()


def test_assertion_pool_stack_differs_only_by_library_frames(otel, make_sync_engine):
    """AssertionPool embeds the first checkout's stack in its error message.

    With the instrumentor the application's frames in it are identical; the message also
    shows our wrapper frame (exactly one) and the SQLAlchemy frames below it that SQLAlchemy
    would otherwise have trimmed.
    """
    messages = []
    for instrumented in (False, True):
        if instrumented:
            otel.instrument()
        engine = make_sync_engine(poolclass=AssertionPool)
        first = engine.connect()
        try:
            with pytest.raises(AssertionError) as raised:
                engine.connect()
        finally:
            first.close()
        messages.append(str(raised.value))
    plain, inst = messages
    assert not [f for f in _frames(plain) if _OUR_FILES in f["file"]]
    assert len([f for f in _frames(inst) if _OUR_FILES in f["file"]]) == 1
    assert application_stack(inst) == application_stack(plain)
    assert any("test_transparency.py" in f["file"] for f in _frames(application_stack(plain)))


# -- the fork pattern -------------------------------------------------------------------------
def _fork_child(engine: Engine, log: EventLog, otel: Any, pool: str | None, write_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 70
    try:
        signal.alarm(20)  # a hung child must not hang the suite
        start = len(log.events)
        engine.dispose(close=False)  # the documented pattern: drop, never close, the parent's
        report: dict[str, Any] = {}
        with engine.connect() as conn:
            report["query"] = conn.execute(SELECT_1).scalar()
            if pool is not None:
                report["used_while_held"] = gauges(otel, pool).get("used")
        if pool is not None:
            report["used_after"] = gauges(otel, pool).get("used")
        report["events"] = log.events[start:]
        os.write(write_fd, json.dumps(report).encode())
        code = 0
    except BaseException:
        code = 71
    finally:
        os._exit(code)


def run_fork_scenario(make_engine: Callable[..., Engine], poolclass: type, otel: Any, name: str):
    engine = make_engine(poolclass=poolclass, pool_logging_name=name)
    log = EventLog(engine)
    pid_before = _pid(engine)  # the parent has a pooled connection when it forks
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _fork_child(engine, log, otel, name if otel is not None else None, write_fd)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(child, 0)
    report = json.loads(b"".join(chunks) or b"{}")
    # The parent's pooled connection was not touched by the child.
    parent_pid_after = _pid(engine)
    same_backend = parent_pid_after == pid_before
    return os.waitstatus_to_exitcode(status), report, same_backend, log.events


@pytest.mark.parametrize("poolclass", [QueuePool, NullPool], ids=lambda cls: cls.__name__)
def test_fork_pattern_behaves_the_same(poolclass, otel, hook_errors, make_sync_engine):
    runs = []
    for instrumented in (False, True):
        if instrumented:
            otel.instrument()
        name = f"fork-{poolclass.__name__}-{int(instrumented)}"
        telemetry = otel if instrumented else None
        runs.append(run_fork_scenario(make_sync_engine, poolclass, telemetry, name))
    (plain_code, plain_report, plain_same, plain_events) = runs[0]
    (inst_code, inst_report, inst_same, inst_events) = runs[1]
    assert plain_code == inst_code == 0
    assert plain_report["query"] == inst_report["query"] == 1
    assert inst_report["events"] == plain_report["events"]
    assert inst_events == plain_events
    assert plain_same == inst_same == (poolclass is QueuePool)
    # In the child the gauges describe the child's own use of the pool, exactly.
    assert inst_report["used_while_held"] == 1
    assert inst_report["used_after"] == 0
    assert gauges(otel, f"fork-{poolclass.__name__}-1").get("used") == 0
    hook_errors.assert_none()


# -- asyncio (asyncpg, AsyncAdaptedQueuePool) -------------------------------------------------
async def run_async_scenario(make_async_engine: Callable[..., Any], admin: Any, name: str):
    engine = make_async_engine(
        pool_size=1, max_overflow=0, pool_timeout=0.3, pool_logging_name=name
    )
    assert isinstance(engine.sync_engine.pool, AsyncAdaptedQueuePool)
    log = EventLog(engine.sync_engine)

    async def query() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(SELECT_1)).scalar()

    async def pid() -> int:
        async with engine.connect() as conn:
            return (await conn.execute(SELECT_PID)).scalar()

    async def timeout() -> Any:
        async with engine.connect() as held:
            await held.execute(SELECT_1)
            return await query()

    async def cancel_while_waiting() -> Any:
        async with engine.connect() as held:
            await held.execute(SELECT_1)
            waiter = asyncio.create_task(query())
            await asyncio.sleep(0.1)
            waiter.cancel()
            cancelled = await aoutcome(waiter)
        return cancelled, await query()

    async def cancel_while_holding() -> Any:
        started = asyncio.Event()

        async def hold() -> None:
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)
                started.set()
                await conn.execute(sa.text("SELECT pg_sleep(2)"))

        task = asyncio.create_task(hold())
        await started.wait()
        await asyncio.sleep(0.1)
        task.cancel()
        cancelled = await aoutcome(task)
        return cancelled, await query()

    async def cancel_in_transaction() -> Any:
        started = asyncio.Event()

        async def hold() -> None:
            async with engine.begin() as conn:
                await conn.execute(SELECT_1)
                started.set()
                await asyncio.sleep(5)

        task = asyncio.create_task(hold())
        await started.wait()
        task.cancel()
        cancelled = await aoutcome(task)
        return cancelled, await query()

    async def invalidate() -> Any:
        async with engine.connect() as conn:
            await conn.execute(SELECT_1)
            await conn.invalidate()
        return await query()

    async def terminated() -> Any:
        admin.terminate([await pid()])
        return [await aoutcome(query()) for _ in range(2)]

    async def dispose_while_held() -> Any:
        async with engine.connect() as conn:
            await conn.execute(SELECT_1)
            await engine.dispose()
            inner = (await conn.execute(SELECT_1)).scalar()
        return inner, await query()

    outcomes = {}
    for label, fn in [
        ("query", query),
        ("timeout", timeout),
        ("cancel_while_waiting", cancel_while_waiting),
        ("cancel_while_holding", cancel_while_holding),
        ("cancel_in_transaction", cancel_in_transaction),
        ("invalidate", invalidate),
        ("terminated", terminated),
        ("dispose_while_held", dispose_while_held),
    ]:
        outcomes[label] = await aoutcome(fn())
    state = pool_state(engine.sync_engine.pool)
    await engine.dispose()
    return outcomes, log.events, state


async def test_async_pool_behaves_the_same(otel, hook_errors, make_async_engine, admin):
    runs = []
    for instrumented in (False, True):
        if instrumented:
            otel.instrument(statement_timing="all")
        name = f"tr-async-{int(instrumented)}"
        runs.append(await run_async_scenario(make_async_engine, admin, name))
    (plain_out, plain_events, plain_state), (inst_out, inst_events, inst_state) = runs
    for label in plain_out:
        assert inst_out[label] == plain_out[label], label
    assert inst_events == plain_events
    assert inst_state == plain_state

    assert plain_out["timeout"][1][0] == "sqlalchemy.exc.TimeoutError"
    assert plain_out["cancel_while_waiting"][1][0][0] == "cancelled"
    assert plain_out["cancel_while_waiting"][1][1] == 1
    assert plain_out["cancel_while_holding"][1][0][0] == "cancelled"
    assert plain_out["cancel_while_holding"][1][1] == 1
    cancelled, after = plain_out["cancel_in_transaction"][1]
    assert cancelled[0] == "cancelled" and after == 1

    figures = gauges(otel, "tr-async-1")
    assert figures.get("used") == 0 and figures.get("pending") == 0, figures
    assert counter(otel, "db.client.connection.timeouts", "tr-async-1") == 1
    hook_errors.assert_none()


# -- uninstrument -----------------------------------------------------------------------------
def _all_pool_classes() -> list[type]:
    seen: list[type] = []
    stack: list[type] = [Pool]
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def _our_listeners(dispatch: Any, names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        for fn in getattr(dispatch, name):
            module = getattr(fn, "__module__", "") or ""
            if module.startswith(PACKAGE):
                found.append(f"{name}: {fn!r}")
    return found


ENGINE_EVENTS = ("before_cursor_execute", "after_cursor_execute")
DIALECT_EVENTS = ("handle_error", "do_connect")
SESSION_EVENTS = ("after_begin", "after_commit", "after_rollback")


def test_uninstrument_leaves_nothing_behind(otel, hook_errors, make_sync_engine):
    pool_methods = {cls: cls.__dict__.get("_do_get") for cls in _all_pool_classes()}
    originals = {
        (_ConnectionRecord, method): _ConnectionRecord.__dict__[method]
        for method in ("checkout", "checkin", "_ConnectionRecord__connect")
    }
    originals[(Connection, "_execute_context")] = Connection.__dict__["_execute_context"]
    engine = make_sync_engine(pool_size=2, pool_logging_name="uninst")
    creator_before = engine.pool.__dict__.get("_invoke_creator")
    otel.instrument(session_spans="all", set_application_name=True, leak_threshold_s=1)
    installed = [
        (e.target, e.name, e.fn)
        for e in otel.instrumentor._state.hooks.installed()
        if isinstance(e, Listen)
    ]
    assert installed
    for target, name, fn in installed:
        assert event.contains(target, name, fn)
    for (cls, method), original in originals.items():
        assert cls.__dict__[method] is not original, (cls, method)

    held = engine.connect()  # held across uninstrument()
    with Session(engine) as session:
        session.execute(SELECT_1)
    assert gauges(otel, "uninst").get("used") == 1
    # The listener scan below does see our listeners while they are installed.
    assert _our_listeners(engine.pool.dispatch, POOL_EVENTS)
    assert _our_listeners(engine.dialect.dispatch, DIALECT_EVENTS)
    assert _our_listeners(Session().dispatch, SESSION_EVENTS)

    otel.instrumentor.uninstrument()

    for target, name, fn in installed:
        assert not event.contains(target, name, fn), (target, name)
    assert not event.contains(Engine, "do_connect", set_application_name)
    for (cls, method), original in originals.items():
        assert cls.__dict__[method] is original, (cls, method)
    assert {cls: cls.__dict__.get("_do_get") for cls in _all_pool_classes()} == pool_methods
    assert _our_listeners(engine.pool.dispatch, POOL_EVENTS) == []
    assert _our_listeners(engine.dispatch, ENGINE_EVENTS) == []
    assert _our_listeners(engine.dialect.dispatch, DIALECT_EVENTS) == []
    assert _our_listeners(Session().dispatch, SESSION_EVENTS) == []
    assert engine.pool.__dict__.get("_invoke_creator") is creator_before
    assert not [k for k in engine.pool.__dict__ if k.startswith("_otel")]
    for record in pool_records(engine.pool):
        assert not [k for k in record.__dict__ if k.startswith("_otel")]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("otel-sqlalchemy-pool")]

    # The connection held across uninstrument() returns normally; the engine keeps working.
    held.execute(SELECT_1)
    held.close()
    assert not [k for k in held.__dict__ if k.startswith("_otel")]
    with engine.connect() as conn:
        assert conn.execute(SELECT_1).scalar() == 1
    assert engine.pool.checkedout() == 0

    # And it can be instrumented again, with exact figures.
    otel.instrumentor = SQLAlchemyPoolInstrumentor()
    otel.instrument()
    with engine.connect():
        assert gauges(otel, "uninst").get("used") == 1
    assert gauges(otel, "uninst").get("used") == 0
    hook_errors.assert_none()
