"""Timing the checkout: wait_time, pending requests, timeouts and ``sqlalchemy.pool.wait`` spans.

``_ConnectionRecord.checkout`` (the one entry of every new checkout, whatever the pool class) is
wrapped at class level. The wrapper is the hot path of every request, so a checkout that did not
wait costs two ``perf_counter`` calls, a list append/pop (the pending count, atomic under the
GIL), a ``Hold``, two dict writes and the ``wait_time`` record. Time spent opening a new DBAPI
connection inside the checkout is measured by the connect wrapper (``pools.py``) and
subtracted, so ``wait_time`` and ``create_time`` never mix.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from sqlalchemy import exc

from opentelemetry import context as otel_context

from . import semconv
from .codesite import find_code_site
from .config import Config
from .pools import (
    CREATE_TIME_ATTR,
    HOLD_ATTR,
    POOL_RECORDER_ATTR,
    Hold,
    PoolRecorder,
    _log_hook_error,
)
from .sessions import current_request_getter

if TYPE_CHECKING:
    from .holders import HolderForensics
    from .pools import PoolRegistry

_TIMEOUT_ERROR_TYPE = f"{exc.TimeoutError.__module__}.{exc.TimeoutError.__qualname__}"


def _context_getter() -> Callable[[], Any]:
    """``context.get_current`` without its two Python frames when the runtime context is the
    default contextvars one (it is what ``get_current`` reads); the API call otherwise."""
    try:
        from opentelemetry.context import _RUNTIME_CONTEXT
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

        if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext:
            return _RUNTIME_CONTEXT._current_context.get  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        pass
    return otel_context.get_current


class SpanBudget:
    """A token bucket: at saturation most checkouts wait past the threshold, and a span with
    holder links for each of them would cost the most exactly when the pool is the bottleneck.
    The wait_time histogram still records every checkout."""

    __slots__ = ("last", "per_s", "skipped", "tokens")

    def __init__(self, per_s: float):
        self.per_s = per_s
        self.tokens = max(1.0, per_s)  # a burst of up to one second's worth
        self.last: float | None = None
        self.skipped = 0  # slow waits without a span since the last span

    def take(self, now: float) -> bool:
        if self.per_s <= 0:
            return True
        # Waits end out of order across threads: time never runs backwards for the bucket.
        elapsed = 0.0 if self.last is None else max(0.0, now - self.last)
        self.last = now if self.last is None else max(self.last, now)
        self.tokens = min(max(1.0, self.per_s), self.tokens + elapsed * self.per_s)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.skipped += 1
        return False

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


class WaitTimer:
    """Builds the checkout wrapper and emits wait spans."""

    def __init__(self, config: Config, telemetry: Any, tracer: Tracer, forensics: HolderForensics):
        self.config = config
        self.telemetry = telemetry
        self.tracer = tracer
        self.forensics = forensics
        self._budgets: weakref.WeakKeyDictionary[PoolRecorder, SpanBudget] = (
            weakref.WeakKeyDictionary()
        )

    def wrap(self, original: Callable[[Any], Any], registry: PoolRegistry) -> Callable[..., Any]:
        """The wrapper of ``_ConnectionRecord.checkout(pool)`` (``original``: its function).

        That classmethod is the one entry of every new checkout, for every pool class: it
        calls ``pool._do_get()`` (where the wait happens; QueuePool's retries recurse inside
        it, unseen), reconnects a recycled or invalidated record, and returns the fairy."""
        wait_time = self.telemetry.wait_time
        threshold = self.config.wait_span_threshold_s
        capture_site = self.config.capture_code_site
        get_context = _context_getter()
        get_request = current_request_getter()
        adopt = registry.adopt
        slow_wait = self._slow_wait
        timed_out = self._timed_out
        deferred = self.telemetry.deferred
        drain = self.telemetry.drain

        def checkout(cls: type, pool: Any) -> Any:
            recorder = pool.__dict__.get(POOL_RECORDER_ATTR)
            if recorder is None:
                recorder = adopt(pool)
            if recorder is False:
                return original(cls, pool)
            if deferred:  # work queued during a garbage collection: a safe place to do it
                drain()
            waiters = recorder.waiters
            used_before = len(recorder.holders)
            waiters.append(None)
            pending_before = len(waiters)  # including this caller
            start = perf_counter()
            try:
                fairy = original(cls, pool)
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
                hold = Hold(
                    recorder,
                    end,
                    get_context(),
                    find_code_site(sys._getframe(1)) if capture_site else None,
                    get_request(),
                )
                record_dict[HOLD_ATTR] = hold
                recorder.holders[record] = hold
                if waited >= threshold:
                    slow_wait(recorder, start, end, used_before, pending_before)
            except Exception:
                _log_hook_error("checkout")
            return fairy

        checkout.__wrapped__ = original  # type: ignore[attr-defined]
        return checkout

    # -- spans (rare paths) -------------------------------------------------------------------
    def _span_attributes(
        self, recorder: PoolRecorder, used_before: int, pending_before: int
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            **recorder.attrs,
            semconv.POOL_CLASS: recorder.pool_class,
            semconv.POOL_CHECKED_OUT: used_before,
            semconv.POOL_PENDING: pending_before,
        }
        if recorder.size is not None:
            attributes[semconv.POOL_SIZE] = recorder.size
        if recorder.max_overflow is not None:
            attributes[semconv.POOL_MAX_OVERFLOW] = recorder.max_overflow
        if recorder.timeout is not None:
            attributes[semconv.POOL_TIMEOUT] = recorder.timeout
        return attributes

    def _start_span(
        self, recorder: PoolRecorder, start: float, end: float, used_before: int, pending: int
    ):
        now_ns = time.time_ns()
        start_ns = now_ns - int((perf_counter() - start) * 1e9)
        links, summary = self.forensics.snapshot_links(recorder)
        attributes = self._span_attributes(recorder, used_before, pending)
        attributes.update(summary)
        skipped = self._budget(recorder).take_skipped()
        if skipped:
            attributes[semconv.WAITS_WITHOUT_SPAN] = skipped
        span = self.tracer.start_span(
            semconv.WAIT_SPAN_NAME,
            kind=SpanKind.INTERNAL,
            start_time=start_ns,
            attributes=attributes,
            links=links,
        )
        return span, start_ns + int((end - start) * 1e9)

    def _budget(self, recorder: PoolRecorder) -> SpanBudget:
        budget = self._budgets.get(recorder)
        if budget is None:
            budget = self._budgets[recorder] = SpanBudget(self.config.wait_spans_per_s)
        return budget

    def _slow_wait(
        self, recorder: PoolRecorder, start: float, end: float, used_before: int, pending: int
    ) -> None:
        if not self._budget(recorder).take(end):
            return
        span, end_ns = self._start_span(recorder, start, end, used_before, pending)
        span.end(end_time=end_ns)

    def _timed_out(
        self,
        recorder: PoolRecorder,
        start: float,
        end: float,
        used_before: int,
        pending: int,
        error: BaseException,
    ) -> None:
        try:
            self.telemetry.timeouts.add(1, recorder.attrs)
            self.telemetry.wait_time.record(end - start, recorder.attrs)
            span, end_ns = self._start_span(recorder, start, end, used_before, pending)
            span.set_attribute(semconv.ERROR_TYPE, _TIMEOUT_ERROR_TYPE)
            span.record_exception(error, escaped=True)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.end(end_time=end_ns)
            self.forensics.log_timeout(recorder, error)
        except Exception:
            _log_hook_error("timeout")
