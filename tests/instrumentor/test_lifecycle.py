"""instrument()/uninstrument(), autoload via opentelemetry-instrument, concurrency exactness."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord


def _pool_attr(name: str) -> dict[str, str]:
    return {"db__client__connection__pool__name": name}


def test_uninstrument_removes_every_hook(otel, make_sync_engine):
    methods = ("checkout", "checkin", "_ConnectionRecord__connect")
    originals = {name: _ConnectionRecord.__dict__[name] for name in methods}
    original_reset = _ConnectionFairy.__dict__["_reset"]
    pool_methods = {
        cls: cls.__dict__["_do_get"]
        for cls in (QueuePool, NullPool, StaticPool, SingletonThreadPool)
    }
    engine = make_sync_engine(pool_logging_name="gone")
    otel.instrument()
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    assert _ConnectionFairy.__dict__["_reset"] is original_reset  # no timed engine yet
    with Session(engine) as session:  # a Session times the engine: open-transaction check
        session.execute(sa.text("select 1"))
    assert _ConnectionFairy.__dict__["_reset"] is not original_reset
    for name, original in originals.items():
        assert _ConnectionRecord.__dict__[name] is not original, name
    otel.instrumentor.uninstrument()
    for name, original in originals.items():
        assert _ConnectionRecord.__dict__[name] is original, name
    assert _ConnectionFairy.__dict__["_reset"] is original_reset
    for cls, original in pool_methods.items():  # pool classes are never patched
        assert cls.__dict__["_do_get"] is original
    fresh = make_sync_engine()
    for pool in (engine.pool, fresh.pool):
        for name in ("checkin", "reset", "detach", "close", "invalidate"):
            assert len(getattr(pool.dispatch, name)) == 0, name
    for eng in (engine, fresh):
        for name in ("before_cursor_execute", "after_cursor_execute"):
            assert len(getattr(eng.dispatch, name)) == 0, name
        assert len(eng.dialect.dispatch.handle_error) == 0
    session = Session(fresh)
    for name in ("after_begin", "after_commit", "after_rollback"):
        assert len(getattr(session.dispatch, name)) == 0, name
    assert "_otel_sqlalchemy_pool_recorder" not in engine.pool.__dict__
    for method in ("checkin", "_ConnectionRecord__connect"):  # the class-level wrappers
        assert not hasattr(_ConnectionRecord.__dict__[method], "__wrapped__"), method
    assert not hasattr(_ConnectionRecord.__dict__["checkout"].__func__, "__wrapped__")
    before = [p.count for p in otel.points("db.client.connection.wait_time")]
    assert sum(before) == 2  # the Core connection and the Session's
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    # Nothing recorded any more (the old points remain in the cumulative reader only).
    assert [p.count for p in otel.points("db.client.connection.wait_time")] == before
    # Re-instrumenting works again, reusing the instruments.
    otel.instrument()
    with engine.connect():
        assert otel.count("gone") == (1, 0)


def test_user_listeners_keep_working_and_order(otel, make_sync_engine):
    seen: list[str] = []
    engine = make_sync_engine(pool_logging_name="order")
    event.listen(engine.pool, "checkout", lambda *a: seen.append("checkout"))
    event.listen(engine.pool, "checkin", lambda *a: seen.append("checkin"))
    otel.instrument()
    with engine.connect():
        pass
    assert seen == ["checkout", "checkin"]


def test_exact_under_threads(otel, make_sync_engine):
    engine = make_sync_engine(
        pool_size=3, max_overflow=2, pool_timeout=0.05, pool_logging_name="threads"
    )
    otel.instrument()
    stop = time.monotonic() + 3
    errors: list[BaseException] = []
    timeouts = [0]
    lock = threading.Lock()
    observed: list[tuple[int | None, int | None]] = []

    def worker():
        while time.monotonic() < stop:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("select 1"))
            except sa.exc.TimeoutError:
                with lock:
                    timeouts[0] += 1
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        observed.append(otel.count("threads"))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors
    assert all(0 <= used <= 5 for used, _ in observed if used is not None)
    assert otel.count("threads")[0] == 0
    assert otel.value("db.client.connection.pending_requests", **_pool_attr("threads")) == 0
    assert (otel.value("db.client.connection.timeouts", **_pool_attr("threads")) or 0) == timeouts[
        0
    ]
    wait_count = otel.value("db.client.connection.wait_time", **_pool_attr("threads"))
    use_count = otel.value("db.client.connection.use_time", **_pool_attr("threads"))
    assert wait_count == use_count + timeouts[0]


async def test_exact_under_50_tasks(otel, make_async_engine):
    otel.instrument()
    engine = make_async_engine(
        pool_size=4, max_overflow=2, pool_timeout=0.2, pool_logging_name="tasks"
    )
    done = [0]
    timeouts = [0]
    peak = [0]

    async def worker(i: int):
        for _ in range(10):
            try:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("select pg_sleep(0.005)"))
                    used, _ = otel.count("tasks")
                    peak[0] = max(peak[0], used or 0)
                done[0] += 1
            except sa.exc.TimeoutError:
                timeouts[0] += 1

    await asyncio.gather(*(worker(i) for i in range(50)))
    assert done[0] + timeouts[0] == 500
    assert 1 <= peak[0] <= 6
    assert otel.count("tasks")[0] == 0
    assert otel.value("db.client.connection.pending_requests", **_pool_attr("tasks")) == 0
    assert (otel.value("db.client.connection.timeouts", **_pool_attr("tasks")) or 0) == timeouts[0]
    assert otel.value("db.client.connection.use_time", **_pool_attr("tasks")) == done[0]
    await engine.dispose()


SCRIPT = r"""
import json, sys, sqlalchemy as sa
from opentelemetry import metrics
engine = sa.create_engine(sys.argv[1], pool_logging_name="auto")
with engine.connect() as conn:
    conn.execute(sa.text("select 1"))
held = [engine.connect(), engine.connect()]
provider = metrics.get_meter_provider()
provider.force_flush()
"""


# What the `opentelemetry-instrument` console script does (works in venvs without the script).
OTEL_INSTRUMENT = "from opentelemetry.instrumentation.auto_instrumentation import run; run()"


def _run_auto(sync_url, extra_env):
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "",
        **extra_env,
    }
    url = sync_url.render_as_string(hide_password=False)
    return subprocess.run(
        [sys.executable, "-c", OTEL_INSTRUMENT, sys.executable, "-c", SCRIPT, url],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


def _console_metrics(stdout: str) -> dict[str, list]:
    found: dict[str, list] = {}
    decoder = json.JSONDecoder()
    index = 0
    while True:
        start = stdout.find("{", index)
        if start < 0:
            return found
        try:
            obj, end = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        index = end
        for rm in obj.get("resource_metrics", []):
            for sm in rm["scope_metrics"]:
                for metric in sm["metrics"]:
                    found.setdefault(metric["name"], []).extend(metric["data"]["data_points"])


def test_opentelemetry_instrument_autoloads(sync_url):
    stdout = _run_auto(sync_url, {})
    found = _console_metrics(stdout)
    used = [p["value"] for p in found["db.client.connection.count"]
            if p["attributes"]["db.client.connection.state"] == "used"]  # fmt: skip
    assert used and set(used) == {2}
    assert found["db.client.connection.wait_time"][0]["attributes"] == {
        "db.client.connection.pool.name": "auto"
    }


def test_disabled_instrumentations_turns_it_off(sync_url):
    stdout = _run_auto(sync_url, {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "sqlalchemy_pool"})
    assert "db.client.connection.count" not in _console_metrics(stdout)
