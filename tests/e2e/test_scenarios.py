"""Each demo scenario against the real app and PostgreSQL gets the right doctor verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from sqlalchemy_pool_tools.demo.app import create_schema
from sqlalchemy_pool_tools.demo.runner import SCENARIOS, Progress, ScenarioResult, run_scenario
from sqlalchemy_pool_tools.loadtest import outlived

pytestmark = pytest.mark.e2e

DURATION_S = 8.0


@pytest.fixture(scope="module")
def demo_db(pg_url: URL) -> str:
    """This module's fresh database, with the demo schema and data."""
    url = pg_url.render_as_string(hide_password=False)
    create_schema(url)
    return url


@pytest.fixture(scope="module")
def results(demo_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScenarioResult]:
    """Run the scenarios once per module; each test checks one of them."""
    cache: dict[str, ScenarioResult] = {}
    logs = Path(tmp_path_factory.mktemp("demo-logs"))

    def run(name: str) -> ScenarioResult:
        if name not in cache:
            cache[name] = run_scenario(
                SCENARIOS[name], demo_db, DURATION_S, logs, Progress(enabled=False)
            )
        return cache[name]

    return run  # type: ignore[return-value]


def _explain(result: ScenarioResult) -> str:
    """Enough context in the assertion message to see why a verdict differs."""
    pool = result.pool
    keys = (
        "checkouts", "used_max", "max_connections", "saturated_share", "pending_max",
        "timeouts", "wait_p99", "use_p95", "held_idle_share", "leaks_by_kind",
        "pg_backends", "pg_oldest_transaction_age", "used_after_traffic_stopped",
    )  # fmt: skip
    shown = {k: getattr(pool, k) for k in keys} if pool else None
    return f"verdicts={result.verdicts} figures={shown}"


def test_undersized_pool_is_diagnosed_as_undersized(results) -> None:
    result = results("undersized")
    assert result.verdict == "undersized_pool", _explain(result)
    pool = result.pool
    assert pool.used_max == pool.max_connections == 2
    assert (pool.pending_max or 0) > 0 or (pool.timeouts or 0) > 0
    assert not outlived(pool)


def test_leaky_build_is_diagnosed_as_leaking(results) -> None:
    result = results("leaky")
    assert result.verdict in ("leaked_sessions", "idle_in_transaction"), _explain(result)
    pool = result.pool
    assert outlived(pool) > 0 or (pool.held_idle_share or 0) > 0.5


def test_fixed_build_is_healthy(results) -> None:
    result = results("fixed")
    assert result.verdict == "healthy", _explain(result)
    pool = result.pool
    assert not pool.timeouts
    assert not outlived(pool)
    assert result.load.run.non_2xx == 0


def test_fixed_beats_leaky_under_the_same_load(results) -> None:
    leaky, fixed = results("leaky").load, results("fixed").load
    assert leaky.latency_s["p99"] > fixed.latency_s["p99"]
    assert (leaky.main_pool.wait_p99 or 0) > (fixed.main_pool.wait_p99 or 0)


def test_open_loop_scenarios_keep_their_schedule(results) -> None:
    """The leaky and fixed loads are open loop at the scenario's rate: the fixed build keeps
    up, so every scheduled request is sent and answered within the window."""
    result = results("fixed")
    run = result.load.run
    assert run.mode == "open" and run.rate == result.scenario.rate
    expected = result.scenario.rate * DURATION_S
    assert expected * 0.95 <= run.requests + run.errors <= expected + 1
    assert run.errors == 0
