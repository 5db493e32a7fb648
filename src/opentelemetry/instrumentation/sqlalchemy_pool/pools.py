"""Pools: discovery, naming, the per-pool recorder, and the one place that (un)hooks SQLAlchemy.

Data flows one way: SQLAlchemy pool events and the checkout wait -> :class:`PoolRecorder`
(plain ints, dicts and ``perf_counter`` stamps) -> OTel instruments (``metrics.py``) and
spans (``wait.py``, ``sessions.py``, ``leaks.py``).

How pools are found: ``_ConnectionRecord.checkout(pool)`` (the one entry of every new checkout,
whatever the pool class) is wrapped at class level, so the first checkout of *any* pool --
including pools of engines built before ``instrument()`` -- adopts it. Checkins and new
connections are class-level wrappers too; the rare pool events (detach, close, invalidate) are
class-level listeners. A connection record maps back to its recorder through its pool.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter, time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import (
    AssertionPool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)
from sqlalchemy.pool import base as pool_base
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord

from . import semconv
from .codesite import CodeSite
from .config import STATEMENT_TIMING_ALL, STATEMENT_TIMING_OFF, Config

_logger = logging.getLogger(__name__)

# Attribute names we put on SQLAlchemy objects (removed again by uninstrument()).
POOL_RECORDER_ATTR = "_otel_sqlalchemy_pool_recorder"  # on Pool: PoolRecorder, or False = not ours
HOLD_ATTR = "_otel_sqlalchemy_pool_hold"  # on _ConnectionRecord while checked out
CREATE_TIME_ATTR = "_otel_sqlalchemy_pool_create"  # (end, seconds) of the last DBAPI connect
CLOSE_REASON_ATTR = "_otel_sqlalchemy_pool_close_reason"  # set by invalidate, read by close


# http.route values kept per pool on histograms before the rest are folded into "other".
MAX_ROUTES_PER_POOL = 50


class Hold:
    """One checked-out connection: what the forensics and leak reports need, nothing more."""

    __slots__ = (
        "__weakref__",
        "context",
        "exec_s",
        "leak_reported",
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
    ):
        self.recorder = recorder
        self.request = request  # sessions.RequestState of the HTTP request, if any
        self.t_out = t_out  # perf_counter at checkout
        self.context = context  # OTel Context current at checkout (holder's span, route)
        self.site = site
        self.session: Any = None  # SessionTracker that owns this connection, if any
        self.statements = 0
        self.exec_s = 0.0  # time spent inside cursor.execute
        self.t_stmt = 0.0  # start of the running statement, 0 when none is running
        self.tx_started = 0.0  # perf_counter when the current DB transaction began, 0 if none
        self.leak_reported = False

    def idle_s(self, now: float) -> float:
        """Held time with no statement running."""
        busy = self.exec_s + ((now - self.t_stmt) if self.t_stmt else 0.0)
        return max(0.0, (now - self.t_out) - busy)


class PoolRecorder:
    """Everything we know about one logical pool (it survives ``engine.dispose()``/recreate)."""

    def __init__(self, pool: Pool, name: str):
        self.name = name
        self.attrs: dict[str, Any] = {semconv.POOL_NAME: name}
        self.attrs_used = {**self.attrs, semconv.CONNECTION_STATE: semconv.STATE_USED}
        self.attrs_idle = {**self.attrs, semconv.CONNECTION_STATE: semconv.STATE_IDLE}
        self.holders: dict[Any, Hold] = {}  # connection record -> Hold (exact "used")
        self.waiters: list[None] = []  # one entry per caller inside the checkout (pending)
        self.last_holders_log = float("-inf")
        self._route_attrs: dict[str, dict[str, Any]] = {}
        # Whether statements on this pool's engine are timed (see PoolRegistry.time_statements):
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
        self.creator_key = _creator_key(pool)
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
            queue = _queued(pool)
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

    def oldest_holders(self, limit: int) -> list[tuple[Any, Hold]]:
        items = list(self.holders.items())
        items.sort(key=lambda item: item[1].t_out)
        return items[:limit]


def _weak(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # None, or an object that cannot be weakly referenced
        return lambda: None


def _creator_key(pool: Pool) -> tuple[int, int]:
    # recreate() passes the same creator and dialect objects to the new pool: that pair
    # identifies "the same logical pool" across engine.dispose(); two engines never share both.
    return (id(getattr(pool, "_creator", None)), id(getattr(pool, "_dialect", None)))


def _creator_closure(pool: Pool) -> dict[str, Any]:
    """The variables create_engine's creator closes over (cparams, dialect), if any."""
    creator = getattr(pool, "_creator", None)
    try:
        return dict(inspect.getclosurevars(creator).nonlocals) if creator else {}
    except (TypeError, ValueError):
        return {}


