"""``sqlalchemy-pool loadtest`` against a tiny real HTTP app on 127.0.0.1 (bounded runs)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sqlalchemy_pool_tools import cli
from sqlalchemy_pool_tools.doctor.figures import Figures
from sqlalchemy_pool_tools.errors import UserError
from sqlalchemy_pool_tools.loadgen import LoadRun, LoadSpec, generate
from sqlalchemy_pool_tools.loadtest import (
    LoadResult,
    compare,
    format_result,
    load,
    require_loopback,
    run_load,
    save,
    split_target,
    summarize,
)

POOL = 'db_client_connection_pool_name="demo"'


class FakeApp:
    """An HTTP app with ``/ok``, ``/fail`` (500), ``/slow`` and a ``/metrics`` endpoint whose
    pool series move on every scrape, like an instrumented app under load."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.lock = threading.Lock()
        self.hits: list[str] = []  # /ok and /slow requests in arrival order

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
            if self.path in ("/ok", "/slow"):
                state.hits.append(self.path)
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
        require_loopback(url)
    require_loopback(url, allow_remote=True)  # explicit opt-in


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/", "http://localhost/", "http://[::1]:80/"])
def test_accepts_loopback_targets(url: str) -> None:
    require_loopback(url)


def test_run_load_refuses_remote_before_sending_anything() -> None:
    with pytest.raises(UserError, match="not a loopback"):
        run_load("http://203.0.113.9/", duration_s=1)


