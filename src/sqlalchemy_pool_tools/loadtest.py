"""``sqlalchemy-pool loadtest``: bounded HTTP load against a local app, with pool figures.

The load comes from a calibrated generator (:mod:`sqlalchemy_pool_tools.loadgen`: the
built-in one, closed or open loop, or ``hey``; wrk is refused because its percentiles fail
the calibration). While the load runs, the app's Prometheus endpoint (``--metrics-url``) is
sampled by the doctor's reader (:class:`~sqlalchemy_pool_tools.doctor.figures.MetricsSampler`)
so the report puts client figures (throughput, latency percentiles, errors) next to the pool
figures over the same window, computed exactly as the doctor computes them.

``--repeat N`` runs the load N times (interleaved with ``--versus URL``: A B A B ...) and
reports the median and spread of each figure; a comparison says "no significant change"
unless every run of one side beats every run of the other.

The core is plain functions (:func:`run_load`, :func:`compare`) so the demo reuses them.
Load only goes to loopback addresses unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.instrumentation.sqlalchemy_pool import semconv
from sqlalchemy_pool_tools.doctor import _format as fmt
from sqlalchemy_pool_tools.doctor.figures import Figures, MetricsSampler, check_url
from sqlalchemy_pool_tools.errors import UserError
from sqlalchemy_pool_tools.loadgen import LoadRun, LoadSpec, check_generator, generate

# Hard bounds: a load test is a measuring tool, not a stress weapon.
MAX_DURATION_S = 600.0
MAX_CONNECTIONS = 1000
MAX_REPEAT = 20
RESULT_VERSION = 2


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One load run: what the client saw, plus the pool figures over the same window."""

    url: str
    paths: list[str]
    run: LoadRun
    label: str | None = None
    started_at: str = ""
    metrics_url: str | None = None
    pools: dict[str, Figures] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.run.rps

    @property
    def errors(self) -> int:
        return self.run.errors

    @property
    def latency_s(self) -> dict[str, float]:
        return self.run.latency_s

    @property
    def main_pool(self) -> Figures | None:
        """The busiest pool: what a one-pool app's report is about."""
        if not self.pools:
            return None
        return max(self.pools.values(), key=lambda f: (f.used_max or 0, f.checkouts or 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "paths": self.paths,
            "label": self.label,
            "started_at": self.started_at,
            "metrics_url": self.metrics_url,
            "run": self.run.to_dict(),
            "errors": self.errors,
            "rps": self.rps,
            "pools": {name: fig.to_dict() for name, fig in self.pools.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        def known(kind: type, values: dict[str, Any]) -> dict[str, Any]:
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in values.items() if k in names}

        return cls(
            url=data["url"],
            paths=list(data["paths"]),
            run=LoadRun(**known(LoadRun, data["run"])),
            label=data.get("label"),
            started_at=data.get("started_at", ""),
            metrics_url=data.get("metrics_url"),
            pools={
                name: Figures(**known(Figures, fig))
                for name, fig in (data.get("pools") or {}).items()
            },
        )


def save(results: Sequence[LoadResult], path: str | Path) -> None:
    """Write runs (one or a ``--repeat`` series) as JSON."""
    doc = {"version": RESULT_VERSION, "runs": [r.to_dict() for r in results]}
    try:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def load(path: str | Path) -> list[LoadResult]:
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "runs" not in data:
            raise ValueError("not a loadtest result")
        if data.get("version") != RESULT_VERSION:
            raise ValueError(f"saved by another version ({data.get('version')}); re-run it")
        runs = [LoadResult.from_dict(r) for r in data["runs"]]
        if not runs:
            raise ValueError("no runs")
        return runs
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path} is not a saved loadtest result ({exc})") from None


# --------------------------------------------------------------------------------------------
# Target checks
# --------------------------------------------------------------------------------------------
def require_loopback(url: str, *, allow_remote: bool = False, what: str = "target") -> str:
    """``url`` (checked by the doctor's URL rule); UserError unless it resolves to loopback
    addresses only (or ``allow_remote``)."""
    url = check_url(url, what)
    if allow_remote:
        return url
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
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
    return url


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
# Running
# --------------------------------------------------------------------------------------------
def run_load(
    url: str,
    *,
    duration_s: float = 10.0,
    connections: int = 20,
    rate: float | None = None,
    paths: Sequence[str] | None = None,
    metrics_url: str | None = None,
    tool: str = "builtin",
    timeout_s: float = 10.0,
    max_requests: int | None = None,
    drain_s: float = 0.0,
    sample_interval_s: float = 1.0,
    allow_remote: bool = False,
    label: str | None = None,
) -> LoadResult:
    """Run one bounded load test and return what the client and the pool saw.

    ``rate`` set: open loop at that many requests/s (latency from each request's due time),
    else closed loop. ``drain_s`` keeps sampling the metrics after the load stops, so work
    that outlives the responses (background tasks) lands in the same window.
    """
    if not 0 < duration_s <= MAX_DURATION_S:
        raise UserError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UserError(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if rate is not None and rate <= 0:
        raise UserError("--rate must be positive")
    if timeout_s <= 0:
        raise UserError("--timeout must be positive")
    if max_requests is not None and max_requests < 1:
        raise UserError("--max-requests must be at least 1")
    check_generator(tool)
    require_loopback(url, allow_remote=allow_remote)
    if metrics_url:
        metrics_url = require_loopback(metrics_url, allow_remote=allow_remote, what="metrics")
    base, request_paths = split_target(url, paths)
    _probe(base + request_paths[0])
    spec = LoadSpec(
        base, request_paths, duration_s, connections, rate, max_requests, timeout_s, tool
    )
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sampler = MetricsSampler(metrics_url, sample_interval_s) if metrics_url else None
    if sampler:
        sampler.start()
    try:
        run = generate(spec)
        if sampler and drain_s > 0:
            time.sleep(drain_s)
    finally:
        if sampler:
            sampler.stop()
    result = LoadResult(base, request_paths, run, label, started_at, metrics_url)
    if sampler:
        try:
            result.pools = sampler.figures()
        except UserError:
            result.pools = {}  # no pool metrics at that endpoint: the report says so
    return result


def run_series(
    targets: Sequence[tuple[str, str | None, str | None]], repeat: int, **kwargs: Any
) -> list[list[LoadResult]]:
    """``repeat`` runs of each ``(url, metrics_url, label)``, interleaved (A B A B ...) so a
    drift of the machine over time hits both sides alike. One list of runs per target."""
    if not 1 <= repeat <= MAX_REPEAT:
        raise UserError(f"--repeat must be between 1 and {MAX_REPEAT}")
    allow_remote = kwargs.get("allow_remote", False)
    for url, metrics_url, _ in targets:  # every target refused before the first load
        require_loopback(url, allow_remote=allow_remote)
        if metrics_url:
            require_loopback(metrics_url, allow_remote=allow_remote, what="metrics")
    series: list[list[LoadResult]] = [[] for _ in targets]
    for _ in range(repeat):
        for i, (url, metrics_url, label) in enumerate(targets):
            series[i].append(run_load(url, metrics_url=metrics_url, label=label, **kwargs))
    return series


# --------------------------------------------------------------------------------------------
# Figures of a series: median and spread
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """A figure of the comparison table: how to read it from a run and how to print it."""

    name: str
    read: Callable[[LoadResult], float | None]
    show: Callable[[float | None], str]


def _pool(attr: str) -> Callable[[LoadResult], float | None]:
    def read(result: LoadResult) -> float | None:
        pool = result.main_pool
        return None if pool is None else getattr(pool, attr)

    return read


ROWS: tuple[Row, ...] = (
    Row("throughput (req/s)", lambda r: r.rps, lambda v: "-" if v is None else f"{v:,.1f}"),
    Row("latency p50", lambda r: r.latency_s.get("p50"), fmt.seconds),
    Row("latency p95", lambda r: r.latency_s.get("p95"), fmt.seconds),
    Row("latency p99", lambda r: r.latency_s.get("p99"), fmt.seconds),
    Row("errors", lambda r: float(r.errors), fmt.count),
    Row("pool timeouts", _pool("timeouts"), fmt.count),
    Row("max checked-out", _pool("used_max"), fmt.count),
    Row("mean checked-out", _pool("used_mean"), fmt.count),
    Row("max pending", _pool("pending_max"), fmt.count),
    Row("wait p99", _pool("wait_p99"), fmt.seconds),
    Row("held-idle share", _pool("held_idle_share"), fmt.share),
)


@dataclass
class Spread:
    """A figure over the runs of a series."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


def spread(runs: Sequence[LoadResult], row: Row) -> Spread | None:
    values = [v for v in (row.read(r) for r in runs) if v is not None]
    return Spread(values) if values else None


def _cell(s: Spread | None, show: Callable[[float | None], str]) -> str:
    if s is None:
        return "-"
    low, high = show(s.low), show(s.high)
    return show(s.median) if low == high else f"{show(s.median)} ({low}-{high})"


def change(a: Spread | None, b: Spread | None) -> str:
    """The relative change of the medians, or "no significant change" when the two series'
    ranges overlap (neither side beats every run of the other). One run per side has no
    spread to judge by, which the table says."""
    if a is None or b is None:
        return ""
    if a.median == b.median:
        return "" if len(a.values) == 1 else "no significant change"
    if len(a.values) > 1 and len(b.values) > 1 and a.low <= b.high and b.low <= a.high:
        return "no significant change"
    pct = "new" if a.median == 0 else f"{(b.median - a.median) / abs(a.median) * 100:+.0f}%"
    return pct


def compare(a: Sequence[LoadResult], b: Sequence[LoadResult]) -> str:
    """A before (``a``) / after (``b``) table of the figures that matter for pool health:
    the median of each side's runs with its min-max spread, and the change."""
    head_a = f"before ({a[0].label})" if a[0].label else "before"
    head_b = f"after ({b[0].label})" if b[0].label else "after"
    table = [("", head_a, head_b, "change")]
    for row in ROWS:
        sa, sb = spread(a, row), spread(b, row)
        if sa is None and sb is None:
            continue
        table.append((row.name, _cell(sa, row.show), _cell(sb, row.show), change(sa, sb)))
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i in (0, 3) else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in table
    ]
    if len(a) == 1 or len(b) == 1:
        lines.append("(one run per side: no spread to judge significance by; use --repeat)")
    else:
        lines.append(
            f"(median (min-max) of {len(a)} vs {len(b)} runs; a change is significant only when "
            "every run of one side beats every run of the other)"
        )
    return "\n".join(lines)


def summarize(runs: Sequence[LoadResult]) -> str:
    """Median and min-max of each figure over a ``--repeat`` series."""
    table = [("", f"median of {len(runs)} runs", "min-max")]
    for row in ROWS:
        s = spread(runs, row)
        if s is not None:
            table.append((row.name, row.show(s.median), f"{row.show(s.low)}-{row.show(s.high)}"))
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line))
        for line in table
    )


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def latency_line(run: LoadRun) -> str:
    """``p50 .. p95 .. p99 .. max`` with values at the timeout shown as "at least"."""

    def show(key: str) -> str:
        value = run.latency_s.get(key)
        if value is not None and run.timeouts and value >= run.timeout_s * 0.999:
            return f">={fmt.seconds(run.timeout_s)}"
        return fmt.seconds(value)

    return "  ".join(f"{k} {show(k)}" for k in ("p50", "p95", "p99", "max"))


