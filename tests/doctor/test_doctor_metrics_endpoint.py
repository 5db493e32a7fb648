"""from_metrics_endpoint on the real opentelemetry-exporter-prometheus exposition."""

from __future__ import annotations

import math

import pytest

from sqlalchemy_pool_tools.doctor import diagnose, from_metrics_endpoint
from sqlalchemy_pool_tools.doctor.figures import (
    evaluate_snapshots,
    histogram_quantile,
    parse_exposition,
)
from sqlalchemy_pool_tools.doctor.verdict import (
    IDLE_IN_TRANSACTION,
    INSUFFICIENT_DATA,
    LEAKED_SESSIONS,
)
from sqlalchemy_pool_tools.errors import UserError

from .doctor_fakes import POOL, FakePoolApp, baseline, incident

SCRAPES = 6  # duration 1.0 s / interval 0.2 s + the first scrape


def script(app: FakePoolApp) -> None:
    """Scrape 0 sees the baseline; the incident lands before scrape 1; the queue drains
    before scrape 3; no checkout after that (traffic stopped, connections still out)."""
    baseline(app)

    def on_scrape(n: int) -> None:
        if n == 1:
            incident(app)
        if n == 3:
            app.set_gauge(
                "db.client.connection.pending_requests",
                0,
                **{"db.client.connection.pool.name": POOL},
            )

    app.on_scrape = on_scrape


def test_figures_from_real_exposition(fake_app: FakePoolApp) -> None:
    script(fake_app)
    figures = from_metrics_endpoint(fake_app.url, duration_s=1.0, interval_s=0.2)
    assert fake_app.scrapes == SCRAPES
    assert sorted(figures) == ["main", "reports"]
    fig = figures[POOL]
    window = fig.window_s
    assert fig.source == "metrics-endpoint"
    assert window == pytest.approx(1.0, abs=0.3)

    # pool state of the (only) instance
    assert fig.instances == 1
    assert fig.max_connections == 10 and fig.idle_max == 5 and fig.max_connections_sum == 10
    assert fig.used_max == 10
    assert fig.used_mean == pytest.approx((2 + 10 * 5) / SCRAPES)
    assert fig.idle_mean == pytest.approx(3 / SCRAPES)
    assert fig.utilisation == pytest.approx(fig.used_mean / 10)
    assert fig.saturated_share == pytest.approx(5 / SCRAPES)
    assert fig.pending_max == 4
    assert fig.pending_mean == pytest.approx(8 / SCRAPES)

    # counts in the window: the 100 earlier checkouts and the earlier timeout do not count
    assert fig.checkouts == 50
    assert fig.checkout_rate == pytest.approx(50 / window)
    assert fig.timeouts == 2
    assert fig.wait_p50 == pytest.approx(0.001 + 0.0015 * 25 / 45)
    assert fig.wait_p99 == pytest.approx(0.25 + 0.25 * 4.5 / 5)
    assert fig.use_mean == pytest.approx(0.05)
    assert 0.025 < fig.use_p95 <= 0.05
    assert fig.held_idle_share == pytest.approx(0.2)
    assert 0.01 < fig.create_p95 <= 0.025
    assert fig.closes_by_reason == pytest.approx(
        {"recycle": 3 / window, "pre_ping_failed": 1 / window}
    )
    assert fig.leaks_by_kind == {"outlived_response": 1}
    assert fig.top_code_sites == ["get_order (app/orders.py:42) - 1 leaks"]

    # end of the window: traffic stopped, 10 connections still checked out
    assert fig.used_last == 10 and fig.open_connections == 10
    assert fig.used_after_traffic_stopped == 10

    # configuration and pg sampler (pool-less series belong to the process' pools)
    assert (fig.config_timeout, fig.config_recycle, fig.config_pre_ping) == (30, -1, 0)
    assert fig.expire_on_commit is None
    assert fig.pg_backends == {"idle in transaction": 3, "active": 2}
    assert fig.pg_total_backends == 25
    assert fig.pg_oldest_transaction_age == 45  # application scope wins over server scope
    assert fig.pg_oldest_query_age == 1.5
    assert (fig.pg_max_connections, fig.pg_reserved_connections) == (100, 3)

    # HTTP server metric
    assert fig.request_rate == pytest.approx(50 / window)
    assert 0.1 < fig.request_p95 <= 0.25
    assert fig.top_routes[0].startswith("GET /orders/{id} - 40 req, p99 ")
    assert "/health" in fig.top_routes[1]

    # and the verdict of that scenario
    diagnosis = diagnose(fig)
    assert diagnosis.verdict == LEAKED_SESSIONS
    kinds = [f.kind for f in diagnosis.findings]
    assert IDLE_IN_TRANSACTION in kinds and "connection_churn" in kinds

    other = figures["reports"]
    assert other.checkouts is None and other.used_max == 0
    assert diagnose(other).verdict == INSUFFICIENT_DATA