def _url_name_from_creator(pool: Pool) -> str | None:
    """host:port/database from the connect arguments captured by create_engine's creator."""
    cparams = _creator_closure(pool).get("cparams")
    if not isinstance(cparams, dict):
        return None
    return name_from_parts(
        cparams.get("host"), cparams.get("port"), cparams.get("dbname") or cparams.get("database")
    )


def url_from_pool(pool: Pool) -> Any:
    """A URL for a pool's database rebuilt from create_engine's connect arguments, or None.

    Used only to open the pg_stat_activity sampler's own connection; it may carry the
    password and is never logged or put on telemetry.
    """
    from sqlalchemy.engine import URL

    closure = _creator_closure(pool)
    cparams, dialect = closure.get("cparams"), closure.get("dialect")
    if not isinstance(cparams, dict) or dialect is None:
        return None
    host = cparams.get("host")
    query = {}
    if isinstance(host, str) and host.startswith("/"):
        query, host = {"host": host}, None
    return URL.create(
        f"{dialect.name}+{dialect.driver}",
        username=cparams.get("user"),
        password=cparams.get("password"),
        host=host,
        port=cparams.get("port"),
        database=cparams.get("dbname") or cparams.get("database"),
        query=query,
    )


def name_from_parts(host: Any, port: Any, database: Any) -> str | None:
    if host is None and database is None:
        return None
    host_text = str(host) if host else "localhost"
    if isinstance(host, (list, tuple)):
        host_text = ",".join(map(str, host))
    location = f"{host_text}:{port}" if port else host_text
    return f"{location}/{database or ''}"


def name_from_url(url: Any) -> str | None:
    """host:port/database from a SQLAlchemy URL -- never the user or password."""
    host = url.host or url.query.get("host")
    return name_from_parts(host, url.port, url.database)