# The open-loop generator's own lateness (p99) worth a warning: beyond it the host is too
# busy for the latencies to be about the app alone.
LATE_GENERATOR_S = 0.010
# The built-in generator's CPU share (CPU time / wall time) at which it, not the app, may be
# what limits the load: its own queueing then shows up as latency.
BUSY_GENERATOR_CPU = 0.8


def describe_load(run: LoadRun) -> str:
    """Which generator and loop a result used (every report says it)."""
    if run.mode == "open":
        return f"{run.generator}, open loop at {run.rate:g} req/s (latency from due time)"
    return f"{run.generator}, closed loop, {run.connections} connections"


def load_warning(run: LoadRun) -> str | None:
    """A loud line when the generator itself may have distorted the figures."""
    lag = run.send_lag_p99_s
    if lag is not None and lag >= LATE_GENERATOR_S:
        return (
            f"WARNING: the generator sent requests up to {fmt.seconds(lag)} late (p99): this "
            "host is too busy for exact open-loop latencies; they include that delay"
        )
    if run.cpu_share is not None and run.cpu_share >= BUSY_GENERATOR_CPU:
        return (
            f"WARNING: the generator used {fmt.share(run.cpu_share)} of a CPU: it may be the "
            "bottleneck and its latencies include its own queueing (fewer connections, or hey)"
        )
    return None


