"""``sqlalchemy-pool loadtest`` against a tiny real HTTP app on 127.0.0.1 (bounded runs)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sqlalchemy_pool_tools import cli
from sqlalchemy_pool_tools.errors import UserError
from sqlalchemy_pool_tools.loadtest import (
    LoadResult,
    PoolWindow,
    _builtin_load,
    check_url,
    compare,
    histogram_quantile,
    load,
    parse_metrics,
    pool_windows,
    run_load,
    save,
    split_target,
)

HAS_WRK = shutil.which("wrk") is not None
POOL = 'db_client_connection_pool_name="demo"'


class FakeApp:
    """An HTTP app with ``/ok``, ``/fail`` (500), ``/slow`` and a ``/metrics`` endpoint whose
    pool series move on every scrape, like an instrumented app under load."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.lock = threading.Lock()

    def metrics(self) -> str:
        with self.lock:
            n = self.scrapes
            self.scrapes += 1
        used = [2, 7, 10, 4][n % 4]
        lines = [
            "# TYPE db_client_connection_count gauge",
            f'db_client_connection_count{{{POOL},db_client_connection_state="used"}} {used}',
            f'db_client_connection_count{{{POOL},db_client_connection_state="idle"}} {10 - used}',
            "# TYPE db_client_connection_max gauge",
            f"db_client_connection_max{{{POOL}}} 10",
            "# TYPE db_client_connection_pending_requests gauge",
            f"db_client_connection_pending_requests{{{POOL}}} {3 if used == 10 else 0}",
            "# TYPE db_client_connection_timeouts_total counter",
            f"db_client_connection_timeouts_total{{{POOL}}} {n}",
            "# TYPE db_client_connection_wait_time_seconds histogram",
        ]
        # Every scrape adds 98 fast checkouts (<= 1 ms) and 2 slow ones (0.5 .. 1 s).
        for le, count in (("0.001", 98 * n), ("0.5", 98 * n), ("1.0", 100 * n), ("+Inf", 100 * n)):
            lines.append(
                f'db_client_connection_wait_time_seconds_bucket{{{POOL},le="{le}"}} {count}'
            )
        lines += [
            f"db_client_connection_wait_time_seconds_count{{{POOL}}} {100 * n}",
            f"db_client_connection_wait_time_seconds_sum{{{POOL}}} {1.5 * n}",
            "# TYPE db_client_connection_use_time_seconds histogram",
            f'db_client_connection_use_time_seconds_bucket{{{POOL},le="+Inf"}} {100 * n}',
            f"db_client_connection_use_time_seconds_count{{{POOL}}} {100 * n}",
            f"db_client_connection_use_time_seconds_sum{{{POOL}}} {4.0 * n}",
            "# TYPE sqlalchemy_pool_connection_held_idle_time_seconds histogram",
            f'sqlalchemy_pool_connection_held_idle_time_seconds_bucket{{{POOL},le="+Inf"}} '
            f"{100 * n}",
            f"sqlalchemy_pool_connection_held_idle_time_seconds_count{{{POOL}}} {100 * n}",
            f"sqlalchemy_pool_connection_held_idle_time_seconds_sum{{{POOL}}} {3.0 * n}",
            "# TYPE sqlalchemy_pool_leaks_total counter",
            f'sqlalchemy_pool_leaks_total{{{POOL},sqlalchemy_pool_leak_kind="outlived_response"}}'
            f" {5 * n}",
            "# TYPE sqlalchemy_pool_pg_backends gauge",
            f'sqlalchemy_pool_pg_backends{{{POOL},sqlalchemy_pool_pg_scope="application",'
            f'sqlalchemy_pool_pg_state="idle in transaction"}} {used // 2}',
            f'sqlalchemy_pool_pg_backends{{{POOL},sqlalchemy_pool_pg_scope="server",'
            'sqlalchemy_pool_pg_state="active"} 99',
            "# TYPE sqlalchemy_pool_pg_oldest_transaction_age_seconds gauge",
            f"sqlalchemy_pool_pg_oldest_transaction_age_seconds{{{POOL},"
            f'sqlalchemy_pool_pg_scope="application"}} {0.5 + n % 3}',
        ]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fake_app() -> Iterator[tuple[str, FakeApp]]:
    state = FakeApp()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real app server

        def do_GET(self) -> None:
            status, body = 200, b'{"ok": true}'
            if self.path.startswith("/fail"):
                status, body = 500, b"boom"
            elif self.path.startswith("/slow"):
                time.sleep(0.05)
            elif self.path.startswith("/metrics"):
                body = state.metrics().encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


# --- pure functions --------------------------------------------------------------------------
def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 10.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None


def test_pool_windows_from_scrapes() -> None:
    app = FakeApp()
    scrapes = [parse_metrics(app.metrics()) for _ in range(5)]  # n = 0..4
    window = pool_windows(scrapes)["demo"]
    assert window.samples == 5
    assert window.size_max == 10
    assert window.max_used == 10
    assert window.mean_used == pytest.approx((2 + 7 + 10 + 4 + 2) / 5)
    assert window.max_pending == 3
    assert window.timeouts == 4
    assert window.checkouts == 400
    # 2% of checkouts took 0.5-1 s: p99 interpolates to the middle of that bucket.
    assert window.wait_p99_ms == pytest.approx(750.0)
    assert window.held_idle_share == pytest.approx(0.75)
    assert window.leaks == {"outlived_response": 20.0}
    assert window.pg_states_max == {"idle in transaction": 5.0}  # server scope is ignored
    assert window.pg_oldest_xact_s == pytest.approx(2.5)


