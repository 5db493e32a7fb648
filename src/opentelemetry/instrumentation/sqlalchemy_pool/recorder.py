"""The data every part shares: :class:`Hold`, :class:`PoolRecorder`, the GC flag.

The hooks (``hooks.py``) write these plain objects on the hot path (ints, dicts and
``perf_counter`` stamps); metrics, spans, leak reports and forensics only read them. Nothing
here imports another module of this package except ``semconv`` and ``codesite``, so every
module can use these types without an import cycle.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from sqlalchemy.engine import URL
from sqlalchemy.pool import (
    AssertionPool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

from . import semconv
from .codesite import CodeSite, function_site, holder_site

_logger = logging.getLogger(__name__)

# Attribute names we put on SQLAlchemy objects (removed again by uninstrument()).
POOL_RECORDER_ATTR = "_otel_sqlalchemy_pool_recorder"  # on Pool: PoolRecorder, or False = not ours
HOLD_ATTR = "_otel_sqlalchemy_pool_hold"  # on _ConnectionRecord while checked out
CREATE_TIME_ATTR = "_otel_sqlalchemy_pool_create"  # (end, seconds) of the last DBAPI connect
CLOSE_REASON_ATTR = "_otel_sqlalchemy_pool_close_reason"  # set by invalidate, read by close
TRACKER_ATTR = "_otel_sqlalchemy_pool_session"  # on Session: its sessions.SessionTracker
STAMP_ATTRS = (HOLD_ATTR, CREATE_TIME_ATTR, CLOSE_REASON_ATTR)  # the ones on connection records

# http.route values kept per pool on histograms before the rest are folded into "other".
MAX_ROUTES_PER_POOL = 50
# A live holder's current site is resolved again after this long (wait spans at saturation
# ask for the same holders many times a second).
LIVE_SITE_TTL_S = 1.0
# Hold.holder when code sites are off: nothing is resolved.
NO_SITES = False


# -- the GC flag ----------------------------------------------------------------------------------
# True while the cyclic garbage collector runs. Finalizers of leaked connections run inside
# it, possibly in the middle of the OTel SDK's own (non-reentrant) locked code: calling the
# SDK from there can deadlock. Such work is queued (metrics.Telemetry.run_or_defer) and done
# at the next safe point. A one-element list: the hot path reads it without a global lookup.
gc_collecting = [False]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    gc_collecting[0] = phase == "start"


def watch_gc(enable: bool) -> None:
    if enable and _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    elif not enable and _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)
        gc_collecting[0] = False


# -- one checkout ---------------------------------------------------------------------------------
class Hold:
    """One checked-out connection: what the forensics and leak reports need, nothing more."""

    __slots__ = (
        "__weakref__",
        "context",
        "exec_s",
        "holder",
        "leak_reported",
        "live",
        "recorder",
        "request",
        "session",
        "site",
        "statements",
        "t_out",
        "t_stmt",
        "tx_started",
    )

    def __init__(
        self,
        recorder: PoolRecorder,
        t_out: float,
        context: Any,
        site: CodeSite | None,
        request: Any = None,
        holder: Any = None,
    ):
        self.recorder = recorder
        self.request = request  # sessions.RequestState of the HTTP request, if any
        self.t_out = t_out  # perf_counter at checkout
        self.context = context  # OTel Context current at checkout (holder's span, route)
        self.site = site  # the checkout site, when it was taken at checkout (see hooks.py)
        # Who took it: the asyncio Task, or the thread id (threading.get_ident()); NO_SITES
        # when code sites are off. Where it is, is resolved only when asked (where()).
        self.holder = holder
        self.live: tuple[float, CodeSite | None] | None = None  # (when, holder's site then)
        self.session: Any = None  # sessions.SessionTracker that owns this connection, if any
        self.statements = 0
        self.exec_s = 0.0  # time spent inside cursor.execute
        self.t_stmt = 0.0  # start of the running statement, 0 when none is running
        self.tx_started = 0.0  # perf_counter when the current DB transaction began, 0 if none
        self.leak_reported = False

    def idle_s(self, now: float) -> float:
        """Held time with no statement running."""
        busy = self.exec_s + ((now - self.t_stmt) if self.t_stmt else 0.0)
        return max(0.0, (now - self.t_out) - busy)

    def where(self, now: float, live: bool = True) -> CodeSite | None:
        """The user code holding this connection: the checkout site when one was taken at
        checkout; else, for a live holder (``live``), the line it runs now (a task awaiting
        inside a transaction: the awaiting line); else where it was opened, as far as it can
        still be told: the request's endpoint, or the holder task's coroutine function."""
        if self.site is not None or self.holder is NO_SITES:
            return self.site
        if live and self.holder is not None:
            cached = self.live
            if cached is None or now - cached[0] >= LIVE_SITE_TTL_S:
                cached = self.live = (now, holder_site(self.holder))
            if cached[1] is not None:
                return cached[1]
        return opening_site(self.request, self.holder)


# -- one logical pool -----------------------------------------------------------------------------
class PoolRecorder:
    """Everything we know about one logical pool (it survives ``engine.dispose()``/recreate).

    Reads a few private pool attributes (``_max_overflow``, ``_timeout``, ``_recycle``,
    ``_pre_ping``, ``_creator``, ``_dialect``, the queue behind ``_pool``): plain data, read at
    adoption and at collection time, listed in docs/ARCHITECTURE.md with the hooks.
    """

    def __init__(self, pool: Pool, name: str):
        self.name = name
        self.attrs: dict[str, Any] = {semconv.POOL_NAME: name}
        self.attrs_used = {**self.attrs, semconv.CONNECTION_STATE: semconv.STATE_USED}
        self.attrs_idle = {**self.attrs, semconv.CONNECTION_STATE: semconv.STATE_IDLE}
        self.holders: dict[Any, Hold] = {}  # connection record -> Hold (exact "used")
        self.waiters: list[None] = []  # one entry per caller inside the checkout (pending)
        self.last_holders_log = float("-inf")
        self._route_attrs: dict[str, dict[str, Any]] = {}
        # Whether statements on this pool's engine are timed (see Hooks.time_statements):
        # without it, held-idle time is unknown and not recorded.
        self.statements_timed = False
        # True/False once an AsyncSession used this pool (expire_on_commit review), else None.
        self.async_expire_on_commit: bool | None = None
        self.set_pool(pool)

    def set_pool(self, pool: Pool) -> None:
        self.pool_ref = weakref.ref(pool)
        self.pool_class = type(pool).__name__
        self.is_queue = isinstance(pool, QueuePool)
        self.is_null = isinstance(pool, NullPool)
        self.size: int | None = pool.size() if self.is_queue else None
        overflow = getattr(pool, "_max_overflow", None) if self.is_queue else None
        self.max_overflow: int | None = overflow
        self.timeout: float | None = getattr(pool, "_timeout", None) if self.is_queue else None
        self.recycle: float = float(getattr(pool, "_recycle", -1))
        self.pre_ping = bool(getattr(pool, "_pre_ping", False))
        self.creator_key = creator_key(pool)
        # The creator outlives engine.dispose() (the new pool shares it): while it lives, the
        # engine lives and so does this logical pool, even before its new pool's first checkout.
        self.creator_ref = _weak(getattr(pool, "_creator", None))

    def route_attrs(self, route: str) -> dict[str, Any]:
        """Attributes for histograms of a connection taken by a request of ``route``."""
        attrs = self._route_attrs.get(route)
        if attrs is None:
            if len(self._route_attrs) >= MAX_ROUTES_PER_POOL:
                route = "other"  # cardinality budget: route templates only, and few of them
                attrs = self._route_attrs.get(route)
            if attrs is None:
                attrs = self._route_attrs[route] = {**self.attrs, semconv.HTTP_ROUTE: route}
        return attrs

    # -- figures read at collection time ------------------------------------------------------
    def used(self) -> int:
        return len(self.holders)

    def pending(self) -> int:
        return len(self.waiters)

    def max_connections(self) -> int | None:
        if self.is_queue:
            if self.max_overflow is None or self.max_overflow < 0 or not self.size:
                return None  # unlimited
            return self.size + self.max_overflow
        if isinstance(self.pool_ref(), (StaticPool, AssertionPool)):
            return 1
        return None

    def idle_max(self) -> int | None:
        if self.is_queue:
            return self.size or None
        return 0 if self.is_null else None

    def idle(self) -> int:
        pool = self.pool_ref()
        if pool is None:
            return 0
        if self.is_queue:
            # Records in the queue that still hold an open DBAPI connection (an invalidated
            # record goes back to the queue empty and reconnects on its next checkout).
            queue = queued_records(pool)
            if queue is None:
                return max(0, pool.checkedin())
            return sum(1 for record in list(queue) if record.dbapi_connection is not None)
        if self.is_null:
            return 0
        if isinstance(pool, SingletonThreadPool):
            open_count = sum(1 for r in list(pool._all_conns) if r.dbapi_connection is not None)
            return max(0, open_count - self.used())
        # StaticPool / AssertionPool: at most one connection, kept by the pool.
        record = pool.__dict__.get("connection") or getattr(pool, "_conn", None)
        is_open = record is not None and record.dbapi_connection is not None
        return max(0, int(is_open) - self.used())

    def queue_full(self) -> bool:
        """Whether the pool has no room to take a connection back (it closes it: overflow)."""
        queue = getattr(self.pool_ref(), "_pool", None)
        full = getattr(queue, "full", None)
        return bool(full()) if callable(full) else False

    def oldest_holders(self, limit: int) -> list[tuple[Any, Hold]]:
        items = list(self.holders.items())
        items.sort(key=lambda item: item[1].t_out)
        return items[:limit]


def opening_site(request: Any, holder: Any) -> CodeSite | None:
    """Where a holder that is gone (or not asked) took its connection, without a stack: the
    endpoint of its HTTP request (``sessions.RequestState``), else its task's coroutine."""
    try:
        endpoint = request.endpoint() if request is not None else None
        site = function_site(endpoint) if endpoint is not None else None
        if site is None and holder is not None and not isinstance(holder, int):
            site = function_site(holder.get_coro())
        return site
    except Exception:
        return None


