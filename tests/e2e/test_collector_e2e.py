"""End to end through the real collector: app -> OTLP -> our collector distribution with the
shipped config (spanmetrics, tail sampling, Prometheus exporter with OpenMetrics) -> a real
Prometheus with exemplar storage and the shipped alerting rules; kept traces go to a file
exporter that stands in for Tempo.

Three apps (tests/e2e/e2e_pool_app.py) run at once under ``opentelemetry-instrument``, configured
only by environment variables, as a user runs them:

* ``pool-saturated``: a pool of 2 + 1 driven past saturation (waits, timeouts), plus a long
  hold, a session that outlives its response, a garbage-collected session and a transaction
  left idle for longer than the alert's 60 s; the FastAPI instrumentation's DEFAULT HTTP metric
  names (``http_server_duration_milliseconds``);
* ``pool-healthy``: the same app with a roomy pool under a light load, with
  ``OTEL_SEMCONV_STABILITY_OPT_IN=http`` (``http_server_request_duration_seconds``);
* ``pool-capacity``: an idle app whose pool maximum exceeds the server's max_connections.

Then the server is filled to > 85 % of its connections for the last alert. Loopback only; every
load is bounded in requests and time.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from pipeline.collector import (
    Runnable,
    collector_binary,
    free_port,
    load,
    read_spans,
    runnable,
    traces,
)
from pipeline.processes import firing, query, start, start_prometheus, stop, wait_http
from pipeline.queries import all_queries, to_promql

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

APP_DIR = Path(__file__).resolve().parent
SATURATED, HEALTHY, CAPACITY = "pool-saturated", "pool-healthy", "pool-capacity"
POOL = "main"  # the saturated app's pool; the others have their own names, since
# pg_stat_activity's "application" scope is per pool name (application_name)
POOL_NAMES = {SATURATED: POOL, HEALTHY: "orders", CAPACITY: "reports"}
WAIT_SPAN_THRESHOLD_MS = 50
IDLE_IN_TRANSACTION_S = 66  # the alert needs > 60 s
DECISION_WAIT_S = 10  # tail_sampling.decision_wait in the shipped configs
SATURATING_WORKERS = 6  # concurrent /slow requests against 2 + 1 connections
MAX_REQUESTS = 4000  # hard bound on the requests of the whole test
HEALTHY_INTERVAL_S = 0.1  # the healthy load: one request per 100 ms per worker
ALERTS_BY_SCENARIO = {
    SATURATED: {
        "SQLAlchemyPoolSaturated", "SQLAlchemyPoolWaitP99High", "SQLAlchemyPoolCheckoutTimeouts",
        "SQLAlchemyPoolWaitSpans", "SQLAlchemyPoolConnectionLeaks",
        "SQLAlchemySessionOutlivedResponse", "SQLAlchemyPoolIdleInTransaction",
    },
    CAPACITY: {"SQLAlchemyPoolCapacityExceedsMaxConnections"},
}  # fmt: skip
SERVER_FULL_ALERT = "SQLAlchemyPoolPgBackendsNearMax"
# Counters that have no series until their first event: the dashboards must show 0 instead.
EVENT_COUNTERS = (
    "db_client_connection_timeouts_total",
    "sqlalchemy_pool_leaks_total",
    "sqlalchemy_pool_connection_closes_total",
    "traces_span_metrics_calls_total",
)
HTTP_METRICS = ("http_server_request_duration_seconds", "http_server_duration_milliseconds")
INSTRUMENT = "from opentelemetry.instrumentation.auto_instrumentation import run; run()"


@dataclass
class App:
    name: str
    url: str
    process: object
    log: Path


def _app_env(name: str, collector: Runnable, database_url: str, **extra: str) -> dict:
    return dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        E2E_TELEMETRY="otlp",
        E2E_DATABASE_URL=database_url,
        OTEL_SERVICE_NAME=name,
        OTEL_RESOURCE_ATTRIBUTES=f"service.instance.id={name}-1",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.ports['otlp_http']}",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_BSP_SCHEDULE_DELAY="500",
        OTEL_PYTHON_FASTAPI_EXCLUDED_URLS="healthz",
        OTEL_PYTHON_SQLALCHEMY_POOL_POOL_NAME=POOL_NAMES[name],
        OTEL_PYTHON_SQLALCHEMY_POOL_WAIT_SPAN_THRESHOLD_MS=str(WAIT_SPAN_THRESHOLD_MS),
        # Every slow wait gets its span, so every slow wait's exemplar points at a kept trace
        # (with the default budget of 10 spans/s some would not: docs/pipeline.md).
        OTEL_PYTHON_SQLALCHEMY_POOL_WAIT_SPANS_PER_S="0",
        OTEL_PYTHON_SQLALCHEMY_POOL_LEAK_THRESHOLD_S="1",
        OTEL_PYTHON_SQLALCHEMY_POOL_PG_ACTIVITY="true",
        OTEL_PYTHON_SQLALCHEMY_POOL_PG_ACTIVITY_INTERVAL_S="1",
        OTEL_PYTHON_SQLALCHEMY_POOL_SET_APPLICATION_NAME="true",
        **extra,
    )


def _start_app(name: str, env: dict, tmp_path: Path) -> App:
    port = free_port()
    log = tmp_path / f"{name}.log"
    process = start(
        [sys.executable, "-c", INSTRUMENT, sys.executable, "-m", "uvicorn", "e2e_pool_app:app",
         "--app-dir", str(APP_DIR), "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        log, env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", process, log)
    return App(name, url, process, log)


def _start_collector(config: Runnable, tmp_path: Path, name: str):
    path = config.write(tmp_path / f"{name}.yaml")
    log = tmp_path / f"{name}-collector.log"
    process = start([str(collector_binary()), f"--config={path}"], log)
    wait_http(f"http://127.0.0.1:{config.ports['health']}/", process, log)
    return process, log


@dataclass
class Stack:
    collector: Runnable
    collector_log: Path
    prometheus: str
    apps: dict[str, App]
    database_url: sa.URL


@pytest.fixture
def stack(async_url, tmp_path):
    processes = []
    try:
        collector = runnable("otelcol", tmp_path, record_all_spans=True)
        process, collector_log = _start_collector(collector, tmp_path, "otelcol")
        processes.append(process)
        scrape = [
            {"job_name": "otel-collector", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{collector.ports['prometheus']}"]}]},
            {"job_name": "otel-collector-internal",
             "static_configs": [{"targets": [f"127.0.0.1:{collector.ports['telemetry']}"]}]},
        ]  # fmt: skip
        prometheus, process = start_prometheus(scrape, tmp_path, free_port())
        processes.append(process)
        database = async_url.render_as_string(hide_password=False)
        pools = {
            SATURATED: {"E2E_POOL_SIZE": "2", "E2E_MAX_OVERFLOW": "1", "E2E_POOL_TIMEOUT": "0.3"},
            HEALTHY: {"E2E_POOL_SIZE": "5", "E2E_MAX_OVERFLOW": "5", "E2E_POOL_TIMEOUT": "30",
                      "E2E_POOL_RECYCLE": "-1", "OTEL_SEMCONV_STABILITY_OPT_IN": "http"},
            CAPACITY: {"E2E_POOL_SIZE": "1", "E2E_MAX_OVERFLOW": "500", "E2E_POOL_TIMEOUT": "30"},
        }  # fmt: skip
        apps = {}
        for name, extra in pools.items():
            apps[name] = _start_app(name, _app_env(name, collector, database, **extra), tmp_path)
            processes.append(apps[name].process)
        yield Stack(collector, collector_log, prometheus, apps, async_url)
    finally:
        for process in reversed(processes):
            stop(process)


# --- load -------------------------------------------------------------------------------------
class Budget:
    """The hard bound on requests, shared by every load of the test."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.statuses: dict[str, dict[int | str, int]] = {}

    async def get(self, client: httpx.AsyncClient, app: str, path: str) -> int | str:
        if self.left <= 0:
            return "budget"
        self.left -= 1
        try:
            status: int | str = (await client.get(path)).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        counts = self.statuses.setdefault(app, {})
        counts[status] = counts.get(status, 0) + 1
        return status