class PoolRegistry:
    """Owns every recorder and every hook we install; the only code that touches SQLAlchemy."""

    def __init__(
        self, config: Config, telemetry: Any, leaks: Any, wrap_checkout: Callable[..., Any]
    ):
        self.config = config
        self.telemetry = telemetry  # metrics.Telemetry
        self.leaks = leaks  # leaks.LeakDetector
        self.sessions: Any = None  # sessions.SessionTracking, when session tracking is on
        self._wrap_checkout = wrap_checkout
        self._recorders: dict[int, PoolRecorder] = {}  # id(recorder) -> recorder
        self._lock = threading.RLock()
        self._patched: list[tuple[type, str, Any]] = []
        self._listeners: list[tuple[Callable[[], Any], str, Callable[..., Any]]] = []
        self._adopted_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._timed_engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._explicit_engines: list[weakref.ref[Any]] | None = None
        self._explicit_keys: set[tuple[int, int]] = set()
        self._names_in_use: set[str] = set()
        self._counter = itertools.count(1)
        self.on_new_recorder: list[Callable[[PoolRecorder, Pool, Any], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def install(self, engines: Iterable[Any] | None) -> None:
        # The hot path is wrappers, not events: a `checkout`/`checkin`/`reset` listener costs
        # every cycle SQLAlchemy's dispatch (and, for `reset`, a PoolResetState object).
        record_methods = _ConnectionRecord.__dict__
        checkout = self._wrap_checkout(record_methods["checkout"].__func__, self)
        self._patch(_ConnectionRecord, "checkout", classmethod(checkout))
        self._patch(_ConnectionRecord, "checkin", self._wrap_checkin(record_methods["checkin"]))
        self._patch(
            _ConnectionRecord,
            _RECORD_CONNECT,
            self._wrap_connect(record_methods[_RECORD_CONNECT]),
        )
        if self.config.statement_timing != STATEMENT_TIMING_OFF:
            execute = Connection.__dict__["_execute_context"]
            self._patch(Connection, "_execute_context", self._wrap_execute(execute))
        for name, fn in (
            ("detach", self._on_detach),
            ("close", self._on_close),
            ("invalidate", self._on_invalidate),
        ):
            self._listen(Pool, name, fn)
        if engines is not None:
            self._explicit_engines = []
            for engine in engines:
                sync_engine = getattr(engine, "sync_engine", engine)
                self._explicit_engines.append(weakref.ref(sync_engine))
                self.adopt(sync_engine.pool, url=sync_engine.url)
        if self.config.statement_timing == STATEMENT_TIMING_ALL:
            if self._explicit_engines is None:
                self.time_statements(Engine)  # class level: every engine, present and future
            for ref in self._explicit_engines or ():
                engine = ref()
                if engine is not None:
                    self.time_statements(engine)

    def _patch(self, cls: type, name: str, replacement: Callable[..., Any]) -> None:
        self._patched.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, replacement)

    def time_statements(self, engine: Any) -> None:
        """Time statements on ``engine`` (or on every engine when given the Engine class).

        Feeds held-idle time and statement counts (the ``_execute_context`` wrapper measures
        statements of timed pools only) and the open-transaction-at-checkin check (the
        ``_ConnectionFairy._reset`` wrapper, installed with the first timed engine). By default
        (statement_timing=sessions) an engine is timed once a Session uses it."""
        if self.config.statement_timing == STATEMENT_TIMING_OFF or engine in self._timed_engines:
            return
        with self._lock:
            if engine in self._timed_engines:
                return
            self._timed_engines.add(engine)
            if engine is Engine:
                for recorder in self._recorders.values():
                    recorder.statements_timed = True
            else:
                recorder = engine.pool.__dict__.get(POOL_RECORDER_ATTR)
                if recorder:
                    recorder.statements_timed = True
            if not any(cls is _ConnectionFairy for cls, _, _ in self._patched):
                reset = _ConnectionFairy.__dict__["_reset"]
                self._patch(_ConnectionFairy, "_reset", self._wrap_reset(reset))

    def _listen(self, target: Any, name: str, fn: Callable[..., Any]) -> None:
        event.listen(target, name, fn)
        # Engines are held weakly: instrumentation must not keep a discarded engine alive.
        ref = (lambda: target) if isinstance(target, type) else weakref.ref(target)
        self._listeners.append((ref, name, fn))

    def installed_listeners(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        """(target, event name, listener) for every listener we added whose target lives."""
        return [(ref(), name, fn) for ref, name, fn in self._listeners if ref() is not None]

    def uninstall(self) -> None:
        for ref, name, fn in reversed(self._listeners):
            target = ref()
            if target is None:
                continue
            try:
                if event.contains(target, name, fn):
                    event.remove(target, name, fn)
            except Exception:
                _logger.debug("could not remove %s listener", name, exc_info=True)
        self._listeners.clear()
        self._timed_engines = weakref.WeakSet()
        for cls, name, original in reversed(self._patched):
            setattr(cls, name, original)
        self._patched.clear()
        for recorder in list(self._recorders.values()):
            for record in list(recorder.holders):
                record.__dict__.pop(HOLD_ATTR, None)
            recorder.holders.clear()
        for pool in list(self._adopted_pools):
            pool.__dict__.pop(POOL_RECORDER_ATTR, None)
            for record in _pool_records(pool):
                for attr in (HOLD_ATTR, CREATE_TIME_ATTR, CLOSE_REASON_ATTR):
                    record.__dict__.pop(attr, None)
        self._recorders.clear()
        self._names_in_use.clear()

    # -- discovery ----------------------------------------------------------------------------
    def adopt(self, pool: Pool, url: Any = None) -> PoolRecorder | bool:
        """The recorder of ``pool`` (created on first sight), or False if we must not touch it."""
        with self._lock:
            existing = pool.__dict__.get(POOL_RECORDER_ATTR)
            if existing is not None:
                return existing
            key = _creator_key(pool)
            outside_scope = self._explicit_engines is not None and url is None
            if outside_scope and key not in self._explicit_keys:
                pool.__dict__[POOL_RECORDER_ATTR] = False
                self._adopted_pools.add(pool)
                return False
            recorder = self._find_previous_generation(key)
            if recorder is not None:
                recorder.set_pool(pool)
            else:
                self.recorders()  # forgets pools that are gone: their names are free again
                recorder = PoolRecorder(pool, self._name_for(pool, url))
                recorder.statements_timed = Engine in self._timed_engines
                self._recorders[id(recorder)] = recorder
                for callback in self.on_new_recorder:
                    try:
                        callback(recorder, pool, url)
                    except Exception:
                        _log_hook_error("new pool")
            if self._explicit_engines is not None:
                self._explicit_keys.add(key)
            pool.__dict__[POOL_RECORDER_ATTR] = recorder
            self._adopted_pools.add(pool)
            return recorder

    def _find_previous_generation(self, key: tuple[int, int]) -> PoolRecorder | None:
        for recorder in self._recorders.values():
            if recorder.creator_key == key:
                return recorder
        return None

    def _name_for(self, pool: Pool, url: Any) -> str:
        configured = self.config.pool_name
        base: str | None = None
        if callable(configured):
            try:
                base = str(configured(pool))
            except Exception:
                _logger.warning("pool_name callable raised; using the default name", exc_info=True)
        elif configured:
            base = configured
        base = base or getattr(pool, "_orig_logging_name", None)
        if not base and url is not None:
            base = name_from_url(url)
        base = base or _url_name_from_creator(pool) or f"pool-{next(self._counter)}"
        name, n = base, 1
        while name in self._names_in_use:
            n += 1
            name = f"{base}#{n}"
        self._names_in_use.add(name)
        return name

    def _wrap_connect(self, original: Callable[[Any], None]) -> Callable[[Any], None]:
        """Time new DBAPI connections (create_time) and tag each record with its recorder.

        Wraps ``_ConnectionRecord.__connect``: the DBAPI connect *and* the connect-time events
        (the dialect's first-connect initialisation, the application's ``connect`` listeners),
        i.e. until the connection is ready; the wait timer subtracts it from wait_time."""
        create_time = self.telemetry.create_time

        def connect(record: Any) -> None:
            recorder = recorder_of(record)
            if recorder is None:
                return original(record)
            start = perf_counter()
            original(record)
            elapsed = perf_counter() - start
            try:
                # (when it ended, how long it took): the wait timer subtracts it only when the
                # connect happened inside its own checkout, not in a later reconnect.
                record.__dict__[CREATE_TIME_ATTR] = (start + elapsed, elapsed)
                create_time.record(elapsed, recorder.attrs)
            except Exception:
                _log_hook_error("connect")

        connect.__wrapped__ = original  # type: ignore[attr-defined]
        return connect

    def recorders(self) -> list[PoolRecorder]:
        """Live recorders; forgets those whose pools are gone and hold nothing."""
        with self._lock:
            alive = []
            for key, recorder in list(self._recorders.items()):
                gone = recorder.pool_ref() is None and recorder.creator_ref() is None
                if gone and not recorder.holders and not recorder.waiters:
                    del self._recorders[key]
                    self._names_in_use.discard(recorder.name)
                    continue
                alive.append(recorder)
            return alive

    # -- checkin and pool event listeners (must never raise) ---------------------------------
    def _wrap_checkin(self, original: Callable[..., Any]) -> Callable[..., Any]:
        from .metrics import gc_collecting

        telemetry = self.telemetry
        record_release = telemetry.record_release
        deferred = telemetry.deferred
        run_or_defer = telemetry.run_or_defer
        garbage_collected = self.leaks.garbage_collected

        def checkin(record: Any, _fairy_was_created: bool = True) -> None:
            # Popped before the record goes back to the queue, where another thread may
            # check it out (and set its own hold) at once.
            hold = record.__dict__.pop(HOLD_ATTR, None)
            if hold is not None:
                try:
                    now = perf_counter()
                    hold.recorder.holders.pop(record, None)  # "used" is exact immediately
                    fairy_ref = record.fairy_ref
                    if fairy_ref is not None and fairy_ref() is None:
                        # Its fairy was garbage collected without being returned: a leak.
                        run_or_defer(garbage_collected, record, hold)
                    if gc_collecting[0] or deferred:
                        run_or_defer(record_release, hold, now)
                    else:
                        record_release(hold, now)
                except Exception:
                    _log_hook_error("checkin")
            return original(record, _fairy_was_created)

        checkin.__wrapped__ = original  # type: ignore[attr-defined]
        return checkin

    def _wrap_reset(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``_ConnectionFairy._reset``, which ``_finalize_fairy`` calls on every checkin before
        the pool's rollback: the place to see a connection returned with its transaction still
        open (a ``reset`` listener would cost each checkin a dispatch and a PoolResetState)."""
        check = self._check_open_transaction

        def _reset(fairy: Any, pool: Any, transaction_was_reset: bool, *args: Any, **kw: Any):
            if not transaction_was_reset:  # nobody rolled back or committed before returning it
                check(fairy)
            return original(fairy, pool, transaction_was_reset, *args, **kw)

        _reset.__wrapped__ = original  # type: ignore[attr-defined]
        return _reset

    def _check_open_transaction(self, fairy: Any) -> None:
        """Timed pools only: the connection comes back inside a server transaction."""
        try:
            record = fairy._connection_record
            hold = record.__dict__.get(HOLD_ATTR) if record is not None else None
            if hold is None or not hold.recorder.statements_timed:
                return
            fairy_ref = record.fairy_ref
            if fairy_ref is not None and fairy_ref() is None:
                return  # garbage collected: reported as such at checkin
            if _in_transaction(fairy.dbapi_connection):
                self.telemetry.run_or_defer(self.leaks.open_transaction_at_checkin, record, hold)
        except Exception:
            _log_hook_error("reset")

    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        try:
            hold = record.__dict__.pop(HOLD_ATTR, None)
            recorder = recorder_of(record)
            if hold is not None:
                if _finalizing_garbage():
                    # Async dialects detach (terminate) a garbage-collected connection instead
                    # of checking it in: a leak, like the sync case seen at checkin.
                    self.telemetry.run_or_defer(self.leaks.garbage_collected, record, hold)
                self.telemetry.release(record, hold, perf_counter(), detached=True)
                recorder = hold.recorder
            if recorder is not None:
                self.telemetry.closed(recorder, semconv.CLOSE_REASON_DETACHED)
        except Exception:
            _log_hook_error("detach")

    def _on_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        try:
            if isinstance(exception, exc.InvalidatePoolError):
                reason = semconv.CLOSE_REASON_PRE_PING
            elif exception is None or isinstance(exception, Exception):
                # Explicit invalidate(), DisconnectionError, or the driver's own error when
                # SQLAlchemy detected a disconnect (it passes the raw DBAPI exception).
                reason = semconv.CLOSE_REASON_INVALIDATED
            else:
                # Cancellation or interruption while the connection was in use.
                reason = semconv.CLOSE_REASON_ERROR
            record.__dict__[CLOSE_REASON_ATTR] = reason
        except Exception:
            _log_hook_error("invalidate")

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        try:
            recorder = recorder_of(record)
            if recorder is None:
                return
            reason = record.__dict__.pop(CLOSE_REASON_ATTR, None)
            if reason is None:
                if _caller_frame(_GET_CONNECTION_CODE) is not None:
                    # Closed while being checked out: too old (pool_recycle), or stale after
                    # a pool-wide invalidation (SQLAlchemy does one after each disconnect).
                    recycle = getattr(recorder.pool_ref(), "_recycle", recorder.recycle)
                    too_old = recycle > -1 and time() - record.starttime > recycle
                    reason = semconv.CLOSE_REASON_RECYCLE
                    if not too_old:
                        reason = semconv.CLOSE_REASON_INVALIDATED
                elif recorder.is_null:
                    reason = semconv.CLOSE_REASON_NULLPOOL
                elif _queue_full(recorder):
                    reason = semconv.CLOSE_REASON_OVERFLOW  # no room to return it
                else:
                    reason = semconv.CLOSE_REASON_DISPOSE
            self.telemetry.closed(recorder, reason)
        except Exception:
            _log_hook_error("close")

    # -- statement timing (held-idle) ---------------------------------------------------------
    def _wrap_execute(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``Connection._execute_context``: every statement of every engine passes here. Only
        statements on a connection whose pool is timed are measured; others cost one lookup.
        (Engine ``before/after_cursor_execute`` listeners would make SQLAlchemy build a joined
        dispatcher for every Connection of the engine: ~7 % of a request's instructions.)"""
        registry = self

        def _execute_context(conn: Any, *args: Any, **kwargs: Any) -> Any:
            hold = None
            try:
                fairy = conn._dbapi_connection  # None once closed/invalidated
                record = fairy._connection_record if fairy is not None else None
                if record is not None:
                    hold = record.__dict__.get(HOLD_ATTR)
                    if hold is not None and not hold.recorder.statements_timed:
                        hold = None
                if hold is not None:
                    hold.t_stmt = perf_counter()
                    hold.statements += 1
                    if not hold.tx_started:
                        hold.tx_started = hold.t_stmt
                    if hold.session is not None and registry.sessions is not None:
                        registry.sessions.on_statement(hold)
            except Exception:
                hold = None
                _log_hook_error("statement start")
            if hold is None:
                return original(conn, *args, **kwargs)
            try:
                return original(conn, *args, **kwargs)
            finally:
                if hold.t_stmt:
                    hold.exec_s += perf_counter() - hold.t_stmt
                    hold.t_stmt = 0.0

        _execute_context.__wrapped__ = original  # type: ignore[attr-defined]
        return _execute_context


def recorder_of(record: Any) -> PoolRecorder | None:
    """The recorder of a connection record's pool (None when the pool is not ours)."""
    pool = getattr(record, "_ConnectionRecord__pool", None)  # name-mangled private attribute
    recorder = pool.__dict__.get(POOL_RECORDER_ATTR) if pool is not None else None
    return recorder or None


# _ConnectionRecord.__connect (name-mangled): opens the DBAPI connection, runs connect events.
_RECORD_CONNECT = "_ConnectionRecord__connect"
_FINALIZE_FAIRY_CODE = getattr(getattr(pool_base, "_finalize_fairy", None), "__code__", None)
_GET_CONNECTION_CODE = getattr(_ConnectionRecord.get_connection, "__code__", None)


def _caller_frame(code: Any, max_depth: int = 10) -> Any:
    """The frame running ``code`` further up the stack, or None. Rare paths only: walking the
    stack is how a listener learns what SQLAlchemy is in the middle of."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None or code is None:
            return None
        if frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


def _finalizing_garbage() -> bool:
    """Whether SQLAlchemy is finalizing a garbage-collected connection further up the stack.

    ``_finalize_fairy`` gets ``is_gc_cleanup=True`` (SQLAlchemy 2.1) or the dead weak reference
    ``ref`` (2.0) when the GC reclaimed the fairy.
    """
    frame = _caller_frame(_FINALIZE_FAIRY_CODE)
    if frame is None:
        return False
    local_vars = frame.f_locals
    return bool(local_vars.get("is_gc_cleanup") or local_vars.get("ref") is not None)


def _in_transaction(dbapi_connection: Any) -> bool:
    """Whether the DBAPI connection is inside a server transaction (psycopg 3 / asyncpg)."""
    if dbapi_connection is None:
        return False
    # psycopg 3: the libpq status int (0 = IDLE) -- conn.info.transaction_status builds an
    # enum on every call, ~20x slower, and this runs on every checkin.
    status = getattr(getattr(dbapi_connection, "pgconn", None), "transaction_status", None)
    if status is None:
        status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    if status is not None:
        return int(status) != 0
    driver = getattr(dbapi_connection, "driver_connection", None)
    is_in_transaction = getattr(driver, "is_in_transaction", None)
    if callable(is_in_transaction):  # asyncpg
        return bool(is_in_transaction())
    return False


def _queue_full(recorder: PoolRecorder) -> bool:
    pool = recorder.pool_ref()
    queue = getattr(pool, "_pool", None)
    full = getattr(queue, "full", None)
    return bool(full()) if callable(full) else False


def _queued(pool: Pool) -> Any:
    """The idle records of a QueuePool (a deque), or None; AsyncAdaptedQueue included."""
    queue = getattr(pool, "_pool", None)
    items = getattr(queue, "queue", None)
    if items is None and queue is not None:  # AsyncAdaptedQueue: a lazily created asyncio.Queue
        items = getattr(queue.__dict__.get("_queue"), "_queue", None)
    return items


def _pool_records(pool: Pool) -> Iterator[Any]:
    """Connection records a pool currently keeps (idle ones), for tagging and cleanup."""
    queue = _queued(pool)
    if queue is not None:
        yield from list(queue)
    all_conns = getattr(pool, "_all_conns", None)
    if all_conns is not None:
        yield from list(all_conns)
    single = pool.__dict__.get("connection") or getattr(pool, "_conn", None)
    if single is not None:
        yield single


_logged_hooks: set[str] = set()


def _log_hook_error(hook: str) -> None:
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
