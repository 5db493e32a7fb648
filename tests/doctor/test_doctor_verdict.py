"""Table-driven tests of the pure verdict functions."""

from __future__ import annotations

import math

import pytest

from sqlalchemy_pool_tools.doctor.figures import Figures
from sqlalchemy_pool_tools.doctor.verdict import (
    CAPACITY,
    CONNECT_FAILURES,
    CONNECTION_CHURN,
    CRITICAL,
    EVENT_LOOP_BLOCKED,
    FAILING_REQUESTS,
    HEALTHY,
    HELD_IDLE_IN_REQUEST,
    IDLE_IN_TRANSACTION,
    INFO,
    INSUFFICIENT_DATA,
    LEAKED_SESSIONS,
    OK,
    SEVERITY_RANK,
    SLOW_QUERIES,
    UNDERSIZED_POOL,
    WARNING,
    WORKER_CPU_SATURATED,
    diagnose,
    review_config,
)

from .doctor_fakes import PG_OK, SATURATED, fig

# Issue 15's cases: what only looks like a pool problem. Each is contended (the pool is full,
# requests queue) - the doctor used to say "undersized_pool" to all of them.
CPU_BOUND = dict(cpu_cores=0.97, loop_active_share=0.99, loop_blocked_share=0.6)
LOOP_BLOCKED = dict(cpu_cores=0.15, loop_active_share=0.97, loop_blocked_share=0.8)
HELD_IN_REQUEST = dict(held_idle_share=0.85, use_mean=0.6, use_p95=0.9, busy_mean=0.09)