async def _every_signal_once(budget: Budget, app: App) -> None:
    """Long hold, outlived response, garbage-collected session, a session: on an idle pool."""
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        for path in ("/hold", "/outlived", "/garbage-collected", "/session/7"):
            assert await budget.get(client, app.name, path) == 200, (path, app.log.read_text())


async def _loop(budget: Budget, app: App, paths: list[str], stop_at: asyncio.Event,
                pause: float = 0.0) -> None:  # fmt: skip
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        i = 0
        while not stop_at.is_set() and budget.left > 0:
            await budget.get(client, app.name, paths[i % len(paths)].format(i=i))
            i += 1
            if pause:
                await asyncio.sleep(pause)


# --- checks -----------------------------------------------------------------------------------
def _panel_queries(job: str):
    """Every dashboard panel query with $job set to one scenario's service (rest: All)."""
    for q in all_queries():
        if q.kind == "panel":
            yield q, to_promql(q.expr, variables={"job": job})


def _is_http(promql: str) -> bool:
    return any(metric in promql for metric in HTTP_METRICS)


async def _assert_every_panel_has_data(prom: httpx.AsyncClient) -> None:
    failures = []
    for job in (SATURATED, HEALTHY):
        for q, promql in _panel_queries(job):
            if job == HEALTHY and not _is_http(promql):
                continue  # the healthy app is there for the HTTP panels and the silent alerts
            status, result = await query(prom, promql)
            if status != "success" or not result:
                failures.append(f"[{job}] {q.where}: {status}, no series\n  {promql}")
    for q in all_queries():
        if q.kind in ("variable", "datasource"):
            status, result = await query(prom, q.promql)
            if status != "success" or not result:
                failures.append(f"{q.where}: {status}, no series\n  {q.promql}")
    assert not failures, "queries without data:\n" + "\n".join(failures)


