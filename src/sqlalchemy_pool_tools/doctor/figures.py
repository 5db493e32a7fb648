"""What the doctor knows about each pool over a window, and the two ways to read it.

Both readers evaluate the same list of *specs* (one per figure input: a metric, a label filter
and an aggregation over the window) and hand the resulting label-sets/values to one
``_assemble`` step, so a figure means exactly the same thing whether it came from Prometheus
(``from_prometheus``) or from sampling an app's ``/metrics`` endpoint (``from_metrics_endpoint``).

Conventions, shared by both readers:

* Pool state (used, idle, max, pending, saturation) is a per-process figure: it is reported for
  the *busiest instance* (highest mean utilisation; maxima over all instances), because one
  starved process is an incident even when the fleet average looks fine.
* Counts (checkouts, timeouts, closes, leaks) and latency distributions (wait/use/create time)
  are summed over all instances.
* "In the window" means last value minus the value at the window start; a series that did not
  exist at the start counts from zero. OTel cumulative counters only appear with their first
  event, so this keeps the first timeout/leak that ``increase()`` alone would drop.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from opentelemetry.instrumentation.sqlalchemy_pool.pg_activity import (
    SCOPE_APPLICATION,
    SCOPE_SERVER,
)
from sqlalchemy_pool_tools.doctor import _format as fmt
from sqlalchemy_pool_tools.errors import UserError

# --- Prometheus names, derived from the instrumentor's semconv (docs/CONTRACT.md) ------------
# The exporters turn an OTel name into a Prometheus one by replacing dots with underscores,
# appending the unit (`s` -> `_seconds`) and `_total` for counters; attributes become labels
# the same way.


def prometheus_name(otel_name: str, suffix: str = "") -> str:
    """The Prometheus name of an OTel metric or attribute: ``db.client.x`` -> ``db_client_x``."""
    return otel_name.replace(".", "_") + suffix


_SECONDS = "_seconds"
_TOTAL = "_total"
POOL_LABEL = prometheus_name(semconv.POOL_NAME)
STATE_LABEL = prometheus_name(semconv.CONNECTION_STATE)
CLOSE_REASON_LABEL = prometheus_name(semconv.CLOSE_REASON)
LEAK_KIND_LABEL = prometheus_name(semconv.LEAK_KIND)
PG_STATE_LABEL = prometheus_name(semconv.PG_STATE)
PG_SCOPE_LABEL = prometheus_name(semconv.PG_SCOPE)
ROUTE_LABEL = prometheus_name(semconv.HTTP_ROUTE)
METHOD_LABEL = "http_request_method"  # OTel HTTP semconv (FastAPI instrumentation)
CODE_FUNCTION_LABEL = prometheus_name(semconv.CODE_FUNCTION)
CODE_FILE_LABEL = prometheus_name(semconv.CODE_FILE)
CODE_LINE_LABEL = prometheus_name(semconv.CODE_LINE)
# Not a real label: the metrics-endpoint reader tags each sample with the URL it came from so
# several scraped processes stay apart, as ``job``/``instance`` do in Prometheus.
ENDPOINT_LABEL = "__endpoint__"

CONNECTION_COUNT = prometheus_name(semconv.CONNECTION_COUNT)
CONNECTION_MAX = prometheus_name(semconv.CONNECTION_MAX)
CONNECTION_IDLE_MAX = prometheus_name(semconv.CONNECTION_IDLE_MAX)
PENDING_REQUESTS = prometheus_name(semconv.CONNECTION_PENDING_REQUESTS)
TIMEOUTS = prometheus_name(semconv.CONNECTION_TIMEOUTS, _TOTAL)
WAIT_TIME = prometheus_name(semconv.CONNECTION_WAIT_TIME, _SECONDS)
CREATE_TIME = prometheus_name(semconv.CONNECTION_CREATE_TIME, _SECONDS)
USE_TIME = prometheus_name(semconv.CONNECTION_USE_TIME, _SECONDS)
HELD_IDLE_TIME = prometheus_name(semconv.CONNECTION_HELD_IDLE_TIME, _SECONDS)
CLOSES = prometheus_name(semconv.CONNECTION_CLOSES, _TOTAL)
LEAKS = prometheus_name(semconv.LEAKS, _TOTAL)
CONFIG_TIMEOUT = prometheus_name(semconv.CONFIG_TIMEOUT, _SECONDS)
CONFIG_RECYCLE = prometheus_name(semconv.CONFIG_RECYCLE, _SECONDS)
CONFIG_PRE_PING = prometheus_name(semconv.CONFIG_PRE_PING)
EXPIRE_ON_COMMIT = prometheus_name(semconv.SESSIONS_EXPIRE_ON_COMMIT)
PG_BACKENDS = prometheus_name(semconv.PG_BACKENDS)
PG_OLDEST_XACT_AGE = prometheus_name(semconv.PG_OLDEST_XACT_AGE, _SECONDS)
PG_OLDEST_QUERY_AGE = prometheus_name(semconv.PG_OLDEST_QUERY_AGE, _SECONDS)
PG_MAX_CONNECTIONS = prometheus_name(semconv.PG_MAX_CONNECTIONS)
PG_RESERVED_CONNECTIONS = prometheus_name(semconv.PG_RESERVED_CONNECTIONS)
HTTP_SERVER_DURATION = "http_server_request_duration_seconds"  # OTel HTTP semconv

# How many code sites / routes to name as culprits: enough to act on, short enough to read.
TOP_N = 5


@dataclass
class Figures:
    """One pool's figures over a window. ``None`` means unknown (metric absent or no data)."""

    pool: str
    source: str | None = None  # "prometheus" | "metrics-endpoint"
    window_s: float | None = None
    instances: float | None = None
    # Pool state per process (busiest instance; maxima over all instances).
    used_mean: float | None = None
    used_max: float | None = None
    idle_mean: float | None = None
    max_connections: float | None = None  # pool_size + max_overflow
    idle_max: float | None = None  # pool_size
    utilisation: float | None = None  # used_mean / max_connections
    saturated_share: float | None = None  # share of the window with used >= max
    pending_mean: float | None = None
    pending_max: float | None = None
    # Counts and distributions over all instances.
    checkouts: float | None = None
    checkout_rate: float | None = None  # per second
    timeouts: float | None = None
    wait_p50: float | None = None
    wait_p95: float | None = None
    wait_p99: float | None = None
    use_mean: float | None = None
    use_p95: float | None = None
    held_idle_share: float | None = None  # sum held_idle / sum use_time
    create_p95: float | None = None
    closes_by_reason: dict[str, float] | None = None  # per second
    leaks_by_kind: dict[str, float] | None = None  # count in the window
    # End of the window, summed over instances.
    used_last: float | None = None
    open_connections: float | None = None  # used + idle
    # used_last when the tail of the window saw no checkouts (and no requests), else None.
    used_after_traffic_stopped: float | None = None
    # Configuration gauges (worst instance).
    config_timeout: float | None = None
    config_recycle: float | None = None  # -1 = never
    config_pre_ping: float | None = None
    expire_on_commit: float | None = None
    # pg_stat_activity sampler.
    pg_backends: dict[str, float] | None = None  # by state; application scope when known
    pg_total_backends: float | None = None  # whole server
    pg_oldest_transaction_age: float | None = None
    pg_oldest_query_age: float | None = None
    pg_max_connections: float | None = None
    pg_reserved_connections: float | None = None
    max_connections_sum: float | None = None  # sum of max over instances (capacity check)
    top_code_sites: list[str] | None = None
    top_routes: list[str] | None = None
    # HTTP server (http_server_request_duration_seconds), when the app exports it.
    request_rate: float | None = None
    request_p95: float | None = None
    request_p99: float | None = None
    request_error_share: float | None = None  # share of requests answered 5xx
    # Around the pool (AROUND_POOL_SPECS): what only looks like a pool problem.
    busy_mean: float | None = None  # per checkout: use_time - held_idle_time (statements)
    held_idle_in_tx_share: float | None = None  # held-idle time inside a transaction / all
    slow_statement_sites: list[str] | None = None
    connect_errors: float | None = None  # failed connects in the window
    connect_errors_by_type: dict[str, float] | None = None  # error.type -> count
    too_many_clients: float | None = None  # of which the server refused for lack of slots
    loop_active_share: float | None = None  # busiest instance: loop running callbacks
    loop_blocked_share: float | None = None  # busiest instance: in iterations > threshold
    loop_lag_p99: float | None = None
    # busiest instance, per second of window: loop thread on a CPU + runnable waiting for one
    loop_cpu_demand: float | None = None
    loop_runqueue_share: float | None = None  # of which waiting for a CPU (host short of CPU)
    blocking_sites: list[str] | None = None
    cpu_cores: float | None = None  # busiest instance: CPU seconds per second of window

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- small pure helpers ----------------------------------------------------------------------
_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_window(text: str) -> float:
    """A Prometheus duration (``30s``, ``5m``, ``1h30m``) in seconds; UserError when invalid."""
    match = _DURATION_RE.match(text.strip()) if text else None
    if not match or not any(match.groups()):
        raise UserError(f"bad window {text!r}: use a Prometheus duration such as 30s, 5m or 1h")
    seconds = sum(
        int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if g
    )
    if seconds < 1:
        raise UserError(f"bad window {text!r}: must be at least 1s")
    return float(seconds)


