"""Each demo scenario against the real app and PostgreSQL gets the right doctor verdict."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from sqlalchemy_pool_tools.demo.app import create_schema
from sqlalchemy_pool_tools.demo.runner import SCENARIOS, Progress, ScenarioResult, run_scenario

pytestmark = pytest.mark.e2e

DURATION_S = 8.0


def _instrumentor_available() -> bool:
    try:
        from opentelemetry.instrumentation.sqlalchemy_pool import (  # noqa: F401
            SQLAlchemyPoolInstrumentor,
        )
    except ImportError:
        return False
    return importlib.util.find_spec("sqlalchemy_pool_tools.doctor.verdict") is not None


requires_instrumentor = pytest.mark.skipif(
    not _instrumentor_available(), reason="the instrumentor or the doctor is not importable yet"
)


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
    figures = next(iter(result.figures.values()), {})
    keys = (
        "checkouts", "used_max", "max_connections", "saturated_share", "pending_max",
        "timeouts", "wait_p99", "use_p95", "held_idle_share", "leaks_by_kind",
        "pg_backends", "pg_oldest_transaction_age", "used_after_traffic_stopped",
    )  # fmt: skip
    shown = {k: figures.get(k) for k in keys}
    return f"verdicts={result.verdicts} error={result.doctor_error} figures={shown}"


@requires_instrumentor
def test_undersized_pool_is_diagnosed_as_undersized(results) -> None:
    result = results("undersized")
    assert result.verdict == "undersized_pool", _explain(result)
    pool = result.pool
    assert pool.max_used == pool.size_max == 2
    assert pool.max_pending > 0 or pool.timeouts > 0
    assert not pool.leaks.get("outlived_response")


@requires_instrumentor
def test_leaky_build_is_diagnosed_as_leaking(results) -> None:
    result = results("leaky")
    assert result.verdict in ("leaked_sessions", "idle_in_transaction"), _explain(result)
    pool = result.pool
    assert pool.leaks.get("outlived_response", 0) > 0 or (pool.held_idle_share or 0) > 0.5


@requires_instrumentor
def test_fixed_build_is_healthy(results) -> None:
    result = results("fixed")
    assert result.verdict == "healthy", _explain(result)
    pool = result.pool
    assert pool.timeouts == 0
    assert not pool.leaks.get("outlived_response")
    assert result.load.non_2xx == 0


@requires_instrumentor
def test_fixed_beats_leaky_under_the_same_load(results) -> None:
    leaky, fixed = results("leaky").load, results("fixed").load
    assert leaky.latency_ms["p99"] > fixed.latency_ms["p99"]
    assert (leaky.main_pool.wait_p99_ms or 0) > (fixed.main_pool.wait_p99_ms or 0)


def test_scenario_runs_without_pool_figures_when_instrumentor_missing(results) -> None:
    """The load side works whatever the state of the instrumentor."""
    result = results("fixed")
    assert result.load.requests > 0
    assert result.load.rps > 0
    assert result.load.latency_ms["p50"] > 0
