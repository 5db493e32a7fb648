"""Every hook into code we do not own, installed and removed in one place.

The surfaces (docs/ARCHITECTURE.md has the table: each one on SQLAlchemy 2.0 / 2.1, why it is
private, what breaks if it changes):

- class-level wrappers: ``_ConnectionRecord.checkout`` (every checkout: wait time, pending,
  timeouts, adoption of new pools), ``_ConnectionRecord.checkin`` (use time, GC-reclaimed
  leaks), ``_ConnectionRecord.__connect`` (create time), ``Connection._execute_context``
  (statement time on timed pools), ``_ConnectionFairy._reset`` (open transaction at checkin;
  installed with the first timed engine), ``Starlette.__call__`` (the "response sent" marker);
- event listeners: Pool ``detach`` / ``close`` / ``invalidate``; Session ``after_begin`` /
  ``after_commit`` / ``after_rollback``; Engine ``do_connect`` (``set_application_name``);
  plus a ``gc.callbacks`` entry (the GC flag);
- private reads: create_engine's creator closure (names, the pg_activity URL), the
  ``_finalize_fairy`` and ``get_connection`` frames up the stack (what SQLAlchemy is in the
  middle of), ``_ConnectionRecord.__pool``, OTel's ``_RUNTIME_CONTEXT``;
- per event loop, not per class (``eventloop.py``, attached when the loop is first seen and
  removed by ``EventLoopMonitor.detach()`` at uninstrument): an instance attribute over the
  loop selector's ``select`` (active/idle time), ``sys._current_frames`` (the watchdog's stack
  sample) and ``/proc/self/task/<tid>/schedstat`` (the loop thread's CPU / run-queue time).

:meth:`Hooks.install` applies :meth:`Hooks.table` (a list of :class:`Patch` / :class:`Listen`
/ :class:`GcCallback` entries); each applied entry pushes its undo; :meth:`Hooks.uninstall`
runs the undos in reverse, then removes the attributes we stamped on SQLAlchemy objects
(``recorder.STAMP_ATTRS``, ``POOL_RECORDER_ATTR``).

The wrapper bodies below are the hot path of every request: a checkout that did not wait
costs two ``perf_counter`` calls, a list append/pop (the pending count, atomic under the GIL),
a ``Hold``, two dict writes and the ``wait_time`` record; a checkin a dict pop, the
``use_time`` record and (when at least 1 ms) ``held_idle_time``. Anything rarer is a call into
a collaborator: ``WaitTimer`` (wait spans), ``LeakDetector``, ``SessionTracking``. No
exception escapes a hook: each logs it once (``recorder.log_hook_error``) and lets the
application's call proceed.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from asyncio import _get_running_loop, current_task
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter, time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool
from sqlalchemy.pool import base as pool_base
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord

from opentelemetry import context as otel_context

from . import semconv
from .codesite import find_code_site
from .config import SESSION_SPANS_ALL, STATEMENT_TIMING_ALL, STATEMENT_TIMING_OFF, Config
from .eventloop import EventLoopMonitor
from .leaks import LeakDetector
from .metrics import Telemetry
from .pg_activity import application_name_for, apply_application_name
from .pools import PoolRegistry
from .recorder import (
    CLOSE_REASON_ATTR,
    CREATE_TIME_ATTR,
    HOLD_ATTR,
    NO_SITES,
    POOL_RECORDER_ATTR,
    STAMP_ATTRS,
    Hold,
    PoolRecorder,
    ReleaseListener,
    gc_collecting,
    log_hook_error,
    pool_records,
    watch_gc,
)
from .sessions import RequestState, SessionTracking, request_state
from .wait import WaitTimer

_logger = logging.getLogger(__name__)

Undo = Callable[[], None]


# -- the table's entries --------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """Replace the class attribute ``target.attribute`` by ``wrap(original)``."""

    target: type
    attribute: str
    wrap: Callable[[Any], Any]

    def apply(self) -> Undo:
        original = self.target.__dict__[self.attribute]
        setattr(self.target, self.attribute, self.wrap(original))
        return lambda: setattr(self.target, self.attribute, original)


@dataclass(frozen=True)
class Listen:
    """``sqlalchemy.event.listen(target, name, fn)``."""

    target: Any
    name: str
    fn: Callable[..., Any]

    def apply(self) -> Undo:
        event.listen(self.target, self.name, self.fn)

        def undo() -> None:
            if event.contains(self.target, self.name, self.fn):
                event.remove(self.target, self.name, self.fn)

        return undo


@dataclass(frozen=True)
class GcCallback:
    """Our entry in ``gc.callbacks`` (keeps ``recorder.gc_collecting`` true during a GC)."""

    def apply(self) -> Undo:
        watch_gc(True)
        return lambda: watch_gc(False)


Entry = Patch | Listen | GcCallback


class Hooks:
    """Installs every hook (see the module docstring) and calls the collaborators from them."""

    def __init__(
        self,
        config: Config,
        registry: PoolRegistry,
        telemetry: Telemetry,
        waits: WaitTimer,
        sessions: SessionTracking,
        leaks: LeakDetector,
        loop_monitor: EventLoopMonitor | None = None,
    ):
        self.config = config
        self.loop_monitor = loop_monitor
        self.registry = registry
        self.telemetry = telemetry
        self.waits = waits
        self.sessions = sessions
        self.leaks = leaks
        # Told when a checkout owned by a Session (or reported as a long hold) ends.
        self.release_listeners: Sequence[ReleaseListener] = (sessions, leaks)
        self._applied: list[tuple[Entry, Undo]] = []
        self._reset_patched = False
        self._lock = threading.Lock()

    # -- install / uninstall --------------------------------------------------------------------
    def table(self) -> list[Entry]:
        """What install() applies, in order (``_ConnectionFairy._reset`` comes later, with the
        first timed engine: see time_statements)."""
        entries: list[Entry] = [
            Patch(_ConnectionRecord, "checkout", self._wrap_checkout),
            Patch(_ConnectionRecord, "checkin", self._wrap_checkin),
            Patch(_ConnectionRecord, _RECORD_CONNECT, self._wrap_connect),
        ]
        if self.config.statement_timing != STATEMENT_TIMING_OFF:
            entries.append(Patch(Connection, "_execute_context", self._wrap_execute))
        entries += [
            Listen(Pool, "detach", self._on_detach),
            Listen(Pool, "close", self._on_close),
            Listen(Pool, "invalidate", self._on_invalidate),
            Listen(Session, "after_begin", self._after_begin),
            Listen(Session, "after_commit", self.sessions.after_commit),
            Listen(Session, "after_rollback", self.sessions.after_rollback),
        ]
        if self.config.set_application_name:
            entries.append(Listen(Engine, "do_connect", set_application_name))
        starlette = _starlette_class()
        if starlette is not None and not _is_ours(starlette.__dict__.get("__call__")):
            entries.append(Patch(starlette, "__call__", self._wrap_asgi))
            from starlette.background import BackgroundTask

            entries.append(Patch(BackgroundTask, "__call__", self._wrap_background))
        entries.append(GcCallback())
        return entries

    def install(self, engines: Iterable[Any] | None) -> None:
        for entry in self.table():
            self._apply(entry)
        PoolRegistry.installed = self.registry
        explicit = self.registry.limit_to(engines) if engines is not None else None
        if self.config.statement_timing == STATEMENT_TIMING_ALL:
            for engine in explicit if explicit is not None else (Engine,):
                self.time_statements(engine)

    def uninstall(self) -> None:
        if PoolRegistry.installed is self.registry:
            PoolRegistry.installed = None
        while self._applied:
            entry, undo = self._applied.pop()
            try:
                undo()
            except Exception:
                _logger.debug("could not undo %s", entry, exc_info=True)
        self._reset_patched = False
        self._remove_stamps()

    def installed(self) -> list[Entry]:
        """The entries applied now, in order."""
        return [entry for entry, _ in self._applied]

    def _apply(self, entry: Entry) -> None:
        self._applied.append((entry, entry.apply()))

    def _remove_stamps(self) -> None:
        recorders, pools = self.registry.clear()
        for recorder in recorders:
            for record in list(recorder.holders):
                record.__dict__.pop(HOLD_ATTR, None)
            recorder.holders.clear()
        for pool in pools:
            pool.__dict__.pop(POOL_RECORDER_ATTR, None)
            for record in pool_records(pool):
                for attr in STAMP_ATTRS:
                    record.__dict__.pop(attr, None)

    def time_statements(self, engine: Any) -> None:
        """Time statements on ``engine`` (or on every engine when given the Engine class).

        Feeds held-idle time and statement counts (the ``_execute_context`` wrapper measures
        statements of timed pools only) and the open-transaction-at-checkin check (the
        ``_ConnectionFairy._reset`` wrapper, installed with the first timed engine). By default
        (statement_timing=sessions) an engine is timed once a Session uses it."""
        if self.config.statement_timing == STATEMENT_TIMING_OFF:
            return
        if self.registry.mark_timed(engine, all_engines=engine is Engine):
            with self._lock:
                if not self._reset_patched:
                    self._apply(Patch(_ConnectionFairy, "_reset", self._wrap_reset))
                    self._reset_patched = True

    # -- checkout / checkin: the hot path -------------------------------------------------------
    def _wrap_checkout(self, original: classmethod) -> classmethod:  # type: ignore[type-arg]
        """The wrapper of the classmethod ``_ConnectionRecord.checkout(pool)``.

        That classmethod is the one entry of every new checkout, for every pool class: it
        calls ``pool._do_get()`` (where the wait happens; QueuePool's retries recurse inside
        it, unseen), reconnects a recycled or invalidated record, and returns the fairy. Time
        spent opening a new DBAPI connection inside it is measured by the connect wrapper and
        subtracted, so ``wait_time`` and ``create_time`` never mix."""
        checkout_fn = original.__func__
        wait_time = self.telemetry.wait_time
        threshold = self.config.wait_span_threshold_s
        sites = self.config.capture_code_site
        # Code sites are resolved when someone asks (Hold.where). The walk at checkout is kept
        # only where nothing could be resolved later: every session span names its site
        # (session_spans=all), and a plain thread outside any HTTP request or asyncio task
        # has neither an endpoint nor a meaningful "now" to report.
        walk_always = sites and self.config.session_spans == SESSION_SPANS_ALL
        get_ident = threading.get_ident
        get_context = context_getter()
        get_request = request_state.get
        adopt = self.registry.adopt
        slow_wait = self.waits.slow_wait
        timed_out = self.waits.timed_out
        deferred = self.telemetry.deferred
        drain = self.telemetry.drain

        def checkout(cls: type, pool: Any) -> Any:
            recorder = pool.__dict__.get(POOL_RECORDER_ATTR)
            if recorder is None:
                recorder = adopt(pool)
            if recorder is False:
                return checkout_fn(cls, pool)
            if deferred:  # work queued during a garbage collection: a safe place to do it
                drain()
            waiters = recorder.waiters
            used_before = len(recorder.holders)
            waiters.append(None)
            pending_before = len(waiters)  # including this caller
            start = perf_counter()
            try:
                fairy = checkout_fn(cls, pool)
            except exc.TimeoutError as error:
                waiters.pop()
                timed_out(recorder, start, perf_counter(), used_before, pending_before, error)
                raise
            except BaseException:
                waiters.pop()
                raise
            end = perf_counter()
            waiters.pop()
            try:
                record = fairy._connection_record
                record_dict = record.__dict__
                waited = end - start
                created = record_dict.pop(CREATE_TIME_ATTR, None)
                if created is not None and created[0] >= start:
                    waited = max(0.0, waited - created[1])
                wait_time.record(waited, recorder.attrs)
                request = get_request()
                loop = _get_running_loop()
                site = None
                if not sites:
                    holder: Any = NO_SITES
                elif loop is not None:
                    holder = current_task(loop)
                else:
                    holder = get_ident()
                    if request is None:
                        site = find_code_site(sys._getframe(1))
                if walk_always and site is None:
                    site = find_code_site(sys._getframe(1))
                hold = Hold(recorder, end, get_context(), site, request, holder)
                record_dict[HOLD_ATTR] = hold
                recorder.holders[record] = hold
                if waited >= threshold:
                    slow_wait(recorder, start, end, used_before, pending_before)
            except Exception:
                log_hook_error("checkout")
            return fairy

        checkout.__wrapped__ = checkout_fn  # type: ignore[attr-defined]
        return classmethod(checkout)

    def _wrap_checkin(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``_ConnectionRecord.checkin``: the connection goes back (or is discarded)."""
        record_release = self.telemetry.record_release
        deferred = self.telemetry.deferred
        run_or_defer = self.telemetry.run_or_defer
        garbage_collected = self.leaks.garbage_collected
        release = self.release
        listeners = self.release_listeners

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
                        run_or_defer(garbage_collected, hold)
                    if gc_collecting[0] or deferred:
                        run_or_defer(release, hold, now, False)
                    else:
                        record_release(hold, now)
                        # The listeners (session periods, "returned after a long hold" logs)
                        # only concern holds owned by a Session or already reported.
                        if hold.session is not None or hold.leak_reported:
                            for listener in listeners:
                                listener.on_release(hold, now, False)
                except Exception:
                    log_hook_error("checkin")
            return original(record, _fairy_was_created)

        checkin.__wrapped__ = original  # type: ignore[attr-defined]
        return checkin

    def release(self, hold: Hold, now: float, detached: bool) -> None:
        """A checkout ended (the checkin wrapper does the same inline)."""
        self.telemetry.record_release(hold, now)
        if hold.session is not None or hold.leak_reported:
            for listener in self.release_listeners:
                listener.on_release(hold, now, detached)

    def _wrap_connect(self, original: Callable[[Any], None]) -> Callable[[Any], None]:
        """Time new DBAPI connections (create_time) and tag each record with its recorder.

        Wraps ``_ConnectionRecord.__connect``: the DBAPI connect *and* the connect-time events
        (the dialect's first-connect initialisation, the application's ``connect`` listeners),
        i.e. until the connection is ready; the checkout wrapper subtracts it from wait_time."""
        create_time = self.telemetry.create_time
        connect_failed = self.telemetry.connect_failed

        def connect(record: Any) -> None:
            recorder = recorder_of(record)
            if recorder is None:
                return original(record)
            start = perf_counter()
            try:
                original(record)
            except BaseException as error:
                try:
                    connect_failed(recorder, error)
                except Exception:
                    log_hook_error("connect failure")
                raise
            elapsed = perf_counter() - start
            try:
                # (when it ended, how long it took): the checkout wrapper subtracts it only when
                # the connect happened inside its own checkout, not in a later reconnect.
                record.__dict__[CREATE_TIME_ATTR] = (start + elapsed, elapsed)
                create_time.record(elapsed, recorder.attrs)
            except Exception:
                log_hook_error("connect")

        connect.__wrapped__ = original  # type: ignore[attr-defined]
        return connect

    # -- statements and the checkin reset (timed pools) -----------------------------------------
    def _wrap_execute(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``Connection._execute_context``: every statement of every engine passes here. Only
        statements on a connection whose pool is timed are measured; others cost one lookup.
        (Engine ``before/after_cursor_execute`` listeners would make SQLAlchemy build a joined
        dispatcher for every Connection of the engine: ~7 % of a request's instructions.)"""
        on_statement = self.sessions.on_statement
        slow_s = self.config.slow_statement_threshold_ms / 1000.0 or float("inf")
        slow_statement = self.telemetry.slow_statement

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
                    if hold.session is not None:
                        on_statement(hold)
            except Exception:
                hold = None
                log_hook_error("statement start")
            if hold is None:
                return original(conn, *args, **kwargs)
            try:
                return original(conn, *args, **kwargs)
            finally:
                if hold.t_stmt:
                    elapsed = perf_counter() - hold.t_stmt
                    hold.exec_s += elapsed
                    hold.t_stmt = 0.0
                    if elapsed >= slow_s:  # rare: the common statement pays this comparison
                        try:
                            slow_statement(hold, elapsed)
                        except Exception:
                            log_hook_error("slow statement")

        _execute_context.__wrapped__ = original  # type: ignore[attr-defined]
        return _execute_context

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
                self.telemetry.run_or_defer(self.leaks.open_transaction_at_checkin, hold)
        except Exception:
            log_hook_error("reset")

    # -- pool events (rare paths; must never raise) ---------------------------------------------
    def _on_detach(self, dbapi_connection: Any, record: Any) -> None:
        try:
            hold = record.__dict__.pop(HOLD_ATTR, None)
            recorder = recorder_of(record)
            telemetry = self.telemetry
            if hold is not None:
                if _finalizing_garbage():
                    # Async dialects detach (terminate) a garbage-collected connection instead
                    # of checking it in: a leak, like the sync case seen at checkin.
                    telemetry.run_or_defer(self.leaks.garbage_collected, hold)
                recorder = hold.recorder
                recorder.holders.pop(record, None)  # "used" is exact immediately
                telemetry.run_or_defer(self.release, hold, perf_counter(), True)
            if recorder is not None:
                telemetry.closed(recorder, semconv.CLOSE_REASON_DETACHED)
        except Exception:
            log_hook_error("detach")

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
            log_hook_error("invalidate")

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
                elif recorder.queue_full():
                    reason = semconv.CLOSE_REASON_OVERFLOW  # no room to return it
                else:
                    reason = semconv.CLOSE_REASON_DISPOSE
            self.telemetry.closed(recorder, reason)
        except Exception:
            log_hook_error("close")

    # -- sessions and HTTP requests -------------------------------------------------------------
    def _after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        hold = None
        try:
            hold = hold_of_connection(connection)
            if hold is not None and not hold.recorder.statements_timed:
                self.time_statements(connection.engine)
        except Exception:
            log_hook_error("session after_begin")
        self.sessions.on_begin(session, hold)

    def _wrap_asgi(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``Starlette.__call__`` (FastAPI included): a per-request :class:`RequestState` in a
        contextvar, nothing else per request. The response counts as sent when its background
        tasks start (``_wrap_background``) or, at the latest, when the ASGI call returns."""
        request_finished = self.sessions.request_finished
        loop_monitor = self.loop_monitor

        async def __call__(app: Any, scope: Any, receive: Any, send: Any) -> None:
            if loop_monitor is not None and not loop_monitor.attached:
                # The app's event loop (lifespan startup, else the first request): uvicorn
                # imports the app, and so runs instrument(), before it starts its loop.
                loop_monitor.attach_running_loop()
            if scope["type"] != "http" or request_state.get() is not None:
                await original(app, scope, receive, send)
                return
            state = RequestState(scope)
            token = request_state.set(state)
            try:
                await original(app, scope, receive, send)
            finally:
                request_state.reset(token)
                request_finished(state)

        __call__._otel_sqlalchemy_pool = True  # type: ignore[attr-defined]
        __call__.__wrapped__ = original  # type: ignore[attr-defined]
        return __call__

    @staticmethod
    def _wrap_background(original: Callable[..., Any]) -> Callable[..., Any]:
        """``starlette.background.BackgroundTask.__call__``: Starlette runs a response's
        background tasks right after sending its last body chunk, inside the same ASGI call;
        from here on the request's sessions act after the response was sent. (Wrapping every
        request's ``send`` to see that chunk cost each request two extra frames per message.)"""

        async def __call__(task: Any, *args: Any, **kwargs: Any) -> Any:
            state = request_state.get()
            if state is not None and not state.response_sent_at:
                state.response_sent_at = perf_counter()
            return await original(task, *args, **kwargs)

        __call__.__wrapped__ = original  # type: ignore[attr-defined]
        return __call__


def set_application_name(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
    """The ``do_connect`` listener: application_name per pool, so server rows map to pools."""
    try:
        recorder = recorder_of(record) if record is not None else None
        if recorder is not None and dialect.name == "postgresql":
            apply_application_name(dialect.driver, cparams, application_name_for(recorder.name))
    except Exception:
        _logger.debug("could not set application_name", exc_info=True)


# -- private reads --------------------------------------------------------------------------------
# _ConnectionRecord.__connect (name-mangled): opens the DBAPI connection, runs connect events.
_RECORD_CONNECT = "_ConnectionRecord__connect"
_FINALIZE_FAIRY_CODE = getattr(getattr(pool_base, "_finalize_fairy", None), "__code__", None)
_GET_CONNECTION_CODE = getattr(_ConnectionRecord.get_connection, "__code__", None)


def recorder_of(record: Any) -> PoolRecorder | None:
    """The recorder of a connection record's pool (None when the pool is not ours)."""
    pool = getattr(record, "_ConnectionRecord__pool", None)  # name-mangled private attribute
    recorder = pool.__dict__.get(POOL_RECORDER_ATTR) if pool is not None else None
    return recorder or None


def hold_of_connection(connection: Any) -> Hold | None:
    """The Hold of a SQLAlchemy Connection's checkout, if the pool is ours."""
    fairy = getattr(connection, "_dbapi_connection", None)
    record = getattr(fairy, "_connection_record", None) if fairy is not None else None
    return record.__dict__.get(HOLD_ATTR) if record is not None else None


def creator_closure(pool: Pool) -> Mapping[str, Any]:
    """The variables create_engine's creator closes over (``cparams``, ``dialect``), if any."""
    creator = getattr(pool, "_creator", None)
    try:
        return dict(inspect.getclosurevars(creator).nonlocals) if creator else {}
    except (TypeError, ValueError):
        return {}


def context_getter() -> Callable[[], Any]:
    """``context.get_current`` without its two Python frames when the runtime context is the
    default contextvars one (it is what ``get_current`` reads); the API call otherwise."""
    try:
        from opentelemetry.context import _RUNTIME_CONTEXT  # type: ignore[attr-defined]
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

        if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext:
            return _RUNTIME_CONTEXT._current_context.get  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        pass
    return otel_context.get_current


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


def _starlette_class() -> type | None:
    try:
        from starlette.applications import Starlette
    except ImportError:
        return None
    return Starlette


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, "_otel_sqlalchemy_pool", False))
