"""OTel instruments and the callbacks that read pool figures at collection time.

Gauges (count, max, idle.max, pending, configuration) are observable: they read the
recorders when the SDK collects, so the hot path pays nothing for them. Histograms are
recorded on the hot path, in the caller's context, so exemplars point at the right trace.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from opentelemetry.context import Context, create_key
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import semconv
from .pg_activity import SamplersProvider, observe
from .recorder import Hold, PoolRecorder, gc_collecting

_logger = logging.getLogger(__name__)

# Held-idle time below this is Python overhead between statements, not "holding a connection
# while doing something else"; skipping it keeps the empty checkout cycle at the two records
# the semantic conventions require. Shares computed from sums are off by < 1 ms per checkout.
HELD_IDLE_MIN_S = 0.001
# held_idle_time is recorded without an exemplar: use_time, recorded at the same moment with
# the same attributes, already links that checkout to its trace, and offering an exemplar is
# about a fifth of a record's cost (~19,000 of ~87,000 instructions with opentelemetry-sdk 1.45).
# A context without a span (not an empty one: the SDK falls back to the current context then).
NO_EXEMPLAR = Context({create_key("sqlalchemy_pool.no_exemplar"): True})

_by_meter: weakref.WeakKeyDictionary[Meter, Telemetry] = weakref.WeakKeyDictionary()


def telemetry_for(
    meter: Meter,
    recorders: Callable[[], Iterable[PoolRecorder]],
    pg_samplers: SamplersProvider = list,
) -> Telemetry:
    """The instruments of ``meter`` reading ``recorders`` (and the pg_stat_activity samplers).

    One Telemetry per meter: the SDK keeps the first instrument registered under a name, so
    instrument() after uninstrument() reuses the instruments and swaps their sources."""
    telemetry = _by_meter.get(meter)
    if telemetry is None:
        telemetry = _by_meter[meter] = Telemetry(meter)
    telemetry.reset(recorders, pg_samplers)
    return telemetry


class Telemetry:
    """The instruments, plus the few reactions that only record (no decisions)."""

    def __init__(self, meter: Meter):
        self.reset(list, list)
        buckets = list(semconv.DURATION_BUCKETS)

        def histogram(name: str, description: str) -> Any:
            return meter.create_histogram(
                name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
            )

        self.wait_time = histogram(
            semconv.CONNECTION_WAIT_TIME,
            "The time it took to obtain an open connection from the pool.",
        )
        self.create_time = histogram(
            semconv.CONNECTION_CREATE_TIME, "The time it took to create a new connection."
        )
        self.use_time = histogram(
            semconv.CONNECTION_USE_TIME,
            "The time between borrowing a connection and returning it to the pool.",
        )
        self.held_idle_time = histogram(
            semconv.CONNECTION_HELD_IDLE_TIME,
            "Per checkout, the part of use_time with no statement running on the connection "
            "(recorded when at least 1 ms).",
        )
        self.timeouts = meter.create_counter(
            semconv.CONNECTION_TIMEOUTS,
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain "
            "a connection from the pool.",
        )
        self.closes = meter.create_counter(
            semconv.CONNECTION_CLOSES,
            unit="{connection}",
            description="Connections closed or discarded by the pool, by reason.",
        )
        self.connect_errors = meter.create_counter(
            semconv.CONNECTION_CONNECT_ERRORS,
            unit="{error}",
            description="Failed attempts to open a connection, by error.type (and SQLSTATE).",
        )
        self.slow_statement_time = meter.create_counter(
            semconv.SLOW_STATEMENT_TIME,
            unit="s",
            description="Time in statements slower than slow_statement_threshold_ms, by the code "
            "site that took the connection and the route.",
        )
        self.leaks = meter.create_counter(
            semconv.LEAKS,
            unit="{event}",
            description="Connections held too long, sessions that outlived their response, "
            "connections reclaimed by the garbage collector, transactions open at checkin.",
        )
        meter.create_observable_up_down_counter(
            semconv.CONNECTION_COUNT,
            [self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described by "
            "the `state` attribute.",
        )
        meter.create_observable_up_down_counter(
            semconv.CONNECTION_MAX,
            [self._observer(PoolRecorder.max_connections)],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            semconv.CONNECTION_IDLE_MAX,
            [self._observer(PoolRecorder.idle_max)],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            semconv.CONNECTION_PENDING_REQUESTS,
            [self._observer(PoolRecorder.pending)],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_gauge(
            semconv.CONFIG_TIMEOUT,
            [self._observer(lambda r: r.timeout)],
            unit="s",
            description="pool_timeout: how long a checkout waits before TimeoutError.",
        )
        meter.create_observable_gauge(
            semconv.CONFIG_RECYCLE,
            [self._observer(lambda r: r.recycle)],
            unit="s",
            description="pool_recycle: maximum connection age in seconds (-1 = never).",
        )
        meter.create_observable_gauge(
            semconv.CONFIG_PRE_PING,
            [self._observer(lambda r: int(r.pre_ping))],
            unit="{bool}",
            description="pool_pre_ping: 1 when connections are tested on checkout.",
        )
        meter.create_observable_gauge(
            semconv.SESSIONS_EXPIRE_ON_COMMIT,
            [self._observe_expire_on_commit],
            unit="{bool}",
            description="1 when an AsyncSession on this pool was created with "
            "expire_on_commit=True.",
        )
        observe(meter, lambda: self._pg_samplers())
        self._count_attrs: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._idle_attrs: dict[tuple[str, str | None, bool], dict[str, Any]] = {}

    def reset(
        self, recorders: Callable[[], Iterable[PoolRecorder]], pg_samplers: SamplersProvider
    ) -> None:
        """Read these sources from now on, and forget the previous run's queue."""
        self._recorders = recorders
        self._pg_samplers = pg_samplers
        # Work that reached us inside a garbage collection (see recorder.gc_collecting).
        self.deferred: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()

    # -- observable callbacks -----------------------------------------------------------------
    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for recorder in self._recorders():
            try:
                observations.append(Observation(recorder.used(), recorder.attrs_used))
                observations.append(Observation(recorder.idle(), recorder.attrs_idle))
            except Exception:
                _logger.debug("could not read pool %s", recorder.name, exc_info=True)
        return observations

    def _observer(
        self, read: Callable[[PoolRecorder], Any]
    ) -> Callable[..., Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            observations = []
            for recorder in self._recorders():
                try:
                    value = read(recorder)
                except Exception:
                    continue
                if value is not None:
                    observations.append(Observation(value, recorder.attrs))
            return observations

        return callback

    def _observe_expire_on_commit(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(recorder.async_expire_on_commit), recorder.attrs)
            for recorder in self._recorders()
            if recorder.async_expire_on_commit is not None
        ]

    # -- reactions ----------------------------------------------------------------------------
    def run_or_defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` now, or queue it when called from inside a garbage collection."""
        if gc_collecting[0]:
            self.deferred.append((fn, args))
        else:
            if self.deferred:
                self.drain()
            fn(*args)

    def drain(self) -> None:
        """Do the work queued during garbage collections (never called from inside one)."""
        while self.deferred and not gc_collecting[0]:
            try:
                fn, args = self.deferred.popleft()
            except IndexError:  # another thread drained it
                return
            try:
                fn(*args)
            except Exception:
                _logger.debug("deferred telemetry failed", exc_info=True)

    def record_release(self, hold: Hold, now: float) -> None:
        """use_time and held_idle_time of a checkout that ended (the release listeners are
        called by the hooks, see Hooks.release)."""
        recorder = hold.recorder
        attrs = recorder.attrs
        request = hold.request
        if request is not None:
            route = request.route()
            if route:
                attrs = recorder.route_attrs(route)
        self.use_time.record(now - hold.t_out, attrs)
        if recorder.statements_timed:  # otherwise statement time is unknown, not zero
            idle = hold.idle_s(now)
            if idle >= HELD_IDLE_MIN_S:
                self.held_idle_time.record(
                    idle, self._with_transaction(attrs, hold), context=NO_EXEMPLAR
                )

    def _with_transaction(self, attrs: dict[str, Any], hold: Hold) -> dict[str, Any]:
        """``attrs`` plus whether the idle time was inside a transaction: the hold ran a
        statement (DBAPI connections are in a transaction from their first statement unless
        autocommit). Only for held-idle records (>= 1 ms), not every checkin."""
        in_transaction = bool(hold.tx_started)
        key = (attrs[semconv.POOL_NAME], attrs.get(semconv.HTTP_ROUTE), in_transaction)
        cached = self._idle_attrs.get(key)
        if cached is None:
            cached = {**attrs, semconv.HELD_IDLE_IN_TRANSACTION: in_transaction}
            self._idle_attrs[key] = cached
        return cached

    def connect_failed(self, recorder: PoolRecorder, error: BaseException) -> None:
        """A connect attempt failed: counted by the driver's error class (and SQLSTATE), so a
        server refusing connections ("too many clients") is never invisible."""
        attrs = {**recorder.attrs, semconv.ERROR_TYPE: error_type(error)}
        sqlstate = error_sqlstate(error)
        if sqlstate:
            attrs[semconv.DB_RESPONSE_STATUS_CODE] = sqlstate
        self.connect_errors.add(1, attrs)

    def slow_statement(self, hold: Hold, duration: float) -> None:
        """A statement at least slow_statement_threshold_ms long (rare by definition)."""
        recorder = hold.recorder
        attrs = dict(recorder.attrs)
        request = hold.request
        route = request.route() if request is not None else None
        if route:
            attrs = dict(recorder.route_attrs(route))
        site = hold.where(perf_counter())  # the statement's line while the holder runs it
        if site is not None:
            attrs[semconv.CODE_FUNCTION] = site.function
            attrs[semconv.CODE_FILE] = site.file
            attrs[semconv.CODE_LINE] = site.line
        self.slow_statement_time.add(duration, attrs)

    def on_new_pool(self, recorder: PoolRecorder, pool: Any, url: Any) -> None:
        """Every counter series of a new pool starts at 0: Prometheus' increase() sees an event
        only in a series it scraped before (one that first appears at 1 has no increase), and
        a dashboard shows 0 instead of "No data"."""
        self.timeouts.add(0, recorder.attrs)
        for reason in semconv.CLOSE_REASONS:
            self._count("closes", semconv.CLOSE_REASON, recorder, reason, 0)
        for kind in semconv.LEAK_KINDS:
            self._count("leaks", semconv.LEAK_KIND, recorder, kind, 0)

    def closed(self, recorder: PoolRecorder, reason: str) -> None:
        self._count("closes", semconv.CLOSE_REASON, recorder, reason)

    def leak(self, recorder: PoolRecorder, kind: str) -> None:
        self._count("leaks", semconv.LEAK_KIND, recorder, kind)

    def _count(
        self, counter: str, attribute: str, recorder: PoolRecorder, value: str, amount: int = 1
    ) -> None:
        if gc_collecting[0]:
            self.deferred.append((self._count, (counter, attribute, recorder, value, amount)))
            return
        key = (recorder.name, attribute, value)
        attrs = self._count_attrs.get(key)
        if attrs is None:
            attrs = self._count_attrs[key] = {**recorder.attrs, attribute: value}
        getattr(self, counter).add(amount, attrs)


# PostgreSQL's SQLSTATE when the server has no connection slot left: "sorry, too many clients
# already" and "remaining connection slots are reserved for ..." are both 53300.
TOO_MANY_CONNECTIONS_SQLSTATE = "53300"
_TOO_MANY_CLIENTS_TEXT = ("too many clients", "remaining connection slots are reserved")


def _driver_error(error: BaseException) -> BaseException:
    """The driver's exception under SQLAlchemy's wrappers (``DBAPIError.orig``, the async
    adapters' ``raise ... from``)."""
    for _ in range(5):
        inner = getattr(error, "orig", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def error_type(error: BaseException) -> str:
    """``error.type``: the driver's exception class, fully qualified (bounded cardinality)."""
    cls = type(_driver_error(error))
    return f"{cls.__module__}.{cls.__qualname__}"


def error_sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE the driver reports (asyncpg/psycopg ``sqlstate``, psycopg2 ``pgcode``);
    53300 recognised from the message when a driver gives no code."""
    driver_error = _driver_error(error)
    for candidate in (error, driver_error):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    text = str(driver_error).lower()
    if any(marker in text for marker in _TOO_MANY_CLIENTS_TEXT):
        return TOO_MANY_CONNECTIONS_SQLSTATE
    return None
