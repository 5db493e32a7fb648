"""The doctor's judgement: pure functions from Figures to findings (no I/O, no clock).

``diagnose`` names what is wrong with a pool (several findings, most severe first);
``review_config`` checks the pool configuration gauges. Every threshold is a module constant
with the reason for its value; docs/doctor.md explains the decision rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from sqlalchemy_pool_tools.doctor import _format as fmt
from sqlalchemy_pool_tools.doctor.figures import Figures

# --- severities and kinds --------------------------------------------------------------------
CRITICAL = "critical"  # failing now (timeouts, exhausted pool, server at risk)
WARNING = "warning"  # a problem that will fail under more load
INFO = "info"  # worth knowing; not a problem on its own
OK = "ok"
SEVERITY_RANK = {CRITICAL: 0, WARNING: 1, INFO: 2, OK: 3}

UNDERSIZED_POOL = "undersized_pool"
LEAKED_SESSIONS = "leaked_sessions"
IDLE_IN_TRANSACTION = "idle_in_transaction"
SLOW_QUERIES = "slow_queries"
CONNECTION_CHURN = "connection_churn"
CAPACITY = "capacity"
# What only looks like a pool problem: checked first, and a bigger pool is never the advice.
WORKER_CPU_SATURATED = "worker_cpu_saturated"
EVENT_LOOP_BLOCKED = "event_loop_blocked"
CONNECT_FAILURES = "connect_failures"
FAILING_REQUESTS = "failing_requests"
HELD_IDLE_IN_REQUEST = "held_idle_in_request"
HEALTHY = "healthy"
INSUFFICIENT_DATA = "insufficient_data"

# --- thresholds ------------------------------------------------------------------------------
# Fewer checkouts than this and the latency quantiles describe a handful of events, not the
# pool: judge only on hard evidence (timeouts, leaks) and otherwise say the data is too thin.
MIN_CHECKOUTS = 20
# Pool full (checked-out == max) for this share of the window is sustained saturation; short
# full moments during bursts are what max_overflow and the queue are for.
SATURATED_SHARE = 0.2
# Mean utilisation at which queueing delay grows steeply (M/M/c: waits explode past ~80%).
HIGH_UTILISATION = 0.8
# A checkout wait this long at p99 is visible to users; equals the instrumentor's default
# wait-span threshold (100 ms) so the doctor and the traces agree on "slow checkout".
SLOW_WAIT_P99_S = 0.1
# Held-idle share (time checked out with no statement running / total checkout time).
# Below BUSY the connections are executing: more connections (or faster SQL) is the fix.
BUSY_HELD_IDLE_SHARE = 0.2
# Above LEAK more than half the hold time is idle: the session lifecycle is the problem.
LEAK_HELD_IDLE_SHARE = 0.5
# Mean idle time per checkout below this is ORM/driver overhead between statements, not a
# lifecycle bug, whatever the share (a 2 ms checkout that is 60% idle is fine).
MIN_HELD_IDLE_PER_CHECKOUT_S = 0.05
# Hold time p95 beyond this is long for request-path work (most OLTP holds are milliseconds).
LONG_HOLD_P95_S = 1.0
# An active query this old on the server is slow (and probably blocking or scanning).
SLOW_QUERY_AGE_S = 10.0
# An open transaction this old: typical idle_in_transaction_session_timeout settings (30-60 s);
# past CRITICAL it blocks vacuum and holds locks long enough to cascade.
OLD_TRANSACTION_S = 30.0
CRITICAL_TRANSACTION_S = 300.0
# Backends idle in transaction (mean) at this share of the pool limit are a lifecycle pattern,
# not the occasional sample caught between two statements.
IDLE_IN_TX_POOL_SHARE = 0.25
# More than one close per ten checkouts means connections are not being reused.
CHURN_CLOSES_PER_CHECKOUT = 0.1
# Opening a connection (TCP + TLS + auth) this slow at p95 makes every churned connection hurt.
SLOW_CREATE_P95_S = 0.5
# Below this share of the usable server budget left free, pool sizes cannot grow safely.
CAPACITY_HEADROOM_SHARE = 0.1
# Size a pool for this much over its offered load (Little's law) so bursts do not queue.
DEMAND_HEADROOM = 1.25
# pool_timeout should fire well before the request is killed upstream, so the app answers a
# clear 503 instead of the proxy a 504; more than half the request budget is too late.
POOL_TIMEOUT_REQUEST_SHARE = 0.5
# Defaults for the configuration review: a common proxy/gunicorn request timeout, and a
# conservative "typical" idle timeout of the boxes between app and database (AWS NLB 350 s,
# PgBouncer server_idle_timeout 600 s, firewalls/NAT often 300 s).
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
# Busy (statement) time per checkout beyond this is long for request-path OLTP work, where
# statements take milliseconds: 100 ms is the usual "slow query" log threshold of web stacks,
# and a 250 ms statement on every request must qualify.
SLOW_STATEMENT_S = 0.1
# A worker using this much of one core is saturated: its event loop (one thread) cannot go
# faster, and every connection it holds waits for the loop between statements.
CPU_SATURATED_CORES = 0.85
# An event loop running callbacks (or its thread wanting a CPU) this share of the time has
# little slack left: queueing grows steeply past ~75-80% busy, as for the pool ...
LOOP_SATURATED_SHARE = 0.75
# ... and it is CPU-bound (not blocked in a sleeping call) when at least this share of that
# time its thread was on a CPU or runnable waiting for one (the rest: sleeping in blocking
# I/O / sleep calls). Without the thread's scheduler times, process CPU time stands in.
CPU_BOUND_SHARE = 0.5
# Share of the time spent in loop iterations longer than the block threshold (default 20 ms):
# every other request on the worker waits that long. 10% of the time is already visible in
# p99 latency and makes every hold on the worker look longer. Counted only as far as the loop
# thread was neither on a CPU nor waiting for one (sleeping in a call): on a host short of
# CPU every iteration gets long, which is not a blocking call.
LOOP_BLOCKED_SHARE = 0.1
# The loop runs callbacks this late at p99: every request waits that long (same bar as the
# checkout wait p99). A CPU-bound worker without pool contention is a problem from here on.
SLOW_LOOP_LAG_P99_S = 0.1
# Requests answered 5xx beyond this share: something fails, whatever the pool figures say.
FAILING_REQUEST_SHARE = 0.01
# Connect failures beyond this share of checkouts are critical (requests are failing now).
CRITICAL_CONNECT_ERROR_SHARE = 0.01
# Closes that are not churn: an explicit engine.dispose().
_DELIBERATE_CLOSES = frozenset({semconv.CLOSE_REASON_DISPOSE})
# Leak kinds that prove a connection was held beyond its unit of work (the request).
_BEYOND_REQUEST = (semconv.LEAK_KIND_OUTLIVED_RESPONSE, semconv.LEAK_KIND_GARBAGE_COLLECTED)

_LOAD_TEST = (
    "replay the peak (sqlalchemy-pool loadtest) and compare checked-out connections with "
    "request p95/p99 before and after the change"
)
_SERVER_LAST = (
    "only if the load test proves the server is the limit, raise PostgreSQL max_connections "
    "(or put PgBouncer in front) - never as the first fix"
)


@dataclass
class Finding:
    """One thing the doctor concluded, with the figures that support it."""

    kind: str
    severity: str
    title: str
    evidence: list[tuple[str, str]] = field(default_factory=list)
    culprits: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """A pool's findings (most severe first), configuration review and the figures used."""

    pool: str
    findings: list[Finding]
    config: list[Finding]
    figures: Figures

    @property
    def verdict(self) -> str:
        """The headline: the most severe problem, else healthy / insufficient_data."""
        for finding in self.findings:
            if finding.severity in (CRITICAL, WARNING):
                return finding.kind
        kinds = {f.kind for f in self.findings}
        return HEALTHY if HEALTHY in kinds else INSUFFICIENT_DATA

    @property
    def severity(self) -> str:
        return self.findings[0].severity if self.findings else INFO

    @property
    def healthy(self) -> bool:
        return self.verdict == HEALTHY


