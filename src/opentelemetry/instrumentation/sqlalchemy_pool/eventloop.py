"""Event-loop health for asyncio apps: how late the loop runs callbacks, how busy it is, and
where it was blocked.

A blocked or CPU-saturated event loop looks like a pool problem from the pool's side: every
connection is held while the loop runs someone else's code, holds grow, checkouts queue. A
bigger pool fixes none of that, so the doctor needs to see the loop itself. Three parts:

* a *probe* callback the loop runs every ``PROBE_INTERVAL_S``: how late it ran is the
  scheduling lag (``sqlalchemy.pool.event_loop.lag`` histogram, a few records per second);
* a timing wrapper around the selector's ``select()`` (asyncio's selector loops; not uvloop):
  the loop's time split into ``active`` (running callbacks) and ``idle`` (waiting for I/O)
  (``sqlalchemy.pool.event_loop.time``, observable);
* the loop thread's scheduler times (Linux ``/proc/self/task/<tid>/schedstat``): time on a
  CPU and time runnable but waiting for one (``sqlalchemy.pool.event_loop.thread.time``,
  observable) - a loop that is busy because it computes (or cannot get a CPU) differs from one
  that is busy because it sleeps in a blocking call;
* a watchdog thread: when one loop iteration has run longer than ``block_threshold_ms``, it
  samples the loop thread's stack (``sys._current_frames``) once and keeps the first user
  frame; when the iteration ends, the loop side adds its duration to
  ``sqlalchemy.pool.event_loop.blocked_time`` with that code site (bounded: ``MAX_SITES``
  distinct sites per process, then ``other``). Without a selector (uvloop) a late probe
  stands in for a long iteration.

Nothing here touches the pool's hot path. The loop side costs two ``perf_counter`` calls per
loop iteration. The watchdog pays for forensics only when there is trouble: on a healthy loop
it wakes every ``WATCHDOG_CALM_PERIOD_S`` (a loop stuck that long is still sampled); once the
loop side has seen a long iteration it wakes every ``WATCHDOG_PERIOD_S`` for
``WATCHDOG_ALERT_S``, so the blocking call sites of repeated short stalls are found too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import semconv
from .codesite import CodeSite, find_code_site

_logger = logging.getLogger(__name__)

# How often the probe runs: often enough to see sub-second stalls, rare enough to cost nothing.
PROBE_INTERVAL_S = 0.1
# How often the watchdog looks at the loop after a long iteration. A third of the default block
# threshold, so an iteration just over the threshold is still sampled while it runs.
WATCHDOG_PERIOD_S = 0.007
# How often it looks while no long iteration was seen for WATCHDOG_ALERT_S: a wake-up every
# 7 ms costs an idle process ~1 % of a core and every request a GIL hand-off.
WATCHDOG_CALM_PERIOD_S = 0.1
WATCHDOG_ALERT_S = 30.0
# Distinct blocking code sites kept per process; more become "other" (bounded cardinality).
MAX_SITES = 20
OTHER_SITE = CodeSite("other", "other", 0)

# Monitors by meter: the SDK keeps the first instrument registered under a name, so a second
# instrument() must reuse the instruments (see metrics.telemetry_for).
_monitors: dict[int, EventLoopMonitor] = {}


def monitor_for(meter: Meter, block_threshold_s: float) -> EventLoopMonitor:
    """The process's monitor for ``meter`` (created once), with the given threshold."""
    monitor = _monitors.get(id(meter))
    if monitor is None or monitor.meter is not meter:
        monitor = _monitors[id(meter)] = EventLoopMonitor(meter)
    monitor.block_threshold_s = block_threshold_s
    return monitor


