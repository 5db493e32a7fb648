"""Leak and long-hold detection (HikariCP's leakDetectionThreshold, and more).

- long hold: a connection checked out longer than ``leak_threshold_s`` is reported once while
  it is still held (WARNING naming pool and code site, a span event on the holder's span, a
  counter); when it finally comes back, an INFO line says how long it was held.
- garbage collected: a connection reclaimed by the GC without being returned.
- open transaction at checkin: returned with a server transaction still open.
- outlived response: reported by ``sessions.py`` through :meth:`LeakDetector.outlived_response`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from time import monotonic, perf_counter
from typing import Any

from opentelemetry import trace

from . import semconv
from .config import Config
from .metrics import Telemetry
from .recorder import NO_SITES, Hold, PoolRecorder

_logger = logging.getLogger("opentelemetry.instrumentation.sqlalchemy_pool")

# Repeated warnings for the same pool, kind and code site are logged at most this often.
_LOG_INTERVAL_S = 60.0


def _site_text(hold: Hold, live: bool = False) -> str:
    site = hold.where(perf_counter(), live=live)
    if site is not None:
        return str(site)
    return "unknown code site" + (" (capture_code_site=off)" if hold.holder is NO_SITES else "")


class LeakDetector:
    """Reports leaks; a release listener (``on_release``) of the hooks."""

    def __init__(
        self,
        config: Config,
        telemetry: Telemetry,
        recorders: Callable[[], Iterable[PoolRecorder]],
    ):
        self.config = config
        self.telemetry = telemetry
        self._recorders = recorders
        self._last_log: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- watchdog -----------------------------------------------------------------------------
    def start(self) -> None:
        # Always runs: besides long holds it does the telemetry queued during garbage
        # collections (metrics.Telemetry.deferred) when no checkout comes along to do it.
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="otel-sqlalchemy-pool-leaks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def _run(self) -> None:
        # Check often enough to report within ~25% of the threshold, but never busy-loop.
        threshold = self.config.leak_threshold_s
        interval = min(max(threshold / 4, 0.05), 5.0) if threshold > 0 else 5.0
        while not self._stop.wait(interval):
            try:
                self.telemetry.drain()
                self.check_long_holds()
            except Exception:
                _logger.debug("leak watchdog error", exc_info=True)

    def check_long_holds(self) -> int:
        """Report holds older than the threshold (once each); returns how many were new."""
        threshold = self.config.leak_threshold_s
        if threshold <= 0:
            return 0
        now = perf_counter()
        reported = 0
        for recorder in self._recorders():
            for hold in list(recorder.holders.values()):
                if hold.leak_reported or now - hold.t_out < threshold:
                    continue
                hold.leak_reported = True
                reported += 1
                self._report_long_hold(recorder, hold, now - hold.t_out)
        return reported

    def _report_long_hold(self, recorder: PoolRecorder, hold: Hold, age: float) -> None:
        self.telemetry.leak(recorder, semconv.LEAK_KIND_LONG_HOLD)
        span = trace.get_current_span(hold.context) if hold.context is not None else None
        if span is not None and span.is_recording():
            attributes: dict[str, Any] = {**recorder.attrs, semconv.HOLDER_AGE: round(age, 3)}
            site = hold.where(perf_counter())
            if site is not None:
                attributes[semconv.CODE_FUNCTION] = site.function
                attributes[semconv.CODE_FILE] = site.file
                attributes[semconv.CODE_LINE] = site.line
            span.add_event(semconv.LONG_HOLD_EVENT, attributes)
        self._warn(
            recorder,
            semconv.LEAK_KIND_LONG_HOLD,
            hold,
            "pool %r: connection checked out for %.1fs (leak threshold %.1fs), still held; "
            "holder at %s",
            recorder.name,
            age,
            self.config.leak_threshold_s,
            _site_text(hold, live=True),
        )

    # -- reactions called by the pool hooks ---------------------------------------------------
    def on_release(self, hold: Hold, now: float, detached: bool) -> None:
        if hold.leak_reported:
            _logger.info(
                "pool %r: connection reported as held too long was returned after %.1fs (%s)",
                hold.recorder.name,
                now - hold.t_out,
                _site_text(hold),
            )

    def garbage_collected(self, hold: Hold) -> None:
        self.telemetry.leak(hold.recorder, semconv.LEAK_KIND_GARBAGE_COLLECTED)
        if hold.session is not None:
            hold.session.garbage_collected = True
        self._warn(
            hold.recorder,
            semconv.LEAK_KIND_GARBAGE_COLLECTED,
            hold,
            "pool %r: a connection was never returned and was reclaimed by the garbage "
            "collector after %.1fs; taken at %s. Close sessions/connections explicitly "
            "(async with / try-finally).",
            hold.recorder.name,
            perf_counter() - hold.t_out,
            _site_text(hold),
        )

    def open_transaction_at_checkin(self, hold: Hold) -> None:
        self.telemetry.leak(hold.recorder, semconv.LEAK_KIND_OPEN_TRANSACTION_AT_CHECKIN)
        self._warn(
            hold.recorder,
            semconv.LEAK_KIND_OPEN_TRANSACTION_AT_CHECKIN,
            hold,
            "pool %r: connection returned with a transaction still open (rolled back by the "
            "pool); taken at %s. Common after task cancellation with asyncpg.",
            hold.recorder.name,
            _site_text(hold),
        )

    def outlived_response(self, recorder: PoolRecorder, site_text: str, how: str) -> None:
        self.telemetry.leak(recorder, semconv.LEAK_KIND_OUTLIVED_RESPONSE)
        key = (recorder.name, semconv.LEAK_KIND_OUTLIVED_RESPONSE, site_text)
        if self._should_log(key):
            _logger.warning(
                "pool %r: a request-scoped session %s after its HTTP response was sent "
                "(opened at %s). Open a fresh session inside background tasks.",
                recorder.name,
                how,
                site_text,
            )

    def _warn(self, recorder: PoolRecorder, kind: str, hold: Hold, msg: str, *args: Any) -> None:
        if self._should_log((recorder.name, kind, _site_text(hold))):
            _logger.warning(msg, *args)

    def _should_log(self, key: tuple[str, str, str]) -> bool:
        now = monotonic()
        last = self._last_log.get(key)
        if last is not None and now - last < _LOG_INTERVAL_S:
            return False
        if len(self._last_log) > 10_000:  # bounded memory with many distinct sites
            self._last_log.clear()
        self._last_log[key] = now
        return True