def _steps(
    metrics: str | None = None,
    lifecycle: str | None = None,
    limits: str | None = None,
    load_test: str | None = _LOAD_TEST,
    server: str | None = _SERVER_LAST,
) -> list[str]:
    """Next steps, always in the runbook order."""
    stages = (
        ("metrics", metrics),
        ("session lifecycle", lifecycle),
        ("pool limits", limits),
        ("load test", load_test),
        ("max_connections", server),
    )
    return [f"{stage}: {text}" for stage, text in stages if text]


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITY_RANK.get(f.severity, 9))


def _known(*values: float | None) -> bool:
    return all(not fmt.unknown(v) for v in values)


def _gt(value: float | None, threshold: float) -> bool:
    return _known(value) and value > threshold


def _ge(value: float | None, threshold: float) -> bool:
    return _known(value) and value >= threshold


def _ratio(num: float | None, den: float | None) -> float | None:
    if not _known(num, den) or not den:
        return None
    return num / den


def _held_any(fig: Figures) -> bool:
    """False only when the pool provably had no connection checked out in the window: the
    pg sampler's figures may be process-wide and then cannot be blamed on this pool."""
    return not (_known(fig.used_max) and fig.used_max == 0)


def _leaks(fig: Figures, *kinds: str) -> float:
    leaks = fig.leaks_by_kind or {}
    return sum(v for k, v in leaks.items() if k in kinds)


# --- evidence lines --------------------------------------------------------------------------
def _used_line(fig: Figures) -> tuple[str, str]:
    return (
        "checked out mean / max / limit",
        f"{fmt.count(fig.used_mean)} / {fmt.count(fig.used_max)} / "
        f"{fmt.count(fig.max_connections)}",
    )


def _wait_line(fig: Figures) -> tuple[str, str]:
    return (
        "wait p50 / p95 / p99",
        f"{fmt.seconds(fig.wait_p50)} / {fmt.seconds(fig.wait_p95)} / {fmt.seconds(fig.wait_p99)}",
    )


def _use_line(fig: Figures) -> tuple[str, str]:
    return "hold time mean / p95", f"{fmt.seconds(fig.use_mean)} / {fmt.seconds(fig.use_p95)}"


def _requests_line(fig: Figures) -> tuple[str, str] | None:
    if not _known(fig.request_rate):
        return None
    return (
        "requests rate / p95 / p99",
        f"{fmt.rate(fig.request_rate)} / {fmt.seconds(fig.request_p95)} / "
        f"{fmt.seconds(fig.request_p99)}",
    )


def _lines(*items: tuple[str, str] | None) -> list[tuple[str, str]]:
    return [item for item in items if item is not None]


# --- signals ---------------------------------------------------------------------------------
@dataclass
class _Signals:
    enough_traffic: bool
    contention: list[str]  # human reasons; empty = no contention
    leak: list[str]  # evidence of holding beyond the unit of work (the request)
    held_idle: list[str]  # held idle between statements, nothing beyond the request
    slow: list[str]


def _signals(fig: Figures) -> _Signals:
    enough = _ge(fig.checkouts, MIN_CHECKOUTS)
    contention = []
    if _gt(fig.timeouts, 0):
        contention.append(f"{fmt.count(fig.timeouts)} checkout timeouts")
    # Full pool counts when someone had to wait for it: exactly full with nobody queued is a
    # pool sized right (the queue and the wait quantiles tell).
    waited = not _known(fig.pending_max) or fig.pending_max > 0 or _ge(fig.wait_p99, 0.01)
    if _ge(fig.saturated_share, SATURATED_SHARE) and waited:
        contention.append(f"pool full {fmt.share(fig.saturated_share)} of the window")
    if enough and _ge(fig.wait_p99, SLOW_WAIT_P99_S):
        contention.append(f"checkout wait p99 {fmt.seconds(fig.wait_p99)}")
    if _gt(fig.pending_max, 0) and _ge(fig.utilisation, HIGH_UTILISATION):
        contention.append(f"up to {fmt.count(fig.pending_max)} requests queued for a connection")

    held_idle_mean = (
        fig.held_idle_share * fig.use_mean if _known(fig.held_idle_share, fig.use_mean) else None
    )
    held_idle = []
    if (
        enough
        and _ge(fig.held_idle_share, LEAK_HELD_IDLE_SHARE)
        and (held_idle_mean is None or held_idle_mean >= MIN_HELD_IDLE_PER_CHECKOUT_S)
    ):
        held_idle.append(f"{fmt.share(fig.held_idle_share)} of hold time with no statement running")
    # Held idle is a leak only with evidence that the connection outlived its unit of work.
    leak = []
    for kind in _BEYOND_REQUEST:
        if _leaks(fig, kind) > 0:
            leak.append(f"{fmt.count(_leaks(fig, kind))} {kind.replace('_', ' ')} leaks")
    # A long hold is a leak only when the connection was not busy executing all along.
    long_holds = _leaks(fig, semconv.LEAK_KIND_LONG_HOLD)
    if long_holds > 0 and not (
        _known(fig.held_idle_share) and fig.held_idle_share < BUSY_HELD_IDLE_SHARE
    ):
        leak.append(f"{fmt.count(long_holds)} long holds")
    if _gt(fig.used_after_traffic_stopped, 0):
        leak.append(
            f"{fmt.count(fig.used_after_traffic_stopped)} connections still checked out "
            "after traffic stopped"
        )
    if leak:
        leak = held_idle + leak

    slow = []
    executing = _known(fig.held_idle_share) and fig.held_idle_share < LEAK_HELD_IDLE_SHARE
    if enough and executing and _ge(fig.use_p95, LONG_HOLD_P95_S):
        slow.append(f"hold time p95 {fmt.seconds(fig.use_p95)} while executing")
    if enough and executing and _ge(fig.busy_mean, SLOW_STATEMENT_S):
        slow.append(f"statements take {fmt.seconds(fig.busy_mean)} per checkout")
    if _ge(fig.pg_oldest_query_age, SLOW_QUERY_AGE_S) and _held_any(fig):
        slow.append(f"a query running for {fmt.seconds(fig.pg_oldest_query_age)} on the server")
    return _Signals(enough, contention, leak, held_idle, slow)


