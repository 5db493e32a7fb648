"""Fixtures for instrumentor tests: SDK providers with in-memory reader/exporter."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor


@dataclass
class Telemetry:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    instrumentor: SQLAlchemyPoolInstrumentor = field(default_factory=SQLAlchemyPoolInstrumentor)

    def instrument(self, **kwargs: Any) -> None:
        self.instrumentor.instrument(
            meter_provider=self.meter_provider, tracer_provider=self.tracer_provider, **kwargs
        )

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource_metrics in data.resource_metrics if data else []:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def value(self, name: str, **attrs: Any) -> Any:
        """Value (or histogram count) of the one point matching attrs; None if absent."""
        matches = [
            p for p in self.points(name)
            if all(p.attributes.get(k.replace("__", ".")) == v for k, v in attrs.items())
        ]  # fmt: skip
        if not matches:
            return None
        assert len(matches) == 1, matches
        point = matches[0]
        return getattr(point, "value", None) if hasattr(point, "value") else point.count

    def count(self, pool: str) -> tuple[int | None, int | None]:
        """(used, idle) for a pool."""
        data = {}
        for point in self.points("db.client.connection.count"):
            if point.attributes["db.client.connection.pool.name"] == pool:
                data[point.attributes["db.client.connection.state"]] = point.value
        return data.get("used"), data.get("idle")

    def spans(self, name: str) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(reader, exporter, tracer_provider, MeterProvider(metric_readers=[reader]))
    yield telemetry
    telemetry.instrumentor.uninstrument()