def test_split_target() -> None:
    assert split_target("http://127.0.0.1:8000/orders?x=1", None) == (
        "http://127.0.0.1:8000",
        ["/orders?x=1"],
    )
    assert split_target("http://127.0.0.1:8000", ["a", "/b"]) == (
        "http://127.0.0.1:8000",
        ["/a", "/b"],
    )


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/", "http://203.0.113.9:8000/x", "https://[2001:db8::1]/"]
)
def test_refuses_non_loopback_targets(url: str) -> None:
    with pytest.raises(UserError, match="--allow-remote"):
        check_url(url)
    check_url(url, allow_remote=True)  # explicit opt-in


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/", "http://localhost/", "http://[::1]:80/"])
def test_accepts_loopback_targets(url: str) -> None:
    check_url(url)


def test_run_load_refuses_remote_before_sending_anything() -> None:
    with pytest.raises(UserError, match="not a loopback"):
        run_load("http://203.0.113.9/", duration_s=1, tool="builtin")


def test_compare_without_pool_figures() -> None:
    a = LoadResult(url="u", paths=["/"], tool="wrk", connections=1, duration_s=1, rps=10.0)
    b = LoadResult(url="u", paths=["/"], tool="wrk", connections=1, duration_s=1, rps=20.0)
    a.latency_ms = {"p50": 10.0, "p95": 20.0, "p99": 30.0}
    b.latency_ms = {"p50": 5.0, "p95": 10.0, "p99": 15.0}
    table = compare(a, b)
    assert "+100%" in table and "-50%" in table
    assert "max checked-out" not in table  # no pool figures on either side: no empty rows


def test_load_rejects_files_that_are_not_results(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a saved loadtest result"):
        load(bad)
    bad.write_text("not json")
    with pytest.raises(UserError):
        load(bad)


# --- real load, bounded ----------------------------------------------------------------------
def test_builtin_generator(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(
        base + "/ok",
        duration_s=1.5,
        connections=4,
        tool="builtin",
        metrics_url=base + "/metrics",
        sample_interval_s=0.2,
    )
    assert result.tool == "builtin"
    assert result.requests > 20
    assert result.errors == 0
    assert result.rps == pytest.approx(result.requests / result.duration_s)
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p95"] <= result.latency_ms["p99"]
    window = result.pools["demo"]
    assert window.samples >= 5
    assert window.max_used == 10
    assert window.timeouts > 0
    assert window.wait_p99_ms == pytest.approx(750.0)
    assert window.leaks["outlived_response"] > 0


def test_builtin_counts_non_2xx_and_respects_bounds(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(
        base,
        paths=["/ok", "/fail"],
        duration_s=5,
        connections=2,
        tool="builtin",
        max_requests=40,
    )
    assert result.requests == 40
    assert result.non_2xx == 20
    assert result.errors == 20
    assert result.duration_s < 5


def test_builtin_rate(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(base + "/ok", duration_s=1.0, connections=4, rate=20, tool="builtin")
    assert 15 <= result.requests <= 21


def test_builtin_connection_refused_counts_socket_errors() -> None:
    # run_load refuses an unreachable target up front; the generator itself must still count
    # refused connections (an app that dies mid-run) instead of crashing.
    counts = asyncio.run(_builtin_load("http://127.0.0.1:9", ["/"], 0.3, 2, None, 1.0, None))
    assert counts["requests"] == 0
    assert counts["connect"] > 0


@pytest.mark.skipif(not HAS_WRK, reason="wrk is not installed")
def test_wrk_generator(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(
        base,
        paths=["/ok", "/fail", "/slow"],
        duration_s=2,
        connections=4,
        tool="wrk",
        metrics_url=base + "/metrics",
        sample_interval_s=0.2,
    )
    assert result.tool == "wrk"
    assert result.requests > 10
    # Round-robin over three paths: about a third fail with 500.
    assert result.non_2xx == pytest.approx(result.requests / 3, rel=0.3)
    assert result.connect_errors == result.read_errors == result.timeouts == 0
    assert result.latency_ms["p99"] >= 50.0  # /slow takes 50 ms
    assert result.pools["demo"].max_used == 10


@pytest.mark.skipif(not HAS_WRK, reason="wrk is not installed")
def test_wrk_rate(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(base + "/ok", duration_s=2, connections=4, rate=20, tool="wrk")
    assert 10 <= result.requests <= 60  # paced: far below what the app could serve


def test_save_and_compare_round_trip(
    fake_app: tuple[str, FakeApp], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = fake_app
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    common = ["--duration", "1", "--connections", "2", "--tool", "builtin"]
    metrics = ["--metrics-url", base + "/metrics"]
    assert cli.main(["loadtest", base + "/slow", *common, "--save", str(before), *metrics]) == 0
    capsys.readouterr()
    saved = load(before)
    assert saved.requests > 0
    assert isinstance(saved.pools["demo"], PoolWindow)
    assert json.loads(before.read_text())["version"] == 1

    argv = ["loadtest", base + "/ok", *common, "--save", str(after), "--compare", str(before)]
    assert cli.main([*argv, *metrics, "--label", "fast"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after (fast)" in out
    for row in ("throughput (req/s)", "latency p99", "errors", "max checked-out", "wait p99"):
        assert row in out
    # The JSON form carries both runs.
    assert cli.main(["loadtest", base + "/ok", *common, "--json", "--compare", str(after)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["before"]["label"] == "fast"
    assert data["result"]["requests"] > 0

    # Round trip: what was saved is what is loaded.
    result = load(after)
    save(result, tmp_path / "again.json")
    assert load(tmp_path / "again.json") == result
