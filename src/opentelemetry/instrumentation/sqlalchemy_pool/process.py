"""Process CPU time, so the doctor can tell "the worker is saturated" from "the pool is small".

A worker whose event loop spends every cycle on Python work (token checks, serialisation)
holds its connections while other requests wait for the loop, and the pool looks exhausted;
a bigger pool makes it worse. CPU time per process over a window (divided by the window: cores
used) shows it. Read at collection only (``os.times()``), nothing on the hot path.

Named ``sqlalchemy.pool.process.cpu.time`` rather than the semantic conventions'
``process.cpu.time`` (same meaning and ``cpu.mode`` attribute): an app that also runs
``opentelemetry-instrumentation-system-metrics`` would otherwise export the same series twice
from two scopes. The doctor reads either (and ``process_cpu_seconds_total`` of
``prometheus_client``'s default registry).
"""

from __future__ import annotations

import os

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import semconv

_registered: dict[int, Meter] = {}


def observe_process_cpu(meter: Meter) -> None:
    """Register the CPU-time counter on ``meter`` once (instruments cannot be removed; the
    callback stays valid after uninstrument() and costs nothing between collections)."""
    if _registered.get(id(meter)) is meter:
        return
    _registered[id(meter)] = meter
    meter.create_observable_counter(
        semconv.PROCESS_CPU_TIME,
        callbacks=[_observe],
        unit="s",
        description="CPU time used by this process, by mode (user/system)",
    )


def _observe(options: CallbackOptions) -> list[Observation]:
    times = os.times()
    return [
        Observation(times.user, {semconv.CPU_MODE: "user"}),
        Observation(times.system, {semconv.CPU_MODE: "system"}),
    ]