def _culprits(fig: Figures, routes_first: bool = False) -> list[str]:
    sites = list(fig.top_code_sites or [])
    routes = list(fig.top_routes or [])
    return routes + sites if routes_first else sites + routes


# --- classes ---------------------------------------------------------------------------------
def _capacity_numbers(fig: Figures) -> tuple[float, float, float | None] | None:
    """(sum of pool limits, usable server budget, other clients) or None when unknown."""
    if not _known(fig.pg_max_connections):
        return None
    total = fig.max_connections_sum
    if not _known(total) and _known(fig.max_connections):
        total = fig.max_connections * (fig.instances or 1)
    if not _known(total) or total < 0 or math.isinf(total):
        return None
    others = None
    if _known(fig.pg_total_backends):
        others = max(0.0, fig.pg_total_backends - (fig.open_connections or 0.0))
    budget = fig.pg_max_connections - (fig.pg_reserved_connections or 0.0) - (others or 0.0)
    return total, budget, others


def _undersized(fig: Figures, sig: _Signals) -> Finding:
    """Size from a model, not from the queue's peak: by Little's law the connections the
    measured checkout rate keeps busy are rate x hold time; the requests queued for one (mean)
    want one too. The pool gets DEMAND_HEADROOM over their sum, at least one more connection
    than today, at most what the server budget allows."""
    limit = fig.max_connections or 0.0
    instances = fig.instances or 1.0
    carried = None
    if _known(fig.checkout_rate, fig.use_mean):
        carried = fig.checkout_rate / instances * fig.use_mean
    demand = None if carried is None else carried + (fig.pending_mean or 0.0)
    target = max(math.ceil((demand or 0.0) * DEMAND_HEADROOM), int(limit) + 1)
    evidence = _lines(
        _used_line(fig),
        ("pool full (share of scrapes)", fmt.share(fig.saturated_share)),
        ("queued for a connection max", fmt.count(fig.pending_max)),
        ("checkout timeouts", fmt.count(fig.timeouts)),
        _wait_line(fig),
        _use_line(fig),
        ("busy (statements) per checkout", fmt.seconds(fig.busy_mean))
        if _known(fig.busy_mean)
        else None,
        ("held idle (no statement)", fmt.share(fig.held_idle_share)),
        ("connections busy (rate x hold, Little's law)", f"{fmt.count(carried)} per instance")
        if carried is not None
        else None,
        ("wanted at once (busy + queued mean)", f"{fmt.count(demand)} per instance")
        if demand is not None
        else None,
        _requests_line(fig),
    )
    server_note = "; enable pg_activity to check the server can take them"
    cap = _capacity_numbers(fig)
    if cap is not None:
        total, budget, _ = cap
        headroom = budget - total
        evidence.append(("server headroom", f"{fmt.count(headroom)} connections"))
        allowed = limit + max(0.0, headroom) / instances
        server_note = ""
        if target > allowed:
            target = max(int(allowed), int(limit))
            server_note = (
                f"; the server has only {fmt.count(max(headroom, 0))} connections to spare, so "
                "that is the most it can take: shorten holds first or add PgBouncer"
            )
    extra = (target - limit) * instances
    if target > limit:
        predicted = (
            f"the requests that queue now get a connection at once and the pool runs at about "
            f"{fmt.share(demand / target)} utilisation; throughput was capped by the pool and "
            "will grow, so measure again after the change"
            if demand
            else "measure the checkout rate and hold time again after the change"
        )
        limits = (
            f"raise the pool explicitly (pool_size/max_overflow) from {fmt.count(limit)} to "
            f"about {target} per instance = {fmt.count(extra)} more server connections over "
            f"{fmt.count(instances)} instance(s): {predicted}{server_note}"
        )
    else:
        limits = f"do not raise the pool: the server cannot take more connections{server_note}"
    return Finding(
        kind=UNDERSIZED_POOL,
        severity=CRITICAL if _gt(fig.timeouts, 0) else WARNING,
        title=f"Pool too small for the load: {'; '.join(sig.contention)} - while connections "
        "are busy with short holds",
        evidence=evidence,
        culprits=_culprits(fig, routes_first=True),
        next_steps=_steps(
            metrics="confirm checked-out sits at the limit with pending > 0 while hold time "
            "p95 stays short (dashboard: pool saturation, wait p99)",
            lifecycle="make sure no slow non-database work (HTTP calls, rendering) runs while a "
            "session is open",
            limits=limits,
        ),
    )