async def _assert_event_counters_show_zero(prom: httpx.AsyncClient) -> None:
    """The healthy app has no timeouts, leaks, closes (no recycle, no overflow) or wait spans:
    those panels show 0 for its pool."""
    for q, promql in _panel_queries(HEALTHY):
        if not any(counter in promql for counter in EVENT_COUNTERS):
            continue
        status, result = await query(prom, promql)
        assert status == "success" and result, f"{q.where}: no data on a healthy app\n{promql}"
        values = [float(series["value"][1]) for series in result]
        assert values == [0.0] * len(values), f"{q.where}: {values}"


def _marked(spans) -> set[str]:
    """Why tail sampling must keep a trace: every reason found among its spans."""
    reasons = set()
    for span in spans:
        if span.name == semconv.WAIT_SPAN_NAME:
            reasons.add("wait")
        if "Timeout" in str(span.attributes.get(semconv.ERROR_TYPE, "")):
            reasons.add("timeout")
        if semconv.LONG_HOLD_EVENT in span.events:
            reasons.add("long_hold")
        if span.attributes.get(semconv.SESSION_OUTLIVED_RESPONSE) is True:
            reasons.add("outlived_response")
        if semconv.OUTLIVED_RESPONSE_EVENT in span.events:
            reasons.add("outlived_response_event")
        if span.attributes.get(semconv.SESSION_OUTCOME) == semconv.OUTCOME_GARBAGE_COLLECTED:
            reasons.add("garbage_collected")
    return reasons


