"""Shared test doubles for the doctor: a fake instrumented app and figure sets.

The fake app creates the contract's instruments on a real MeterProvider with the real
``opentelemetry-exporter-prometheus`` reader and serves ``prometheus_client.generate_latest``
on 127.0.0.1, so the readers parse exactly what an instrumented app exposes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from opentelemetry.instrumentation.sqlalchemy_pool import semconv as sc
from sqlalchemy_pool_tools.doctor.figures import Figures


class FakePoolApp:
    """Pool telemetry under test control. ``on_scrape(n)`` runs before the n-th scrape (0-based)
    is answered, so a test can script exactly what each scrape sees."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(registry=self.registry)
        self.provider = MeterProvider(
            metric_readers=[self.reader],
            resource=Resource.create({"service.name": "doctor-test"}),
        )
        meter = self.provider.get_meter("opentelemetry.instrumentation.sqlalchemy_pool")
        # name -> {attribute set -> value}, read by the observable instruments at scrape time
        self.gauges: dict[str, dict[tuple[tuple[str, object], ...], float]] = {}
        self.on_scrape: Callable[[int], None] | None = None
        self.scrapes = 0
        self._lock = threading.Lock()

        def observable(name: str, unit: str, kind: str = "updown") -> None:
            self.gauges[name] = {}

            def callback(_: CallbackOptions) -> Iterator[Observation]:
                for attrs, value in list(self.gauges[name].items()):
                    yield Observation(value, dict(attrs))

            create = (
                meter.create_observable_up_down_counter
                if kind == "updown"
                else meter.create_observable_gauge
            )
            create(name, callbacks=[callback], unit=unit)

        observable(sc.CONNECTION_COUNT, "{connection}")
        observable(sc.CONNECTION_MAX, "{connection}")
        observable(sc.CONNECTION_IDLE_MAX, "{connection}")
        observable(sc.CONNECTION_PENDING_REQUESTS, "{request}")
        observable(sc.CONFIG_TIMEOUT, "s", "gauge")
        observable(sc.CONFIG_RECYCLE, "s", "gauge")
        observable(sc.CONFIG_PRE_PING, "1", "gauge")
        observable(sc.SESSIONS_EXPIRE_ON_COMMIT, "1", "gauge")
        observable(sc.PG_BACKENDS, "{connection}", "gauge")
        observable(sc.PG_OLDEST_XACT_AGE, "s", "gauge")
        observable(sc.PG_OLDEST_QUERY_AGE, "s", "gauge")
        observable(sc.PG_MAX_CONNECTIONS, "{connection}", "gauge")
        observable(sc.PG_RESERVED_CONNECTIONS, "{connection}", "gauge")

        def histogram(name: str):
            return meter.create_histogram(
                name, unit="s", explicit_bucket_boundaries_advisory=list(sc.DURATION_BUCKETS)
            )

        self.wait_time = histogram(sc.CONNECTION_WAIT_TIME)
        self.use_time = histogram(sc.CONNECTION_USE_TIME)
        self.create_time = histogram(sc.CONNECTION_CREATE_TIME)
        self.held_idle = histogram(sc.CONNECTION_HELD_IDLE_TIME)
        self.http_duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            explicit_bucket_boundaries_advisory=[
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10
            ],
        )  # fmt: skip
        self.timeouts = meter.create_counter(sc.CONNECTION_TIMEOUTS, unit="{timeout}")
        self.closes = meter.create_counter(sc.CONNECTION_CLOSES, unit="{connection}")
        self.leaks = meter.create_counter(sc.LEAKS, unit="{event}")

        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # name fixed by http.server
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                with app._lock:
                    if app.on_scrape is not None:
                        app.on_scrape(app.scrapes)
                    app.scrapes += 1
                    body = generate_latest(app.registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # -- helpers mirroring what the instrumentor records ------------------------------------
    def set_gauge(self, name: str, value: float, **attrs: object) -> None:
        self.gauges[name][tuple(sorted(attrs.items()))] = value

    def pool_state(
        self, pool: str, *, used: float, idle: float, limit: float, idle_max: float, pending=0.0
    ) -> None:
        p = {sc.POOL_NAME: pool}
        self.set_gauge(sc.CONNECTION_COUNT, used, **p, **{sc.CONNECTION_STATE: "used"})
        self.set_gauge(sc.CONNECTION_COUNT, idle, **p, **{sc.CONNECTION_STATE: "idle"})
        self.set_gauge(sc.CONNECTION_MAX, limit, **p)
        self.set_gauge(sc.CONNECTION_IDLE_MAX, idle_max, **p)
        self.set_gauge(sc.CONNECTION_PENDING_REQUESTS, pending, **p)

    def checkouts(
        self, pool: str, n: int, *, wait: float, use: float, held_idle: float = 0.0
    ) -> None:
        p = {sc.POOL_NAME: pool}
        for _ in range(n):
            self.wait_time.record(wait, p)
            self.use_time.record(use, p)
            self.held_idle.record(held_idle, p)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.provider.shutdown()


# The scenario both reader tests use: numbers are chosen so every figure has a known value.
POOL = "main"
LEAK_SITE = {
    sc.CODE_FUNCTION: "get_order",
    sc.CODE_FILE: "app/orders.py",
    sc.CODE_LINE: 42,
}


def baseline(app: FakePoolApp) -> None:
    """History before the window (must not count) and the idle state."""
    app.pool_state(POOL, used=2, idle=3, limit=10, idle_max=5)
    app.pool_state("reports", used=0, idle=1, limit=5, idle_max=5)
    app.checkouts(POOL, 100, wait=0.0002, use=0.01, held_idle=0.001)
    app.timeouts.add(1, {sc.POOL_NAME: POOL})
    p = {sc.POOL_NAME: POOL}
    app.set_gauge(sc.CONFIG_TIMEOUT, 30, **p)
    app.set_gauge(sc.CONFIG_RECYCLE, -1, **p)
    app.set_gauge(sc.CONFIG_PRE_PING, 0, **p)
    # pg sampler figures carry no pool name: they belong to every pool of the process
    for scope, state, n in (
        ("application", "idle in transaction", 3),
        ("application", "active", 2),
        ("server", "idle", 20),
        ("server", "active", 5),
    ):
        app.set_gauge(sc.PG_BACKENDS, n, **{sc.PG_SCOPE: scope, sc.PG_STATE: state})
    app.set_gauge(sc.PG_OLDEST_XACT_AGE, 45, **{sc.PG_SCOPE: "application"})
    app.set_gauge(sc.PG_OLDEST_XACT_AGE, 400, **{sc.PG_SCOPE: "server"})
    app.set_gauge(sc.PG_OLDEST_QUERY_AGE, 1.5, **{sc.PG_SCOPE: "application"})
    app.set_gauge(sc.PG_MAX_CONNECTIONS, 100)
    app.set_gauge(sc.PG_RESERVED_CONNECTIONS, 3)


def incident(app: FakePoolApp) -> None:
    """The activity inside the window: a burst that exhausts the pool, then traffic stops."""
    p = {sc.POOL_NAME: POOL}
    app.checkouts(POOL, 45, wait=0.002, use=0.05, held_idle=0.01)
    app.checkouts(POOL, 5, wait=0.3, use=0.05, held_idle=0.01)
    for _ in range(3):
        app.create_time.record(0.02, p)
    app.timeouts.add(2, p)
    app.closes.add(3, {**p, sc.CLOSE_REASON: "recycle"})
    app.closes.add(1, {**p, sc.CLOSE_REASON: "pre_ping_failed"})
    app.leaks.add(1, {**p, sc.LEAK_KIND: "outlived_response", **LEAK_SITE})
    for _ in range(40):
        app.http_duration.record(0.2, {"http.route": "/orders/{id}", "http.request.method": "GET"})
    for _ in range(10):
        app.http_duration.record(0.001, {"http.route": "/health", "http.request.method": "GET"})
    app.pool_state(POOL, used=10, idle=0, limit=10, idle_max=5, pending=4)


# A healthy pool under steady traffic: 2 instances x (5 + 10), short busy holds.
HEALTHY_FIGURES = Figures(
    pool="main",
    source="test",
    window_s=300,
    instances=2,
    used_mean=3,
    used_max=6,
    idle_mean=2,
    max_connections=15,
    idle_max=5,
    utilisation=0.2,
    saturated_share=0.0,
    pending_mean=0,
    pending_max=0,
    checkouts=30000,
    checkout_rate=100,
    timeouts=0,
    wait_p50=0.0001,
    wait_p95=0.0005,
    wait_p99=0.002,
    use_mean=0.02,
    use_p95=0.08,
    held_idle_share=0.05,
    create_p95=0.01,
    closes_by_reason={},
    leaks_by_kind={},
    used_last=4,
    open_connections=10,
    config_timeout=5,
    config_recycle=280,
    config_pre_ping=1,
    expire_on_commit=0,
    top_routes=["GET /orders/{id} - 900 req, p99 120 ms, 80% of request time"],
    top_code_sites=["get_order (app/orders.py:42) - 3 leaks"],
)

SATURATED = dict(
    used_mean=14.6,
    used_max=15,
    utilisation=0.97,
    saturated_share=0.7,
    pending_mean=3,
    pending_max=8,
    wait_p99=2.0,
)
PG_OK = dict(
    pg_backends={"active": 3, "idle": 7},
    pg_total_backends=30,
    pg_oldest_transaction_age=0.5,
    pg_oldest_query_age=0.2,
    pg_max_connections=100,
    pg_reserved_connections=3,
    max_connections_sum=30,
)


def fig(*parts: dict, **overrides: object) -> Figures:
    """The healthy figures with ``parts`` (dicts, later wins) and ``overrides`` applied."""
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return replace(HEALTHY_FIGURES, **(merged | overrides))
