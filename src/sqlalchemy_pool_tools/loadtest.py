"""``sqlalchemy-pool loadtest``: bounded HTTP load against a local app, with pool figures.

The load comes from ``wrk`` when it is installed (a C load generator does not steal the CPU
the app under test needs), else from a small built-in asyncio/httpx generator. While the
load runs, the app's Prometheus endpoint (``--metrics-url``) is sampled so the report puts
client-side figures (throughput, latency percentiles, errors) next to pool figures over the
same window (checked-out and pending connections, wait p99, timeouts, held-idle share, leaks,
pg_stat_activity states).

The core is plain functions (:func:`run_load`, :func:`compare`) so the demo reuses them.
Load only goes to loopback addresses unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy_pool_tools.errors import UserError

# Hard bounds: a load test is a measuring tool, not a stress weapon.
MAX_DURATION_S = 600.0
MAX_CONNECTIONS = 1000
LUA_SCRIPT = Path(__file__).with_name("loadtest.lua")
RESULT_VERSION = 1

# Prometheus names (see docs/CONTRACT.md) and their label keys.
POOL_LABEL = "db_client_connection_pool_name"
M_COUNT = "db_client_connection_count"
M_MAX = "db_client_connection_max"
M_PENDING = "db_client_connection_pending_requests"
M_TIMEOUTS = "db_client_connection_timeouts_total"
M_WAIT = "db_client_connection_wait_time_seconds"
M_USE = "db_client_connection_use_time_seconds"
M_HELD_IDLE = "sqlalchemy_pool_connection_held_idle_time_seconds"
M_LEAKS = "sqlalchemy_pool_leaks_total"
M_PG_BACKENDS = "sqlalchemy_pool_pg_backends"
M_PG_OLDEST_XACT = "sqlalchemy_pool_pg_oldest_transaction_age_seconds"
UNNAMED_POOL = "(unnamed)"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class PoolWindow:
    """Pool figures over the load window, from the app's metrics endpoint."""

    pool: str
    samples: int = 0
    size_max: float | None = None  # db.client.connection.max (pool_size + max_overflow)
    max_used: float = 0.0
    mean_used: float = 0.0
    max_pending: float = 0.0
    mean_pending: float = 0.0
    timeouts: float = 0.0  # delta over the window
    checkouts: float = 0.0  # wait_time histogram count delta
    wait_p99_ms: float | None = None
    held_idle_share: float | None = None  # held-idle seconds / checked-out seconds
    leaks: dict[str, float] = field(default_factory=dict)  # kind -> delta
    pg_states_max: dict[str, float] = field(default_factory=dict)  # application scope
    pg_oldest_xact_s: float | None = None  # max over the window, application scope


@dataclass
class LoadResult:
    """One load run: what the client saw, plus the pool figures over the same window."""

    url: str
    paths: list[str]
    tool: str  # "wrk" | "builtin"
    connections: int
    duration_s: float  # measured
    rate: float | None = None
    label: str | None = None
    started_at: str = ""
    requests: int = 0
    rps: float = 0.0
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50 p95 p99 max mean
    pools: dict[str, PoolWindow] = field(default_factory=dict)
    metrics_url: str | None = None

    @property
    def errors(self) -> int:
        """Every request that did not end in a 2xx response."""
        return (
            self.non_2xx
            + self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeouts
        )

    @property
    def main_pool(self) -> PoolWindow | None:
        """The busiest pool: what a one-pool app's report is about."""
        if not self.pools:
            return None
        return max(self.pools.values(), key=lambda w: (w.max_used, w.checkouts))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["errors"] = self.errors
        data["version"] = RESULT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        pool_names = {f.name for f in dataclasses.fields(PoolWindow)}
        kwargs["pools"] = {
            name: PoolWindow(**{k: v for k, v in window.items() if k in pool_names})
            for name, window in (data.get("pools") or {}).items()
        }
        return cls(**kwargs)