def _promql_duration(seconds: float) -> str:
    if float(seconds).is_integer():
        return f"{seconds:.0f}s"
    return f"{max(1, round(seconds * 1000))}ms"


def check_url(url: str, what: str) -> str:
    """``url`` without a trailing slash, or UserError when it is not an http(s) URL."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"bad {what} URL {url!r}: expected http(s)://host:port[/path]")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric port
    except ValueError:
        raise UserError(f"bad {what} URL {url!r}: invalid port") from None
    return url.rstrip("/")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative ``{le: count}``; None when undefined.

    Same algorithm (linear interpolation inside the bucket, upper bound of the last finite
    bucket when the rank falls into +Inf) so both readers agree with PromQL.
    """
    if not buckets or math.inf not in buckets:
        return None
    items = sorted(buckets.items())
    bounds = [le for le, _ in items]
    counts: list[float] = []
    for _, c in items:  # repair non-monotonic buckets (skewed scrapes), as Prometheus does
        counts.append(max(c, counts[-1]) if counts else c)
    if len(counts) < 2 or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    b = next((i for i, c in enumerate(counts[:-1]) if c >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


def _parse_le(value: str) -> float:
    return math.inf if value in ("+Inf", "Inf", "inf") else float(value)


# --- specs: the inputs both readers evaluate -------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    key: str
    metric: str
    agg: str  # avg | max | last (over the window) | inc (in the window) | tail (inc, tail)
    match: tuple[tuple[str, str], ...] = ()


_USED = ((STATE_LABEL, semconv.STATE_USED),)
_IDLE = ((STATE_LABEL, semconv.STATE_IDLE),)
SPECS: tuple[_Spec, ...] = (
    _Spec("used_avg", CONNECTION_COUNT, "avg", _USED),
    _Spec("used_max", CONNECTION_COUNT, "max", _USED),
    _Spec("used_last", CONNECTION_COUNT, "last", _USED),
    _Spec("idle_avg", CONNECTION_COUNT, "avg", _IDLE),
    _Spec("idle_last", CONNECTION_COUNT, "last", _IDLE),
    _Spec("max", CONNECTION_MAX, "max"),
    _Spec("idle_max", CONNECTION_IDLE_MAX, "max"),
    _Spec("pending_avg", PENDING_REQUESTS, "avg"),
    _Spec("pending_max", PENDING_REQUESTS, "max"),
    _Spec("timeouts", TIMEOUTS, "inc"),
    _Spec("checkouts", WAIT_TIME + "_count", "inc"),
    _Spec("checkouts_tail", WAIT_TIME + "_count", "tail"),
    _Spec("wait_bucket", WAIT_TIME + "_bucket", "inc"),
    _Spec("use_count", USE_TIME + "_count", "inc"),
    _Spec("use_sum", USE_TIME + "_sum", "inc"),
    _Spec("use_bucket", USE_TIME + "_bucket", "inc"),
    _Spec("held_idle_sum", HELD_IDLE_TIME + "_sum", "inc"),
    _Spec("create_bucket", CREATE_TIME + "_bucket", "inc"),
    _Spec("closes", CLOSES, "inc"),
    _Spec("leaks", LEAKS, "inc"),
    _Spec("config_timeout", CONFIG_TIMEOUT, "last"),
    _Spec("config_recycle", CONFIG_RECYCLE, "last"),
    _Spec("config_pre_ping", CONFIG_PRE_PING, "last"),
    _Spec("expire_on_commit", EXPIRE_ON_COMMIT, "last"),
    _Spec("pg_backends", PG_BACKENDS, "avg"),
    _Spec("pg_xact_age", PG_OLDEST_XACT_AGE, "max"),
    _Spec("pg_query_age", PG_OLDEST_QUERY_AGE, "max"),
    _Spec("pg_max_connections", PG_MAX_CONNECTIONS, "last"),
    _Spec("pg_reserved", PG_RESERVED_CONNECTIONS, "last"),
    _Spec("http_count", HTTP_SERVER_DURATION + "_count", "inc"),
    _Spec("http_count_tail", HTTP_SERVER_DURATION + "_count", "tail"),
    _Spec("http_sum", HTTP_SERVER_DURATION + "_sum", "inc"),
    _Spec("http_bucket", HTTP_SERVER_DURATION + "_bucket", "inc"),
)

Labels = dict[str, str]
Rows = list[tuple[Labels, float]]


def _tail_for(window_s: float, resolution_s: float) -> float:
    """The end slice of the window used to ask "did traffic stop?": a fifth of the window,
    at least two samples (or a minute in Prometheus), never more than the window."""
    return min(window_s, max(window_s / 5, resolution_s))


# --- assembling Figures from evaluated specs -------------------------------------------------
def _instance(labels: Labels) -> tuple[str | None, str | None, str | None]:
    return labels.get(ENDPOINT_LABEL), labels.get("job"), labels.get("instance")


def _per_instance(rows: Rows) -> dict[tuple[str | None, ...], float]:
    out: dict[tuple[str | None, ...], float] = defaultdict(float)
    for labels, value in rows:
        out[_instance(labels)] += value
    return dict(out)


def _total(rows: Rows) -> float | None:
    return sum(v for _, v in rows) if rows else None


def _grouped(rows: Rows, *names: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in rows:
        out[tuple(labels.get(n, "") for n in names)] += value
    return dict(out)


def _buckets(rows: Rows) -> dict[float, float]:
    return {_parse_le(k[0]): v for k, v in _grouped(rows, "le").items() if k[0]}


def _max(values: Iterable[float]) -> float | None:
    values = list(values)
    return max(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def _code_site(labels: Labels) -> str | None:
    site = fmt.code_site(
        labels.get(CODE_FUNCTION_LABEL), labels.get(CODE_FILE_LABEL), labels.get(CODE_LINE_LABEL)
    )
    route = labels.get(ROUTE_LABEL)
    if route:
        site = f"{site} [{route}]" if site else f"route {route}"
    return site


def _top_sites(rows: Rows, unit: Callable[[float], str]) -> list[str] | None:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in rows:
        site = _code_site(labels)
        if site and value > 0:
            totals[site] += value
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_N]
    return [f"{site} - {unit(value)}" for site, value in ranked] or None


def _top_routes(view: Callable[[str], Rows]) -> list[str] | None:
    keys = (METHOD_LABEL, ROUTE_LABEL)
    time_by_route = _grouped(view("http_sum"), *keys)
    count_by_route = _grouped(view("http_count"), *keys)
    buckets: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in view("http_bucket"):
        if "le" in labels:
            route = tuple(labels.get(k, "") for k in keys)
            buckets[route][_parse_le(labels["le"])] += value
    total_time = sum(time_by_route.values())
    ranked = sorted(
        ((k, v) for k, v in time_by_route.items() if v > 0 and k[1]), key=lambda kv: -kv[1]
    )
    out = []
    for (method, route), spent in ranked[:TOP_N]:
        p99 = histogram_quantile(0.99, dict(buckets[(method, route)]))
        name = f"{method} {route}".strip()
        out.append(
            f"{name} - {fmt.count(count_by_route.get((method, route)))} req, "
            f"p99 {fmt.seconds(p99)}, {fmt.share(spent / total_time)} of request time"
        )
    return out or None


def _assemble(
    vectors: dict[str, Rows],
    saturation: Rows,
    window_s: float,
    source: str,
    pool: str | None,
    where: str,
) -> dict[str, Figures]:
    """Turn evaluated specs into Figures per pool (shared by both readers)."""
    pools = sorted(
        {
            labels[POOL_LABEL]
            for rows in vectors.values()
            for labels, _ in rows
            if POOL_LABEL in labels
        }
    )
    if not pools:
        raise UserError(
            f"no SQLAlchemy pool metrics ({CONNECTION_COUNT}, ...) found at {where}; "
            "is the instrumentor enabled and exporting?"
        )
    if pool is not None:
        if pool not in pools:
            raise UserError(f"pool {pool!r} not found at {where}; pools seen: {', '.join(pools)}")
        pools = [pool]
    return {name: _pool_figures(name, vectors, saturation, window_s, source) for name in pools}


def _pool_figures(
    pool: str, vectors: dict[str, Rows], saturation: Rows, window_s: float, source: str
) -> Figures:
    instances = {
        _instance(labels)
        for rows in vectors.values()
        for labels, _ in rows
        if labels.get(POOL_LABEL) == pool
    }

    def view(key: str) -> Rows:
        # This pool's series, plus pool-less series (HTTP, pg sampler, session factories)
        # exported by the same processes.
        return [
            (labels, value)
            for labels, value in vectors.get(key, [])
            if labels.get(POOL_LABEL) == pool
            or (POOL_LABEL not in labels and _instance(labels) in instances)
        ]

    fig = Figures(pool=pool, source=source, window_s=window_s)

    # -- pool state: the busiest instance
    used_avg = _per_instance(view("used_avg"))
    max_by_inst = _per_instance(view("max"))
    idle_avg = _per_instance(view("idle_avg"))
    util = {i: u / max_by_inst[i] for i, u in used_avg.items() if max_by_inst.get(i, 0) > 0}
    if util:
        busiest = max(util, key=lambda i: util[i])
        fig.utilisation = util[busiest]
    elif used_avg:
        busiest = max(used_avg, key=lambda i: used_avg[i])
    else:
        busiest = None
    if busiest is not None:
        fig.used_mean = used_avg.get(busiest)
        fig.idle_mean = idle_avg.get(busiest)
    fig.used_max = _max(_per_instance(view("used_max")).values())
    fig.max_connections = _max(max_by_inst.values())
    fig.idle_max = _max(_per_instance(view("idle_max")).values())
    fig.pending_mean = _max(_per_instance(view("pending_avg")).values())
    fig.pending_max = _max(_per_instance(view("pending_max")).values())
    fig.saturated_share = _max(v for labels, v in saturation if labels.get(POOL_LABEL) == pool)
    known = max_by_inst or used_avg
    fig.instances = float(len(known)) if known else None
    fig.max_connections_sum = sum(max_by_inst.values()) if max_by_inst else None

    # -- counts and distributions: all instances
    fig.checkouts = _total(view("checkouts"))
    if fig.checkouts is None:  # no wait_time histogram: checkins are the next best count
        fig.checkouts = _total(view("use_count"))
    fig.checkout_rate = _ratio(fig.checkouts, window_s)
    fig.timeouts = _total(view("timeouts"))
    if fig.timeouts is None and fig.checkouts is not None:
        fig.timeouts = 0.0  # the OTel counter is born with its first timeout
    wait = _buckets(view("wait_bucket"))
    fig.wait_p50 = histogram_quantile(0.50, wait)
    fig.wait_p95 = histogram_quantile(0.95, wait)
    fig.wait_p99 = histogram_quantile(0.99, wait)
    use_sum = _total(view("use_sum"))
    fig.use_mean = _ratio(use_sum, _total(view("use_count")))
    fig.use_p95 = histogram_quantile(0.95, _buckets(view("use_bucket")))
    fig.held_idle_share = _ratio(_total(view("held_idle_sum")), use_sum)
    fig.create_p95 = histogram_quantile(0.95, _buckets(view("create_bucket")))
    closes = view("closes")
    if closes:
        fig.closes_by_reason = {
            k[0] or "unknown": v / window_s for k, v in _grouped(closes, CLOSE_REASON_LABEL).items()
        }
    leaks = view("leaks")
    if leaks:
        fig.leaks_by_kind = {
            k[0] or "unknown": v for k, v in _grouped(leaks, LEAK_KIND_LABEL).items()
        }

    # -- end of the window
    fig.used_last = _total(view("used_last"))
    idle_last = _total(view("idle_last"))
    if fig.used_last is not None and idle_last is not None:
        fig.open_connections = fig.used_last + idle_last
    tail_checkouts = _total(view("checkouts_tail"))
    tail_requests = _total(view("http_count_tail"))
    if fig.used_last is not None and tail_checkouts == 0 and not tail_requests:
        fig.used_after_traffic_stopped = fig.used_last

    # -- configuration: the worst value any instance reports
    timeouts_cfg = [v for _, v in view("config_timeout")]
    fig.config_timeout = _max(timeouts_cfg)
    recycle = [v for _, v in view("config_recycle")]
    if recycle:
        fig.config_recycle = -1.0 if min(recycle) < 0 else max(recycle)
    pre_ping = [v for _, v in view("config_pre_ping")]
    fig.config_pre_ping = min(pre_ping) if pre_ping else None
    fig.expire_on_commit = _max(v for _, v in view("expire_on_commit"))

    # -- pg_stat_activity: every instance samples the same server, so take maxima, not sums
    by_scope_state: dict[tuple[str, str], float] = {}
    for labels, value in view("pg_backends"):
        key = (labels.get(PG_SCOPE_LABEL, SCOPE_SERVER), labels.get(PG_STATE_LABEL, "unknown"))
        by_scope_state.setdefault(key, 0.0)
        by_scope_state[key] = max(by_scope_state[key], value)
    app = {s: v for (scope, s), v in by_scope_state.items() if scope == SCOPE_APPLICATION}
    server = {s: v for (scope, s), v in by_scope_state.items() if scope != SCOPE_APPLICATION}
    fig.pg_backends = app or server or None
    fig.pg_total_backends = sum(server.values()) if server else None

    def age(key: str) -> float | None:
        rows = view(key)
        app_rows = [v for labels, v in rows if labels.get(PG_SCOPE_LABEL) == SCOPE_APPLICATION]
        return _max(app_rows) if app_rows else _max(v for _, v in rows)

    fig.pg_oldest_transaction_age = age("pg_xact_age")
    fig.pg_oldest_query_age = age("pg_query_age")
    fig.pg_max_connections = _max(v for _, v in view("pg_max_connections"))
    fig.pg_reserved_connections = _max(v for _, v in view("pg_reserved"))

    # -- culprits and HTTP
    # Culprits: leak sites first, else connection hold time by route (use_time carries
    # http.route).
    fig.top_code_sites = _top_sites(leaks, lambda n: f"{fmt.count(n)} leaks") or _top_sites(
        view("use_sum"), lambda s: f"{fmt.seconds(s)} connection hold time"
    )
    fig.top_routes = _top_routes(view)
    http_count = _total(view("http_count"))
    fig.request_rate = _ratio(http_count, window_s)
    http_buckets = _buckets(view("http_bucket"))
    fig.request_p95 = histogram_quantile(0.95, http_buckets)
    fig.request_p99 = histogram_quantile(0.99, http_buckets)
    _around_pool(fig, view, window_s)
    return fig


# --- around the pool: event loop, CPU, connect errors, statement time --------------------------
# Kept in one section (own specs, one assembling function) so the pool figures above stay as
# they are. Names derive from the instrumentor's semconv like the ones above.
HELD_IDLE_IN_TX_LABEL = prometheus_name(semconv.HELD_IDLE_IN_TRANSACTION)
ERROR_TYPE_LABEL = prometheus_name(semconv.ERROR_TYPE)
STATUS_CODE_LABEL = prometheus_name(semconv.DB_RESPONSE_STATUS_CODE)
LOOP_STATE_LABEL = prometheus_name(semconv.EVENT_LOOP_STATE)
LOOP_THREAD_STATE_LABEL = prometheus_name(semconv.EVENT_LOOP_THREAD_STATE)
LOOP_THREAD_TIME = prometheus_name(semconv.EVENT_LOOP_THREAD_TIME, "_seconds_total")
HTTP_STATUS_LABEL = "http_response_status_code"
CONNECT_ERRORS = prometheus_name(semconv.CONNECTION_CONNECT_ERRORS, _TOTAL)
SLOW_STATEMENT_TIME = prometheus_name(semconv.SLOW_STATEMENT_TIME, "_seconds_total")
LOOP_LAG = prometheus_name(semconv.EVENT_LOOP_LAG, "_seconds")
LOOP_TIME = prometheus_name(semconv.EVENT_LOOP_TIME, "_seconds_total")
LOOP_BLOCKED = prometheus_name(semconv.EVENT_LOOP_BLOCKED_TIME, "_seconds_total")
# Ours first; the semantic-convention name of opentelemetry-instrumentation-system-metrics and
# prometheus_client's default process collector are read when ours is absent.
CPU_TIME_NAMES = (
    prometheus_name(semconv.PROCESS_CPU_TIME, "_seconds_total"),
    "process_cpu_time_seconds_total",
    "process_cpu_seconds_total",
)
# PostgreSQL's SQLSTATE for "too many clients already" and "remaining connection slots are
# reserved": the server has no slot left for this connection.
TOO_MANY_CONNECTIONS_SQLSTATE = "53300"

AROUND_POOL_SPECS: tuple[_Spec, ...] = (
    _Spec("held_idle_tx_sum", HELD_IDLE_TIME + "_sum", "inc"),
    _Spec("http_count_by_status", HTTP_SERVER_DURATION + "_count", "inc"),
    _Spec("connect_errors", CONNECT_ERRORS, "inc"),
    _Spec("slow_statements", SLOW_STATEMENT_TIME, "inc"),
    _Spec("loop_lag_bucket", LOOP_LAG + "_bucket", "inc"),
    _Spec("loop_time", LOOP_TIME, "inc"),
    _Spec("loop_blocked", LOOP_BLOCKED, "inc"),
    _Spec("loop_thread", LOOP_THREAD_TIME, "inc"),
    *(_Spec(f"cpu_{i}", name, "inc") for i, name in enumerate(CPU_TIME_NAMES)),
)
SPECS += AROUND_POOL_SPECS


def _too_many_clients(labels: Labels) -> bool:
    return (
        labels.get(STATUS_CODE_LABEL) == TOO_MANY_CONNECTIONS_SQLSTATE
        or "toomanyconnections" in labels.get(ERROR_TYPE_LABEL, "").lower()
    )


def _busiest(per_instance: dict[tuple[str | None, ...], float]) -> float | None:
    return max(per_instance.values()) if per_instance else None


def _sites_by_function(rows: Rows, unit: Callable[[float], str]) -> list[str] | None:
    """Code sites ranked by value, one per function (a CPU-bound function is sampled on many
    lines: they are one culprit, shown with its heaviest line)."""
    by_function: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in rows:
        site = _code_site(labels)
        if site and value > 0:
            key = (labels.get(CODE_FUNCTION_LABEL, ""), labels.get(CODE_FILE_LABEL, site))
            by_function[key][site] += value
    ranked = sorted(by_function.values(), key=lambda sites: -sum(sites.values()))[:TOP_N]
    return [
        f"{max(sites, key=lambda s: sites[s])} - {unit(sum(sites.values()))}" for sites in ranked
    ] or None


def _around_pool(fig: Figures, view: Callable[[str], Rows], window_s: float) -> None:
    """Fill the around-the-pool figures of ``fig`` (see AROUND_POOL_SPECS)."""
    use_sum = _total(view("use_sum"))
    use_count = _total(view("use_count"))
    held_idle = _total(view("held_idle_sum"))
    if use_sum is not None and use_count and held_idle is not None:
        fig.busy_mean = max(0.0, use_sum - held_idle) / use_count
    in_tx = _grouped(view("held_idle_tx_sum"), HELD_IDLE_IN_TX_LABEL)
    if any(k[0] for k in in_tx) and held_idle:
        fig.held_idle_in_tx_share = in_tx.get(("true",), 0.0) / held_idle
    fig.slow_statement_sites = _sites_by_function(
        view("slow_statements"), lambda s: f"{fmt.seconds(s)} in slow statements"
    )

    by_status = _grouped(view("http_count_by_status"), HTTP_STATUS_LABEL)
    requests = sum(by_status.values())
    if requests and any(k[0] for k in by_status):
        errors = sum(v for k, v in by_status.items() if k[0].startswith("5"))
        fig.request_error_share = errors / requests

    errors = view("connect_errors")
    if errors:
        fig.connect_errors = _total(errors)
        fig.connect_errors_by_type = {
            k[0] or "unknown": v for k, v in _grouped(errors, ERROR_TYPE_LABEL).items() if v
        }
        fig.too_many_clients = sum(v for labels, v in errors if _too_many_clients(labels))
    elif fig.checkouts is not None and (view("loop_time") or view("cpu_0")):
        fig.connect_errors = 0.0  # this instrumentor version counts them: none happened

    loop_time = view("loop_time")
    active = _per_instance([(lb, v) for lb, v in loop_time if lb.get(LOOP_STATE_LABEL) == "active"])
    total = _per_instance(loop_time)
    fig.loop_active_share = _busiest({i: a / total[i] for i, a in active.items() if total.get(i)})
    blocked = view("loop_blocked")
    if blocked or loop_time:
        fig.loop_blocked_share = (_busiest(_per_instance(blocked)) or 0.0) / window_s
    fig.loop_lag_p99 = histogram_quantile(0.99, _buckets(view("loop_lag_bucket")))
    thread = view("loop_thread")
    demand = _per_instance(thread)
    if demand:
        busiest = max(demand, key=lambda i: demand[i])
        fig.loop_cpu_demand = demand[busiest] / window_s
        runqueue = _per_instance(
            [(lb, v) for lb, v in thread if lb.get(LOOP_THREAD_STATE_LABEL) == "runqueue"]
        )
        fig.loop_runqueue_share = runqueue.get(busiest, 0.0) / window_s
    fig.blocking_sites = _sites_by_function(
        blocked, lambda s: f"{fmt.share(s / window_s)} of the time blocked"
    )
    for i in range(len(CPU_TIME_NAMES)):
        cpu = _per_instance(view(f"cpu_{i}"))
        if cpu:
            fig.cpu_cores = _busiest(cpu) / window_s
            break


# --- reader 1: Prometheus HTTP API -----------------------------------------------------------
def _matchers(match: Sequence[tuple[str, str]], selector: str) -> str:
    parts = [f'{name}="{value}"' for name, value in match]
    if selector:
        parts.append(selector)
    return "{" + ",".join(parts) + "}" if parts else ""


def _increase(series: str, window: str) -> str:
    """Increase in the window: last minus value at the start (0 for series born in the window);
    ``increase()`` only where the counter reset (difference negative)."""
    return (
        f"(({series} - ({series} offset {window} or {series} * 0)) >= 0"
        f" or increase({series}[{window}]))"
    )


def _promql(spec: _Spec, selector: str, window: str, tail: str) -> str:
    series = spec.metric + _matchers(spec.match, selector)
    if spec.agg == "avg":
        return f"avg_over_time({series}[{window}])"
    if spec.agg == "max":
        return f"max_over_time({series}[{window}])"
    if spec.agg == "last":
        return f"last_over_time({series}[{window}])"
    return _increase(series, tail if spec.agg == "tail" else window)


def _saturation_promql(selector: str, window: str, step: str) -> str:
    by = f"sum by ({POOL_LABEL}, job, instance)"
    used = f"{by} ({CONNECTION_COUNT}{_matchers(_USED, selector)})"
    # `> 0` drops pools without a limit (max_overflow=-1 reports no positive max).
    limit = f"{by} ({CONNECTION_MAX}{_matchers((), selector)} > 0)"
    return f"avg_over_time(({used} >= bool {limit})[{window}:{step}])"


class _Prometheus:
    def __init__(self, base: str, client: httpx.Client, at: float | None) -> None:
        self.base = base
        self.client = client
        self.at = at

    def query(self, promql: str) -> Rows:
        params = {"query": promql}
        if self.at is not None:
            params["time"] = f"{self.at:.3f}"
        try:
            resp = self.client.get(f"{self.base}/api/v1/query", params=params)
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach Prometheus at {self.base}: {_reason(exc)}") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise UserError(
                f"{self.base} does not look like a Prometheus server "
                f"(HTTP {resp.status_code} from /api/v1/query)"
            )
        if body["status"] != "success":
            error = str(body.get("error", "unknown error")).splitlines()[0]
            raise UserError(f"Prometheus at {self.base} rejected a query: {error}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise UserError(f"unexpected {data.get('resultType')!r} result from {self.base}")
        rows: Rows = []
        for item in data.get("result", []):
            value = float(item["value"][1])
            if not math.isnan(value):
                rows.append((dict(item.get("metric", {})), value))
        return rows


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


def _clean_selector(selector: str | None) -> str:
    selector = (selector or "").strip()
    if selector.startswith("{") and selector.endswith("}"):
        selector = selector[1:-1].strip()
    if "{" in selector or "}" in selector:
        raise UserError(f'bad selector {selector!r}: give label matchers such as job="api"')
    return selector


def from_prometheus(
    url: str,
    pool: str | None = None,
    window: str = "5m",
    selector: str | None = None,
    *,
    at: float | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Figures]:
    """Read every pool's figures over ``window`` from a Prometheus server's HTTP API.

    ``selector``: extra label matchers (``job="api"``) added to every query; ``at``: evaluate
    at this unix time instead of now (post-mortems). Raises UserError when Prometheus is
    unreachable, answers badly, or holds no pool metrics (or not ``pool``).
    """
    base = check_url(url, "Prometheus")
    window_s = parse_window(window)
    sel = _clean_selector(selector)
    win = _promql_duration(window_s)
    tail = _promql_duration(_tail_for(window_s, 60.0))
    # Sample the saturation condition 60 times per window: a time-weighted share at any window.
    step = _promql_duration(round(window_s / 60, 3))
    with httpx.Client(timeout=timeout_s) as client:
        prom = _Prometheus(base, client, at)
        vectors = {spec.key: prom.query(_promql(spec, sel, win, tail)) for spec in SPECS}
        saturation = prom.query(_saturation_promql(sel, win, step))
    return _assemble(vectors, saturation, window_s, "prometheus", pool, f"Prometheus {base}")


# --- reader 2: sampling an app's /metrics endpoint --------------------------------------------
_SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
Snapshot = dict[_SeriesKey, float]


def parse_exposition(text: str, endpoint: str | None = None) -> Snapshot:
    """Flatten a Prometheus text exposition into ``{(sample name, labels): value}``."""
    out: Snapshot = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = dict(sample.labels)
                if endpoint is not None:
                    labels[ENDPOINT_LABEL] = endpoint
                out[(sample.name, tuple(sorted(labels.items())))] = float(sample.value)
    except (ValueError, TypeError, IndexError) as exc:
        where = f" from {endpoint}" if endpoint else ""
        raise UserError(f"not a Prometheus text exposition{where}: {_reason(exc)}") from None
    return out


def _series(
    snapshots: Sequence[Snapshot], by_name: dict[str, set[_SeriesKey]], spec: _Spec
) -> dict[_SeriesKey, list[float | None]]:
    """Per series matching ``spec``: its value in each snapshot (None where absent)."""
    keys = [
        key for key in by_name.get(spec.metric, ()) if all((n, v) in key[1] for n, v in spec.match)
    ]
    return {key: [snap.get(key) for snap in snapshots] for key in keys}


def _increase_of(values: Sequence[float | None], baseline: float = 0.0) -> float:
    """Sum of the rises after ``baseline`` (0 for a series born in the window: OTel counters
    appear with their first event); a drop is a counter reset, counted from 0."""
    total, prev = 0.0, baseline
    for value in values:
        if value is None:
            continue
        total += value - prev if value >= prev else value
        prev = value
    return total


def evaluate_snapshots(
    times: Sequence[float], snapshots: Sequence[Snapshot], tail_s: float
) -> tuple[dict[str, Rows], Rows]:
    """Evaluate SPECS (and the saturation share) on a series of scrapes, like the PromQL."""
    tail_start = max((i for i, t in enumerate(times) if t <= times[-1] - tail_s + 1e-9), default=0)
    by_name: dict[str, set[_SeriesKey]] = defaultdict(set)  # index once: big expositions
    for snap in snapshots:
        for key in snap:
            by_name[key[0]].add(key)
    vectors: dict[str, Rows] = {}
    for spec in SPECS:
        rows: Rows = []
        for (_, label_items), values in _series(snapshots, by_name, spec).items():
            present = [v for v in values if v is not None]
            if not present:
                continue
            labels = dict(label_items)
            if spec.agg == "avg":
                rows.append((labels, sum(present) / len(present)))
            elif spec.agg == "max":
                rows.append((labels, max(present)))
            elif spec.agg == "last":
                rows.append((labels, present[-1]))
            else:  # inc / tail: from the last sample at or before the start
                start = 0 if spec.agg == "inc" else tail_start
                baseline = next((v for v in reversed(values[: start + 1]) if v is not None), 0.0)
                rows.append((labels, _increase_of(values[start + 1 :], baseline)))
        vectors[spec.key] = rows

    # Saturation: share of scrapes in which a process had all its connections checked out.
    hits: dict[tuple[str | None, ...], list[bool]] = defaultdict(list)
    for snap in snapshots:
        used: dict[tuple[str | None, ...], float] = defaultdict(float)
        limit: dict[tuple[str | None, ...], float] = defaultdict(float)
        for (name, label_items), value in snap.items():
            labels = dict(label_items)
            if POOL_LABEL not in labels:
                continue
            key = (labels[POOL_LABEL], *_instance(labels))
            if name == CONNECTION_COUNT and labels.get(STATE_LABEL) == semconv.STATE_USED:
                used[key] += value
            elif name == CONNECTION_MAX and value > 0:
                limit[key] += value
        for key, lim in limit.items():
            if key in used:
                hits[key].append(used[key] >= lim)
    saturation: Rows = []
    for (pool, endpoint, job, instance), flags in hits.items():
        labels = {POOL_LABEL: pool or ""}
        for name, value in ((ENDPOINT_LABEL, endpoint), ("job", job), ("instance", instance)):
            if value is not None:
                labels[name] = value
        saturation.append((labels, sum(flags) / len(flags)))
    return vectors, saturation


def _scrape(client: httpx.Client, url: str) -> Snapshot:
    try:
        resp = client.get(url, headers={"Accept": "text/plain;version=0.0.4"})
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach metrics endpoint {url}: {_reason(exc)}") from None
    if resp.status_code != 200:
        raise UserError(f"metrics endpoint {url} answered HTTP {resp.status_code}")
    return parse_exposition(resp.text, endpoint=url)


class MetricsSampler:
    """Scrapes one or more Prometheus text endpoints into a window of snapshots.

    The doctor drives it on a fixed schedule (:func:`from_metrics_endpoint`); the load test
    and the demo run it on a background thread for as long as the load lasts
    (:meth:`start` / :meth:`stop`). Either way :meth:`figures` evaluates the same SPECS as
    the Prometheus reader, so one figure means one thing in every tool. Every scrape costs
    the app CPU: one sampler per window, once per interval.
    """

    def __init__(
        self, url: str | Sequence[str], interval_s: float = 1.0, *, timeout_s: float = 5.0
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise UserError("no metrics endpoint URL given")
        if not interval_s > 0:
            raise UserError("the scrape interval must be positive")
        self.urls = [check_url(u, "metrics endpoint") for u in urls]
        self.interval_s = interval_s
        self.times: list[float] = []
        self.snapshots: list[Snapshot] = []
        self.missed = 0  # background scrapes that failed (a load spike); the window goes on
        self._client = httpx.Client(timeout=timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> None:
        """One scrape of every endpoint; UserError when one fails."""
        snap: Snapshot = {}
        for u in self.urls:
            snap.update(_scrape(self._client, u))
        self.times.append(time.monotonic())
        self.snapshots.append(snap)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.take()
            except UserError:
                self.missed += 1

    def start(self) -> None:
        """The baseline scrape (an unreachable endpoint is a UserError here), then one
        scrape per interval on a background thread until :meth:`stop`."""
        self.take()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take the closing scrape (counted as missed if it fails)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.take()
        except UserError:
            self.missed += 1
        self.close()

    def close(self) -> None:
        self._client.close()

    def figures(self, pool: str | None = None) -> dict[str, Figures]:
        """Every pool's figures over the sampled window (UserError: fewer than two scrapes,
        or no pool metrics / not ``pool``)."""
        if len(self.snapshots) < 2:
            raise UserError(f"fewer than two scrapes of {', '.join(self.urls)}")
        window_s = self.times[-1] - self.times[0]
        step = window_s / (len(self.times) - 1)
        vectors, saturation = evaluate_snapshots(
            self.times, self.snapshots, _tail_for(window_s, 2 * step)
        )
        where = ", ".join(self.urls)
        return _assemble(vectors, saturation, window_s, "metrics-endpoint", pool, where)


def from_metrics_endpoint(
    url: str | Sequence[str],
    duration_s: float = 20.0,
    interval_s: float = 1.0,
    *,
    pool: str | None = None,
    timeout_s: float = 5.0,
) -> dict[str, Figures]:
    """Scrape one or more Prometheus text endpoints every ``interval_s`` for ``duration_s``
    (at least two scrapes) and compute every pool's figures from the samples and deltas.

    Several URLs are treated as several instances of the same app (capacity check).
    Raises UserError when an endpoint is unreachable, is not an exposition, or has no pool
    metrics (or not ``pool``).
    """
    if not duration_s > 0 or not interval_s > 0:
        raise UserError("duration and interval must be positive")
    sampler = MetricsSampler(url, interval_s, timeout_s=timeout_s)
    ticks = max(1, math.floor(duration_s / interval_s + 1e-9))
    step = duration_s / ticks
    try:
        start = time.monotonic()
        for tick in range(ticks + 1):
            delay = start + tick * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sampler.take()
    finally:
        sampler.close()
    return sampler.figures(pool)
