"""What every scenario shares: OTel SDK providers, the variants under test, timing, statistics.

Every measured block gets a fresh SDK ``MeterProvider`` whose ``PeriodicExportingMetricReader``
collects on a short interval into an in-memory exporter (so collection cost is inside the
timed window), and a fresh SDK ``TracerProvider`` with a ``BatchSpanProcessor`` feeding a
counting exporter. The exporters keep only the latest metric batch and a span count, so
memory stays flat however long a run is.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Imported before any instrumentor runs: the official instrumentor wraps
# ``sqlalchemy.ext.asyncio.create_async_engine`` by module name, and when that module is first
# imported under its wrapper the wrapper survives uninstrument() (a second EngineTracer then
# attaches to every async engine and the next uninstrument() fails).
import sqlalchemy.ext.asyncio  # noqa: F401
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracerProvider

from opentelemetry.instrumentation.sqlalchemy_pool import semconv

WAIT_TIME = semconv.CONNECTION_WAIT_TIME
FLOOR_A = "bench.floor.record_a"
FLOOR_B = "bench.floor.record_b"
FLOOR_ATTRS = {semconv.POOL_NAME: "bench"}


# --------------------------------------------------------------------------------------------
# OTel SDK plumbing
# --------------------------------------------------------------------------------------------
class LastBatchMetricExporter(MetricExporter):
    """Keeps the latest (cumulative) batch and counts exports; nothing leaves the process."""

    def __init__(self) -> None:
        super().__init__()
        self.last: MetricsData | None = None
        self.exports = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any):
        self.last = metrics_data
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None

    def points(self, name: str) -> list[Any]:
        found: list[Any] = []
        batch = self.last
        for resource_metrics in batch.resource_metrics if batch else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def histogram_count(self, name: str) -> int | None:
        points = self.points(name)
        return sum(point.count for point in points) if points else None

    def counter_value(self, name: str, **attributes: Any) -> int:
        total = 0
        for point in self.points(name):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                total += point.value
        return total


class CountingSpanExporter(SpanExporter):
    """Counts finished spans by name and drops them."""

    def __init__(self) -> None:
        self.by_name: Counter[str] = Counter()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        for span in spans:
            self.by_name[span.name] += 1
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@dataclass
class Providers:
    meter_provider: MeterProvider
    metrics: LastBatchMetricExporter
    tracer_provider: TracerProvider
    spans: CountingSpanExporter

    def flush_metrics(self) -> None:
        self.meter_provider.force_flush()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()  # flushes the batch processor into the counter
        self.meter_provider.shutdown()


def make_providers(export_interval_ms: float) -> Providers:
    metrics = LastBatchMetricExporter()
    reader = PeriodicExportingMetricReader(metrics, export_interval_millis=export_interval_ms)
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    spans = CountingSpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(BatchSpanProcessor(spans))
    return Providers(meter_provider, metrics, tracer_provider, spans)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
BARE, FLOOR, OFFICIAL, OURS = "bare", "floor", "official", "ours"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str  # bare | floor | official | ours
    options: tuple[tuple[str, Any], ...] = ()
    official_spans: bool = False  # official instrumentor: SDK tracer instead of a no-op one

    @property
    def records_wait_time(self) -> bool:
        return self.kind in (OURS, FLOOR)


OURS_METRICS_OPTIONS = (
    ("session_spans", "none"),
    ("capture_code_site", False),
    ("leak_threshold_s", 0),
)

V_BARE = Variant("bare", "bare SQLAlchemy", BARE)
V_FLOOR = Variant("floor", "bare + 2 Histogram.record calls (floor)", FLOOR)
V_OFFICIAL = Variant(
    "official-metric", "official instrumentor, pool metric (no-op tracer)", OFFICIAL
)
V_OFFICIAL_SPANS = Variant(
    "official-spans", "official instrumentor, SDK tracer (+ spans)", OFFICIAL, official_spans=True
)
V_OURS_METRICS = Variant(
    "ours-metrics", "ours, metrics only (no sessions/site/leaks)", OURS, OURS_METRICS_OPTIONS
)
V_OURS_DEFAULT = Variant("ours-default", "ours, defaults (session tracking on)", OURS)
V_OURS_LEAKS = Variant(
    "ours-leak-site",
    "ours, leak watchdog 1 s + code site, no sessions",
    OURS,
    (("session_spans", "none"), ("capture_code_site", True), ("leak_threshold_s", 1)),
)
V_OURS_WAIT_SPANS = Variant(
    "ours-wait-spans",
    "ours, defaults + a wait span for every checkout",
    OURS,
    (("wait_span_threshold_ms", 0), ("wait_spans_per_s", 0)),
)

CYCLE_VARIANTS: tuple[Variant, ...] = (
    V_BARE,
    V_FLOOR,
    V_OFFICIAL,
    V_OFFICIAL_SPANS,
    V_OURS_METRICS,
    V_OURS_DEFAULT,
    V_OURS_LEAKS,
)
WAIT_VARIANTS: tuple[Variant, ...] = (
    V_BARE,
    V_OFFICIAL,
    V_OURS_METRICS,
    V_OURS_DEFAULT,
    V_OURS_WAIT_SPANS,
)


class Active:
    """One variant switched on for one engine; ``off()`` restores bare SQLAlchemy."""

    def __init__(self, variant: Variant, engine: Any, providers: Providers):
        self.variant = variant
        self.providers = providers
        self.floor: tuple[Any, Any] | None = None
        self._instrumentor: Any = None
        sync_engine = getattr(engine, "sync_engine", engine)
        if variant.kind == OURS:
            from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

            self._instrumentor = SQLAlchemyPoolInstrumentor()
            self._instrumentor.instrument(
                engine=engine,
                meter_provider=providers.meter_provider,
                tracer_provider=providers.tracer_provider,
                **dict(variant.options),
            )
        elif variant.kind == OFFICIAL:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            tracer_provider = (
                providers.tracer_provider if variant.official_spans else NoOpTracerProvider()
            )
            self._instrumentor = SQLAlchemyInstrumentor()
            self._instrumentor.instrument(
                engine=sync_engine,
                meter_provider=providers.meter_provider,
                tracer_provider=tracer_provider,
                enable_commenter=False,
                skip_dep_check=True,
            )
        elif variant.kind == FLOOR:
            meter = providers.meter_provider.get_meter("sqlalchemy_pool_tools.bench")
            buckets = list(semconv.DURATION_BUCKETS)
            self.floor = tuple(  # type: ignore[assignment]
                meter.create_histogram(name, unit="s", explicit_bucket_boundaries_advisory=buckets)
                for name in (FLOOR_A, FLOOR_B)
            )

    def off(self) -> None:
        if self._instrumentor is not None:
            self._instrumentor.uninstrument()
            self._instrumentor = None

    def recorded_checkouts(self) -> int | None:
        """wait_time histogram count (ours) or the floor histograms' count, after a flush."""
        if not self.variant.records_wait_time:
            return None
        self.providers.flush_metrics()
        name = WAIT_TIME if self.variant.kind == OURS else FLOOR_A
        return self.providers.metrics.histogram_count(name) or 0


