"""One FastAPI app per problem class under real load: the doctor names the right class, with
the evidence and the culprit a user acts on - and never a bigger pool when something else is
the bottleneck (docs/doctor.md)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from sqlalchemy_pool_tools.doctor.verdict import (
    CONNECT_FAILURES,
    CONNECTION_CHURN,
    EVENT_LOOP_BLOCKED,
    HEALTHY,
    IDLE_IN_TRANSACTION,
    LEAKED_SESSIONS,
    SLOW_QUERIES,
    UNDERSIZED_POOL,
    WORKER_CPU_SATURATED,
)

from .conftest import held_connections

pytestmark = pytest.mark.e2e

ANY_POOL_ADVICE = ("raise the pool explicitly",)


def never_prescribes_a_bigger_pool(outcome) -> None:
    for finding in outcome.diagnosis.findings:
        for step in finding.next_steps:
            assert not step.startswith("pool limits: raise the pool"), (finding.kind, step)


def test_undersized_pool(scenario) -> None:
    out = scenario("undersized", "/items/7", connections=12)
    assert out.verdict == UNDERSIZED_POOL, out.explain()
    finding = out.finding(UNDERSIZED_POOL)
    evidence = dict(finding.evidence)
    assert evidence["checked out mean / max / limit"].endswith("/ 2 / 2")
    limits = next(s for s in finding.next_steps if s.startswith("pool limits"))
    assert "raise the pool explicitly" in limits and "utilisation" in limits
    assert any("/items/{item_id}" in c for c in finding.culprits)


def test_leak_via_create_task(scenario) -> None:
    out = scenario("leak_create_task", "/items/3", connections=4, drain_s=2.0)
    assert out.verdict == LEAKED_SESSIONS, out.explain()
    assert out.diagnosis.figures.leaks_by_kind.get("outlived_response", 0) > 0
    culprits = out.finding(LEAKED_SESSIONS).culprits
    assert any("/items/{item_id}" in c for c in culprits), culprits
    never_prescribes_a_bigger_pool(out)


def test_leak_via_background_tasks(scenario) -> None:
    out = scenario("leak_background", "/orders/5", connections=8, drain_s=2.0)
    assert out.verdict == LEAKED_SESSIONS, out.explain()
    assert out.diagnosis.figures.leaks_by_kind.get("outlived_response", 0) > 0
    never_prescribes_a_bigger_pool(out)


def test_session_never_closed_in_a_sync_route(scenario) -> None:
    out = scenario("never_closed", "/users/9", connections=8)
    assert out.verdict == LEAKED_SESSIONS, out.explain()
    assert out.diagnosis.figures.leaks_by_kind.get("garbage_collected", 0) > 0
    culprits = out.finding(LEAKED_SESSIONS).culprits
    assert any("/users/{user_id}" in c for c in culprits), culprits
    never_prescribes_a_bigger_pool(out)


def test_transaction_across_an_awaited_http_call(scenario) -> None:
    out = scenario("tx_across_await", "/checkout/4", connections=12)
    assert out.verdict == IDLE_IN_TRANSACTION, out.explain()
    assert not out.finding(LEAKED_SESSIONS)
    finding = out.finding(IDLE_IN_TRANSACTION)
    assert "inside the request" in finding.title
    assert any("/checkout/{item_id}" in c for c in finding.culprits)
    never_prescribes_a_bigger_pool(out)


def test_slow_statement_on_every_request(scenario) -> None:
    out = scenario("slow_statement", "/reports/daily", connections=24)
    assert out.verdict == SLOW_QUERIES, out.explain()
    finding = out.finding(SLOW_QUERIES)
    assert "statements take" in finding.title
    assert out.diagnosis.figures.busy_mean >= 0.2
    assert any("/reports/daily" in c for c in finding.culprits)
    assert any("slow_statement.py" in c for c in finding.culprits)  # the statement's code site
    never_prescribes_a_bigger_pool(out)


def test_connection_churn(scenario, scenario_db) -> None:
    stop = threading.Event()

    def firewall() -> None:
        """Kill the app's idle connections, as an idle timeout between app and server does."""
        with psycopg.connect(scenario_db, autocommit=True) as conn:
            while not stop.wait(0.3):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'main' AND state = 'idle'"
                )

    killer = threading.Thread(target=firewall, daemon=True)
    killer.start()
    try:
        out = scenario("churn", "/items/11", connections=4)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert CONNECTION_CHURN in {f.kind for f in out.diagnosis.findings}, out.explain()
    assert out.diagnosis.figures.closes_by_reason.get("pre_ping_failed", 0) > 0
    assert not out.diagnosis.healthy


def test_event_loop_blocked_by_a_sync_call(scenario) -> None:
    out = scenario("loop_blocked", "/quotes/2", connections=12)
    assert out.verdict == EVENT_LOOP_BLOCKED, out.explain()
    finding = out.finding(EVENT_LOOP_BLOCKED)
    assert finding.culprits[0].startswith("fetch_exchange_rate"), finding.culprits
    assert "loop_blocked.py" in finding.culprits[0]
    assert not out.finding(UNDERSIZED_POOL)
    never_prescribes_a_bigger_pool(out)


def test_cpu_saturated_worker(scenario) -> None:
    out = scenario("cpu_bound", "/me/items/8", connections=32)
    assert out.verdict == WORKER_CPU_SATURATED, out.explain()
    finding = out.finding(WORKER_CPU_SATURATED)
    assert any(c.startswith("verify_token") for c in finding.culprits), finding.culprits
    assert not out.finding(UNDERSIZED_POOL)
    never_prescribes_a_bigger_pool(out)


def test_sibling_workers_exhaust_max_connections(scenario, scenario_db) -> None:
    with held_connections(scenario_db, leave_free=3):
        out = scenario("siblings", "/items/5", connections=12)
    assert out.verdict == CONNECT_FAILURES, out.explain()
    figures = out.diagnosis.figures
    assert figures.too_many_clients and figures.too_many_clients > 0
    assert "too many clients" in out.finding(CONNECT_FAILURES).title
    assert out.load.run.non_2xx > 0  # requests really fail: never "healthy"
    never_prescribes_a_bigger_pool(out)


def test_healthy_service(scenario) -> None:
    out = scenario("healthy", "/items/12", connections=4)
    assert out.verdict == HEALTHY, out.explain()
    assert out.load.errors == 0
