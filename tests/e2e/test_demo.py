"""``sqlalchemy-pool demo`` end to end: a real PostgreSQL, real app subprocesses, real load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from sqlalchemy_pool_tools.pg import with_driver

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_env(pg_server_url: URL) -> dict[str, str]:
    """The session's PostgreSQL as DATABASE_URL: the demo creates (and drops) its own database
    there instead of starting a second embedded server."""
    return dict(os.environ, DATABASE_URL=pg_server_url.render_as_string(hide_password=False))


def _demo_databases(pg_server_url: URL) -> set[str]:
    engine = sa.create_engine(with_driver(pg_server_url, "psycopg"))
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT datname FROM pg_database WHERE starts_with(datname, 'sqla_pool_demo_')"
            )
            return {row[0] for row in rows}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def databases_before(pg_server_url: URL) -> set[str]:
    """Demo databases that existed before this module ran (left by a killed run, say)."""
    return _demo_databases(pg_server_url)


@pytest.fixture(scope="module")
def demo_run(
    demo_env: dict[str, str], databases_before: set[str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_tools", "demo", "--quick", "--json"],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def report(demo_run: tuple[subprocess.CompletedProcess[str], float]) -> dict:
    proc, _ = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_demo_finishes_quickly_with_progress_and_json(
    demo_run: tuple[subprocess.CompletedProcess[str], float], report: dict
) -> None:
    proc, elapsed = demo_run
    assert elapsed < 120
    assert "Traceback" not in proc.stderr
    progress = proc.stderr.strip().splitlines()
    # One line per phase: database, then start + load for each scenario, then cleanup.
    for scenario in ("leaky", "fixed", "undersized"):
        assert sum(line.startswith("[") and f"] {scenario}:" in line for line in progress) == 2
    assert report["version"] == 2
    assert report["database"] == "DATABASE_URL"


def test_every_scenario_has_the_figures(report: dict) -> None:
    assert set(report["scenarios"]) == {"leaky", "fixed", "undersized"}
    for name, scenario in report["scenarios"].items():
        assert scenario["name"] == name
        config, run = scenario["config"], scenario["load"]["run"]
        # The calibrated generator, in the loop the scenario asks for.
        assert run["generator"] == "builtin"
        assert run["mode"] == ("open" if config["rate"] else "closed"), name
        assert run["requests"] > 0 and scenario["load"]["rps"] > 0, name
        latency = run["latency_s"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], name
        assert scenario["verdict"] == scenario["diagnoses"][scenario["pool"]["pool"]]["verdict"]


def test_comparison_table(report: dict) -> None:
    table = report["comparison"]["table"]
    assert "before (leaky)" in table and "after (fixed)" in table
    assert "throughput (req/s)" in table and "latency p99" in table
    assert "wait p99" in table and "max checked-out" in table


def test_pool_figures_present(report: dict) -> None:
    for name, scenario in report["scenarios"].items():
        pool, config = scenario["pool"], scenario["config"]
        assert pool is not None, f"{name}: no pool metrics"
        assert pool["max_connections"] == config["pool_size"] + config["max_overflow"], name
        assert pool["checkouts"] > 0, name
        assert pool["wait_p99"] is not None and pool["held_idle_share"] is not None, name
        assert pool["pg_backends"], f"{name}: no pg_stat_activity figures"


def _outlived(scenario: dict) -> float:
    return (scenario["pool"]["leaks_by_kind"] or {}).get("outlived_response", 0)


def test_leaky_shows_leaks_and_fixed_does_not(report: dict) -> None:
    leaky = report["scenarios"]["leaky"]
    fixed = report["scenarios"]["fixed"]
    assert _outlived(leaky) > 0 or leaky["pool"]["held_idle_share"] > 0.5, leaky["pool"]
    assert not _outlived(fixed), fixed["pool"]["leaks_by_kind"]
    # Short transactions still show some held-idle time (BEGIN/COMMIT round trips, event-loop
    # lag on a busy box); the leaky build's connections are idle nearly all the time.
    assert leaky["pool"]["held_idle_share"] > (fixed["pool"]["held_idle_share"] or 0) + 0.2
    assert fixed["pool"]["timeouts"] in (0, None)
    # The leaky build keeps transactions open on the server, the fixed one does not.
    assert leaky["pool"]["pg_backends"].get("idle in transaction", 0) > 0
    assert leaky["pool"]["pg_oldest_transaction_age"] > (
        fixed["pool"]["pg_oldest_transaction_age"] or 0
    )
    # The code holding the connections is named.
    sites = [site["site"] for site in leaky["holders"]["top_sites"]]
    assert any("leaky" in site or "report" in site for site in sites), sites


def test_undersized_shows_queueing(report: dict) -> None:
    pool = report["scenarios"]["undersized"]["pool"]
    assert (pool["pending_max"] or 0) > 0 or (pool["timeouts"] or 0) > 0
    assert pool["used_max"] == pool["max_connections"] == 2


def test_repeat_interleaves_builds_and_judges_the_spread(demo_env: dict[str, str]) -> None:
    argv = ["--scenario", "leaky", "--scenario", "fixed", "--repeat", "2", "--duration", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_tools", "demo", *argv, "--json"],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["repeat"] == 2
    assert [len(data["runs"][name]) for name in ("leaky", "fixed")] == [2, 2]
    # Interleaved: leaky, fixed, leaky, fixed (the progress lines say so).
    loads = [
        line.split("] ")[1].split(":")[0] for line in proc.stderr.splitlines() if "load for" in line
    ]
    assert loads == ["leaky", "fixed", "leaky", "fixed"]
    table = data["comparison"]["table"]
    assert "median (min-max) of 2 vs 2 runs" in table
    # The leaky build waits seconds for a connection, the fixed one microseconds: every run
    # of one side beats every run of the other.
    wait = next(line for line in table.splitlines() if line.startswith("wait p99"))
    assert "no significant change" not in wait and "-" in wait.split()[-1]


def test_demo_databases_are_dropped(
    report: dict, pg_server_url: URL, databases_before: set[str]
) -> None:
    assert _demo_databases(pg_server_url) <= databases_before


def _stop(proc: subprocess.Popen[str]) -> None:
    """After a failed assertion: Ctrl-C first so the demo cleans up, then kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _default_sigint() -> None:
    # A test runner started in the background (`cmd &` in a script, nohup) ignores SIGINT, and
    # children inherit that: Python then installs no KeyboardInterrupt handler and Ctrl-C
    # would do nothing. The demo is meant to run in a terminal, so give it the terminal's
    # default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_demo(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_pool_tools", "demo", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _interrupt(proc: subprocess.Popen[str], expected_status: int) -> str:
    """Ctrl-C the demo; its remaining stderr. Both pipes are drained while it shuts down (a
    full pipe would block its last writes), and a shutdown that hangs fails with its output
    and, where py-spy exists, its stack."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stacks = ""
        if shutil.which("py-spy"):
            dump = ["py-spy", "dump", "--pid", str(proc.pid)]
            stacks = subprocess.run(dump, capture_output=True, text=True, check=False).stdout
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the demo did not stop within 30 s of Ctrl-C\n{stacks}\n{err[-3000:]}")
    assert proc.returncode == expected_status, err[-3000:]
    return err


def test_serve_runs_until_ctrl_c_and_cleans_up(
    demo_env: dict[str, str], pg_server_url: URL, databases_before: set[str]
) -> None:
    with httpx.Client() as probe:
        port = 18000 + os.getpid() % 1000
        proc = _start_demo(["--serve", "--port", str(port)], demo_env)
        try:
            deadline = time.monotonic() + 60
            lines: list[str] = []
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if line.startswith("Ctrl-C"):
                    break
            text = "".join(lines)
            assert f"http://127.0.0.1:{port}/metrics" in text, (text, proc.stderr)
            assert probe.get(f"http://127.0.0.1:{port}/orders").status_code == 200
            assert probe.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
            # The holders route is the one `sqlalchemy-pool holders URL` reads.
            holders_url = f"http://127.0.0.1:{port}/_debug/pool-holders"
            assert "demo" in probe.get(holders_url).json()["pools"]
            cli = subprocess.run(
                [sys.executable, "-m", "sqlalchemy_pool_tools", "holders", holders_url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert cli.returncode == 0, cli.stderr
            assert "pool demo" in cli.stdout
            rest = _interrupt(proc, 0)
        finally:
            _stop(proc)
        assert "Traceback" not in rest
        with pytest.raises(httpx.ConnectError):
            probe.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert _demo_databases(pg_server_url) <= databases_before


def test_interrupt_during_a_scenario_exits_130_and_cleans_up(
    demo_env: dict[str, str], pg_server_url: URL, databases_before: set[str]
) -> None:
    proc = _start_demo(["--scenario", "fixed", "--duration", "30"], demo_env)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or "load for" in line:
                break
        time.sleep(1.0)
        rest = _interrupt(proc, 130)
    finally:
        _stop(proc)
    assert "Traceback" not in rest
    assert _demo_databases(pg_server_url) <= databases_before
