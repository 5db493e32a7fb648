"""Session lifetime: spans, outcome, held-idle time, code site, and "outlived its response".

A :class:`SessionTracker` lives on each ``Session`` (and ``AsyncSession.sync_session``) that
took a connection. A *holding period* runs from the session's first checkout to the release of
its last connection; each period can become one ``sqlalchemy.session`` span, built only at its
end (with the start time and parent captured at its start), so sessions that are not emitted
cost no span at all.

The hooks (``hooks.py``) call in: ``on_begin`` from the Session ``after_begin`` listener,
``on_statement`` from the statement hook, ``on_release`` when a session's connection is
returned, ``request_finished`` from the Starlette shim.

Outlived response -- the reliable signal. Starlette sends the response and then runs
BackgroundTasks inside the same ASGI call, so "the server span ended" proves nothing. The
``Starlette.__call__`` shim (FastAPI included) marks the moment the final body chunk was sent,
in a :class:`RequestState` carried by the :data:`request_state` contextvar (so it follows
``asyncio.create_task`` copies too). A session *created before* that moment is flagged when it:
(a) takes a connection after the response was sent, (b) runs a statement after it, or (c) still
holds a connection when the request's ASGI call returns. A session created after the response
(a fresh session inside the background task -- the correct pattern) is never flagged.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

from opentelemetry.trace import Tracer
from sqlalchemy.orm import Session

from opentelemetry import context as otel_context

from . import semconv
from .codesite import CodeSite, find_code_site
from .config import SESSION_SPANS_ALL, SESSION_SPANS_NONE, Config
from .leaks import LeakDetector
from .recorder import NO_SITES, TRACKER_ATTR, Hold, PoolRecorder, log_hook_error, opening_site

_logger = logging.getLogger(__name__)


class RequestState:
    """One HTTP request as seen from inside the app (set by the ASGI shim)."""

    __slots__ = ("__weakref__", "finished", "response_sent_at", "scope", "trackers")

    def __init__(self, scope: dict[str, Any]):
        self.scope = scope
        # perf_counter when the response counts as sent: its background tasks started, or the
        # request's ASGI call returned (see hooks.Hooks._wrap_background).
        self.response_sent_at = 0.0
        self.finished = False  # the request's ASGI call returned
        # Sessions created during the request, checked when it ends (then dropped). A plain
        # list made on first use: most requests open one session, some none.
        self.trackers: list[SessionTracker] | None = None

    def route(self) -> str | None:
        route = self.scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else None

    def endpoint(self) -> Any:
        """The matched route's endpoint (the user's handler function), if any."""
        return getattr(self.scope.get("route"), "endpoint", None)


# The current HTTP request (set by the Starlette shim in hooks.py).
request_state: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar(
    "otel_sqlalchemy_pool_request", default=None
)


class SessionTracker:
    __slots__ = (
        "__weakref__",
        "async_",
        "born_after_response",
        "flagged_outlived",
        "garbage_collected",
        "holder",
        "holding",
        "idle_s",
        "outcome",
        "outlived_event",
        "parent_context",
        "recorder",
        "request",
        "site",
        "start_ns",
        "start_perf",
        "statements",
        "transactions",
    )

    def __init__(self, session: Session, request: RequestState | None):
        self.request = request
        self.born_after_response = bool(request is not None and request.response_sent_at)
        self.flagged_outlived = False
        self.async_ = False
        self.site: CodeSite | None = None  # taken at checkout (session_spans=all), else None
        self.holder: Any = None  # the first checkout's Hold.holder (see opening_site)
        self.recorder: PoolRecorder | None = None
        self.holding = 0  # connections currently held
        self._reset_period()

    def _reset_period(self) -> None:
        self.start_perf = 0.0
        self.start_ns = 0
        self.parent_context: Any = None
        self.statements = 0
        self.transactions = 0
        self.idle_s = 0.0
        self.outcome: str | None = None
        self.garbage_collected = False
        # (time_ns, action) when this period flagged the session as outliving its response.
        self.outlived_event: tuple[int, str] | None = None

    def after_response(self) -> bool:
        """True when this request-scoped session is acting after its response was sent."""
        request = self.request
        return bool(
            request is not None and request.response_sent_at and not self.born_after_response
        )


class SessionTracking:
    """Session trackers and session spans; a release listener (``on_release``) of the hooks."""

    def __init__(self, config: Config, leaks: LeakDetector, tracer: Tracer):
        self.config = config
        self.leaks = leaks
        self.tracer = tracer
        self._walk = config.capture_code_site and config.session_spans == SESSION_SPANS_ALL

    # -- session events (registered by hooks.py) ----------------------------------------------
    def on_begin(self, session: Session, hold: Hold | None) -> None:
        """A Session began a transaction on a connection (``hold``: its checkout, if ours)."""
        try:
            tracker = session.__dict__.get(TRACKER_ATTR)
            if tracker is None:
                tracker = SessionTracker(session, request_state.get())
                tracker.async_ = _is_async(session)
                session.__dict__[TRACKER_ATTR] = tracker
                request = tracker.request
                if request is not None and not request.finished:
                    if request.trackers is None:
                        request.trackers = [tracker]
                    else:
                        request.trackers.append(tracker)
            if hold is None:
                return
            if hold.session is tracker:
                tracker.transactions += 1
                return
            hold.session = tracker
            recorder = hold.recorder
            if tracker.holding == 0:
                tracker.start_perf = hold.t_out
                tracker.start_ns = time.time_ns() - int((perf_counter() - hold.t_out) * 1e9)
                tracker.parent_context = hold.context
                tracker.recorder = recorder
                if tracker.holder is None:
                    tracker.holder = hold.holder
                if tracker.site is None:
                    tracker.site = hold.site
                    if tracker.site is None and self._walk:
                        tracker.site = find_code_site()
                if tracker.async_ and session.expire_on_commit:
                    recorder.async_expire_on_commit = True
                elif tracker.async_ and recorder.async_expire_on_commit is None:
                    recorder.async_expire_on_commit = False
                if tracker.after_response():
                    self._flag_outlived(tracker, semconv.OUTLIVED_TOOK_CONNECTION)
            tracker.holding += 1
            tracker.transactions += 1
        except Exception:
            log_hook_error("session after_begin")

    def after_commit(self, session: Session) -> None:
        tracker = session.__dict__.get(TRACKER_ATTR)
        if tracker is not None:
            tracker.outcome = semconv.OUTCOME_COMMIT

    def after_rollback(self, session: Session) -> None:
        tracker = session.__dict__.get(TRACKER_ATTR)
        if tracker is not None:
            tracker.outcome = semconv.OUTCOME_ROLLBACK

    # -- hooks from the pool side -------------------------------------------------------------
    def on_statement(self, hold: Hold) -> None:
        tracker = hold.session
        if tracker is not None and not tracker.flagged_outlived and tracker.after_response():
            self._flag_outlived(tracker, semconv.OUTLIVED_RAN_STATEMENT)

    def on_release(self, hold: Hold, now: float, detached: bool) -> None:
        tracker = hold.session
        if tracker is None:
            return
        try:
            hold.session = None
            tracker.statements += hold.statements
            tracker.idle_s += hold.idle_s(now)
            tracker.holding -= 1
            if tracker.holding <= 0:
                tracker.holding = 0
                self._period_ended(tracker, now)
        except Exception:
            log_hook_error("session release")

    def request_finished(self, state: RequestState) -> None:
        state.finished = True
        if not state.response_sent_at:  # no background task: the response went out just now
            state.response_sent_at = perf_counter()
        trackers, state.trackers = state.trackers, None
        try:
            for tracker in trackers or ():
                if tracker.holding and not tracker.born_after_response:
                    self._flag_outlived(tracker, semconv.OUTLIVED_HELD_AT_REQUEST_END)
        except Exception:
            log_hook_error("request end")

    def _flag_outlived(self, tracker: SessionTracker, action: str) -> None:
        if tracker.flagged_outlived or tracker.recorder is None:
            return
        tracker.flagged_outlived = True
        tracker.outlived_event = (time.time_ns(), action)  # an event on the period's span
        site = _opened_at(tracker)
        self.leaks.outlived_response(
            tracker.recorder,
            str(site) if site is not None else "unknown code site",
            _OUTLIVED_TEXT[action],
        )

    # -- spans --------------------------------------------------------------------------------
    def _period_ended(self, tracker: SessionTracker, now: float) -> None:
        recorder = tracker.recorder
        if recorder is None:
            return
        duration = max(0.0, now - tracker.start_perf)
        outcome = (
            semconv.OUTCOME_GARBAGE_COLLECTED
            if tracker.garbage_collected
            else tracker.outcome or semconv.OUTCOME_CLOSE
        )
        mode = self.config.session_spans
        anomalous = (
            tracker.flagged_outlived
            or tracker.garbage_collected
            or duration >= self.config.session_span_threshold_s
        )
        try:
            if mode == SESSION_SPANS_ALL or (mode != SESSION_SPANS_NONE and anomalous):
                self._emit_span(tracker, recorder, duration, outcome)
        finally:  # even if a span processor raised: the next period starts from zero
            flagged = tracker.flagged_outlived
            tracker._reset_period()
            # A session keeps its "outlived" flag across periods: it stays a leak suspect.
            tracker.flagged_outlived = flagged

    def _emit_span(
        self, tracker: SessionTracker, recorder: PoolRecorder, duration: float, outcome: str
    ) -> None:
        attributes: dict[str, Any] = {
            **recorder.attrs,
            semconv.SESSION_STATEMENTS: tracker.statements,
            semconv.SESSION_TRANSACTIONS: tracker.transactions,
            semconv.SESSION_OUTCOME: outcome,
            semconv.SESSION_HELD_IDLE: round(tracker.idle_s, 6),
            semconv.SESSION_OUTLIVED_RESPONSE: tracker.flagged_outlived,
            semconv.SESSION_ASYNC: tracker.async_,
        }
        site = _opened_at(tracker)
        if site is not None:
            attributes[semconv.CODE_FUNCTION] = site.function
            attributes[semconv.CODE_FILE] = site.file
            attributes[semconv.CODE_LINE] = site.line
        route = tracker.request.route() if tracker.request is not None else None
        if route:
            attributes[semconv.HTTP_ROUTE] = route
        parent = tracker.parent_context or otel_context.get_current()
        span = self.tracer.start_span(
            semconv.SESSION_SPAN_NAME,
            context=parent,
            start_time=tracker.start_ns,
            attributes=attributes,
        )
        if tracker.outlived_event is not None:
            # What the collector's tail sampling keeps traces for (collector-config/).
            at_ns, action = tracker.outlived_event
            span.add_event(
                semconv.OUTLIVED_RESPONSE_EVENT,
                {**recorder.attrs, semconv.OUTLIVED_ACTION: action},
                timestamp=at_ns,
            )
        span.end(end_time=tracker.start_ns + int(duration * 1e9))


# For the log line (leaks.outlived_response): "a request-scoped session <text> after ...".
_OUTLIVED_TEXT = {
    semconv.OUTLIVED_TOOK_CONNECTION: "took a new connection",
    semconv.OUTLIVED_RAN_STATEMENT: "ran a statement",
    semconv.OUTLIVED_HELD_AT_REQUEST_END: "still held a connection when the request ended",
}


def _opened_at(tracker: SessionTracker) -> CodeSite | None:
    """Where the session took its first connection: the checkout site when it was taken,
    else the request's endpoint or the task's coroutine (``recorder.opening_site``)."""
    if tracker.site is not None or tracker.holder is NO_SITES:
        return tracker.site
    return opening_site(tracker.request, tracker.holder)


def _is_async(session: Session) -> bool:
    global _async_session_of
    if _async_session_of is None:
        try:
            from sqlalchemy.ext.asyncio import async_session
        except ImportError:  # pragma: no cover
            return False
        _async_session_of = async_session  # imported once, not at every session's first begin
    return _async_session_of(session) is not None


_async_session_of: Callable[[Session], Any] | None = None
