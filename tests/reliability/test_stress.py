"""Thread and asyncio safety: a sync and an async engine in one process, hammered at once.

For a bounded time, threads (psycopg) and asyncio tasks (asyncpg) hold, release, time out,
invalidate and cancel connections while a collector thread checks the invariants on every
collection: 0 <= used <= max, idle <= pool_size, pending >= 0. At the end the state is exact:
0 used, 0 pending, idle == the pool's open idle connections, and the timeouts counter equals
the TimeoutErrors the application saw, per pool.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa

from .conftest import counter, gauges, queue_open_records

SELECT_1 = sa.text("SELECT 1")
DURATION_S = 4.0
SYNC = {"name": "stress-sync", "size": 3, "overflow": 2}
ASYNC = {"name": "stress-async", "size": 3, "overflow": 1}


class Collector(threading.Thread):
    def __init__(self, otel: Any) -> None:
        super().__init__(name="stress-collector", daemon=True)
        self.otel = otel
        self.stop = threading.Event()
        self.samples = 0
        self.violations: list[Any] = []
        self.errors: list[BaseException] = []
        self.peak: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for pool in (SYNC, ASYNC):
                    figures = gauges(self.otel, pool["name"])
                    if not figures:
                        continue  # not adopted yet
                    used, idle = figures.get("used", 0), figures.get("idle", 0)
                    pending = figures.get("pending", 0)
                    self.peak[pool["name"]] = max(self.peak[pool["name"]], used)
                    if not 0 <= used <= pool["size"] + pool["overflow"]:
                        self.violations.append((pool["name"], "used", figures))
                    if not 0 <= idle <= pool["size"]:
                        self.violations.append((pool["name"], "idle", figures))
                    if pending < 0:
                        self.violations.append((pool["name"], "pending", figures))
                    if figures.get("max") != pool["size"] + pool["overflow"]:
                        self.violations.append((pool["name"], "max", figures))
                self.samples += 1
            except BaseException as error:
                self.errors.append(error)
            time.sleep(0.002)


def sync_worker(engine: sa.Engine, stop_at: float, seed: int, seen: Counter, errors: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        action = rng.random()
        try:
            if action < 0.5:  # hold briefly
                with engine.connect() as conn:
                    conn.execute(SELECT_1)
                    time.sleep(rng.uniform(0, 0.02))
                seen["ok"] += 1
            elif action < 0.7:  # hold two at once (pushes into overflow and timeouts)
                with engine.connect() as first, engine.connect() as second:
                    first.execute(SELECT_1)
                    second.execute(SELECT_1)
                    time.sleep(rng.uniform(0, 0.03))
                seen["ok"] += 1
            elif action < 0.85:  # invalidate
                with engine.connect() as conn:
                    conn.execute(SELECT_1)
                    conn.invalidate()
                seen["invalidated"] += 1
            else:  # raw DBAPI connection, returned in a transaction (reset on return)
                raw = engine.raw_connection()
                try:
                    cursor = raw.cursor()
                    cursor.execute("SELECT 1")
                    cursor.close()
                finally:
                    raw.close()
                seen["ok"] += 1
        except sa.exc.TimeoutError:
            seen["timeout"] += 1
        except Exception as error:
            errors.append(error)


async def async_worker(engine: Any, stop_at: float, seed: int, seen: Counter, errors: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        action = rng.random()
        try:
            if action < 0.5:
                async with engine.connect() as conn:
                    await conn.execute(SELECT_1)
                    await asyncio.sleep(rng.uniform(0, 0.02))
                seen["ok"] += 1
            elif action < 0.65:
                async with engine.connect() as conn:
                    await conn.execute(SELECT_1)
                    await conn.invalidate()
                seen["invalidated"] += 1
            elif action < 0.85:  # a task cancelled while waiting for or holding a connection
                task = asyncio.ensure_future(_hold(engine, rng.uniform(0.01, 0.05)))
                await asyncio.sleep(rng.uniform(0, 0.03))
                task.cancel()
                try:
                    await task
                    seen["ok"] += 1
                except asyncio.CancelledError:
                    seen["cancelled"] += 1
                except sa.exc.TimeoutError:
                    seen["timeout"] += 1
            else:
                async with engine.begin() as conn:
                    await conn.execute(SELECT_1)
                    await asyncio.sleep(rng.uniform(0, 0.01))
                seen["ok"] += 1
        except sa.exc.TimeoutError:
            seen["timeout"] += 1
        except Exception as error:
            errors.append(error)


async def _hold(engine: Any, seconds: float) -> None:
    async with engine.connect() as conn:
        await conn.execute(SELECT_1)
        await asyncio.sleep(seconds)


async def test_threads_and_tasks_together(otel, hook_errors, make_sync_engine, make_async_engine):
    sync_engine = make_sync_engine(
        pool_size=SYNC["size"],
        max_overflow=SYNC["overflow"],
        pool_timeout=0.05,
        pool_logging_name=SYNC["name"],
    )
    async_engine = make_async_engine(
        pool_size=ASYNC["size"],
        max_overflow=ASYNC["overflow"],
        pool_timeout=0.05,
        pool_logging_name=ASYNC["name"],
    )
    otel.instrument(leak_threshold_s=0.5)
    sync_seen: Counter[str] = Counter()
    async_seen: Counter[str] = Counter()
    errors: list[BaseException] = []
    collector = Collector(otel)
    collector.start()
    stop_at = time.monotonic() + DURATION_S
    per_thread: list[Counter[str]] = [Counter() for _ in range(5)]  # no shared += across threads
    threads = [
        threading.Thread(target=sync_worker, args=(sync_engine, stop_at, i, seen, errors))
        for i, seen in enumerate(per_thread)
    ]
    try:
        for thread in threads:
            thread.start()
        await asyncio.gather(
            *(async_worker(async_engine, stop_at, 100 + i, async_seen, errors) for i in range(8))
        )
        for thread in threads:
            thread.join(30)
        assert not [t for t in threads if t.is_alive()], "a worker thread hung"
        for seen in per_thread:
            sync_seen.update(seen)
    finally:
        collector.stop.set()
        collector.join(10)

    assert not errors, errors[:3]
    assert not collector.errors, collector.errors[:3]
    assert not collector.violations, collector.violations[:5]
    assert collector.samples > 50
    # The load really reached the interesting states.
    assert sync_seen["ok"] > 50 and sync_seen["timeout"] > 0 and sync_seen["invalidated"] > 0
    assert async_seen["ok"] > 50 and async_seen["cancelled"] > 0 and async_seen["invalidated"] > 0
    assert collector.peak[SYNC["name"]] == SYNC["size"] + SYNC["overflow"]

    # Exact final state, per pool.
    for engine, pool, seen in (
        (sync_engine, SYNC, sync_seen),
        (async_engine.sync_engine, ASYNC, async_seen),
    ):
        figures = gauges(otel, pool["name"])
        assert figures["used"] == 0, (pool["name"], figures)
        assert figures["pending"] == 0, (pool["name"], figures)
        assert engine.pool.checkedout() == 0
        assert figures["idle"] == queue_open_records(engine.pool), (pool["name"], figures)
        assert counter(otel, "db.client.connection.timeouts", pool["name"]) == seen["timeout"]
        timeout_spans = [
            span
            for span in otel.spans("sqlalchemy.pool.wait")
            if span.attributes["db.client.connection.pool.name"] == pool["name"]
            and span.status.status_code.name == "ERROR"
        ]
        assert len(timeout_spans) == seen["timeout"], pool["name"]
    await async_engine.dispose()
    hook_errors.assert_none()