async def _assert_every_policy_kept_traces(prom: httpx.AsyncClient) -> None:
    """Per policy, the collector's own count of traces it decided to keep: each policy of the
    shipped config kept at least one (so none keys on something that is never emitted)."""
    policies = {p["name"] for p in load("otelcol")["processors"]["tail_sampling"]["policies"]}
    result = await _series(
        prom,
        'sum by (policy) ({__name__=~"otelcol_processor_tail_sampling_count_traces_sampled'
        '(_total)?", sampled="true"})',
    )
    kept = {series["metric"]["policy"]: float(series["value"][1]) for series in result}
    assert {policy for policy in policies if kept.get(policy, 0) > 0} == policies, kept


def _assert_tail_sampling(collector: Runnable, budget: Budget) -> set[str]:
    """Every trace with a reason is kept; most healthy ones are dropped. Returns kept ids."""
    everything = traces(read_spans(collector.all_spans))
    kept = traces(read_spans(collector.kept))
    assert kept, "the collector kept no trace"
    assert set(kept) <= set(everything)
    reasons_seen: set[str] = set()
    lost = []
    for trace_id, spans in everything.items():
        reasons = _marked(spans)
        reasons_seen |= reasons
        if reasons and trace_id not in kept:
            lost.append((trace_id, sorted(reasons), sorted({s.name for s in spans})))
        if trace_id in kept:
            assert len(kept[trace_id]) == len(spans), f"{trace_id}: kept only part of the trace"
    assert not lost, f"traces with a reason to keep that were dropped: {lost[:10]}"
    kinds = {"wait", "timeout", "long_hold", "outlived_response", "outlived_response_event",
             "garbage_collected"}  # fmt: skip
    assert kinds <= reasons_seen, f"the scenario lacks some kinds of trouble: {reasons_seen}"
    healthy = [
        trace_id for trace_id, spans in everything.items()
        if {s.service for s in spans} == {HEALTHY} and not _marked(spans)
        and not any(s.error for s in spans)
    ]  # fmt: skip
    healthy_kept = [trace_id for trace_id in healthy if trace_id in kept]
    print(f"healthy traces: {len(healthy)}, kept {len(healthy_kept)}; requests {budget.statuses}")
    assert len(healthy) >= 100, f"too few healthy traces to judge: {len(healthy)}"
    # baseline policy: 10 % by trace id; 25 % leaves room for chance on a few hundred traces
    assert 0 < len(healthy_kept) < 0.25 * len(healthy), (len(healthy_kept), len(healthy))
    return set(kept)


async def _assert_wait_exemplars_point_at_kept_traces(
    prom: httpx.AsyncClient, kept: set[str], start_s: float
) -> None:
    response = await prom.get(
        "/api/v1/query_exemplars",
        params={
            "query": f'db_client_connection_wait_time_seconds_bucket{{job="{SATURATED}"}}',
            "start": start_s,
            "end": time.time(),
        },
    )
    body = response.json()
    assert body["status"] == "success", body
    exemplars = [e for series in body["data"] for e in series["exemplars"]]
    slow = [e for e in exemplars if float(e["value"]) >= WAIT_SPAN_THRESHOLD_MS / 1000]
    assert slow, f"no exemplar of a slow wait among {len(exemplars)}"
    missing = [e["labels"]["trace_id"] for e in slow if e["labels"]["trace_id"] not in kept]
    assert not missing, f"{len(missing)} of {len(slow)} slow-wait exemplars: trace not kept"


async def _series(prom: httpx.AsyncClient, promql: str) -> list:
    status, result = await query(prom, promql)
    assert status == "success", (promql, status)
    return result