def _leaked(fig: Figures, sig: _Signals) -> Finding:
    severity = CRITICAL if sig.contention else WARNING
    leaks = fig.leaks_by_kind or {}
    evidence = _lines(
        ("held idle (no statement)", fmt.share(fig.held_idle_share)),
        _use_line(fig),
        *(
            (f"leaks: {kind.replace('_', ' ')}", fmt.count(n))
            for kind, n in sorted(leaks.items())
            if n > 0
        ),
        ("checked out after traffic stopped", fmt.count(fig.used_after_traffic_stopped))
        if _known(fig.used_after_traffic_stopped)
        else None,
        _used_line(fig),
        ("checkout timeouts", fmt.count(fig.timeouts)) if _gt(fig.timeouts, 0) else None,
    )
    hurting = f" - starving the pool ({'; '.join(sig.contention)})" if sig.contention else ""
    return Finding(
        kind=LEAKED_SESSIONS,
        severity=severity,
        title=f"Sessions hold connections without using them: {'; '.join(sig.leak)}{hurting}",
        evidence=evidence,
        culprits=_culprits(fig),
        next_steps=_steps(
            metrics="find the holders: sqlalchemy.session spans with outlived_response / "
            "held_idle, leak counters by code site, `sqlalchemy-pool` holders snapshot",
            lifecycle="open sessions per unit of work (`with Session() as s:` / `async with`), "
            "close them before the response is sent and before slow non-DB awaits; never keep "
            "a session on a module or a long-lived object",
            limits="keep the pool limits as they are: a bigger pool only delays the exhaustion",
        ),
    )


def _idle_in_tx(fig: Figures, sig: _Signals) -> Finding | None:
    backends = fig.pg_backends or {}
    idle_tx = sum(v for k, v in backends.items() if k.startswith("idle in transaction"))
    at_checkin = _leaks(fig, semconv.LEAK_KIND_OPEN_TRANSACTION_AT_CHECKIN)
    age = fig.pg_oldest_transaction_age
    # Held idle between statements with nothing outliving the request: the transaction (or
    # the session) is held across non-database work inside the request.
    in_request = bool(sig.held_idle) and not sig.leak
    if not _held_any(fig) and at_checkin == 0:
        return None  # server-side figures, but this pool held nothing: not its transactions
    many = idle_tx >= max(2.0, IDLE_IN_TX_POOL_SHARE * (fig.max_connections or 0.0))
    old = idle_tx > 0 and _ge(age, OLD_TRANSACTION_S)
    if not (many or old or at_checkin > 0 or in_request):
        return None
    outside_tx = _known(fig.held_idle_in_tx_share) and fig.held_idle_in_tx_share < 0.5
    reasons = list(sig.held_idle) if in_request else []
    if idle_tx > 0:
        reasons.append(f"{fmt.count(idle_tx)} backends idle in transaction")
    if _ge(age, OLD_TRANSACTION_S):
        reasons.append(f"oldest transaction {fmt.seconds(age)}")
    if at_checkin > 0:
        reasons.append(f"{fmt.count(at_checkin)} connections returned with a transaction open")
    critical = _ge(age, CRITICAL_TRANSACTION_S) or _gt(fig.timeouts, 0)
    if in_request and not (idle_tx or at_checkin or old):
        where = "outside a transaction" if outside_tx else "in an open transaction"
        title = (
            f"Connections held idle {where} across non-database work inside the request "
            f"(nothing outlives its request, so not a leak): {'; '.join(reasons)}"
        )
    else:
        title = f"Transactions left open between statements: {'; '.join(reasons)}"
    hurting = f" - starving the pool ({'; '.join(sig.contention)})" if sig.contention else ""
    return Finding(
        kind=HELD_IDLE_IN_REQUEST if outside_tx and not idle_tx else IDLE_IN_TRANSACTION,
        severity=CRITICAL if critical else WARNING,
        title=title + hurting,
        evidence=_lines(
            ("held idle (no statement)", fmt.share(fig.held_idle_share)),
            ("of which inside a transaction", fmt.share(fig.held_idle_in_tx_share))
            if _known(fig.held_idle_in_tx_share)
            else None,
            _use_line(fig),
            ("busy (statements) per checkout", fmt.seconds(fig.busy_mean))
            if _known(fig.busy_mean)
            else None,
            (
                "leaks beyond the request (outlived response, GC)",
                fmt.count(sum(_leaks(fig, k) for k in _BEYOND_REQUEST)),
            ),
            *((f"backends: {state}", fmt.count(n)) for state, n in sorted(backends.items()) if n),
            ("oldest transaction age", fmt.seconds(age)) if _known(age) else None,
            ("returned with open transaction", fmt.count(at_checkin)) if at_checkin else None,
            _used_line(fig),
            ("checkout timeouts", fmt.count(fig.timeouts)) if _gt(fig.timeouts, 0) else None,
        ),
        culprits=_culprits(fig, routes_first=True),
        next_steps=_steps(
            metrics="find the await: sqlalchemy.session spans with held_idle under these "
            "routes (`sqlalchemy-pool pg-activity` shows the idle-in-transaction backends)",
            lifecycle="commit or roll back before any slow await (HTTP call, queue, sleep) and "
            "open a new transaction for the writes after it, or make the slow call before "
            "the first statement; set idle_in_transaction_session_timeout as a safety net",
            limits="keep the pool limits as they are: a bigger pool only holds more idle "
            "transactions",
        ),
    )


def _slow(fig: Figures, sig: _Signals) -> Finding:
    if _gt(fig.timeouts, 0):
        severity = CRITICAL
    elif sig.contention:
        severity = WARNING
    else:
        severity = INFO
    hurting = (
        f" - and the pool is contended ({'; '.join(sig.contention)})" if sig.contention else ""
    )
    return Finding(
        kind=SLOW_QUERIES,
        severity=severity,
        title=f"Connections held long while executing: {'; '.join(sig.slow)}{hurting}",
        evidence=_lines(
            _use_line(fig),
            ("held idle (no statement)", fmt.share(fig.held_idle_share)),
            ("oldest running query", fmt.seconds(fig.pg_oldest_query_age))
            if _known(fig.pg_oldest_query_age)
            else None,
            _used_line(fig),
            _wait_line(fig),
            _requests_line(fig),
        ),
        culprits=list(fig.slow_statement_sites or []) + _culprits(fig, routes_first=True),
        next_steps=_steps(
            metrics="find the statements: db spans by duration under the slow routes, "
            "pg_stat_statements / EXPLAIN ANALYZE",
            lifecycle="fix the queries (indexes, N+1, batching) or move long work off the "
            "request path; keep transactions short",
            limits="do not raise the pool to absorb slow queries: it adds load to the server "
            "that is already the bottleneck",
        ),
    )


