"""Timing the checkout: wait_time, pending requests, timeouts and ``sqlalchemy.pool.wait`` spans.

Every pool class's ``_do_get`` is wrapped. The wrapper is the hot path of every request, so a
checkout that did not wait costs two ``perf_counter`` calls, a list append/pop (the pending
count, atomic under the GIL), one dict write and the ``wait_time`` record. Time spent opening
a new DBAPI connection inside ``_do_get`` is measured by the creator wrapper (``pools.py``)
and subtracted, so ``wait_time`` and ``create_time`` never mix.
"""

from __future__ import annotations

import sys
import time
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
    RECORD_RECORDER_ATTR,
    Hold,
    PoolRecorder,
    _log_hook_error,
)
from .sessions import current_request

if TYPE_CHECKING:
    from .holders import HolderForensics
    from .pools import PoolRegistry

_TIMEOUT_ERROR_TYPE = f"{exc.TimeoutError.__module__}.{exc.TimeoutError.__qualname__}"


class WaitTimer:
    """Builds the ``_do_get`` wrappers and emits wait spans."""

    def __init__(self, config: Config, telemetry: Any, tracer: Tracer, forensics: HolderForensics):
        self.config = config
        self.telemetry = telemetry
        self.tracer = tracer
        self.forensics = forensics
        self._original_codes: set[Any] = set()

    def wrap(self, original: Callable[[Any], Any], registry: PoolRegistry) -> Callable[[Any], Any]:
        wait_time = self.telemetry.wait_time
        threshold = self.config.wait_span_threshold_s
        capture_site = self.config.capture_code_site
        get_context = otel_context.get_current
        # Codes of every wrapped original: QueuePool._do_get retries by calling itself, and a
        # pool subclass's _do_get may call super()._do_get(); only the outermost call is timed.
        inner_codes = self._original_codes
        inner_codes.add(original.__code__)
        adopt = registry.adopt
        slow_wait = self._slow_wait
        timed_out = self._timed_out
        deferred = self.telemetry.deferred
        drain = self.telemetry.drain

        def _do_get(pool: Any) -> Any:
            recorder = pool.__dict__.get(POOL_RECORDER_ATTR)
            if recorder is None:
                recorder = adopt(pool)
            if recorder is False or sys._getframe(1).f_code in inner_codes:
                return original(pool)
            if deferred:  # work queued during a garbage collection: a safe place to do it
                drain()
            waiters = recorder.waiters
            used_before = len(recorder.holders)
            waiters.append(None)
            pending_before = len(waiters)  # including this caller
            start = perf_counter()
            try:
                record = original(pool)
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
                    current_request(),
                )
                record_dict[HOLD_ATTR] = hold
                record_dict[RECORD_RECORDER_ATTR] = recorder
                recorder.holders[record] = hold
                if waited >= threshold:
                    slow_wait(recorder, start, end, used_before, pending_before)
            except Exception:
                _log_hook_error("checkout")
            return record

        _do_get.__wrapped__ = original  # type: ignore[attr-defined]
        _do_get.__qualname__ = getattr(original, "__qualname__", "_do_get")
        return _do_get

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
        span = self.tracer.start_span(
            semconv.WAIT_SPAN_NAME,
            kind=SpanKind.INTERNAL,
            start_time=start_ns,
            attributes=attributes,
            links=links,
        )
        return span, start_ns + int((end - start) * 1e9)

    def _slow_wait(
        self, recorder: PoolRecorder, start: float, end: float, used_before: int, pending: int
    ) -> None:
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
