"""Wait spans: ``sqlalchemy.pool.wait`` for slow and timed-out checkouts, and their budget.

The checkout hook (``hooks.py``) times every checkout and records ``wait_time``; it calls
:meth:`WaitTimer.slow_wait` when a wait reached ``wait_span_threshold_ms`` and
:meth:`WaitTimer.timed_out` on ``TimeoutError``. Both are rare paths: they build a span with
links to the pool's holders (``holders.py``) and count timeouts.
"""

from __future__ import annotations

import time
import weakref
from time import perf_counter
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from sqlalchemy import exc

from . import semconv
from .config import Config
from .holders import HolderForensics
from .metrics import Telemetry
from .recorder import PoolRecorder, log_hook_error

_TIMEOUT_ERROR_TYPE = f"{exc.TimeoutError.__module__}.{exc.TimeoutError.__qualname__}"


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
    """Emits wait spans (the checkout hook decides when)."""

    def __init__(
        self, config: Config, telemetry: Telemetry, tracer: Tracer, forensics: HolderForensics
    ):
        self.config = config
        self.telemetry = telemetry
        self.tracer = tracer
        self.forensics = forensics
        self._budgets: weakref.WeakKeyDictionary[PoolRecorder, SpanBudget] = (
            weakref.WeakKeyDictionary()
        )

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
    ) -> tuple[Span, int]:
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

    def slow_wait(
        self, recorder: PoolRecorder, start: float, end: float, used_before: int, pending: int
    ) -> None:
        if not self._budget(recorder).take(end):
            return
        span, end_ns = self._start_span(recorder, start, end, used_before, pending)
        span.end(end_time=end_ns)

    def timed_out(
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
            log_hook_error("timeout")