_CHURN_ADVICE = {
    semconv.CLOSE_REASON_OVERFLOW: "overflow connections are opened and closed with every "
    "burst: raise pool_size toward the typical checked-out count, keep max_overflow for bursts",
    semconv.CLOSE_REASON_RECYCLE: "pool_recycle closes connections often: raise it to just "
    "under the shortest idle timeout between app and server",
    semconv.CLOSE_REASON_PRE_PING: "something kills idle connections (proxy, firewall, server "
    "idle timeout): set pool_recycle below that idle timeout",
    semconv.CLOSE_REASON_INVALIDATED: "connections are invalidated by errors: look for "
    "disconnects and statement errors in the logs",
    semconv.CLOSE_REASON_ERROR: "connections fail while in use: check server logs and network",
    semconv.CLOSE_REASON_NULLPOOL: "NullPool closes every connection: use QueuePool unless a "
    "pooler (PgBouncer) sits in front",
    "": "find out why connections are closed (closes by reason on the dashboard)",
}


def _churn(fig: Figures, sig: _Signals) -> Finding | None:
    closes = {k: v for k, v in (fig.closes_by_reason or {}).items() if k not in _DELIBERATE_CLOSES}
    close_rate = sum(closes.values())
    ratio = _ratio(close_rate, fig.checkout_rate)
    pre_ping = closes.get(semconv.CLOSE_REASON_PRE_PING, 0.0)
    reasons = []
    if sig.enough_traffic and ratio is not None and ratio >= CHURN_CLOSES_PER_CHECKOUT:
        reasons.append(f"{fmt.share(ratio)} of checkouts needed a new connection")
    if pre_ping > 0:
        reasons.append(f"pre-ping found dead connections ({fmt.rate(pre_ping)})")
    slow_create = _ge(fig.create_p95, SLOW_CREATE_P95_S) and close_rate > 0
    reused_badly = bool(reasons)
    if not reasons and not slow_create:
        return None
    if slow_create:
        reasons.append(f"opening a connection takes {fmt.seconds(fig.create_p95)} (p95)")
    # Advice for the dominant close reason, plus pre-ping failures whenever they happen.
    top = max(closes, key=lambda k: closes[k]) if closes else None
    reasons_to_advise = [
        r for r in (top, semconv.CLOSE_REASON_PRE_PING if pre_ping > 0 else None) if r
    ]
    advice = "; ".join(
        dict.fromkeys(_CHURN_ADVICE.get(r, _CHURN_ADVICE[""]) for r in reasons_to_advise)
    )
    return Finding(
        kind=CONNECTION_CHURN,
        # Slow connects alone only hurt when churn happens; reuse problems are warnings.
        severity=WARNING if reused_badly else INFO,
        title=f"Connections are not reused: {'; '.join(reasons)}",
        evidence=_lines(
            *((f"closes: {k}", fmt.rate(v)) for k, v in sorted(closes.items())),
            ("checkout rate", fmt.rate(fig.checkout_rate)),
            ("closes per checkout", fmt.share(ratio)),
            ("connect time p95", fmt.seconds(fig.create_p95)),
            ("pool_recycle", fmt.seconds(fig.config_recycle)),
            ("pool_pre_ping", fmt.flag(fig.config_pre_ping)),
        ),
        culprits=[],
        next_steps=_steps(
            metrics="break closes down by reason and compare with connect time p95",
            lifecycle=None,
            limits=advice or _CHURN_ADVICE[""],
            server=None,
        ),
    )


def _capacity(fig: Figures, undersized: bool, sig: _Signals) -> Finding | None:
    numbers = _capacity_numbers(fig)
    if numbers is None:
        return None
    total, budget, others = numbers
    headroom = budget - total
    evidence = _lines(
        (
            "instances x pool limit",
            f"{fmt.count(fig.instances)} x {fmt.count(fig.max_connections)}",
        ),
        ("sum of pool limits", fmt.count(total)),
        ("server max_connections", fmt.count(fig.pg_max_connections)),
        ("reserved connections", fmt.count(fig.pg_reserved_connections)),
        ("other clients", fmt.count(others) if others is not None else "unknown"),
        ("usable budget", fmt.count(budget)),
        ("headroom", fmt.count(headroom)),
    )
    steps = _steps(
        metrics="compare the sum of pool limits over every instance (and replica during "
        "deploys) with max_connections - reserved - other clients",
        lifecycle="shorten holds first: it frees capacity without new connections",
        limits="set explicit per-instance limits so that instances x (pool_size + "
        f"max_overflow) stays under {fmt.count(budget)}; count deploy surges and autoscaling",
    )
    if headroom < 0:
        return Finding(
            kind=CAPACITY,
            severity=CRITICAL if sig.contention else WARNING,
            title=f"Pools can open {fmt.count(total)} connections but the server can give only "
            f"{fmt.count(budget)}: at full load new connections fail (too many clients)",
            evidence=evidence,
            next_steps=steps,
        )
    if headroom < CAPACITY_HEADROOM_SHARE * budget:
        return Finding(
            kind=CAPACITY,
            severity=WARNING if undersized else INFO,
            title=f"Only {fmt.count(headroom)} server connections to spare: raising pool sizes "
            "would exhaust the server",
            evidence=evidence,
            next_steps=steps,
        )
    return None


# --- around the pool: checked first (root cause first) ----------------------------------------
def _worker_lines(fig: Figures) -> list[tuple[str, str] | None]:
    return [
        ("worker CPU (busiest instance)", f"{fmt.count(fig.cpu_cores)} cores")
        if _known(fig.cpu_cores)
        else None,
        ("event loop busy", fmt.share(fig.loop_active_share))
        if _known(fig.loop_active_share)
        else None,
        ("event loop blocked (long iterations)", fmt.share(fig.loop_blocked_share))
        if _known(fig.loop_blocked_share)
        else None,
        ("event loop lag p99", fmt.seconds(fig.loop_lag_p99)) if _known(fig.loop_lag_p99) else None,
        ("loop thread on or waiting for a CPU", fmt.share(fig.loop_cpu_demand))
        if _known(fig.loop_cpu_demand)
        else None,
        ("loop thread waiting for a CPU (host busy)", fmt.share(fig.loop_runqueue_share))
        if _known(fig.loop_runqueue_share)
        else None,
    ]


