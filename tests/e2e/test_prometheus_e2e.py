"""End to end: a real FastAPI app, a real Prometheus, every shipped query, real alerts.

The app (tests/e2e/e2e_pool_app.py) runs under uvicorn on 127.0.0.1 with the pool
instrumentation, the FastAPI instrumentation and opentelemetry-exporter-prometheus on /metrics;
PostgreSQL is the test session's embedded server. A real ``prometheus`` scrapes it every second
and evaluates a copy of collector-config/rules with ``for:`` shortened. The test drives the pool
into saturation with a bounded number of loopback requests, then asserts through the HTTP API
that

* SQLAlchemyPoolSaturated and SQLAlchemyPoolCheckoutTimeouts become firing;
* every dashboard panel, template variable and trace-to-metrics query of
  tests/pipeline/queries.py returns data (except span-metrics queries, which need the
  collector: they are listed in the failure message if anything else fails);
* every metric an alert reads exists.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipeline.collector import free_port
from pipeline.processes import firing, query, start, start_prometheus, stop, wait_http
from pipeline.queries import all_queries

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

APP_DIR = Path(__file__).resolve().parent
ALERTS_THAT_MUST_FIRE = {"SQLAlchemyPoolSaturated", "SQLAlchemyPoolCheckoutTimeouts"}
LOAD_WORKERS = 8  # concurrent /slow requests against a pool of 2 + 1 overflow
MAX_REQUESTS = 3000  # hard bound on the requests the test sends


@dataclass
class App:
    url: str
    process: object
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:]


@pytest.fixture
def app(async_url, tmp_path):
    port = free_port()
    log = tmp_path / "app.log"
    env = dict(
        os.environ,
        E2E_DATABASE_URL=async_url.render_as_string(hide_password=False),
        OTEL_SEMCONV_STABILITY_OPT_IN="http",
        PYTHONUNBUFFERED="1",
    )
    process = start(
        [sys.executable, "-m", "uvicorn", "e2e_pool_app:app", "--app-dir", str(APP_DIR),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        log, env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", process, log)
        yield App(url, process, log)
    finally:
        stop(process)


@pytest.fixture
def prometheus_url(app: App, tmp_path):
    scrape = [{"job_name": "app", "static_configs": [{"targets": [app.url.split("//", 1)[1]]}]}]
    url, process = start_prometheus(scrape, tmp_path, free_port())
    try:
        yield url
    finally:
        stop(process)


async def _drive(app_url: str, stop: asyncio.Event) -> dict[int | str, int]:
    """Saturate the pool until ``stop`` is set (or MAX_REQUESTS were sent)."""
    statuses: dict[int | str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=LOAD_WORKERS + 4)

    async def worker(paths: list[str]) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=app_url, timeout=30, limits=limits) as client:
            i = 0
            while not stop.is_set() and sent < MAX_REQUESTS:
                sent += 1
                path = paths[i % len(paths)].format(i=i)
                i += 1
                try:
                    status: int | str = (await client.get(path)).status_code
                except httpx.HTTPError as exc:  # counted; a dead app fails the test below
                    status = type(exc).__name__
                statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(["/slow"]) for _ in range(LOAD_WORKERS)), worker(SIDE_PATHS))
    return statuses


SIDE_PATHS = ["/hold", "/idle-in-transaction", "/session/{i}"]


async def _one_of_each(app_url: str) -> None:
    """Leak, idle transaction, session and a slow query, on an idle pool (so none times out)."""
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        for path in [*SIDE_PATHS, "/slow"]:
            response = await client.get(path.format(i=7))
            assert response.status_code == 200, (path, response.status_code, response.text)


async def test_every_query_returns_data_and_pool_alerts_fire(app: App, prometheus_url):
    # Every kind of signal once on an idle pool: under saturation these may all time out.
    await _one_of_each(app.url)
    stop = asyncio.Event()
    load = asyncio.create_task(_drive(app.url, stop))
    async with httpx.AsyncClient(base_url=prometheus_url, timeout=10) as prom:
        fired: dict[str, list[dict]] = {}
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline and not set(fired) >= ALERTS_THAT_MUST_FIRE:
                await asyncio.sleep(1)
                if load.done():
                    break
                fired = await firing(prom)
            # a few more seconds of load so the slower signals (pg sampler, leaks) show up
            await asyncio.sleep(3)
        finally:
            stop.set()
            statuses = await load
        print(f"responses: {statuses}; firing: {sorted(fired)}")
        assert app.process.poll() is None, f"the app died:\n{app.log_tail()}"
        assert set(fired) >= ALERTS_THAT_MUST_FIRE, (
            f"firing: {sorted(fired)}; responses: {statuses}\n{app.log_tail()}"
        )
        assert statuses.get(503), f"no pool timeouts seen by the client: {statuses}"
        assert statuses.get(200), f"no request succeeded: {statuses}\n{app.log_tail()}"
        for name in ALERTS_THAT_MUST_FIRE:
            labels = fired[name][0]["labels"]
            assert labels["job"] == "app" and labels["db_client_connection_pool_name"] == "main"
            assert labels["instance"] == app.url.split("//", 1)[1]

        await _one_of_each(app.url)  # recent samples for the rate() windows
        await asyncio.sleep(3)  # scraped, and sampled by pg_activity (1 s interval)
        failures, collector_only = [], []
        queries = [x for x in all_queries() if x.kind in ("panel", "variable", "datasource")]
        assert queries
        for q in queries:
            if q.requires_collector:
                collector_only.append(q.where)
                continue
            status, result = await query(prom, q.promql)
            if status != "success" or not result:
                failures.append(f"{q.where}: {status}, {len(result)} series\n  {q.promql}")
        for q in all_queries():
            if q.kind != "alert":
                continue
            for metric in sorted(q.metrics):
                if metric.startswith("traces_span_metrics_"):
                    continue
                status, result = await query(prom, f'count({{__name__="{metric}"}})')
                if status != "success" or not result:
                    failures.append(f"{q.where}: metric {metric} has no series")
        assert not failures, (
            "queries without data (span-metrics queries skipped, they need the collector: "
            f"{collector_only}):\n" + "\n".join(failures)
        )
