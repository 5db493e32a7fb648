"""Event-loop health: lag, active/idle time and the blocking code site, on a real asyncio loop."""

from __future__ import annotations

import asyncio
import time

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from opentelemetry.instrumentation.sqlalchemy_pool.eventloop import MAX_SITES, EventLoopMonitor


def _points(reader: InMemoryMetricReader, name: str) -> list:
    data = reader.get_metrics_data()
    return [
        point
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def blocking_sdk_call() -> None:
    time.sleep(0.04)  # a synchronous client inside an async route


async def _app(blocking: bool, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if blocking:
            blocking_sdk_call()
        await asyncio.sleep(0.01)


def _run(blocking: bool, seconds: float = 0.8) -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    monitor = EventLoopMonitor(MeterProvider(metric_readers=[reader]).get_meter("t"))
    monitor.block_threshold_s = 0.02

    async def main() -> None:
        assert monitor.attach_running_loop()
        assert not monitor.attach_running_loop()  # already watched
        try:
            await _app(blocking, seconds)
        finally:
            monitor.detach()

    asyncio.run(main())
    return reader


def test_blocked_loop_reports_lag_active_time_and_the_blocking_site() -> None:
    reader = _run(blocking=True)
    blocked = _points(reader, semconv.EVENT_LOOP_BLOCKED_TIME)
    by_function = {p.attributes.get(semconv.CODE_FUNCTION): p.value for p in blocked}
    assert by_function.get("blocking_sdk_call", 0) > 0.3, by_function
    site = next(
        p for p in blocked if p.attributes.get(semconv.CODE_FUNCTION) == "blocking_sdk_call"
    )
    assert site.attributes[semconv.CODE_FILE].endswith("test_eventloop.py")
    time_points = {
        p.attributes[semconv.EVENT_LOOP_STATE]: p.value
        for p in _points(reader, semconv.EVENT_LOOP_TIME)
    }
    assert time_points["active"] > 2 * time_points["idle"], time_points
    (lag,) = _points(reader, semconv.EVENT_LOOP_LAG)
    assert lag.count >= 3


def test_lag_is_how_late_the_loop_ran_the_probe() -> None:
    reader = InMemoryMetricReader()
    monitor = EventLoopMonitor(MeterProvider(metric_readers=[reader]).get_meter("t"))

    async def main() -> None:
        monitor.attach(asyncio.get_running_loop())
        await asyncio.sleep(0.02)
        time.sleep(0.3)  # the probe (every 0.1 s) falls due in here: >= 0.2 s late
        await asyncio.sleep(0.02)
        monitor.detach()

    asyncio.run(main())
    (lag,) = _points(reader, semconv.EVENT_LOOP_LAG)
    assert 0.19 <= lag.max < 1.0, lag


def test_healthy_loop_is_mostly_idle_and_never_blocked() -> None:
    reader = _run(blocking=False)
    assert not _points(reader, semconv.EVENT_LOOP_BLOCKED_TIME)
    time_points = {
        p.attributes[semconv.EVENT_LOOP_STATE]: p.value
        for p in _points(reader, semconv.EVENT_LOOP_TIME)
    }
    assert time_points["idle"] > time_points["active"], time_points
    (lag,) = _points(reader, semconv.EVENT_LOOP_LAG)
    assert lag.count >= 3


def test_detach_restores_the_selector_and_stops_the_watchdog() -> None:
    reader = InMemoryMetricReader()
    monitor = EventLoopMonitor(MeterProvider(metric_readers=[reader]).get_meter("t"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monitor.attach(loop)
        assert "select" in vars(loop._selector)
        monitor.detach()
        assert "select" not in vars(loop._selector)
        assert not monitor.attached

    asyncio.run(main())


def test_code_sites_are_bounded() -> None:
    from opentelemetry.instrumentation.sqlalchemy_pool.codesite import CodeSite

    monitor = EventLoopMonitor(MeterProvider().get_meter("t"))
    names = {
        monitor._attributes(CodeSite(f"f{i}", "app.py", i))[semconv.CODE_FUNCTION]
        for i in range(MAX_SITES * 2)
    }
    assert len(names) == MAX_SITES + 1 and "other" in names


def token_check() -> int:
    total = 0
    for i in range(40_000):  # pure-Python work, like a JWT check in Python
        total += i * i % 7
    return total


def _thread_and_active(work) -> tuple[float, float]:
    reader = InMemoryMetricReader()
    monitor = EventLoopMonitor(MeterProvider(metric_readers=[reader]).get_meter("t"))

    def thread_time() -> float:  # cumulative since the thread started: take a delta
        return sum(p.value for p in _points(reader, semconv.EVENT_LOOP_THREAD_TIME))

    async def main() -> float:
        monitor.attach(asyncio.get_running_loop())
        start = thread_time()
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            work()
            await asyncio.sleep(0)
        used = thread_time() - start
        monitor.detach()
        return used

    wanted_cpu = asyncio.run(main())
    active = {
        p.attributes[semconv.EVENT_LOOP_STATE]: p.value
        for p in _points(reader, semconv.EVENT_LOOP_TIME)
    }["active"]
    return wanted_cpu, active


def test_thread_times_tell_a_cpu_bound_loop_from_a_sleeping_one() -> None:
    wanted_cpu, active = _thread_and_active(token_check)
    assert wanted_cpu >= 0.5 * active, (wanted_cpu, active)
    wanted_cpu, active = _thread_and_active(lambda: time.sleep(0.03))
    assert wanted_cpu < 0.5 * active, (wanted_cpu, active)