def _pool_symptoms(fig: Figures, sig: _Signals) -> list[tuple[str, str] | None]:
    """What the pool looks like meanwhile: holds wait for the worker, so they look long."""
    return [
        _used_line(fig),
        ("checkout timeouts", fmt.count(fig.timeouts)),
        _use_line(fig),
        ("held idle (no statement)", fmt.share(fig.held_idle_share)),
        ("pool contention", "; ".join(sig.contention) or "none"),
        _requests_line(fig),
    ]


def _cpu_bound(fig: Figures) -> bool:
    """The worker's CPU is the limit: it uses a core, or its loop is saturated and spends that
    time computing (or waiting for a CPU) rather than sleeping in a call."""
    if _ge(fig.cpu_cores, CPU_SATURATED_CORES):
        return True
    wanted_cpu = fig.loop_cpu_demand if _known(fig.loop_cpu_demand) else fig.cpu_cores
    if not _known(fig.loop_active_share, wanted_cpu):
        return False
    busy = max(fig.loop_active_share, wanted_cpu)
    return busy >= LOOP_SATURATED_SHARE and wanted_cpu >= CPU_BOUND_SHARE * fig.loop_active_share


def _sleeping_share(fig: Figures) -> float | None:
    """Share of the time the loop was busy but its thread neither ran nor waited for a CPU:
    inside blocking calls (sleep, synchronous I/O). None without scheduler times."""
    if not _known(fig.loop_active_share, fig.loop_cpu_demand):
        return None
    return max(0.0, fig.loop_active_share - fig.loop_cpu_demand)


def _blocked_by_calls(fig: Figures) -> bool:
    if not _ge(fig.loop_blocked_share, LOOP_BLOCKED_SHARE) or _cpu_bound(fig):
        return False
    sleeping = _sleeping_share(fig)
    return sleeping is None or sleeping >= LOOP_BLOCKED_SHARE


def _worker_finding(
    fig: Figures, sig: _Signals, kind: str, title: str, metrics: str, lifecycle: str, limits: str
) -> Finding:
    """A stalled worker: the same evidence and culprits (where the loop was found running)
    whatever stalls it; never a bigger pool and never max_connections."""
    if _gt(fig.timeouts, 0) or sig.contention:
        severity = CRITICAL
    elif kind == EVENT_LOOP_BLOCKED or _ge(fig.loop_lag_p99, SLOW_LOOP_LAG_P99_S):
        severity = WARNING  # no queue for connections, but requests wait for the loop
    else:
        severity = INFO  # a busy worker that keeps up
    return Finding(
        kind=kind,
        severity=severity,
        title=title,
        evidence=_lines(*_worker_lines(fig), *_pool_symptoms(fig, sig)),
        culprits=list(fig.blocking_sites or []) + list(fig.top_routes or []),
        next_steps=_steps(metrics=metrics, lifecycle=lifecycle, limits=limits, server=None),
    )


def _worker_saturated(fig: Figures, sig: _Signals) -> Finding | None:
    if not _cpu_bound(fig):
        return None
    starved = _known(fig.loop_runqueue_share, fig.cpu_cores) and (
        fig.loop_runqueue_share > fig.cpu_cores
    )
    why = (
        "and it waits for a CPU more than it runs (the host is short of CPU)"
        if starved
        else "requests wait for the CPU"
    )
    return _worker_finding(
        fig,
        sig,
        WORKER_CPU_SATURATED,
        title=f"The worker process is CPU-bound ({fmt.count(fig.cpu_cores)} cores, event loop "
        f"busy {fmt.share(fig.loop_active_share)}) {why}; connections are held while the loop "
        "runs other requests' code - a bigger pool would only add waiting connections",
        metrics="profile the worker under load (py-spy top --pid PID); the culprits are "
        "where the event loop was found running",
        lifecycle="spend less CPU per request (cache token checks, cheaper serialisation), "
        "move CPU-heavy work to a process pool, and run more worker processes "
        "(uvicorn/gunicorn --workers) - one event loop uses one core",
        limits="do not raise the pool: throughput is capped by the CPU, not by connections; "
        "with more workers keep workers x (pool_size + max_overflow) within the server budget",
    )


def _loop_blocked(fig: Figures, sig: _Signals) -> Finding | None:
    if not _blocked_by_calls(fig):
        return None
    where = f" (mostly in {fig.blocking_sites[0].split(' - ')[0]})" if fig.blocking_sites else ""
    return _worker_finding(
        fig,
        sig,
        EVENT_LOOP_BLOCKED,
        title=f"The event loop is blocked {fmt.share(fig.loop_blocked_share)} of the time by "
        f"synchronous calls{where} while CPU stays at {fmt.count(fig.cpu_cores)} cores: every "
        "request and every held connection waits for them - a bigger pool fixes nothing",
        metrics="the culprits are the code sites found running while the loop was "
        "blocked (sqlalchemy.pool.event_loop.blocked_time by code.*)",
        lifecycle="make the blocking call asynchronous (an async client) or run it in a "
        "thread (`await asyncio.to_thread(call)` / run_in_threadpool), and never hold a "
        "session across it",
        limits="keep the pool limits as they are",
    )


def _connect_failures(fig: Figures, sig: _Signals) -> Finding | None:
    if not _gt(fig.connect_errors, 0):
        return None
    refused = fig.too_many_clients or 0.0
    share = _ratio(fig.connect_errors, fig.checkouts)
    critical = share is None or share >= CRITICAL_CONNECT_ERROR_SHARE or bool(sig.contention)
    instances = fig.instances or 1.0
    limit = fig.max_connections
    evidence = _lines(
        ("failed connects", fmt.count(fig.connect_errors)),
        *(
            (f"error: {kind}", fmt.count(n))
            for kind, n in sorted((fig.connect_errors_by_type or {}).items())
        ),
        ("server refused: too many clients", fmt.count(refused)) if refused else None,
        ("failed connects per checkout", fmt.share(share)) if share is not None else None,
        ("instances x pool limit", f"{fmt.count(instances)} x {fmt.count(limit)}"),
        ("server max_connections", fmt.count(fig.pg_max_connections)),
        ("server backends (all clients)", fmt.count(fig.pg_total_backends))
        if _known(fig.pg_total_backends)
        else None,
        ("requests answered 5xx", fmt.share(fig.request_error_share))
        if _known(fig.request_error_share)
        else None,
    )
    if refused:
        title = (
            f"PostgreSQL refused {fmt.count(refused)} connections (too many clients): its "
            "max_connections is used up by this app's sibling workers/instances or other "
            "clients - requests fail; a bigger pool would make it worse"
        )
        limits = (
            "do not raise the pool; size pools from the server budget: (number of worker "
            "processes x instances) x (pool_size + max_overflow) must stay under max_connections - "
            "superuser_reserved_connections - other clients; lower the per-worker limits or "
            "put PgBouncer (transaction pooling) in front"
        )
        server = "raise max_connections only if the server has memory for it, and only after "
        server += "the per-worker limits are right"
    else:
        title = (
            f"{fmt.count(fig.connect_errors)} connection attempts failed "
            f"({', '.join(sorted(fig.connect_errors_by_type or {}))}): requests that needed a "
            "new connection failed"
        )
        limits = (
            "keep the pool limits; fix what refuses the connections (credentials, "
            "network, server health)"
        )
        server = None
    return Finding(
        kind=CONNECT_FAILURES,
        severity=CRITICAL if critical else WARNING,
        title=title,
        evidence=evidence,
        culprits=list(fig.top_routes or []),
        next_steps=_steps(
            metrics="count server connections by client (`sqlalchemy-pool pg-activity`, "
            "pg_stat_activity by application_name/client_addr) and the failed connects by "
            "error.type",
            lifecycle=None,
            limits=limits,
            load_test=_LOAD_TEST,
            server=server,
        ),
    )


