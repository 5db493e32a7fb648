"""from_prometheus against a real Prometheus scraping the fake app's real exposition."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.processes import stop
from sqlalchemy_pool_tools.doctor import diagnose, from_prometheus
from sqlalchemy_pool_tools.doctor.verdict import LEAKED_SESSIONS
from sqlalchemy_pool_tools.errors import UserError

from .doctor_fakes import POOL, FakePoolApp, baseline, incident

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
STARTUP_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def _instant(base: str, promql: str) -> list[tuple[dict, float]]:
    body = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


@pytest.fixture
def app() -> Iterator[FakePoolApp]:
    app = FakePoolApp()
    baseline(app)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def prometheus(app: FakePoolApp, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping the fake app every second."""
    if not os.path.exists(PROMETHEUS):
        message = f"{PROMETHEUS} not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    target = app.url.removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: app\n"
        "    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for("Prometheus to start", ready, STARTUP_TIMEOUT_S)
        yield base
    finally:
        stop(proc)
        log.close()


def test_figures_from_real_prometheus(app: FakePoolApp, prometheus: str) -> None:
    # Baseline scrapes first, so the window start has the pre-incident values.
    _wait_for(
        "baseline samples",
        lambda: bool(_instant(prometheus, "count_over_time(db_client_connection_max[1m]) >= 6")),
        SCRAPE_TIMEOUT_S,
    )
    started = time.time()
    incident(app)
    _wait_for(
        "the incident to be scraped",
        lambda: (
            _instant(prometheus, "sum(db_client_connection_wait_time_seconds_count)")
            == [({}, 150.0)]
        ),
        SCRAPE_TIMEOUT_S,
    )
    time.sleep(1.0)  # let the incident state last a moment inside the window
    # A window reaching back to just before the incident (samples of the baseline at its start).
    window_s = math.ceil(time.time() - started) + 2
    figures = from_prometheus(prometheus, window=f"{window_s}s", selector='job="app"')

    assert sorted(figures) == ["main", "reports"]
    fig = figures[POOL]
    assert fig.source == "prometheus" and fig.window_s == window_s
    assert fig.instances == 1
    assert fig.max_connections == 10 and fig.idle_max == 5 and fig.max_connections_sum == 10
    assert fig.used_max == 10 and fig.used_last == 10
    assert 2 <= fig.used_mean <= 10
    assert 0 < fig.saturated_share <= 1
    assert fig.pending_max == 4

    # Counts in the window: the 100 earlier checkouts / the earlier timeout are excluded, the
    # leak counter born inside the window counts from zero.
    assert fig.checkouts == 50
    assert fig.timeouts == 2
    assert fig.leaks_by_kind == {"outlived_response": 1}
    assert fig.closes_by_reason == pytest.approx(
        {"recycle": 3 / window_s, "pre_ping_failed": 1 / window_s}
    )
    assert fig.wait_p50 == pytest.approx(0.001 + 0.0015 * 25 / 45)
    assert fig.wait_p99 == pytest.approx(0.25 + 0.25 * 4.5 / 5)
    assert fig.use_mean == pytest.approx(0.05)
    assert fig.held_idle_share == pytest.approx(0.2)
    assert fig.top_code_sites == ["get_order (app/orders.py:42) - 1 leaks"]
    assert fig.top_routes[0].startswith("GET /orders/{id} - 40 req")
    assert fig.request_rate == pytest.approx(50 / window_s)

    assert (fig.config_timeout, fig.config_recycle, fig.config_pre_ping) == (30, -1, 0)
    assert fig.pg_backends == {"idle in transaction": 3, "active": 2}
    assert fig.pg_total_backends == 25
    assert fig.pg_oldest_transaction_age == 45
    assert (fig.pg_max_connections, fig.pg_reserved_connections) == (100, 3)
    assert diagnose(fig).verdict == LEAKED_SESSIONS

    # Our bucket interpolation agrees with PromQL's own histogram_quantile.
    promql = (
        "histogram_quantile(0.95, sum by (le) "
        f"(increase(db_client_connection_wait_time_seconds_bucket[{window_s}s])))"
    )
    (_, prom_p95), *_ = _instant(prometheus, promql)
    assert fig.wait_p95 == pytest.approx(prom_p95, rel=0.05)

    # Evaluated before the incident: no traffic in that window.
    before = from_prometheus(prometheus, pool=POOL, window="2s", at=started - 0.5)
    assert list(before) == [POOL]
    assert before[POOL].checkouts == 0 and before[POOL].used_max == 2


def test_prometheus_errors(app: FakePoolApp, prometheus: str) -> None:
    _wait_for(
        "first samples",
        lambda: bool(_instant(prometheus, "db_client_connection_max")),
        SCRAPE_TIMEOUT_S,
    )
    with pytest.raises(UserError, match=r"pool 'nope' not found"):
        from_prometheus(prometheus, pool="nope", window="1m")
    with pytest.raises(UserError, match="no SQLAlchemy pool metrics"):
        from_prometheus(prometheus, window="1m", selector='job="other"')
    with pytest.raises(UserError, match="rejected a query"):
        from_prometheus(prometheus, window="1m", selector='job=~"("')
    with pytest.raises(UserError, match="does not look like a Prometheus server"):
        from_prometheus(app.url.removesuffix("/metrics"), window="1m")


def test_unreachable_prometheus() -> None:
    with pytest.raises(UserError, match="cannot reach Prometheus") as info:
        from_prometheus(f"http://127.0.0.1:{_free_port()}", window="1m")
    assert "\n" not in str(info.value)