def test_pool_filter_and_several_instances() -> None:
    apps = [FakePoolApp(), FakePoolApp()]
    try:
        for n, app in enumerate(apps):
            app.pool_state(POOL, used=n + 1, idle=1, limit=8, idle_max=4)
            app.on_scrape = lambda i, app=app: (
                i == 1 and app.checkouts(POOL, 10, wait=0.001, use=0.002)
            )
        figures = from_metrics_endpoint(
            [a.url for a in apps], duration_s=0.4, interval_s=0.2, pool=POOL
        )
    finally:
        for app in apps:
            app.close()
    fig = figures[POOL]
    assert list(figures) == [POOL]
    assert fig.instances == 2
    assert fig.max_connections == 8 and fig.max_connections_sum == 16
    assert fig.used_mean == 2  # the busiest instance
    assert fig.used_last == 3 and fig.open_connections == 5  # summed over instances
    assert fig.checkouts == 20


def test_unknown_pool_lists_the_pools(fake_app: FakePoolApp) -> None:
    baseline(fake_app)
    with pytest.raises(UserError, match=r"pool 'nope' not found .*pools seen: main, reports"):
        from_metrics_endpoint(fake_app.url, duration_s=0.1, interval_s=0.1, pool="nope")


def test_endpoint_without_pool_metrics(fake_app: FakePoolApp) -> None:
    with pytest.raises(UserError, match="no SQLAlchemy pool metrics"):
        from_metrics_endpoint(fake_app.url, duration_s=0.1, interval_s=0.1)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:1/metrics", "cannot reach metrics endpoint"),
        ("ftp://example/metrics", "bad metrics endpoint URL"),
        ("not a url", "bad metrics endpoint URL"),
    ],
)
def test_unreachable_or_bad_url(url: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        from_metrics_endpoint(url, duration_s=0.1, interval_s=0.1)
    assert "\n" not in str(info.value)


def test_http_error_status(fake_app: FakePoolApp) -> None:
    with pytest.raises(UserError, match="answered HTTP 404"):
        from_metrics_endpoint(fake_app.url.replace("/metrics", "/nope"), 0.1, 0.1)


def test_not_an_exposition() -> None:
    with pytest.raises(UserError, match="not a Prometheus text exposition"):
        parse_exposition("<html><body>hello {</body></html>\n", endpoint="http://x/")


def test_counter_reset_and_series_born_in_window() -> None:
    """A restarted process (counter drops) counts from zero; a new series counts whole."""
    name = "db_client_connection_timeouts_total"
    labels = (("db_client_connection_pool_name", "p"),)
    used = (
        "db_client_connection_count",
        (("db_client_connection_pool_name", "p"), ("db_client_connection_state", "used")),
    )
    snaps = [
        {(name, labels): 5.0, used: 1.0},
        {(name, labels): 7.0, used: 1.0},
        {(name, labels): 1.0, used: 1.0},  # reset
        {(name, labels): 3.0, used: 1.0},
    ]
    vectors, _ = evaluate_snapshots([0.0, 1.0, 2.0, 3.0], snaps, tail_s=1.0)
    assert [v for _, v in vectors["timeouts"]] == [2 + 1 + 2]
    born = [{used: 1.0}, {used: 1.0, (name, labels): 4.0}]
    vectors, _ = evaluate_snapshots([0.0, 1.0], born, tail_s=1.0)
    assert [v for _, v in vectors["timeouts"]] == [4]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 1, 0.5: 3, math.inf: 4}, 0.1 + 0.4 * (1 / 2)),
        (0.99, {0.1: 1, 0.5: 3, math.inf: 4}, 0.5),  # rank in +Inf: last finite bound
        (0.5, {0.1: 0, math.inf: 0}, None),  # no observations
        (0.5, {0.1: 3, 0.5: 3}, None),  # no +Inf bucket
        (0.5, {0.1: 4, 0.5: 2, math.inf: 4}, 0.05),  # non-monotonic repaired
    ],
)
def test_histogram_quantile(q: float, buckets: dict, expected: float | None) -> None:
    result = histogram_quantile(q, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_culprit_routes_from_connection_hold_time() -> None:
    """use_time carries http.route: the doctor names the routes holding the pool longest."""
    from opentelemetry.instrumentation.sqlalchemy_pool import semconv as sc

    app = FakePoolApp()
    try:
        app.pool_state(POOL, used=1, idle=1, limit=4, idle_max=2)

        def on_scrape(n: int) -> None:
            if n == 1:
                for route, use, count in (("/report", 2.0, 5), ("/orders", 0.01, 50)):
                    for _ in range(count):
                        app.wait_time.record(0.001, {sc.POOL_NAME: POOL})
                        app.use_time.record(use, {sc.POOL_NAME: POOL, sc.HTTP_ROUTE: route})

        app.on_scrape = on_scrape
        figures = from_metrics_endpoint(app.url, duration_s=0.4, interval_s=0.2, pool=POOL)
    finally:
        app.close()
    sites = figures[POOL].top_code_sites
    assert sites is not None
    assert sites[0].startswith("route /report") and "connection hold time" in sites[0]
    assert sites[1].startswith("route /orders")
