"""The real-app benchmark: our cost on top of the OTel stack a user already runs (issue 16).

The app (:mod:`.realapp_app`: FastAPI, an HS256 JWT check and a PK lookup through a
request-scoped ``AsyncSession``, asyncpg, pool 5 + 10) runs on one uvicorn worker started by
``opentelemetry-instrument`` -- the FastAPI and SQLAlchemy instrumentations, the SDK with the
Prometheus exporter, spans created and batch-exported -- twice: with our instrumentor at its
defaults (``on``) and with ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=sqlalchemy_pool`` (``off``).

- Load: closed loop (each client sends its next request when the previous one answered) from
  the calibrated generator of ``sqlalchemy_pool_tools.loadgen`` (its own process; HDR
  percentiles checked against a known-latency server), runs interleaved ABBA (off, on, on, off,
  ...), a fresh server per run, a warm-up, then the measured window. Throughput ratio, p50/p99
  ratios and the server's
  CPU per request (its process CPU time over the measured window / requests it served) are
  medians of same-pair ratios; every run is kept, so the spread between runs is shown.
- Instructions: the same app, initialised exactly as ``opentelemetry-instrument`` does
  (``auto_instrumentation.initialize()``), driven in-process through httpx's ASGI transport one
  request at a time under ``valgrind --tool=callgrind``: the difference of a 0-request and an
  N-request run, per request. The steady figure on a noisy machine.
- Verification: in ``on`` runs, the ``wait_time`` histogram count scraped from the app's
  Prometheus endpoint equals the requests the app served (one checkout per request); in
  ``off`` runs the metric must be absent (ours really off).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy.engine import URL

from .e2e import AppServer, free_port, load
from .harness import abba_order, child_env, median, ours_file
from .instructions import NO_TIMED_SPANS, callgrind_count

Progress = Callable[[str], None]
MODES = ("off", "on")
MODE_LABELS = {
    "off": "OTel stack (FastAPI + SQLAlchemy instrumentations, SDK, Prometheus), ours disabled",
    "on": "the same stack + ours (defaults)",
}
APP = "sqlalchemy_pool_tools.bench.realapp_app:app"
PATH = "/me"
USER_ID = 42
# opentelemetry-instrument's own entry point, run by this interpreter (a console script on
# PATH may belong to another Python).
LAUNCHER = (
    sys.executable,
    "-c",
    "import sys; from opentelemetry.instrumentation.auto_instrumentation import run; "
    "sys.argv[0] = 'opentelemetry-instrument'; run()",
)
WAIT_TIME_COUNT = "db_client_connection_wait_time_seconds_count"
WARMUP_REQUESTS = 50


def otel_env(mode: str, url: URL, prometheus_port: int, **extra: str) -> dict[str, str]:
    """The environment of an app run: what a user sets for ``opentelemetry-instrument``."""
    env = {
        k: v for k, v in child_env().items() if not k.startswith("OTEL_")
    }  # our options at their defaults, whatever the caller's shell has
    env.update(
        OTEL_SERVICE_NAME="sqlalchemy-pool-bench-realapp",
        OTEL_TRACES_EXPORTER="none",  # the app adds a batch processor into a span counter
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(prometheus_port),
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="sqlalchemy_pool" if mode == "off" else "",
        SQLA_POOL_BENCH_DB_URL=url.render_as_string(hide_password=False),
        SQLA_POOL_BENCH_POOL_SIZE="5",
        SQLA_POOL_BENCH_MAX_OVERFLOW="10",
    )
    env.update(extra)
    return env


def auth_header() -> str:
    from .realapp_data import make_token

    return f"Bearer {make_token(USER_ID)}"


def scrape_count(prometheus_port: int, metric: str) -> int | None:
    """Sum of ``metric`` over its series on the app's Prometheus endpoint (None: absent)."""
    text = httpx.get(f"http://127.0.0.1:{prometheus_port}/metrics", timeout=30.0).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric + "{") or line.startswith(metric + " ")
    ]
    return round(sum(values)) if values else None


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def one_run(mode: str, url: URL, settings: Any) -> dict[str, Any]:
    prometheus_port = free_port()
    env = otel_env(mode, url, prometheus_port)
    headers = {"Authorization": auth_header()}
    clients = settings.realapp_clients
    with AppServer(APP, env, launcher=LAUNCHER) as server:
        server.wait_ready()
        target = f"{server.base}{PATH}"
        load(target, clients, settings.realapp_warmup_s, settings.load_generator, headers)
        before = server.stats()
        served0 = before["requests"]
        cpu0 = server.cpu_seconds()
        result = load(
            target, clients, settings.realapp_duration_s, settings.load_generator, headers
        )
        cpu1 = server.cpu_seconds()
        stats = server.stats()
        recorded = scrape_count(prometheus_port, WAIT_TIME_COUNT)
    served = stats["requests"] - served0
    gc0, gc1 = before["gc"], stats["gc"]
    result["gc"] = {
        "collections": [b - a for a, b in zip(gc0["collections"], gc1["collections"], strict=True)],
        "total_ms": [b - a for a, b in zip(gc0["total_ms"], gc1["total_ms"], strict=True)],
        "max_ms_whole_run": gc1["max_ms"],
        "objects": gc1["objects"],
    }
    result["cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / max(1, served)
    if mode == "on" and stats.get("ours_file") != ours_file():
        raise RuntimeError(f"the app imported another instrumentor: {stats.get('ours_file')}")
    result.update(
        mode=mode,
        served=served,
        served_total=stats["requests"],
        recorded_checkouts=recorded,
        ours_active=stats["ours_active"],
        spans=stats.get("spans", {}),
    )
    if mode == "on":
        result["verified"] = bool(stats["ours_active"]) and recorded == stats["requests"]
    else:
        result["verified"] = not stats["ours_active"] and recorded is None
    return result


def _spread(values: list[float]) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if values else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    rows = []
    for mode in MODES:
        mine = by_mode[mode]
        spans: dict[str, float] = {}
        served = sum(r["served_total"] for r in mine)
        for r in mine:
            for name, count in r.get("spans", {}).items():
                spans[name] = spans.get(name, 0) + count / max(1, served)
        row: dict[str, Any] = {"variant": mode, "label": MODE_LABELS[mode]}
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request"):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = median(values)
            row[f"{key}_range"] = _spread(values)
        row["gc_ms_per_request"] = median(
            sum(r["gc"]["total_ms"]) / max(1, r["served"]) for r in mine
        )
        row["gen2_per_1000_requests"] = median(
            r["gc"]["collections"][2] * 1000 / max(1, r["served"]) for r in mine
        )
        row["gc_max_pause_ms"] = max(max(r["gc"]["max_ms_whole_run"]) for r in mine)
        row.update(
            errors=sum(r["errors"] for r in mine),
            requests=sum(r["requests"] for r in mine),
            verified=all(r["verified"] for r in mine),
            spans_per_request=spans,
        )
        rows.append(row)
    off, on = rows
    pairs = list(zip(by_mode["off"], by_mode["on"], strict=True))
    for key, ratio_key in (
        ("rps", "rps_ratio"),
        ("p50_ms", "p50_ratio"),
        ("p99_ms", "p99_ratio"),
        ("cpu_ms_per_request", "cpu_ratio"),
    ):
        ratios = [o[key] / b[key] for b, o in pairs if b[key] and o[key] is not None]
        on[ratio_key] = median(ratios)
        on[f"{ratio_key}_range"] = _spread(ratios)
        off[ratio_key] = 1.0
    return rows


def run_realapp_scenario(url_sync: URL, url_async: URL, settings: Any, progress: Progress):
    from .realapp_data import seed

    seed(url_sync)
    order = abba_order(MODES, settings.realapp_pairs)
    runs = []
    for i, mode in enumerate(order):
        result = one_run(mode, url_async, settings)
        runs.append(result)
        progress(
            f"[realapp] run {i + 1}/{len(order)} {mode:<3} {result['rps']:7.1f} req/s "
            f"p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms, server CPU "
            f"{result['cpu_ms_per_request']:.3f} ms/request, errors {result['errors']}"
            + ("" if result["verified"] else " NOT VERIFIED")
        )
    instructions = None
    if settings.realapp_requests and shutil.which("valgrind"):
        instructions = count_instructions(url_async, settings.realapp_requests)
        for mode in ("off", "floor", "on"):
            progress(
                f"[realapp] instructions/request {mode:<3} "
                f"{instructions['per_request'][mode]:>12,.0f}"
            )
    return {
        "key": "realapp",
        "kind": "realapp",
        "title": f"real app: FastAPI + JWT check + PK lookup (asyncpg, pool 5+10) under "
        f"opentelemetry-instrument, {settings.realapp_clients} closed-loop clients, "
        f"{settings.realapp_duration_s:g} s per run, calibrated generator "
        f"({settings.load_generator})",
        "clients": settings.realapp_clients,
        "rows": summarize(runs),
        "runs": runs,
        "instructions": instructions,
    }


# --------------------------------------------------------------------------------------------
# Instructions per request (valgrind)
# --------------------------------------------------------------------------------------------
def _count(url: URL, mode: str, requests: int, timeout_s: float = 1800) -> int:
    """Instructions of a child serving ``requests`` after the warm-up; ``mode``: off, on, or
    floor (ours off, the app makes the two records the semantic conventions require)."""
    extra = {"SQLA_POOL_BENCH_FLOOR": "1"} if mode == "floor" else {}
    env = otel_env("off" if mode == "floor" else mode, url, free_port(), **NO_TIMED_SPANS, **extra)
    what = f"the real app ({mode})"
    return callgrind_count(__name__, json.dumps({"n": requests}), env, timeout_s, what)


def count_instructions(url: URL, requests: int) -> dict[str, Any]:
    """Instructions per request for off, floor and on (each a 0- and an N-request child)."""
    modes = ("off", "floor", "on")
    runs = [(mode, n) for mode in modes for n in (0, requests)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(runs, pool.map(lambda run: _count(url, *run), runs), strict=True))
    per_request = {m: (counts[(m, requests)] - counts[(m, 0)]) / requests for m in modes}
    return {
        "requests": requests,
        "per_request": per_request,
        "ratio": per_request["on"] / per_request["off"],
        "added": per_request["on"] - per_request["off"],
        "floor_added": per_request["floor"] - per_request["off"],
    }


def _held_idle_always() -> None:
    """``held_idle_time`` is recorded when a checkout sat >= 1 ms without a statement: under
    load nearly always, one request at a time natively almost never -- and under valgrind
    (~50x slower) sometimes, depending on how busy the machine is. Counted as under load
    (always), so the count does not depend on the machine's load."""
    from opentelemetry.instrumentation.sqlalchemy_pool import metrics

    if hasattr(metrics, "HELD_IDLE_MIN_S"):
        metrics.HELD_IDLE_MIN_S = 0.0


def _child(config: dict[str, Any]) -> None:
    """One app process initialised like ``opentelemetry-instrument``; requests in-process."""
    import asyncio
    import gc

    from opentelemetry.instrumentation.auto_instrumentation import initialize

    initialize(swallow_exceptions=False)
    _held_idle_always()
    from .realapp_app import app

    headers = {"Authorization": auth_header()}

    async def send(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            (await client.get(PATH, headers=headers)).raise_for_status()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await send(client, WARMUP_REQUESTS)
            # Whether a full collection of the ~110,000 objects of the app falls inside the
            # counted requests depends on what the exporter threads allocated meanwhile (wall
            # clock): +-1 collection moved the count by ~80,000 per request. Frozen, a full
            # collection only visits what was allocated since; young collections -- the cost
            # of each request's own allocations -- are still counted.
            gc.collect()
            gc.freeze()
            await send(client, config["n"])

    asyncio.run(main())
    os._exit(0)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