def child_env(**extra: str) -> dict[str, str]:
    """Environment for benchmark subprocesses: they import the very same instrumentor and
    tools code as this process (an editable install elsewhere must not swap it mid-run)."""
    import opentelemetry.instrumentation.sqlalchemy_pool as ours
    import sqlalchemy_pool_tools

    roots = [
        os.path.dirname(os.path.dirname(sqlalchemy_pool_tools.__file__)),
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(ours.__file__)))),
    ]
    env = dict(os.environ)
    current = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *current]))
    env.update(extra)
    return env


def ours_file() -> str:
    import opentelemetry.instrumentation.sqlalchemy_pool as ours

    return os.path.dirname(ours.__file__)


# --------------------------------------------------------------------------------------------
# Timing and statistics
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One measured block: per-operation wall and CPU time, and the checkout verification."""

    wall_us: float
    cpu_us: float
    expected: int | None = None  # checkouts made while instrumented
    recorded: int | None = None  # wait_time histogram count
    exports: int = 0  # metric collections+exports inside the timed window
    spans: dict[str, int] = field(default_factory=dict)

    @property
    def verified(self) -> bool | None:
        if self.recorded is None:
            return None
        return self.recorded == self.expected

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_us": self.wall_us,
            "cpu_us": self.cpu_us,
            "expected_checkouts": self.expected,
            "recorded_checkouts": self.recorded,
            "verified": self.verified,
            "exports": self.exports,
            "spans": dict(self.spans),
        }


class Stopwatch:
    """Wall (perf_counter) and process CPU time (all threads: reader and span exporter too)."""

    def __enter__(self) -> Stopwatch:
        gc.collect()
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(data) if data else float("nan")


def paired(
    samples: Sequence[Sample], reference: Sequence[Sample], op: Callable[[float, float], float]
) -> dict[str, float]:
    """Median over rounds of op(variant, reference) for wall and CPU time (same-round pairs)."""
    return {
        "wall": median(op(s.wall_us, r.wall_us) for s, r in zip(samples, reference, strict=True)),
        "cpu": median(op(s.cpu_us, r.cpu_us) for s, r in zip(samples, reference, strict=True)),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def difference(a: float, b: float) -> float:
    return a - b


def abba_order(modes: Sequence[str], pairs: int) -> list[str]:
    """``pairs`` rounds of ``modes``, every other one reversed (A B B A ...): a drift of the
    machine over the run falls on every mode alike."""
    order: list[str] = []
    for pair in range(pairs):
        order.extend(modes if pair % 2 == 0 else reversed(modes))
    return order


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """Round-robin order so no variant always runs first (or right after another)."""
    shift %= max(1, len(items))
    return list(items[shift:]) + list(items[:shift])