def format_pool(fig: Figures, indent: str = "  ") -> list[str]:
    size = f" of {fmt.count(fig.max_connections)}" if fig.max_connections else ""
    lines = [
        f"{indent}checked out  max {fmt.count(fig.used_max)}{size}, "
        f"mean {fmt.count(fig.used_mean)}",
        f"{indent}pending      max {fmt.count(fig.pending_max)}, "
        f"mean {fmt.count(fig.pending_mean)}",
        f"{indent}wait p99     {fmt.seconds(fig.wait_p99)}   timeouts +{fmt.count(fig.timeouts)}"
        f"   checkouts +{fmt.count(fig.checkouts)}",
        f"{indent}held idle    {fmt.share(fig.held_idle_share)} of checked-out time",
    ]
    leaks = {k: n for k, n in (fig.leaks_by_kind or {}).items() if n}
    if leaks:
        kinds = ", ".join(f"{kind} +{fmt.count(n)}" for kind, n in sorted(leaks.items()))
        lines.append(f"{indent}leaks        {kinds}")
    if fig.pg_backends or fig.pg_oldest_transaction_age is not None:
        states = ", ".join(
            f"{s} {fmt.count(n)}" for s, n in sorted((fig.pg_backends or {}).items()) if n
        )
        lines.append(
            f"{indent}postgres     mean backends: {states or '-'}; oldest transaction "
            f"{fmt.seconds(fig.pg_oldest_transaction_age)}"
        )
    return lines