def _failing_requests(fig: Figures) -> Finding | None:
    if not _ge(fig.request_error_share, FAILING_REQUEST_SHARE):
        return None
    return Finding(
        kind=FAILING_REQUESTS,
        severity=WARNING,
        title=f"{fmt.share(fig.request_error_share)} of requests fail (5xx) although the pool "
        "figures show no cause: not healthy",
        evidence=_lines(
            ("requests answered 5xx", fmt.share(fig.request_error_share)),
            _requests_line(fig),
            ("failed connects", fmt.count(fig.connect_errors)),
            ("checkout timeouts", fmt.count(fig.timeouts)),
        ),
        culprits=list(fig.top_routes or []),
        next_steps=_steps(
            metrics="read the errors of the failing routes (logs, error spans): database "
            "errors other than pool timeouts and failed connects are not in the pool metrics",
            lifecycle=None,
            load_test=None,
            server=None,
        ),
    )


def _no_figures(fig: Figures) -> bool:
    return not any(
        _known(v) for v in (fig.used_mean, fig.used_max, fig.max_connections, fig.checkouts)
    )


def _insufficient(fig: Figures, title: str, severity: str = INFO) -> Finding:
    return Finding(
        kind=INSUFFICIENT_DATA,
        severity=severity,
        title=title,
        evidence=_lines(
            ("checkouts in window", fmt.count(fig.checkouts)),
            ("window", fmt.seconds(fig.window_s)),
            _used_line(fig),
            ("held idle (no statement)", fmt.share(fig.held_idle_share)),
            _use_line(fig),
        ),
        next_steps=_steps(
            metrics="widen --window (Prometheus) or --duration (metrics endpoint) to cover "
            "traffic, or diagnose during load; check the instrumentor exports "
            "use_time and held_idle_time",
            lifecycle=None,
            load_test=None,
            server=None,
        ),
    )


def _healthy(fig: Figures) -> Finding:
    not_checked = []
    if not _known(fig.held_idle_share):
        not_checked.append("held-idle share (leaks)")
    if fig.pg_backends is None and not _known(fig.pg_max_connections):
        not_checked.append("server side (enable pg_activity)")
    evidence = _lines(
        _used_line(fig),
        ("utilisation (busiest instance)", fmt.share(fig.utilisation)),
        _wait_line(fig),
        _use_line(fig),
        ("held idle (no statement)", fmt.share(fig.held_idle_share)),
        ("checkouts in window", fmt.count(fig.checkouts)),
        _requests_line(fig),
        ("not checked", ", ".join(not_checked)) if not_checked else None,
    )
    return Finding(
        kind=HEALTHY,
        severity=OK,
        title=f"Pool healthy: {fmt.share(fig.utilisation)} utilised, wait p99 "
        f"{fmt.seconds(fig.wait_p99)}, no timeouts or leaks",
        evidence=evidence,
    )


def _pool_findings(fig: Figures) -> list[Finding]:
    if _no_figures(fig):
        return [_insufficient(fig, "No pool figures in the window: nothing to judge")]
    sig = _signals(fig)
    findings: list[Finding] = []
    # Root cause first: a saturated or blocked worker and a server refusing connections look
    # like pool problems (holds grow, checkouts queue) and a bigger pool fixes neither.
    worker = _worker_saturated(fig, sig) or _loop_blocked(fig, sig)
    connect = _connect_failures(fig, sig)
    for finding in (connect, worker):  # requests failing outrank requests waiting
        if finding:
            findings.append(finding)
    if sig.leak:
        findings.append(_leaked(fig, sig))
    idle_tx = None
    if worker is None or worker.severity == INFO:
        # With a stalled worker, idle and statement times include waiting for the loop:
        # symptoms, not causes.
        idle_tx = _idle_in_tx(fig, sig)
        if idle_tx:
            findings.append(idle_tx)
        if sig.slow:
            findings.append(_slow(fig, sig))
    undersized = False
    explained = (
        (worker is not None and worker.severity != INFO)
        or connect
        or sig.leak
        or sig.slow
        or sig.held_idle
    )
    if sig.contention and not explained:
        if _known(fig.use_p95) and fig.use_p95 < LONG_HOLD_P95_S:
            findings.append(_undersized(fig, sig))
            undersized = True
        elif not idle_tx:
            # Contended, but the figures that separate "too small" from "held too long" are
            # missing (or the holds are long with unknown idle share): say so, do not guess.
            findings.append(
                _insufficient(
                    fig,
                    f"Pool contended ({'; '.join(sig.contention)}) but the cause is unclear: "
                    "hold time or held-idle figures missing",
                    severity=CRITICAL if _gt(fig.timeouts, 0) else WARNING,
                )
            )
    churn = _churn(fig, sig)
    if churn:
        findings.append(churn)
    capacity = _capacity(fig, undersized, sig)
    if capacity:
        findings.append(capacity)
    if not any(f.severity in (CRITICAL, WARNING) for f in findings):
        failing = _failing_requests(fig)
        if failing:
            findings.append(failing)
        elif sig.enough_traffic:
            findings.append(_healthy(fig))
        else:
            findings.append(
                _insufficient(
                    fig,
                    f"Only {fmt.count(fig.checkouts)} checkouts in the window (need "
                    f"{MIN_CHECKOUTS}): not enough traffic to judge"
                    if _known(fig.checkouts)
                    else "No checkouts recorded in the window: not enough traffic to judge",
                )
            )
    return _sorted(findings)