async def _fill_the_server(database_url: sa.URL, stop_at: asyncio.Event) -> int:
    """Open connections until the server's backends exceed 87 % of what it allows users."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url, poolclass=sa.pool.NullPool)
    conns = []
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.text(
                "select current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int "
                "+ coalesce(current_setting('reserved_connections', true)::int, 0), "
                "(select count(*) from pg_stat_activity where backend_type = 'client backend')"
            ))).one()  # fmt: skip
        max_connections, reserved, backends = row
        wanted = math.ceil(0.87 * (max_connections - reserved)) - backends
        assert 0 < wanted <= 100, (max_connections, reserved, backends)
        for _ in range(wanted):
            conns.append(await engine.connect())
        await stop_at.wait()
        return wanted
    finally:
        for conn in conns:
            await conn.close()
        await engine.dispose()


async def _idle_in_transaction(app: App) -> int:
    async with httpx.AsyncClient(base_url=app.url, timeout=IDLE_IN_TRANSACTION_S + 30) as client:
        response = await client.get(f"/idle-in-transaction?seconds={IDLE_IN_TRANSACTION_S}")
        return response.status_code


def _on_loopback(url: sa.URL) -> bool:
    """Filling a server we do not own is out of the question (loopback or unix socket only)."""
    return url.host in (None, "", "localhost", "127.0.0.1", "::1") or url.host.startswith("/")


async def test_pipeline_end_to_end(stack: Stack):
    if not _on_loopback(stack.database_url):
        pytest.skip("fills the server to 87 % of max_connections: a loopback PostgreSQL only")
    saturated, healthy = stack.apps[SATURATED], stack.apps[HEALTHY]
    budget = Budget(MAX_REQUESTS)
    start_s = time.time()
    # Each pool is adopted at its first checkout, with every counter at 0; Prometheus must have
    # scraped those zeros before the first event, or increase() sees no increase.
    for app in stack.apps.values():
        async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
            assert await budget.get(client, app.name, "/session/1") == 200
    await asyncio.sleep(3)  # one metric export (1 s), one scrape (1 s)
    await _every_signal_once(budget, saturated)
    stop_load = asyncio.Event()
    idle = asyncio.create_task(_idle_in_transaction(saturated))
    await asyncio.sleep(0.5)  # it holds its connection before the pool saturates
    loads = [
        asyncio.create_task(_loop(budget, saturated, ["/slow"], stop_load))
        for _ in range(SATURATING_WORKERS)
    ] + [
        asyncio.create_task(_loop(budget, healthy, ["/session/{i}"], stop_load, HEALTHY_INTERVAL_S))
        for _ in range(2)
    ]
    expected = {(job, name) for job, names in ALERTS_BY_SCENARIO.items() for name in names}
    fired: set[tuple[str, str]] = set()
    async with httpx.AsyncClient(base_url=stack.prometheus, timeout=10) as prom:
        try:
            deadline = time.monotonic() + IDLE_IN_TRANSACTION_S + 45
            while time.monotonic() < deadline and not fired >= expected:
                await asyncio.sleep(1)
                for name, alerts in (await firing(prom)).items():
                    fired |= {(a["labels"]["job"], name) for a in alerts}
                for app in stack.apps.values():
                    assert app.process.poll() is None, f"{app.name} died:\n{app.log.read_text()}"
        finally:
            stop_load.set()
            await asyncio.gather(*loads)
            idle_status = await idle
        print(f"fired: {sorted(fired)}; requests: {budget.statuses}")
        assert idle_status == 200
        assert fired >= expected, f"missing: {sorted(expected - fired)}"
        healthy_alerts = sorted(name for job, name in fired if job == HEALTHY)
        assert not healthy_alerts, f"alerts fired on the healthy run: {healthy_alerts}"
        assert budget.statuses[SATURATED].get(503), budget.statuses  # pool timeouts
        for app in (saturated, healthy):
            assert budget.statuses[app.name].get(200), budget.statuses

        # Pool metrics and span metrics, with the pool label, through the collector.
        selector = f'job="{SATURATED}", db_client_connection_pool_name="{POOL}"'
        assert await _series(prom, f"db_client_connection_count{{{selector}}}")
        assert await _series(
            prom, f'traces_span_metrics_calls_total{{span_name="sqlalchemy.pool.wait", {selector}}}'
        )
        await _every_signal_once(budget, saturated)  # fresh samples for the rate() windows
        await asyncio.sleep(3)
        await _assert_every_panel_has_data(prom)
        await _assert_event_counters_show_zero(prom)

        # The server near max_connections: the last alert.
        stop_fill = asyncio.Event()
        fill = asyncio.create_task(_fill_the_server(stack.database_url, stop_fill))
        server_full: list[dict] = []

        def jobs(alerts: list[dict]) -> set[str]:
            return {a["labels"]["job"] for a in alerts}

        try:
            deadline = time.monotonic() + 30
            # Each app's sampler sees the whole server, so the alert fires per job as each one's
            # samples arrive: wait for the saturated app's, not the first job's.
            while time.monotonic() < deadline and not fill.done():
                await asyncio.sleep(1)
                server_full = (await firing(prom)).get(SERVER_FULL_ALERT, [])
                if SATURATED in jobs(server_full):
                    break
        finally:
            stop_fill.set()
            opened = await fill
        assert jobs(server_full) >= {SATURATED}, (opened, server_full)

        # Tail sampling decides DECISION_WAIT_S after a trace's first span; the batch
        # processor and the file exporter flush within 5 s more.
        await asyncio.sleep(DECISION_WAIT_S + 7)
        kept = _assert_tail_sampling(stack.collector, budget)
        await asyncio.sleep(2)  # the collector's own metrics, scraped
        await _assert_every_policy_kept_traces(prom)
        await _assert_wait_exemplars_point_at_kept_traces(prom, kept, start_s)


# --- agent -> gateway layout -------------------------------------------------------------------
ROUTING_REQUESTS = 300


async def test_agent_routes_every_span_of_a_trace_to_one_gateway(async_url, tmp_path):
    processes = []
    try:
        gateways = []
        for i in (1, 2):
            out = tmp_path / f"gateway{i}"
            out.mkdir()
            gateway = runnable("otelcol-gateway", out, record_all_spans=True)
            processes.append(_start_collector(gateway, out, "otelcol-gateway")[0])
            gateways.append(gateway)
        out = tmp_path / "agent"
        out.mkdir()
        agent = runnable(
            "otelcol-agent",
            out,
            record_all_spans=True,
            gateways=[f"127.0.0.1:{g.ports['otlp_grpc']}" for g in gateways],
        )
        processes.append(_start_collector(agent, out, "otelcol-agent")[0])
        database = async_url.render_as_string(hide_password=False)
        app = _start_app(SATURATED, _app_env(SATURATED, agent, database), tmp_path)
        processes.append(app.process)

        budget = Budget(ROUTING_REQUESTS)
        await _every_signal_once(budget, app)
        stop_at = asyncio.Event()
        loads = [asyncio.create_task(_loop(budget, app, ["/slow", "/session/{i}"], stop_at))
                 for _ in range(4)]  # fmt: skip
        await asyncio.sleep(8)
        stop_at.set()
        await asyncio.gather(*loads)
        # the app's batch span processor (0.5 s) and the agent's batch processor (5 s)
        await asyncio.sleep(8)

        received = traces(read_spans(agent.all_spans))
        routed = [traces(read_spans(g.all_spans)) for g in gateways]
        assert len(received) >= 50, f"too few traces: {len(received)}; {budget.statuses}"
        assert all(routed), f"a gateway received nothing: {[len(r) for r in routed]}"
        for trace_id, spans in received.items():
            holders = [i for i, r in enumerate(routed) if trace_id in r]
            assert len(holders) == 1, f"{trace_id} went to gateways {holders}"
            got = routed[holders[0]][trace_id]
            assert sorted(s.span_id for s in got) == sorted(s.span_id for s in spans), trace_id
        assert set().union(*routed) == set(received)

        # The agent exports the app's metrics and the span metrics, with the pool label.
        exported = httpx.get(f"http://127.0.0.1:{agent.ports['prometheus']}/metrics").text
        pool_label = f'db_client_connection_pool_name="{POOL}"'
        for metric in ("db_client_connection_count", "db_client_connection_wait_time_seconds"):
            assert any(
                line.startswith(metric) and pool_label in line for line in exported.splitlines()
            ), metric
    finally:
        for process in reversed(processes):
            stop(process)