def _weak(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # None, or an object that cannot be weakly referenced
        return lambda: None


def creator_key(pool: Pool) -> tuple[int, int]:
    """Identifies "the same logical pool" across ``engine.dispose()``: ``recreate()`` passes
    the same creator and dialect objects to the new pool; two engines never share both."""
    return (id(getattr(pool, "_creator", None)), id(getattr(pool, "_dialect", None)))


def queued_records(pool: Pool) -> Any:
    """The idle records of a QueuePool (a deque), or None; AsyncAdaptedQueue included."""
    queue = getattr(pool, "_pool", None)
    items = getattr(queue, "queue", None)
    if items is None and queue is not None:  # AsyncAdaptedQueue: a lazily created asyncio.Queue
        items = getattr(queue.__dict__.get("_queue"), "_queue", None)
    return items


def pool_records(pool: Pool) -> Iterator[Any]:
    """Connection records a pool currently keeps (idle ones), for tagging and cleanup."""
    queue = queued_records(pool)
    if queue is not None:
        yield from list(queue)
    all_conns = getattr(pool, "_all_conns", None)
    if all_conns is not None:
        yield from list(all_conns)
    single = pool.__dict__.get("connection") or getattr(pool, "_conn", None)
    if single is not None:
        yield single


# -- the listener interface -----------------------------------------------------------------------
class NewPoolListener(Protocol):
    def on_new_pool(self, recorder: PoolRecorder, pool: Pool, url: URL | None) -> None:
        """A pool seen for the first time. ``url`` may carry a password: never log it."""


class ReleaseListener(Protocol):
    def on_release(self, hold: Hold, now: float, detached: bool) -> None:
        """A checkout owned by a Session, or already reported as a long hold, ended."""


# -- errors in our hooks --------------------------------------------------------------------------
_logged_hooks: set[str] = set()


def log_hook_error(hook: str) -> None:
    """Log a failure in one of our hooks once per hook; the application never sees it."""
    if hook in _logged_hooks:
        _logger.debug("error in %s hook", hook, exc_info=True)
        return
    _logged_hooks.add(hook)
    _logger.warning(
        "opentelemetry-instrumentation-sqlalchemy-pool: internal error in the %s hook "
        "(ignored; the application is unaffected)",
        hook,
        exc_info=True,
    )