def save(result: LoadResult, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def load(path: str | Path) -> LoadResult:
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "requests" not in data:
            raise ValueError("not a loadtest result")
        return LoadResult.from_dict(data)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a saved loadtest result ({exc})") from None


# --------------------------------------------------------------------------------------------
# Target checks
# --------------------------------------------------------------------------------------------
def check_url(url: str, *, allow_remote: bool = False, what: str = "target") -> None:
    """Refuse anything but http(s) to a loopback address (unless ``allow_remote``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{what} must be an http:// or https:// URL, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"{what} URL has an invalid port: {url!r}") from None
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve {parts.hostname!r}: {exc.strerror}") from None
    addresses = sorted({info[4][0] for info in infos})
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UserError(
            f"refusing to load-test {parts.hostname} ({', '.join(addresses)}): not a loopback "
            "address; pass --allow-remote only for a server you own"
        )


def split_target(url: str, paths: Sequence[str] | None) -> tuple[str, list[str]]:
    """``(base URL, request paths)``: the URL's own path is used when no ``paths`` are given."""
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    if paths:
        return base, [p if p.startswith("/") else "/" + p for p in paths]
    own = parts.path or "/"
    if parts.query:
        own += "?" + parts.query
    return base, [own]


def _probe(url: str, timeout: float = 5.0) -> None:
    """One GET so an unreachable app is a clear error instead of a run full of failures."""
    import httpx

    try:
        httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise UserError(f"cannot reach {url}: {reason}") from None


# --------------------------------------------------------------------------------------------
# Metrics sampling (Prometheus text from the app under test)
# --------------------------------------------------------------------------------------------
Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Flat ``(sample name, labels, value)`` list from Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


class MetricsSampler:
    """Scrapes a Prometheus endpoint on a background thread until stopped.

    The first and last scrapes bound the window for counters and histograms (deltas); the
    scrapes in between feed the gauge figures (max and mean checked-out, pending, pg states).
    """

    def __init__(self, url: str, interval_s: float = 0.5, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = url
        self.interval_s = interval_s
        self._client = httpx.Client(timeout=timeout_s)
        self.scrapes: list[list[Sample]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-sampler", daemon=True)

    def scrape(self) -> list[Sample]:
        import httpx

        try:
            response = self._client.get(self.url)
            response.raise_for_status()
            return parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            raise UserError(f"cannot read metrics from {self.url}: {exc}") from None

    def _take(self) -> None:
        try:
            self.scrapes.append(self.scrape())
        except UserError:
            self.errors += 1  # one missed scrape during a load spike is not fatal

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> None:
        self.scrapes.append(self.scrape())  # baseline; failing here is a clear user error
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        self._client.close()

    def windows(self) -> dict[str, PoolWindow]:
        return pool_windows(self.scrapes)


def _pool_of(labels: dict[str, str]) -> str | None:
    return labels.get(POOL_LABEL)


def _by_pool(samples: Iterable[Sample], name: str, **match: str) -> dict[str | None, float]:
    """Sum of ``name`` samples per pool, keeping those whose labels include ``match``."""
    out: dict[str | None, float] = {}
    for sample_name, labels, value in samples:
        if sample_name != name or any(labels.get(k) != v for k, v in match.items()):
            continue
        pool = _pool_of(labels)
        out[pool] = out.get(pool, 0.0) + value
    return out


def _delta(first: float | None, last: float | None) -> float:
    if last is None:
        return 0.0
    if first is None or last < first:  # counter reset (app restart): count from zero
        return last
    return last - first


def _buckets(samples: Iterable[Sample], name: str) -> dict[str | None, dict[float, float]]:
    """Cumulative bucket counts ``{pool: {le: count}}`` of histogram ``name``."""
    out: dict[str | None, dict[float, float]] = {}
    for sample_name, labels, value in samples:
        if sample_name != name + "_bucket" or "le" not in labels:
            continue
        le = math.inf if labels["le"] in ("+Inf", "Inf") else float(labels["le"])
        per_pool = out.setdefault(_pool_of(labels), {})
        per_pool[le] = per_pool.get(le, 0.0) + value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus-style ``histogram_quantile`` over cumulative ``{le: count}`` buckets.

    Linear interpolation inside the bucket; a rank in the ``+Inf`` bucket answers with the
    highest finite bound (all we know is "more than that").
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, lower_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == lower_count:
                return le
            return lower + (le - lower) * (rank - lower_count) / (count - lower_count)
        lower, lower_count = le, count
    return lower


def pool_windows(scrapes: Sequence[list[Sample]]) -> dict[str, PoolWindow]:
    """Per-pool figures over the window covered by ``scrapes`` (oldest first)."""
    if not scrapes:
        return {}
    first, last = scrapes[0], scrapes[-1]
    names: set[str] = set()
    for samples in scrapes:
        for name, labels, _ in samples:
            if name in (M_COUNT, M_MAX, M_PENDING) and _pool_of(labels) is not None:
                names.add(labels[POOL_LABEL])
    if not names and any(name == M_COUNT for name, _, _ in last):
        names.add(UNNAMED_POOL)

    def key(pool: str) -> str | None:
        return None if pool == UNNAMED_POOL else pool

    windows: dict[str, PoolWindow] = {}
    for pool in sorted(names):
        w = PoolWindow(pool=pool, samples=len(scrapes))
        used = [
            _by_pool(s, M_COUNT, db_client_connection_state="used").get(key(pool), 0.0)
            for s in scrapes
        ]
        pending = [_by_pool(s, M_PENDING).get(key(pool), 0.0) for s in scrapes]
        w.max_used, w.mean_used = max(used), sum(used) / len(used)
        w.max_pending, w.mean_pending = max(pending), sum(pending) / len(pending)
        w.size_max = _by_pool(last, M_MAX).get(key(pool))
        w.timeouts = _delta(
            _by_pool(first, M_TIMEOUTS).get(key(pool)), _by_pool(last, M_TIMEOUTS).get(key(pool))
        )
        w.checkouts = _delta(
            _by_pool(first, M_WAIT + "_count").get(key(pool)),
            _by_pool(last, M_WAIT + "_count").get(key(pool)),
        )
        before = _buckets(first, M_WAIT).get(key(pool), {})
        after = _buckets(last, M_WAIT).get(key(pool), {})
        window_buckets = {le: _delta(before.get(le), count) for le, count in after.items()}
        p99 = histogram_quantile(0.99, window_buckets)
        w.wait_p99_ms = None if p99 is None else p99 * 1000.0
        held_idle = _delta(
            _by_pool(first, M_HELD_IDLE + "_sum").get(key(pool)),
            _by_pool(last, M_HELD_IDLE + "_sum").get(key(pool)),
        )
        use = _delta(
            _by_pool(first, M_USE + "_sum").get(key(pool)),
            _by_pool(last, M_USE + "_sum").get(key(pool)),
        )
        w.held_idle_share = min(1.0, held_idle / use) if use > 0 else None
        if w.checkouts and w.max_used < 1:
            # Short holds fall between scrapes; a window with checkouts had at least one
            # connection in use at some moment.
            w.max_used = 1.0
        w.leaks = _leaks(first, last, key(pool))
        w.pg_states_max, w.pg_oldest_xact_s = _pg_figures(scrapes, key(pool))
        windows[pool] = w
    return windows


def _leaks(first: list[Sample], last: list[Sample], pool: str | None) -> dict[str, float]:
    def per_kind(samples: list[Sample]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, labels, value in samples:
            if name == M_LEAKS and _pool_of(labels) == pool:
                kind = labels.get("sqlalchemy_pool_leak_kind", "unknown")
                out[kind] = out.get(kind, 0.0) + value
        return out

    before, after = per_kind(first), per_kind(last)
    deltas = {kind: _delta(before.get(kind), value) for kind, value in after.items()}
    return {kind: value for kind, value in sorted(deltas.items()) if value > 0}


def _pg_figures(
    scrapes: Sequence[list[Sample]], pool: str | None
) -> tuple[dict[str, float], float | None]:
    """Max backends per state and max oldest-transaction age (application scope).

    The pg sampler's series may not carry a pool name; then they describe the whole app and
    are attributed to every pool.
    """
    states: dict[str, float] = {}
    oldest: float | None = None
    for samples in scrapes:
        current: dict[str, float] = {}
        for name, labels, value in samples:
            if labels.get("sqlalchemy_pool_pg_scope", "application") != "application":
                continue
            if _pool_of(labels) not in (None, pool):
                continue
            if name == M_PG_BACKENDS:
                state = labels.get("sqlalchemy_pool_pg_state", "unknown")
                current[state] = current.get(state, 0.0) + value
            elif name == M_PG_OLDEST_XACT:
                oldest = value if oldest is None else max(oldest, value)
        for state, value in current.items():
            states[state] = max(states.get(state, 0.0), value)
    return dict(sorted(states.items())), oldest


# --------------------------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------------------------
def _percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = sorted(latencies_s)

    def rank(q: float) -> float:  # nearest-rank percentile, like wrk's
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1] * 1000,
        "mean": sum(ordered) / len(ordered) * 1000,
    }


def _run_wrk(
    base: str,
    paths: list[str],
    duration_s: float,
    connections: int,
    rate: float | None,
    timeout_s: float,
    result: LoadResult,
) -> None:
    threads = max(1, min(connections, os.cpu_count() or 1))
    env = dict(os.environ, SQLAPOOL_PATHS="\n".join(paths), SQLAPOOL_DELAY_MS="0")
    if rate:
        # Debian's wrk has no constant-rate mode (that is wrk2): pace each connection with a
        # fixed think time instead, which approximates --rate while the app keeps up.
        env["SQLAPOOL_DELAY_MS"] = str(max(1, round(connections / rate * 1000)))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, math.ceil(timeout_s))}s",
        "-s",
        str(LUA_SCRIPT),
        base + paths[0],
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=duration_s + timeout_s + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UserError("wrk did not finish in time") from None
    match = re.search(r"^SQLAPOOL_RESULT (.*)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not match:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"wrk failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    fields = {k: float(v) for k, v in (kv.split("=", 1) for kv in match.group(1).split())}
    result.duration_s = fields["duration_us"] / 1e6 or (time.monotonic() - started)
    result.requests = int(fields["requests"])
    result.non_2xx = int(fields["non2xx"])
    result.connect_errors = int(fields["connect"])
    result.read_errors = int(fields["read"])
    result.write_errors = int(fields["write"])
    result.timeouts = int(fields["timeout"])
    result.latency_ms = {k: fields[k] / 1000.0 for k in ("p50", "p95", "p99", "max", "mean")}


async def _builtin_load(
    base: str,
    paths: list[str],
    duration_s: float,
    connections: int,
    rate: float | None,
    timeout_s: float,
    max_requests: int | None,
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    counts = {"requests": 0, "non_2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + duration_s
    issued = 0  # shared request counter: round-robin paths and open-loop pacing
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while loop.time() < deadline and (max_requests is None or issued < max_requests):
            n = issued
            issued += 1
            if rate:
                # Request n is due at start + n/rate; a worker that is early waits for it.
                due = started + n / rate
                if due >= deadline:
                    return
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            t0 = loop.time()
            try:
                response = await client.get(paths[n % len(paths)])
                await response.aread()
            except httpx.TimeoutException:
                counts["timeout"] += 1
            except httpx.ConnectError:
                counts["connect"] += 1
                await asyncio.sleep(0.01)  # do not spin on a refused connection
            except httpx.WriteError:
                counts["write"] += 1
            except httpx.TransportError:
                counts["read"] += 1
            else:
                counts["requests"] += 1
                latencies.append(loop.time() - t0)
                if not 200 <= response.status_code <= 299:
                    counts["non_2xx"] += 1

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout_s) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    counts["elapsed"] = loop.time() - started
    counts["latency_ms"] = _percentiles_ms(latencies)
    return counts


def _run_builtin(
    base: str,
    paths: list[str],
    duration_s: float,
    connections: int,
    rate: float | None,
    timeout_s: float,
    max_requests: int | None,
    result: LoadResult,
) -> None:
    counts = asyncio.run(
        _builtin_load(base, paths, duration_s, connections, rate, timeout_s, max_requests)
    )
    result.duration_s = counts["elapsed"]
    result.requests = counts["requests"]
    result.non_2xx = counts["non_2xx"]
    result.connect_errors = counts["connect"]
    result.read_errors = counts["read"]
    result.write_errors = counts["write"]
    result.timeouts = counts["timeout"]
    result.latency_ms = counts["latency_ms"]


def run_load(
    url: str,
    *,
    duration_s: float = 10.0,
    connections: int = 20,
    rate: float | None = None,
    paths: Sequence[str] | None = None,
    metrics_url: str | None = None,
    tool: str = "auto",
    timeout_s: float = 10.0,
    max_requests: int | None = None,
    drain_s: float = 0.0,
    sample_interval_s: float = 0.5,
    allow_remote: bool = False,
    label: str | None = None,
) -> LoadResult:
    """Run one bounded load test and return what the client and the pool saw.

    ``drain_s`` keeps sampling the metrics after the load stops, so work that outlives the
    responses (background tasks) lands in the same window. ``max_requests`` bounds the
    built-in generator (wrk is bounded by time only).
    """
    if not 0 < duration_s <= MAX_DURATION_S:
        raise UserError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UserError(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if rate is not None and rate <= 0:
        raise UserError("--rate must be positive")
    if timeout_s <= 0:
        raise UserError("--timeout must be positive")
    if tool not in ("auto", "wrk", "builtin"):
        raise UserError(f"unknown load tool {tool!r} (auto, wrk or builtin)")
    check_url(url, allow_remote=allow_remote)
    if metrics_url:
        check_url(metrics_url, allow_remote=allow_remote, what="metrics")
    base, request_paths = split_target(url, paths)
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "builtin"
    elif tool == "wrk" and not shutil.which("wrk"):
        raise UserError("wrk is not installed (use --tool builtin or install wrk)")
    _probe(base + request_paths[0])

    result = LoadResult(
        url=base,
        paths=request_paths,
        tool=tool,
        connections=connections,
        duration_s=duration_s,
        rate=rate,
        label=label,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        metrics_url=metrics_url,
    )
    sampler = MetricsSampler(metrics_url, sample_interval_s) if metrics_url else None
    if sampler:
        sampler.start()
    try:
        if tool == "wrk":
            _run_wrk(base, request_paths, duration_s, connections, rate, timeout_s, result)
        else:
            _run_builtin(
                base,
                request_paths,
                duration_s,
                connections,
                rate,
                timeout_s,
                max_requests,
                result,
            )
        if sampler and drain_s > 0:
            time.sleep(drain_s)
    finally:
        if sampler:
            sampler.stop()
    result.rps = result.requests / result.duration_s if result.duration_s > 0 else 0.0
    if sampler:
        result.pools = sampler.windows()
    return result


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def format_pool(w: PoolWindow, indent: str = "  ") -> list[str]:
    size = f" of {_num(w.size_max)}" if w.size_max is not None else ""
    lines = [
        f"{indent}checked out  max {_num(w.max_used)}{size}, mean {w.mean_used:.1f}",
        f"{indent}pending      max {_num(w.max_pending)}, mean {w.mean_pending:.1f}",
        f"{indent}wait p99     {_ms(w.wait_p99_ms)}   timeouts +{_num(w.timeouts)}"
        f"   checkouts +{_num(w.checkouts)}",
        f"{indent}held idle    {_pct(w.held_idle_share)} of checked-out time",
    ]
    if w.leaks:
        kinds = ", ".join(f"{kind} +{_num(n)}" for kind, n in w.leaks.items())
        lines.append(f"{indent}leaks        {kinds}")
    if w.pg_states_max or w.pg_oldest_xact_s is not None:
        states = ", ".join(f"{s} {_num(n)}" for s, n in w.pg_states_max.items() if n) or "-"
        oldest = "-" if w.pg_oldest_xact_s is None else f"{w.pg_oldest_xact_s:.1f} s"
        lines.append(f"{indent}postgres     max backends: {states}; oldest transaction {oldest}")
    return lines


def format_result(r: LoadResult) -> str:
    rate = f", target {r.rate:g} req/s" if r.rate else ""
    lat = r.latency_ms
    lines = [
        f"{r.tool} -> {r.url}  paths {', '.join(r.paths)}",
        f"  {r.connections} connections, {r.duration_s:.1f} s{rate}",
        f"requests     {r.requests:,} ({r.rps:.1f} req/s)",
        f"latency      p50 {_ms(lat.get('p50'))}  p95 {_ms(lat.get('p95'))}  "
        f"p99 {_ms(lat.get('p99'))}  max {_ms(lat.get('max'))}",
        f"errors       {r.errors:,}: non-2xx {r.non_2xx:,}, timeouts {r.timeouts:,}, socket "
        f"connect {r.connect_errors:,} / read {r.read_errors:,} / write {r.write_errors:,}",
    ]
    for window in r.pools.values():
        lines.append(f'pool "{window.pool}" over the same window ({window.samples} samples)')
        lines.extend(format_pool(window))
    if r.metrics_url and not r.pools:
        lines.append(f"pool         no pool metrics found at {r.metrics_url}")
    return "\n".join(lines)


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == 0:
        return "" if after == 0 else "new"
    return f"{(after - before) / before * 100:+.0f}%"


def compare(a: LoadResult, b: LoadResult) -> str:
    """A before (``a``) / after (``b``) table of the figures that matter for pool health."""
    pa, pb = a.main_pool, b.main_pool

    def pool_value(p: PoolWindow | None, attr: str) -> float | None:
        return None if p is None else getattr(p, attr)

    rows: list[tuple[str, float | None, float | None, str]] = [
        ("throughput (req/s)", a.rps, b.rps, "num1"),
        ("latency p50", a.latency_ms.get("p50"), b.latency_ms.get("p50"), "ms"),
        ("latency p95", a.latency_ms.get("p95"), b.latency_ms.get("p95"), "ms"),
        ("latency p99", a.latency_ms.get("p99"), b.latency_ms.get("p99"), "ms"),
        ("errors", a.errors, b.errors, "num"),
        ("pool timeouts", pool_value(pa, "timeouts"), pool_value(pb, "timeouts"), "num"),
        ("max checked-out", pool_value(pa, "max_used"), pool_value(pb, "max_used"), "num"),
        ("mean checked-out", pool_value(pa, "mean_used"), pool_value(pb, "mean_used"), "num1"),
        ("max pending", pool_value(pa, "max_pending"), pool_value(pb, "max_pending"), "num"),
        ("wait p99", pool_value(pa, "wait_p99_ms"), pool_value(pb, "wait_p99_ms"), "ms"),
        (
            "held-idle share",
            pool_value(pa, "held_idle_share"),
            pool_value(pb, "held_idle_share"),
            "pct",
        ),
    ]

    def fmt(value: float | None, kind: str) -> str:
        if value is None:
            return "-"
        if kind == "ms":
            return _ms(value)
        if kind == "pct":
            return _pct(value)
        if kind == "num1":
            return f"{value:,.1f}"
        return f"{value:,.0f}"

    head_a = f"before ({a.label})" if a.label else "before"
    head_b = f"after ({b.label})" if b.label else "after"
    table = [("", head_a, head_b, "change")]
    for name, va, vb, kind in rows:
        if va is None and vb is None:
            continue
        table.append((name, fmt(va, kind), fmt(vb, kind), _change(va, vb)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in table
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="bounded HTTP load test with pool figures over the same window",
        description="Bounded HTTP load against a local app (wrk when installed, else a "
        "built-in generator), with pool figures sampled from the app's /metrics endpoint "
        "over the same window. Only loopback targets unless --allow-remote.",
    )
    parser.add_argument("url", help="target URL, e.g. http://127.0.0.1:8000/orders")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--connections", type=int, default=20, help="concurrent connections")
    parser.add_argument(
        "--rate", type=float, default=None, help="target requests/s (approximate with wrk)"
    )
    parser.add_argument(
        "--path",
        action="append",
        dest="paths",
        metavar="PATH",
        help="request path, relative to URL; repeat to mix paths round-robin",
    )
    parser.add_argument("--metrics-url", help="the app's Prometheus endpoint to sample")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    parser.add_argument(
        "--max-requests", type=int, default=None, help="stop after N requests (built-in only)"
    )
    parser.add_argument("--drain", type=float, default=0.0, help="keep sampling N s after load")
    parser.add_argument("--tool", choices=("auto", "wrk", "builtin"), default="auto")
    parser.add_argument("--label", help="name of this run in --compare tables")
    parser.add_argument("--save", metavar="FILE", help="write the result as JSON")
    parser.add_argument("--compare", metavar="BEFORE.json", help="compare with a saved run")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback target (yours!)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Read the baseline first: a typo in --compare should not cost a whole load run.
    before = load(args.compare) if args.compare else None
    if args.max_requests is not None and args.max_requests < 1:
        raise UserError("--max-requests must be at least 1")
    result = run_load(
        args.url,
        duration_s=args.duration,
        connections=args.connections,
        rate=args.rate,
        paths=args.paths,
        metrics_url=args.metrics_url,
        tool=args.tool,
        timeout_s=args.timeout,
        max_requests=args.max_requests,
        drain_s=max(0.0, args.drain),
        allow_remote=args.allow_remote,
        label=args.label,
    )
    if args.save:
        save(result, args.save)
    if args.json:
        out: dict[str, Any] = {"result": result.to_dict()}
        if before is not None:
            out["before"] = before.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(format_result(result))
        if before is not None:
            print()
            print(compare(before, result))
    return 0
