"""Pool-timeout forensics: who holds the connections right now.

The registry of holders is the recorder's ``holders`` dict (filled on checkout, emptied on
checkin). Nothing here runs on the hot path: snapshots are built only for slow/timed-out
waits, the rate-limited WARNING log, and the public :func:`holders` API.
"""

from __future__ import annotations

import logging
from collections import Counter
from time import monotonic, perf_counter
from typing import Any

from opentelemetry.trace import Link

from opentelemetry import trace

from . import semconv
from .config import Config
from .pools import PoolRegistry
from .recorder import POOL_RECORDER_ATTR, Hold, PoolRecorder

_logger = logging.getLogger("opentelemetry.instrumentation.sqlalchemy_pool")


def hold_route(hold: Hold) -> str | None:
    """``http.route`` of the request that took the connection, when known (low cardinality)."""
    state = hold.request
    if state is not None:
        route = state.route()
        if route:
            return route
    span = trace.get_current_span(hold.context) if hold.context is not None else None
    attributes = getattr(span, "attributes", None)
    if attributes:
        route = attributes.get(semconv.HTTP_ROUTE)
        if isinstance(route, str):
            return route
    return None


def describe_hold(hold: Hold, now: float) -> dict[str, Any]:
    """One holder as plain data (no SQL, no parameters, no credentials)."""
    span_context = trace.get_current_span(hold.context).get_span_context() if hold.context else None
    in_tx_idle = hold.idle_s(now) if hold.tx_started else 0.0
    site = hold.where(now)
    entry: dict[str, Any] = {
        "pool": hold.recorder.name,
        "age_s": round(now - hold.t_out, 6),
        "statements": hold.statements,
        "idle_s": round(hold.idle_s(now), 6),
        "idle_in_transaction_s": round(in_tx_idle, 6),
        "code_site": str(site) if site else None,
        "code_function": site.function if site else None,
        "code_file": site.file if site else None,
        "code_line": site.line if site else None,
        "http_route": hold_route(hold),
        "trace_id": None,
        "span_id": None,
        "session": hold.session is not None,
    }
    if span_context is not None and span_context.is_valid:
        entry["trace_id"] = format(span_context.trace_id, "032x")
        entry["span_id"] = format(span_context.span_id, "016x")
    return entry


def snapshot(recorder: PoolRecorder, limit: int | None = None) -> list[dict[str, Any]]:
    now = perf_counter()
    holds = recorder.oldest_holders(limit if limit is not None else len(recorder.holders))
    return [describe_hold(hold, now) for _, hold in holds]


def holders(pool_or_engine: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """Who holds the connections of this pool/engine now, oldest first.

    Accepts an ``Engine``, ``AsyncEngine`` or ``Pool``. Returns [] when the pool is not
    instrumented. Each entry: pool, age_s, statements, idle_s, idle_in_transaction_s,
    code_site/code_function/code_file/code_line, http_route, trace_id, span_id, session.
    """
    engine = getattr(pool_or_engine, "sync_engine", pool_or_engine)
    pool = getattr(engine, "pool", engine)
    recorder = getattr(pool, "__dict__", {}).get(POOL_RECORDER_ATTR)
    if not recorder:
        return []
    return snapshot(recorder, limit)


def all_holders(limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Holders of every instrumented pool, by pool name."""
    registry = PoolRegistry.installed
    if registry is None:
        return {}
    return {recorder.name: snapshot(recorder, limit) for recorder in registry.recorders()}


class HoldersASGIApp:
    """ASGI app serving ``all_holders()`` as JSON (a class, so Starlette's ``Route`` and
    ``add_route`` treat it as an ASGI app rather than a request handler)."""

    def __init__(self, limit: int | None = 20):
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import json

        if scope.get("type") != "http":
            return
        body = json.dumps({"pools": all_holders(self.limit)}, indent=2).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def make_asgi_app(limit: int | None = 20) -> HoldersASGIApp:
    """The holders JSON endpoint, to add on a *private* route; off unless you add it::

        app.add_route("/_debug/pool-holders", make_asgi_app())    # Starlette / FastAPI

    It exposes code sites, routes and trace ids -- never SQL, parameters or credentials --
    but keep it behind your admin/internal network all the same.
    """
    return HoldersASGIApp(limit)


class HolderForensics:
    """What wait spans and timeout logs say about the holders (rare paths only)."""

    def __init__(self, config: Config):
        self.config = config

    def snapshot_links(self, recorder: PoolRecorder) -> tuple[list[Link], dict[str, Any]]:
        """Links to the N oldest holders' spans, and summary attributes for a wait span."""
        now = perf_counter()
        all_holds = [hold for _, hold in recorder.oldest_holders(len(recorder.holders))]
        links = []
        for hold in all_holds[: self.config.holders_limit]:
            span_context = trace.get_current_span(hold.context).get_span_context()
            if not span_context.is_valid:
                continue
            described = describe_hold(hold, now)
            attributes: dict[str, Any] = {
                semconv.HOLDER_AGE: described["age_s"],
                semconv.HOLDER_STATEMENTS: hold.statements,
                semconv.HOLDER_IDLE_IN_TX: described["idle_in_transaction_s"],
            }
            if described["code_function"] is not None:
                attributes[semconv.CODE_FUNCTION] = described["code_function"]
                attributes[semconv.CODE_FILE] = described["code_file"]
                attributes[semconv.CODE_LINE] = described["code_line"]
            if described["http_route"]:
                attributes[semconv.HTTP_ROUTE] = described["http_route"]
            links.append(Link(span_context, attributes))
        summary: dict[str, Any] = {semconv.HOLDERS_COUNT: len(all_holds)}
        if all_holds:
            where = [h.where(now) for h in all_holds]
            sites = Counter(str(site) for site in where if site is not None)
            summary[semconv.HOLDERS_TOP_SITES] = [
                f"{site} x{n}" for site, n in sites.most_common(3)
            ]
            idle_in_tx = sum(1 for h in all_holds if h.tx_started and h.idle_s(now) > 0.1)
            summary[semconv.HOLDERS_IDLE_IN_TX_SHARE] = round(idle_in_tx / len(all_holds), 4)
        return links, summary

    def log_timeout(self, recorder: PoolRecorder, error: BaseException) -> None:
        """One WARNING with the holders table per pool per burst (rate-limited)."""
        now = monotonic()
        if now - recorder.last_holders_log < self.config.holders_log_interval_s:
            return
        recorder.last_holders_log = now
        rows = snapshot(recorder, self.config.holders_limit)
        lines = [
            f"pool {recorder.name!r}: checkout timed out ({error.__class__.__name__}); "
            f"{recorder.used()} connections held, {recorder.pending()} waiting. Oldest holders:",
            f"  {'age':>8}  {'stmts':>5}  {'idle-in-tx':>10}  {'route':<24}  code site",
        ]
        for row in rows:
            lines.append(
                f"  {row['age_s']:>7.2f}s  {row['statements']:>5}  "
                f"{row['idle_in_transaction_s']:>9.2f}s  {(row['http_route'] or '-'):<24}  "
                f"{row['code_site'] or '-'}"
            )
        _logger.warning("\n".join(lines))