def test_wrk_is_refused_because_it_fails_calibration(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    with pytest.raises(UserError, match="calibration"):
        run_load(base + "/ok", duration_s=1, tool="wrk")


def _result(label: str, rps: float, p99: float, wait_p99: float | None = None) -> LoadResult:
    run = LoadRun("builtin", "closed", 4, None, 10.0, duration_s=1.0, requests=round(rps))
    run.latency_s = {"p50": p99 / 2, "p95": p99 * 0.9, "p99": p99}
    pools = {} if wait_p99 is None else {"p": Figures(pool="p", wait_p99=wait_p99, used_max=3)}
    return LoadResult("http://127.0.0.1", ["/"], run, label=label, pools=pools)


def test_compare_single_runs_says_spread_is_unknown() -> None:
    table = compare([_result("a", 10, 0.030)], [_result("b", 20, 0.015)])
    assert "+100%" in table and "-50%" in table
    assert "no spread" in table
    assert "max checked-out" not in table  # no pool figures on either side: no empty rows


def test_compare_reports_significance_from_the_spread() -> None:
    before = [_result("a", rps, 0.030, 0.5) for rps in (100, 120, 110)]
    overlapping = [_result("b", rps, 0.010, 0.1) for rps in (105, 125, 115)]
    table = compare(before, overlapping)
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "no significant change" in rows["throughput (req/s)"]
    assert "110.0 (100.0-120.0)" in rows["throughput (req/s)"]
    # Every after-run beats every before-run: a real change, with its size.
    assert "-67%" in rows["latency p99"]
    assert "-80%" in rows["wait p99"]
    assert "median (min-max) of 3 vs 3 runs" in table
    summary = summarize(before)
    assert "median of 3 runs" in summary and "100.0-120.0" in summary


def test_a_late_open_loop_generator_is_a_loud_warning() -> None:
    result = _result("a", 10, 0.030)
    result.run.mode, result.run.rate = "open", 10.0
    result.run.send_lag_p99_s = 0.002  # normal scheduling noise: no warning
    assert "open loop at 10 req/s" in format_result(result)
    assert "WARNING" not in format_result(result)
    result.run.send_lag_p99_s = 0.040
    assert "WARNING: the generator sent requests up to 40 ms late" in format_result(result)
    result.run.send_lag_p99_s, result.run.cpu_share = None, 0.95
    assert "WARNING: the generator used 95% of a CPU" in format_result(result)


def test_load_rejects_files_that_are_not_results(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a saved loadtest result"):
        load(bad)
    bad.write_text('{"version": 1, "runs": []}')
    with pytest.raises(UserError, match="another version"):
        load(bad)
    bad.write_text("not json")
    with pytest.raises(UserError):
        load(bad)


# --- real load, bounded ----------------------------------------------------------------------
def test_builtin_generator_with_pool_figures(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(
        base + "/ok",
        duration_s=1.5,
        connections=4,
        metrics_url=base + "/metrics",
        sample_interval_s=0.2,
    )
    run = result.run
    assert (run.generator, run.mode) == ("builtin", "closed")
    assert run.requests > 20
    assert run.errors == 0
    assert run.rps == pytest.approx(run.requests / run.duration_s)
    assert 0 < run.latency_s["p50"] <= run.latency_s["p95"] <= run.latency_s["p99"]
    assert run.cpu_share is not None and 0 < run.cpu_share <= 1.5
    # The pool figures are the doctor's, over the load window.
    fig = result.pools["demo"]
    assert fig.source == "metrics-endpoint"
    assert fig.used_max == 10
    assert fig.max_connections == 10
    assert fig.timeouts and fig.timeouts > 0
    assert fig.wait_p99 == pytest.approx(0.75)  # 2% of checkouts in the 0.5-1 s bucket
    assert fig.leaks_by_kind["outlived_response"] > 0
    # Application scope wins over the server-wide series.
    assert set(fig.pg_backends) == {"idle in transaction"}
    assert fig.pg_backends["idle in transaction"] > 0


def test_builtin_counts_non_2xx_and_respects_bounds(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(base, paths=["/ok", "/fail"], duration_s=5, connections=2, max_requests=40)
    assert result.run.requests == 40
    assert result.run.non_2xx == 20
    assert result.errors == 20
    assert result.run.duration_s < 5


def test_builtin_open_loop_keeps_its_schedule(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(base + "/ok", duration_s=1.0, connections=4, rate=20)
    assert result.run.mode == "open"
    assert result.run.requests == 20  # due at 0, 50, ..., 950 ms


def test_builtin_connection_refused_counts_connect_errors() -> None:
    # run_load refuses an unreachable target up front; the generator itself must still count
    # refused connections (an app that dies mid-run) instead of crashing.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = generate(LoadSpec(f"http://127.0.0.1:{port}", ["/"], 0.3, 2, timeout_s=1.0))
    assert run.requests == 0
    assert run.connect_errors > 0
    assert run.errors == run.connect_errors


def test_hey_generator(fake_app: tuple[str, FakeApp]) -> None:
    base, _ = fake_app
    result = run_load(base + "/fail", duration_s=1, connections=2, tool="hey")
    assert result.run.generator == "hey"
    assert result.run.requests > 10
    assert result.run.non_2xx == result.run.requests
    with pytest.raises(UserError, match="open-loop"):
        run_load(base + "/ok", duration_s=1, rate=10, tool="hey")


def test_save_and_compare_round_trip(
    fake_app: tuple[str, FakeApp], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = fake_app
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    common = ["--duration", "1", "--connections", "2"]
    metrics = ["--metrics-url", base + "/metrics"]
    assert cli.main(["loadtest", base + "/slow", *common, "--save", str(before), *metrics]) == 0
    out = capsys.readouterr().out
    assert "builtin, closed loop, 2 connections" in out
    saved = load(before)
    assert saved[0].run.requests > 0
    assert isinstance(saved[0].pools["demo"], Figures)
    assert json.loads(before.read_text())["version"] == 2

    argv = ["loadtest", base + "/ok", *common, "--save", str(after), "--compare", str(before)]
    assert cli.main([*argv, *metrics, "--label", "fast"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after (fast)" in out
    for row in ("throughput (req/s)", "latency p99", "errors", "max checked-out", "wait p99"):
        assert row in out
    # The JSON form carries both runs.
    assert cli.main(["loadtest", base + "/ok", *common, "--json", "--compare", str(after)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["before"][0]["label"] == "fast"
    assert data["runs"][0]["run"]["requests"] > 0

    # Round trip: what was saved is what is loaded.
    results = load(after)
    save(results, tmp_path / "again.json")
    assert load(tmp_path / "again.json") == results


def test_repeat_versus_interleaves_and_judges_significance(
    fake_app: tuple[str, FakeApp], capsys: pytest.CaptureFixture[str]
) -> None:
    base, app = fake_app
    app.hits.clear()
    argv = ["loadtest", base + "/ok", "--versus", base + "/slow", "--repeat", "2"]
    assert cli.main([*argv, "--duration", "0.5", "--connections", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ok_runs, slow_runs = data["runs"], data["versus"]
    assert len(ok_runs) == len(slow_runs) == 2
    # Interleaved: A B A B (the app saw blocks of /ok and /slow requests in that order).
    blocks = [path for i, path in enumerate(app.hits) if i == 0 or app.hits[i - 1] != path]
    assert blocks == ["/ok", "/slow", "/ok", "/slow"]
    rows = {line.split("  ")[0]: line for line in data["comparison"].splitlines()}
    # /slow answers in 50 ms, /ok in about a millisecond: every run of one side beats the other.
    assert "no significant change" not in rows["latency p50"]
    assert "+" in rows["latency p50"]
    assert "median (min-max) of 2 vs 2 runs" in data["comparison"]


def test_code_sites_are_named_one_way() -> None:
    from sqlalchemy_pool_tools.demo.runner import code_site
    from sqlalchemy_pool_tools.doctor import _format as fmt

    record = {"code_function": "report", "code_file": "/srv/app/app.py", "code_line": 12}
    assert code_site(record) == "report (app.py:12)" == fmt.code_site("report", "app.py", 12)
    assert code_site({"code_function": None, "code_file": None, "code_line": None}) is None
    assert fmt.code_site(None, "app.py") == "app.py"