# --- configuration review --------------------------------------------------------------------
def review_config(
    fig: Figures,
    *,
    request_timeout_s: float | None = None,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> list[Finding]:
    """Check the pool configuration gauges against the request and idle timeouts.

    ``request_timeout_s`` None: not known, DEFAULT_REQUEST_TIMEOUT_S is assumed and a
    pool_timeout at or above it is only worth knowing (SQLAlchemy's default pool_timeout
    equals that assumption: warning on it would flag every app).
    """
    assumed = request_timeout_s is None
    if request_timeout_s is None:
        request_timeout_s = DEFAULT_REQUEST_TIMEOUT_S
    out: list[Finding] = []
    gauges = (fig.config_timeout, fig.config_recycle, fig.config_pre_ping, fig.expire_on_commit)
    if not any(_known(v) for v in gauges) and not _known(fig.max_connections):
        return [
            Finding(
                kind="config_unknown",
                severity=INFO,
                title="No configuration gauges exported: configuration not reviewed",
            )
        ]

    timeout = fig.config_timeout
    if _known(timeout):
        if timeout <= 0 or math.isinf(timeout):
            out.append(
                Finding(
                    "pool_timeout",
                    WARNING,
                    "pool_timeout disabled: a checkout can wait forever",
                    [
                        ("pool_timeout", fmt.seconds(timeout)),
                        ("request timeout", fmt.seconds(request_timeout_s)),
                    ],
                    next_steps=[f"set pool_timeout to about {fmt.seconds(request_timeout_s / 3)}"],
                )
            )
        elif timeout >= request_timeout_s:
            out.append(
                Finding(
                    "pool_timeout",
                    INFO if assumed else WARNING,
                    f"pool_timeout {fmt.seconds(timeout)} >= request timeout "
                    f"{fmt.seconds(request_timeout_s)}"
                    + (" (assumed: pass --request-timeout)" if assumed else "")
                    + ": the proxy kills the request before the pool gives up",
                    [
                        ("pool_timeout", fmt.seconds(timeout)),
                        ("request timeout", fmt.seconds(request_timeout_s)),
                    ],
                    next_steps=[
                        f"set pool_timeout to about {fmt.seconds(request_timeout_s / 3)} and "
                        "answer 503 on sqlalchemy.exc.TimeoutError (fail fast, shed load)"
                    ],
                )
            )
        elif timeout > POOL_TIMEOUT_REQUEST_SHARE * request_timeout_s:
            out.append(
                Finding(
                    "pool_timeout",
                    INFO,
                    f"pool_timeout {fmt.seconds(timeout)} uses most of the "
                    f"{fmt.seconds(request_timeout_s)} request budget",
                    [
                        ("pool_timeout", fmt.seconds(timeout)),
                        ("request timeout", fmt.seconds(request_timeout_s)),
                    ],
                    next_steps=[f"consider pool_timeout <= {fmt.seconds(request_timeout_s / 3)}"],
                )
            )

    pre_ping_off = _known(fig.config_pre_ping) and not fig.config_pre_ping
    recycle = fig.config_recycle
    if _known(recycle) and (recycle < 0 or recycle >= idle_timeout_s):
        what = "off" if recycle < 0 else f"{fmt.seconds(recycle)}"
        out.append(
            Finding(
                "pool_recycle",
                WARNING if pre_ping_off else INFO,
                f"pool_recycle {what}: connections can outlive a {fmt.seconds(idle_timeout_s)} "
                "proxy/server idle timeout"
                + (
                    " and pre-ping is off, so the request that gets one fails"
                    if pre_ping_off
                    else ""
                ),
                [
                    ("pool_recycle", what),
                    ("idle timeout assumed", fmt.seconds(idle_timeout_s)),
                    ("pool_pre_ping", fmt.flag(fig.config_pre_ping)),
                ],
                next_steps=[
                    f"set pool_recycle below the shortest idle timeout between app and "
                    f"database (e.g. {fmt.seconds(max(idle_timeout_s - 20, idle_timeout_s * 0.9))})"
                ],
            )
        )

    if pre_ping_off:
        broken_reasons = (semconv.CLOSE_REASON_INVALIDATED, semconv.CLOSE_REASON_ERROR)
        broken = sum(v for k, v in (fig.closes_by_reason or {}).items() if k in broken_reasons)
        out.append(
            Finding(
                "pool_pre_ping",
                WARNING if broken > 0 else INFO,
                "pool_pre_ping off: a connection that died while idle fails the request that "
                "checks it out"
                + (f" (connections invalidated at {fmt.rate(broken)})" if broken > 0 else ""),
                [("pool_pre_ping", "off")],
                next_steps=["set pool_pre_ping=True (one cheap round trip per checkout)"],
            )
        )

    if _known(fig.max_connections) and (fig.max_connections < 0 or math.isinf(fig.max_connections)):
        out.append(
            Finding(
                "max_overflow",
                WARNING,
                "max_overflow unlimited: the pool never limits how many connections it opens",
                [("pool limit", "unlimited")],
                next_steps=[
                    "set max_overflow explicitly so instances x (pool_size + max_overflow) fits "
                    "the server's max_connections"
                ],
            )
        )

    if _gt(fig.expire_on_commit, 0):
        out.append(
            Finding(
                "expire_on_commit",
                WARNING,
                "Async session factory with expire_on_commit=True: reading attributes after "
                "commit triggers lazy IO (MissingGreenlet) or extra queries",
                [("expire_on_commit", "True on an async session factory")],
                next_steps=["async_sessionmaker(engine, expire_on_commit=False)"],
            )
        )
    return _sorted(out)


def diagnose(
    fig: Figures,
    *,
    request_timeout_s: float | None = None,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> Diagnosis:
    """Judge one pool's figures: findings (most severe first) plus the configuration review."""
    return Diagnosis(
        pool=fig.pool,
        findings=_pool_findings(fig),
        config=review_config(
            fig, request_timeout_s=request_timeout_s, idle_timeout_s=idle_timeout_s
        ),
        figures=fig,
    )