class EventLoopMonitor:
    """Watches one event loop at a time (the one last attached): lag, active/idle, blocks."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.block_threshold_s = 0.02
        self._lag = meter.create_histogram(
            semconv.EVENT_LOOP_LAG,
            unit="s",
            description="How late the event loop ran a callback scheduled for a given time",
            explicit_bucket_boundaries_advisory=semconv.DURATION_BUCKETS,
        )
        self._blocked = meter.create_counter(
            semconv.EVENT_LOOP_BLOCKED_TIME,
            unit="s",
            description="Time the event loop spent in iterations longer than the block "
            "threshold, by the code site found running in them",
        )
        meter.create_observable_counter(
            semconv.EVENT_LOOP_TIME,
            callbacks=[self._observe_time],
            unit="s",
            description="Event loop time by state: active (running callbacks) or idle "
            "(waiting for I/O)",
        )
        meter.create_observable_counter(
            semconv.EVENT_LOOP_THREAD_TIME,
            callbacks=[self._observe_thread],
            unit="s",
            description="Event loop thread time on a CPU, and runnable but waiting for a CPU",
        )
        self._lock = threading.Lock()
        self._native_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id: int | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probe_due = 0.0
        self._selector: Any = None
        self._timed = False  # a selector was ever timed: keep reporting the cumulative times
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        # Written by the loop thread, read by the watchdog and the metric callback.
        self.active_s = 0.0
        self.idle_s = 0.0
        self._busy_since = time.perf_counter()
        self._idle = False
        # (busy_since of the sampled iteration, its code site), written by the watchdog.
        self._sample: tuple[float, CodeSite | None] = (-1.0, None)
        # perf_counter() of the last long iteration seen by the loop side (-inf: none yet).
        self._last_block_at = float("-inf")
        self._sites: dict[CodeSite, dict[str, Any]] = {}

    # --- attach / detach ----------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Watching a loop that is still open (a closed one is replaced on the next attach)."""
        loop = self._loop
        return loop is not None and not loop.is_closed()

    def attach_running_loop(self) -> bool:
        """Watch the loop running in the calling thread; False when there is none (or it is
        already watched). Safe to call from any hook: never raises."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if loop is self._loop:
            return False
        try:
            self.attach(loop)
        except Exception:  # never break the host app
            _logger.debug("could not watch the event loop", exc_info=True)
            return False
        return True

    def on_new_pool(self, recorder: Any, pool: Any, url: Any) -> None:
        """NewPoolListener: a pool's first checkout runs in the app's loop (async engines)."""
        self.attach_running_loop()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching ``loop`` (call from its thread); stops watching any previous loop."""
        with self._lock:
            self._detach_locked()
            self._loop = loop
            self._thread_id = threading.get_ident()
            self._native_id = threading.get_native_id()
            self._busy_since = time.perf_counter()
            self._idle = False
            self._wrap_selector(loop)
            self._probe_due = loop.time() + PROBE_INTERVAL_S
            self._probe = loop.call_at(self._probe_due, self._run_probe)
            self._stop.clear()
            self._watchdog = threading.Thread(
                target=self._watch, name="otel-sqlalchemy-pool-loop-watchdog", daemon=True
            )
            self._watchdog.start()

    def detach(self) -> None:
        with self._lock:
            self._detach_locked()

    def _detach_locked(self) -> None:
        self._stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=1.0)
        self._watchdog = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self._selector is not None:
            self._selector.__dict__.pop("select", None)
            self._selector = None
        self._loop = None
        self._thread_id = None

    # --- loop side ----------------------------------------------------------------------------
    def _wrap_selector(self, loop: asyncio.AbstractEventLoop) -> None:
        selector = getattr(loop, "_selector", None)
        original = getattr(selector, "select", None)
        if selector is None or not callable(original) or "select" in vars(selector):
            return  # not a selector loop (uvloop, proactor), or wrapped already
        perf = time.perf_counter
        monitor = self

        def select(timeout: float | None = None) -> Any:
            start = perf()
            busy = start - monitor._busy_since
            monitor.active_s += busy
            monitor._idle = True
            if busy >= monitor.block_threshold_s:
                monitor._on_block(busy, monitor._busy_since)
            try:
                return original(timeout)
            finally:
                end = perf()
                monitor.idle_s += end - start
                monitor._busy_since = end
                monitor._idle = False

        selector.select = select
        self._selector = selector
        self._timed = True

    def _run_probe(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            now = loop.time()
            lag = max(0.0, now - self._probe_due)
            self._lag.record(lag)
            if self._selector is None and lag >= self.block_threshold_s:
                # No iteration timing (uvloop): a late probe is the block we can see.
                self._on_block(lag, self._probe_due)
            self._probe_due = now + PROBE_INTERVAL_S
            self._probe = loop.call_at(self._probe_due, self._run_probe)
        except Exception:
            _logger.debug("event loop probe failed", exc_info=True)

    def _on_block(self, duration: float, started: float) -> None:
        """A long iteration (or late probe) ended: add it to its sampled code site."""
        try:
            self._last_block_at = time.perf_counter()
            sampled_at, site = self._sample
            if sampled_at != started:
                site = None
            self._blocked.add(duration, self._attributes(site))
        except Exception:
            _logger.debug("could not record a blocked event loop", exc_info=True)

    def _attributes(self, site: CodeSite | None) -> dict[str, Any]:
        if site is None:
            return {}
        attributes = self._sites.get(site)
        if attributes is None:
            if len(self._sites) >= MAX_SITES:
                site = OTHER_SITE
                attributes = self._sites.get(site)
            if attributes is None:
                attributes = self._sites[site] = {
                    semconv.CODE_FUNCTION: site.function,
                    semconv.CODE_FILE: site.file,
                    semconv.CODE_LINE: site.line,
                }
        return attributes

    # --- watchdog thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        stop = self._stop
        perf = time.perf_counter
        period = WATCHDOG_CALM_PERIOD_S
        while not stop.wait(period):
            try:
                alert = perf() - self._last_block_at < WATCHDOG_ALERT_S
                period = WATCHDOG_PERIOD_S if alert else WATCHDOG_CALM_PERIOD_S
                if self._selector is not None:
                    if self._idle:
                        continue
                    started = self._busy_since
                    overdue = perf() - started
                else:  # uvloop & co: the probe is late by how long the loop has been stuck
                    loop = self._loop
                    if loop is None:
                        continue
                    started = self._probe_due
                    overdue = loop.time() - started
                if overdue < self.block_threshold_s or self._sample[0] == started:
                    continue
                self._sample = (started, self._sample_site())
            except Exception:
                _logger.debug("event loop watchdog failed", exc_info=True)

    def _sample_site(self) -> CodeSite | None:
        thread_id = self._thread_id
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        if frame is None:
            return None
        return find_code_site(frame)

    # --- collection ---------------------------------------------------------------------------
    def _observe_time(self, options: CallbackOptions) -> list[Observation]:
        if not self._timed:
            return []
        active = self.active_s
        if self._selector is not None and not self._idle:
            # Count the iteration running now, so a stuck loop shows up before it ends.
            active += max(0.0, time.perf_counter() - self._busy_since)
        return [
            Observation(active, {semconv.EVENT_LOOP_STATE: semconv.EVENT_LOOP_STATE_ACTIVE}),
            Observation(self.idle_s, {semconv.EVENT_LOOP_STATE: semconv.EVENT_LOOP_STATE_IDLE}),
        ]

    def _observe_thread(self, options: CallbackOptions) -> list[Observation]:
        native_id = self._native_id
        if native_id is None:
            return []
        try:
            with open(f"/proc/self/task/{native_id}/schedstat") as stat:
                on_cpu_ns, runqueue_ns = (int(v) for v in stat.read().split()[:2])
        except (OSError, ValueError):  # not Linux, or the thread is gone
            return []
        state = semconv.EVENT_LOOP_THREAD_STATE
        return [
            Observation(on_cpu_ns / 1e9, {state: semconv.EVENT_LOOP_THREAD_STATE_CPU}),
            Observation(runqueue_ns / 1e9, {state: semconv.EVENT_LOOP_THREAD_STATE_RUNQUEUE}),
        ]