def outlived(fig: Figures) -> float:
    """Sessions that still held a connection after their response was sent."""
    return (fig.leaks_by_kind or {}).get(semconv.LEAK_KIND_OUTLIVED_RESPONSE, 0.0)


def format_result(r: LoadResult) -> str:
    run = r.run
    lines = [
        f"{r.url}  paths {', '.join(r.paths)}  ({describe_load(run)})",
        f"requests     {run.requests:,} in {run.duration_s:.1f} s = {run.rps:.1f} req/s",
        f"latency      {latency_line(run)}",
        f"errors       {run.errors:,}: non-2xx {run.non_2xx:,}, timeouts {run.timeouts:,}, "
        f"connect {run.connect_errors:,}, socket {run.socket_errors:,}",
    ]
    warning = load_warning(run)
    if warning:
        lines.append(warning)
    for fig in r.pools.values():
        lines.append(f'pool "{fig.pool}" over the same window ({fmt.seconds(fig.window_s)})')
        lines.extend(format_pool(fig))
    if r.metrics_url and not r.pools:
        lines.append(f"pool         no pool metrics found at {r.metrics_url}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="bounded HTTP load test with pool figures over the same window",
        description="Bounded HTTP load against a local app from a calibrated generator "
        "(closed loop, or open loop with --rate), with pool figures sampled from the app's "
        "/metrics endpoint over the same window. Only loopback targets unless --allow-remote.",
    )
    parser.add_argument("url", nargs="?", help="target URL, e.g. http://127.0.0.1:8000/orders")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--connections",
        type=int,
        default=20,
        help="concurrent connections (open loop: the most in flight)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: requests/s on a fixed schedule, latency from each due time",
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
    parser.add_argument("--max-requests", type=int, default=None, help="stop after N requests")
    parser.add_argument("--drain", type=float, default=0.0, help="keep sampling N s after load")
    parser.add_argument(
        "--tool",
        choices=("builtin", "hey", "wrk"),
        default="builtin",
        help="load generator (wrk is refused: it fails the calibration)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run N times; median and spread")
    parser.add_argument("--versus", metavar="URL", help="compare with this URL, interleaved")
    parser.add_argument("--versus-metrics-url", metavar="URL", help="metrics of --versus")
    parser.add_argument("--label", help="name of this run in comparison tables")
    parser.add_argument("--save", metavar="FILE", help="write the run(s) as JSON")
    parser.add_argument("--compare", metavar="BEFORE.json", help="compare with a saved run")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback target (yours!)"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="check every generator against servers with known latency mixes, then exit",
    )
    parser.set_defaults(func=run)


def _calibrate(as_json: bool) -> int:
    from sqlalchemy_pool_tools.calibration import calibrate_all, format_calibrations

    results = calibrate_all()
    if as_json:
        rows = [
            {"generator": c.generator, "mode": c.mode, "mix": c.mix, "ok": c.ok,
             "problems": c.problems, "truth_s": c.truth_s, "run": c.run.to_dict()}
            for c in results
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
    else:
        print(format_calibrations(results))
    return 0 if all(c.ok for c in results) else 1


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        return _calibrate(args.json)
    if not args.url:
        raise UserError("give a target URL (or --calibrate)")
    if args.compare and args.versus:
        raise UserError("--compare and --versus are two kinds of comparison: pick one")
    # Read the baseline first: a typo in --compare should not cost a whole load run.
    before = load(args.compare) if args.compare else None
    targets = [(args.url, args.metrics_url, args.label)]
    if args.versus:
        targets.append((args.versus, args.versus_metrics_url, "versus"))
    series = run_series(
        targets,
        args.repeat,
        duration_s=args.duration,
        connections=args.connections,
        rate=args.rate,
        paths=args.paths,
        tool=args.tool,
        timeout_s=args.timeout,
        max_requests=args.max_requests,
        drain_s=max(0.0, args.drain),
        allow_remote=args.allow_remote,
    )
    runs = series[0]
    if args.save:
        save(runs, args.save)
    baseline, current = (before, runs) if before else (runs, series[-1])
    comparing = before is not None or args.versus
    if args.json:
        out: dict[str, Any] = {"runs": [r.to_dict() for r in runs]}
        if args.versus:
            out["versus"] = [r.to_dict() for r in series[1]]
        if before is not None:
            out["before"] = [r.to_dict() for r in before]
        if comparing:
            out["comparison"] = compare(baseline, current)
        print(json.dumps(out, indent=2))
        return 0
    for i, result in enumerate(runs if not args.versus else [r for s in series for r in s]):
        if i:
            print()
        print(format_result(result))
    if comparing:
        print()
        print(compare(baseline, current))
    elif len(runs) > 1:
        print()
        print(summarize(runs))
    return 0