CASES = [
    # (id, figures, verdict, kinds that must be present, kinds that must be absent, severity)
    (
        "cpu_saturated_worker_is_not_an_undersized_pool",
        fig(SATURATED, CPU_BOUND, timeouts=3),
        WORKER_CPU_SATURATED,
        {WORKER_CPU_SATURATED},
        {UNDERSIZED_POOL, EVENT_LOOP_BLOCKED, SLOW_QUERIES, IDLE_IN_TRANSACTION},
        CRITICAL,
    ),
    (
        "cpu_bound_on_a_busy_host_counts_cpu_against_loop_time",
        fig(SATURATED, CPU_BOUND, cpu_cores=0.6),
        WORKER_CPU_SATURATED,
        {WORKER_CPU_SATURATED},
        {UNDERSIZED_POOL, EVENT_LOOP_BLOCKED},
        CRITICAL,
    ),
    (
        "cpu_saturated_without_loop_figures",
        fig(SATURATED, cpu_cores=0.95),
        WORKER_CPU_SATURATED,
        {WORKER_CPU_SATURATED},
        {UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "event_loop_blocked_by_a_sync_call",
        fig(SATURATED, LOOP_BLOCKED, HELD_IN_REQUEST, timeouts=2),
        EVENT_LOOP_BLOCKED,
        {EVENT_LOOP_BLOCKED},
        {UNDERSIZED_POOL, WORKER_CPU_SATURATED, IDLE_IN_TRANSACTION, LEAKED_SESSIONS},
        CRITICAL,
    ),
    (
        "event_loop_blocked_without_contention_is_a_warning",
        fig(cpu_cores=0.1, loop_active_share=0.4, loop_blocked_share=0.25),
        EVENT_LOOP_BLOCKED,
        {EVENT_LOOP_BLOCKED},
        {HEALTHY},
        WARNING,
    ),
    (
        "cpu_bound_worker_without_contention_is_only_info",
        fig(CPU_BOUND),
        HEALTHY,
        {WORKER_CPU_SATURATED, HEALTHY},
        {EVENT_LOOP_BLOCKED},
        INFO,
    ),
    (
        "host_short_of_cpu_long_iterations_are_not_blocking_calls",
        # Every iteration is long because the thread waits for a CPU (run queue), not because
        # it sleeps in a call; with nobody queueing for connections that is worth knowing only.
        fig(
            cpu_cores=0.28,
            loop_active_share=0.73,
            loop_cpu_demand=0.78,
            loop_runqueue_share=0.51,
            loop_blocked_share=0.12,
        ),
        HEALTHY,
        {HEALTHY, WORKER_CPU_SATURATED},
        {EVENT_LOOP_BLOCKED},
        INFO,
    ),
    (
        "cpu_bound_worker_with_a_big_pool_still_makes_requests_wait",
        # The pool was raised until nobody queues for a connection: the queue moved to the CPU.
        fig(CPU_BOUND, loop_lag_p99=0.37, use_mean=0.18, use_p95=0.4, busy_mean=0.13),
        WORKER_CPU_SATURATED,
        {WORKER_CPU_SATURATED},
        {UNDERSIZED_POOL, SLOW_QUERIES},
        WARNING,
    ),
    (
        "host_short_of_cpu_with_contention_is_the_worker_not_the_pool",
        fig(
            SATURATED,
            cpu_cores=0.19,
            loop_active_share=0.79,
            loop_cpu_demand=0.79,
            loop_runqueue_share=0.61,
            loop_blocked_share=0.72,
            busy_mean=0.17,
            held_idle_share=0.34,
        ),
        WORKER_CPU_SATURATED,
        {WORKER_CPU_SATURATED},
        {EVENT_LOOP_BLOCKED, UNDERSIZED_POOL, SLOW_QUERIES},
        CRITICAL,
    ),
    (
        "sleeping_loop_with_scheduler_times_is_blocked",
        fig(
            SATURATED,
            cpu_cores=0.1,
            loop_active_share=0.98,
            loop_cpu_demand=0.25,
            loop_blocked_share=0.7,
        ),
        EVENT_LOOP_BLOCKED,
        {EVENT_LOOP_BLOCKED},
        {WORKER_CPU_SATURATED, UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "pool_exactly_full_with_nobody_waiting_is_not_contention",
        fig(saturated_share=0.4, used_max=15, pending_max=0, wait_p99=0.0003),
        HEALTHY,
        {HEALTHY},
        {UNDERSIZED_POOL},
        OK,
    ),
    (
        "busy_loop_below_thresholds_is_healthy",
        fig(cpu_cores=0.5, loop_active_share=0.6, loop_blocked_share=0.02),
        HEALTHY,
        {HEALTHY},
        {EVENT_LOOP_BLOCKED, WORKER_CPU_SATURATED},
        OK,
    ),
    (
        "too_many_clients_without_pg_activity",
        fig(
            connect_errors=450,
            too_many_clients=450,
            connect_errors_by_type={"TooManyConnectionsError": 450},
            request_error_share=0.45,
        ),
        CONNECT_FAILURES,
        {CONNECT_FAILURES},
        {HEALTHY, UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "too_many_clients_while_contended_never_suggests_a_bigger_pool",
        fig(SATURATED, timeouts=5, connect_errors=30, too_many_clients=30),
        CONNECT_FAILURES,
        {CONNECT_FAILURES},
        {UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "rare_connect_failure_is_a_warning",
        fig(connect_errors=3, connect_errors_by_type={"OSError": 3}),
        CONNECT_FAILURES,
        {CONNECT_FAILURES},
        {HEALTHY},
        WARNING,
    ),
    (
        "failing_requests_are_never_healthy",
        fig(request_error_share=0.2),
        FAILING_REQUESTS,
        {FAILING_REQUESTS},
        {HEALTHY},
        WARNING,
    ),
    (
        "transaction_held_across_an_await_inside_the_request",
        fig(SATURATED, HELD_IN_REQUEST, held_idle_in_tx_share=0.98, timeouts=4),
        IDLE_IN_TRANSACTION,
        {IDLE_IN_TRANSACTION},
        {LEAKED_SESSIONS, UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "held_idle_in_request_tx_unknown_is_idle_in_transaction",
        fig(HELD_IN_REQUEST),
        IDLE_IN_TRANSACTION,
        {IDLE_IN_TRANSACTION},
        {LEAKED_SESSIONS},
        WARNING,
    ),
    (
        "held_idle_outside_a_transaction",
        fig(SATURATED, HELD_IN_REQUEST, held_idle_in_tx_share=0.1),
        HELD_IDLE_IN_REQUEST,
        {HELD_IDLE_IN_REQUEST},
        {LEAKED_SESSIONS, IDLE_IN_TRANSACTION, UNDERSIZED_POOL},
        WARNING,
    ),
    (
        "held_idle_and_outlived_response_is_a_leak",
        fig(SATURATED, HELD_IN_REQUEST, leaks_by_kind={"outlived_response": 40}),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS},
        {IDLE_IN_TRANSACTION, UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "slow_statement_on_every_request",
        fig(SATURATED, use_mean=0.26, use_p95=0.45, busy_mean=0.25, held_idle_share=0.03),
        SLOW_QUERIES,
        {SLOW_QUERIES},
        {UNDERSIZED_POOL},
        WARNING,
    ),
    ("healthy", fig(), HEALTHY, {HEALTHY}, {UNDERSIZED_POOL, LEAKED_SESSIONS}, OK),
    ("healthy_with_pg", fig(PG_OK), HEALTHY, {HEALTHY}, {CAPACITY, IDLE_IN_TRANSACTION}, OK),
    (
        "undersized_timeouts",
        fig(SATURATED, timeouts=12),
        UNDERSIZED_POOL,
        {UNDERSIZED_POOL},
        {LEAKED_SESSIONS, SLOW_QUERIES, HEALTHY},
        CRITICAL,
    ),
    (
        "undersized_queueing_only",
        fig(used_mean=13, utilisation=0.87, saturated_share=0.3, pending_max=3, wait_p99=0.2),
        UNDERSIZED_POOL,
        {UNDERSIZED_POOL},
        {HEALTHY},
        WARNING,
    ),
    (
        "undersized_held_idle_unknown_but_short_holds",
        fig(SATURATED, timeouts=2, held_idle_share=None),
        UNDERSIZED_POOL,
        {UNDERSIZED_POOL},
        {INSUFFICIENT_DATA},
        CRITICAL,
    ),
    (
        "leaked_starving_pool",
        fig(
            SATURATED,
            timeouts=3,
            held_idle_share=0.8,
            use_mean=2.0,
            use_p95=8.0,
            leaks_by_kind={"outlived_response": 5, "long_hold": 2},
        ),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS},
        {UNDERSIZED_POOL, SLOW_QUERIES},
        CRITICAL,
    ),
    (
        "leaked_after_traffic_stopped",
        fig(used_after_traffic_stopped=4, used_last=4),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS},
        {HEALTHY},
        WARNING,
    ),
    (
        "leaked_garbage_collected",
        fig(leaks_by_kind={"garbage_collected": 1}),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS},
        set(),
        WARNING,
    ),
    (
        "leaked_no_traffic_but_connections_held",
        fig(checkouts=0, checkout_rate=0, used_after_traffic_stopped=3, used_last=3),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS},
        {INSUFFICIENT_DATA},
        WARNING,
    ),
    (
        "held_idle_high_but_tiny_holds_is_overhead",
        fig(held_idle_share=0.7, use_mean=0.002, use_p95=0.004),
        HEALTHY,
        {HEALTHY},
        {LEAKED_SESSIONS},
        OK,
    ),
    (
        "idle_in_transaction",
        fig(
            PG_OK,
            {"pg_backends": {"idle in transaction": 6, "active": 1}},
            pg_oldest_transaction_age=120,
        ),
        IDLE_IN_TRANSACTION,
        {IDLE_IN_TRANSACTION},
        {HEALTHY},
        WARNING,
    ),
    (
        "idle_in_transaction_very_old",
        fig(PG_OK, {"pg_backends": {"idle in transaction": 1}}, pg_oldest_transaction_age=900),
        IDLE_IN_TRANSACTION,
        {IDLE_IN_TRANSACTION},
        set(),
        CRITICAL,
    ),
    (
        "idle_in_transaction_at_checkin",
        fig(leaks_by_kind={"open_transaction_at_checkin": 4}),
        IDLE_IN_TRANSACTION,
        {IDLE_IN_TRANSACTION},
        {LEAKED_SESSIONS},
        WARNING,
    ),
    (
        "pg_idle_in_transaction_not_blamed_on_idle_pool",
        fig(
            PG_OK,
            {"pg_backends": {"idle in transaction": 6}},
            pg_oldest_transaction_age=120,
            used_max=0,
            used_mean=0,
            utilisation=0,
        ),
        HEALTHY,
        {HEALTHY},
        {IDLE_IN_TRANSACTION},
        OK,
    ),
    (
        "slow_queries_contended",
        fig(SATURATED, use_mean=1.5, use_p95=4.0, held_idle_share=0.05),
        SLOW_QUERIES,
        {SLOW_QUERIES},
        {UNDERSIZED_POOL, LEAKED_SESSIONS},
        WARNING,
    ),
    (
        "slow_queries_long_hold_busy_is_not_a_leak",
        fig(use_mean=1.5, use_p95=40.0, held_idle_share=0.02, leaks_by_kind={"long_hold": 3}),
        HEALTHY,
        {SLOW_QUERIES, HEALTHY},
        {LEAKED_SESSIONS},
        INFO,
    ),
    (
        "slow_query_on_server",
        fig(SATURATED, timeouts=1, pg_oldest_query_age=45),
        SLOW_QUERIES,
        {SLOW_QUERIES},
        {UNDERSIZED_POOL},
        CRITICAL,
    ),
    (
        "churn_overflow",
        fig(closes_by_reason={"overflow": 20.0, "dispose": 1.0}),
        CONNECTION_CHURN,
        {CONNECTION_CHURN},
        {HEALTHY},
        WARNING,
    ),
    (
        "churn_pre_ping_failures",
        fig(closes_by_reason={"pre_ping_failed": 0.01}),
        CONNECTION_CHURN,
        {CONNECTION_CHURN},
        set(),
        WARNING,
    ),
    (
        "churn_slow_connect_only_is_info",
        fig(closes_by_reason={"recycle": 0.5}, create_p95=1.2),
        HEALTHY,
        {CONNECTION_CHURN, HEALTHY},
        set(),
        INFO,
    ),
    (
        "dispose_is_not_churn",
        fig(closes_by_reason={"dispose": 50.0}),
        HEALTHY,
        {HEALTHY},
        {CONNECTION_CHURN},
        OK,
    ),
    (
        "capacity_over_budget",
        fig(
            PG_OK,
            {"pg_total_backends": 40, "max_connections_sum": 120},
            instances=4,
            max_connections=30,
        ),
        CAPACITY,
        {CAPACITY},
        {HEALTHY},
        WARNING,
    ),
    (
        "capacity_tight_while_undersized",
        fig(SATURATED, PG_OK, {"pg_max_connections": 55, "pg_total_backends": 30}, timeouts=4),
        UNDERSIZED_POOL,
        {UNDERSIZED_POOL, CAPACITY},
        set(),
        CRITICAL,
    ),
    (
        "capacity_tight_but_fine_is_info",
        fig(PG_OK, {"pg_max_connections": 55, "pg_total_backends": 30}),
        HEALTHY,
        {CAPACITY, HEALTHY},
        set(),
        INFO,
    ),
    ("no_figures", Figures(pool="x"), INSUFFICIENT_DATA, {INSUFFICIENT_DATA}, set(), INFO),
    (
        "too_little_traffic",
        fig(checkouts=5, checkout_rate=5 / 300),
        INSUFFICIENT_DATA,
        {INSUFFICIENT_DATA},
        {HEALTHY},
        INFO,
    ),
    (
        "no_checkout_histogram",
        fig(checkouts=None, checkout_rate=None, wait_p99=None, use_p95=None, use_mean=None),
        INSUFFICIENT_DATA,
        {INSUFFICIENT_DATA},
        {HEALTHY},
        INFO,
    ),
    (
        "contended_but_cause_unknown",
        fig(SATURATED, timeouts=3, use_p95=None, use_mean=None, held_idle_share=None),
        INSUFFICIENT_DATA,
        {INSUFFICIENT_DATA},
        {UNDERSIZED_POOL, HEALTHY},
        CRITICAL,
    ),
    (
        "mixed_leak_idle_tx_churn",
        fig(
            SATURATED,
            PG_OK,
            {"pg_backends": {"idle in transaction": 5}},
            timeouts=9,
            held_idle_share=0.75,
            use_mean=3.0,
            use_p95=12.0,
            pg_oldest_transaction_age=60,
            closes_by_reason={"pre_ping_failed": 0.2},
            leaks_by_kind={"outlived_response": 3},
        ),
        LEAKED_SESSIONS,
        {LEAKED_SESSIONS, IDLE_IN_TRANSACTION, CONNECTION_CHURN},
        {UNDERSIZED_POOL, HEALTHY},
        CRITICAL,
    ),
]


@pytest.mark.parametrize(
    ("figures", "verdict", "present", "absent", "severity"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_diagnose(figures: Figures, verdict: str, present: set, absent: set, severity: str) -> None:
    diagnosis = diagnose(figures)
    kinds = [f.kind for f in diagnosis.findings]
    assert diagnosis.verdict == verdict, [(f.kind, f.severity, f.title) for f in diagnosis.findings]
    assert present <= set(kinds)
    assert not (absent & set(kinds))
    assert diagnosis.severity == severity
    assert diagnosis.healthy == (verdict == HEALTHY)
    # most severe first
    ranks = [SEVERITY_RANK[f.severity] for f in diagnosis.findings]
    assert ranks == sorted(ranks)
    for finding in diagnosis.findings:
        assert finding.title and "\n" not in finding.title
        assert all(isinstance(v, str) for _, v in finding.evidence)


RUNBOOK = ["metrics", "session lifecycle", "pool limits", "load test", "max_connections"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_next_steps_follow_the_runbook_order(case: tuple) -> None:
    for finding in diagnose(case[1]).findings:
        stages = [step.split(":", 1)[0] for step in finding.next_steps]
        assert all(stage in RUNBOOK for stage in stages), stages
        assert stages == sorted(stages, key=RUNBOOK.index)
        if finding.kind in (UNDERSIZED_POOL, LEAKED_SESSIONS, SLOW_QUERIES, CAPACITY):
            assert stages[0] == "metrics"
        if finding.kind in (WORKER_CPU_SATURATED, EVENT_LOOP_BLOCKED, CONNECT_FAILURES):
            # Root cause first: the pool-limits stage never says to raise the pool.
            limits = " ".join(s for s in finding.next_steps if s.startswith("pool limits"))
            assert "raise the pool explicitly" not in limits
            assert "do not raise the pool" in limits or "keep the pool limits" in limits
        if finding.kind in (UNDERSIZED_POOL, LEAKED_SESSIONS, SLOW_QUERIES):
            assert stages[-1] == "max_connections"  # raising the server limit comes last


def test_undersized_suggests_a_size_from_littles_law_within_server_headroom() -> None:
    # 100 checkouts/s over 2 instances x 0.3 s hold = 15 connections busy per instance (the
    # limit) + 3 queued on average = 18 wanted; 1.25 x 18 = 23, but the server has 2
    # connections left = 1 per instance.
    busy = dict(SATURATED, use_mean=0.3, use_p95=0.5, timeouts=4)
    tight = fig(busy, PG_OK, {"pg_max_connections": 55, "pg_total_backends": 30})
    finding = diagnose(tight).findings[0]
    assert finding.kind == UNDERSIZED_POOL
    limits = next(s for s in finding.next_steps if s.startswith("pool limits"))
    assert "from 15 to about 16 per instance" in limits
    assert "the server has only 2 connections to spare" in limits
    assert ("server headroom", "2 connections") in finding.evidence
    assert ("connections busy (rate x hold, Little's law)", "15 per instance") in finding.evidence
    assert ("wanted at once (busy + queued mean)", "18 per instance") in finding.evidence
    assert finding.culprits[0].startswith("GET /orders/{id}")  # routes first for load problems

    roomy = diagnose(fig(busy, PG_OK)).findings[0]
    limits = next(s for s in roomy.next_steps if s.startswith("pool limits"))
    # The suggestion comes from the model, not from the queue's peak (limit + 8 queued max).
    assert "from 15 to about 23 per instance" in limits
    assert "about 78% utilisation" in limits  # the predicted effect
    assert "the server has only" not in limits
    no_pg = diagnose(fig(busy)).findings[0]
    assert any("enable pg_activity" in s for s in no_pg.next_steps)


def test_leak_names_code_sites_first() -> None:
    finding = diagnose(fig(leaks_by_kind={"outlived_response": 2})).findings[0]
    assert finding.kind == LEAKED_SESSIONS
    assert finding.culprits[0].startswith("get_order (app/orders.py:42)")
    assert ("leaks: outlived response", "2") in finding.evidence


def test_unknown_values_read_as_unknown() -> None:
    finding = diagnose(fig(SATURATED, timeouts=1, held_idle_share=None)).findings[0]
    assert ("held idle (no statement)", "unknown") in finding.evidence


# --- configuration review --------------------------------------------------------------------
CONFIG_CASES = [
    # (id, overrides, review kwargs, expected {kind: severity})
    ("good", {}, {}, {}),
    # SQLAlchemy's default 30 s against an assumed 30 s request timeout: advice, not a warning.
    (
        "timeout_default_vs_assumed_request_timeout",
        {"config_timeout": 30},
        {},
        {"pool_timeout": INFO},
    ),
    (
        "timeout_equals_given_request_timeout",
        {"config_timeout": 30},
        {"request_timeout_s": 30},
        {"pool_timeout": WARNING},
    ),
    (
        "timeout_over_request_timeout_param",
        {"config_timeout": 10},
        {"request_timeout_s": 5},
        {"pool_timeout": WARNING},
    ),
    ("timeout_most_of_budget", {"config_timeout": 20}, {}, {"pool_timeout": INFO}),
    ("timeout_disabled", {"config_timeout": 0}, {}, {"pool_timeout": WARNING}),
    ("timeout_infinite", {"config_timeout": math.inf}, {}, {"pool_timeout": WARNING}),
    ("timeout_unknown_not_reviewed", {"config_timeout": None}, {}, {}),
    ("recycle_off_with_pre_ping", {"config_recycle": -1}, {}, {"pool_recycle": INFO}),
    (
        "recycle_off_without_pre_ping",
        {"config_recycle": -1, "config_pre_ping": 0},
        {},
        {"pool_recycle": WARNING, "pool_pre_ping": INFO},
    ),
    ("recycle_above_idle_timeout", {"config_recycle": 3600}, {}, {"pool_recycle": INFO}),
    ("recycle_below_custom_idle_timeout", {"config_recycle": 3600}, {"idle_timeout_s": 7200}, {}),
    (
        "pre_ping_off_and_connections_dying",
        {"config_pre_ping": 0, "closes_by_reason": {"invalidated": 0.1}},
        {},
        {"pool_pre_ping": WARNING},
    ),
    ("overflow_unlimited", {"max_connections": -1}, {}, {"max_overflow": WARNING}),
    ("overflow_unlimited_inf", {"max_connections": math.inf}, {}, {"max_overflow": WARNING}),
    ("async_expire_on_commit", {"expire_on_commit": 1}, {}, {"expire_on_commit": WARNING}),
    (
        "nothing_exported",
        {
            "config_timeout": None,
            "config_recycle": None,
            "config_pre_ping": None,
            "expire_on_commit": None,
            "max_connections": None,
        },
        {},
        {"config_unknown": INFO},
    ),
]


@pytest.mark.parametrize(
    ("overrides", "kwargs", "expected"),
    [c[1:] for c in CONFIG_CASES],
    ids=[c[0] for c in CONFIG_CASES],
)
def test_review_config(overrides: dict, kwargs: dict, expected: dict) -> None:
    findings = review_config(fig(**overrides), **kwargs)
    assert {f.kind: f.severity for f in findings} == expected
    for finding in findings:
        assert finding.title and "\n" not in finding.title
        if finding.kind != "config_unknown":
            assert finding.next_steps and finding.evidence


def test_diagnose_includes_the_configuration_review() -> None:
    diagnosis = diagnose(fig(config_timeout=30), request_timeout_s=60)
    assert diagnosis.config == []
    diagnosis = diagnose(fig(config_timeout=30))
    assert [f.kind for f in diagnosis.config] == ["pool_timeout"]
    assert diagnosis.healthy  # configuration advice is not a pool problem


def test_worker_findings_name_the_blocking_site_first() -> None:
    blocked = fig(
        SATURATED,
        LOOP_BLOCKED,
        blocking_sites=["sdk_call (app/api.py:31) [GET /report] - 80% of the time blocked"],
    )
    finding = diagnose(blocked).findings[0]
    assert finding.kind == EVENT_LOOP_BLOCKED
    assert finding.culprits[0].startswith("sdk_call (app/api.py:31)")
    assert "sdk_call (app/api.py:31)" in finding.title
    assert any("asyncio.to_thread" in step for step in finding.next_steps)
    cpu = diagnose(fig(SATURATED, CPU_BOUND)).findings[0]
    assert any("worker processes" in step for step in cpu.next_steps)


def test_slow_statements_name_the_statement_time_and_route() -> None:
    finding = diagnose(
        fig(SATURATED, use_mean=0.26, use_p95=0.45, busy_mean=0.25, held_idle_share=0.03)
    ).findings[0]
    assert finding.kind == SLOW_QUERIES
    assert "statements take 250 ms per checkout" in finding.title
    assert finding.culprits[0].startswith("GET /orders/{id}")
