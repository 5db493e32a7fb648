"""What every scenario app shares: the database URL, /healthz, /metrics, OpenTelemetry.

Each app is a real FastAPI service run under uvicorn in its own process; the test samples its
``/metrics`` endpoint with the doctor while loading it. Knobs come from the environment so the
closed-loop tests can start the same app with the doctor's advice applied.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import exc

from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

DATABASE_URL = os.environ.get("SCENARIO_DATABASE_URL", "")  # postgresql://... (no driver)
ASYNC_URL = DATABASE_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
SYNC_URL = DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)


def knob(name: str, default: float) -> float:
    """A number from the environment (the closed-loop tests apply the advice this way)."""
    return float(os.environ.get(f"SCENARIO_{name}", default))


def flag(name: str) -> bool:
    return os.environ.get(f"SCENARIO_{name}", "") == "1"


def observe(app: FastAPI, engine: Any, **options: Any) -> FastAPI:
    """Health and metrics routes, HTTP server metrics, and the pool instrumentor."""
    registry = CollectorRegistry()
    resource = Resource.create({"service.name": "scenario"})
    meter_provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=registry)], resource=resource
    )
    tracer_provider = TracerProvider(resource=resource)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(exc.TimeoutError)
    async def pool_timeout(request: Request, error: Exception) -> Response:
        return JSONResponse({"detail": "database busy"}, status_code=503)

    FastAPIInstrumentor.instrument_app(
        app,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        excluded_urls="metrics,healthz,upstream",
    )
    SQLAlchemyPoolInstrumentor().instrument(
        engine=engine,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        pool_name="main",
        **options,
    )
    return app
