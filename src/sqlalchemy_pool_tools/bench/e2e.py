"""End to end: the FastAPI + asyncpg app on uvicorn, driven at pool saturation, bare vs ours.

Runs alternate in an ABBA order (bare, ours, ours, bare, ...) so a drifting machine load
does not favour one mode; each run is a fresh uvicorn process: a warm-up load, then the
measured load, then the app's own request and checkout counts. The load comes from the
calibrated generators of ``sqlalchemy_pool_tools.loadgen`` (issue 17: the built-in one in its own
process, or hey); wrk is not used (its percentiles failed the calibration).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import URL

from .harness import abba_order, child_env, median, ours_file

Progress = Callable[[str], None]
MODES = ("bare", "ours")
MODE_LABELS = {
    "bare": "FastAPI instrumentor only",
    "ours": "FastAPI instrumentor + ours (defaults)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """A uvicorn app on 127.0.0.1 in a subprocess (one worker): ``app_path`` is
    ``module:attribute``; ``launcher`` is put before ``python -m uvicorn`` (for example
    ``opentelemetry-instrument``)."""

    def __init__(
        self,
        app_path: str,
        env: dict[str, str],
        launcher: tuple[str, ...] = (),
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            *launcher,
            sys.executable,
            "-m",
            "uvicorn",
            app_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    @classmethod
    def e2e(
        cls,
        mode: str,
        url: URL,
        pool_size: int,
        interval_ms: float,
        ours_options: dict[str, Any] | None = None,
    ) -> AppServer:
        """``sqlalchemy_pool_tools.bench.e2e_app`` in ``mode`` (bare or ours)."""
        env = child_env(
            SQLA_POOL_BENCH_MODE=mode,
            SQLA_POOL_BENCH_DB_URL=url.render_as_string(hide_password=False),
            SQLA_POOL_BENCH_POOL_SIZE=str(pool_size),
            SQLA_POOL_BENCH_EXPORT_INTERVAL_MS=str(interval_ms),
            SQLA_POOL_BENCH_OURS_OPTIONS=json.dumps(ours_options or {}),
        )
        return cls("sqlalchemy_pool_tools.bench.e2e_app:app", env)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the e2e app exited early: {self._stderr_tail()}")
            try:
                response = httpx.get(f"{self.base}/healthz", timeout=1.0)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the e2e app did not start within {timeout_s:.0f}s")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the app process has used so far."""
        try:
            import psutil

            times = psutil.Process(self.process.pid).cpu_times()
            return times.user + times.system
        except ImportError:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/bench/stats", timeout=60.0).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def _stderr_tail(self) -> str:
        try:
            _, err = self.process.communicate(timeout=5)
        except Exception:
            return "(no output)"
        lines = (err or "").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def load(
    url: str,
    connections: int,
    duration_s: float,
    generator: str = "builtin",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Closed-loop load from the calibrated generators of ``sqlalchemy_pool_tools.loadgen``
    (built-in, or hey): requests/s, p50/p99 (ms), answered requests and errors."""
    from sqlalchemy_pool_tools.loadgen import LoadSpec, generate

    parts = urlsplit(url)
    run = generate(
        LoadSpec(
            base_url=f"{parts.scheme}://{parts.netloc}",
            paths=[parts.path],
            duration_s=max(0.5, duration_s),
            connections=connections,
            timeout_s=60.0,
            generator=generator,
            headers=headers or {},
        )
    )
    if not run.requests:
        raise RuntimeError("the load generator got no answer")
    ok = run.requests - run.non_2xx
    latency = run.latency_s
    return {
        "rps": ok / run.duration_s if run.duration_s else 0.0,
        "p50_ms": latency["p50"] * 1000 if "p50" in latency else None,
        "p99_ms": latency["p99"] * 1000 if "p99" in latency else None,
        "max_ms": latency["max"] * 1000 if "max" in latency else None,
        "requests": ok,
        "errors": run.errors,
        "elapsed_s": run.duration_s,
        "generator": run.generator,
    }


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------
def one_run(mode: str, url: URL, settings: Any) -> dict[str, Any]:
    with AppServer.e2e(mode, url, settings.pool_size, settings.export_interval_ms) as server:
        server.wait_ready()
        target = f"{server.base}/q"
        load(target, settings.e2e_connections, settings.e2e_warmup_s, settings.load_generator)
        served0 = server.stats()["requests"]
        cpu0 = server.cpu_seconds()
        result = load(
            target, settings.e2e_connections, settings.e2e_duration_s, settings.load_generator
        )
        cpu1 = server.cpu_seconds()
        stats = server.stats()
    # Server CPU per request: robust to a busy machine (throughput and latency are not).
    result["cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / max(1, stats["requests"] - served0)
    if stats.get("ours_file") != ours_file():
        raise RuntimeError(f"the e2e app imported another instrumentor: {stats.get('ours_file')}")
    result["mode"] = mode
    result["served"] = stats["requests"]
    result["recorded_checkouts"] = stats["recorded_checkouts"]
    result["spans"] = stats.get("spans", {})
    result["verified"] = (
        None if mode == "bare" else stats["recorded_checkouts"] == stats["requests"]
    )
    return result


def run_e2e_scenario(url_async: URL, settings: Any, progress: Progress) -> dict[str, Any]:
    generator = settings.load_generator
    order = abba_order(MODES, settings.e2e_pairs)
    runs: list[dict[str, Any]] = []
    for i, mode in enumerate(order):
        result = one_run(mode, url_async, settings)
        runs.append(result)
        progress(
            f"[e2e] run {i + 1}/{len(order)} {mode:<4} {result['rps']:8.1f} req/s "
            f"p99 {result['p99_ms']} ms, server CPU {result['cpu_ms_per_request']:.3f} ms/request, "
            f"errors {result['errors']}"
        )
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    rows = []
    for mode in MODES:
        mine = by_mode[mode]
        flags = [r["verified"] for r in mine if r["verified"] is not None]
        served = sum(r["served"] for r in mine)
        spans: dict[str, int] = {}
        for r in mine:
            for name, count in r.get("spans", {}).items():
                if name.startswith("sqlalchemy."):  # ours, not the FastAPI instrumentor's
                    spans[name] = spans.get(name, 0) + count
        rows.append(
            {
                "variant": mode,
                "label": MODE_LABELS[mode],
                "rps": median(r["rps"] for r in mine),
                "p50_ms": median(r["p50_ms"] for r in mine if r["p50_ms"] is not None),
                "p99_ms": median(r["p99_ms"] for r in mine if r["p99_ms"] is not None),
                "cpu_ms_per_request": median(r["cpu_ms_per_request"] for r in mine),
                "errors": sum(r["errors"] for r in mine),
                "requests": sum(r["served"] for r in mine),
                "checkouts_recorded": None
                if mode == "bare"
                else sum(r["recorded_checkouts"] or 0 for r in mine),
                "verified": all(flags) if flags else None,
                "our_spans_per_request": {k: v / max(1, served) for k, v in spans.items()},
            }
        )
    bare, ours = rows
    pairs = list(zip(by_mode["bare"], by_mode["ours"], strict=True))
    ours["rps_ratio"] = median(o["rps"] / b["rps"] for b, o in pairs if b["rps"])
    ours["p99_ratio"] = median(
        o["p99_ms"] / b["p99_ms"] for b, o in pairs if b["p99_ms"] and o["p99_ms"] is not None
    )
    ours["cpu_ratio"] = median(
        o["cpu_ms_per_request"] / b["cpu_ms_per_request"]
        for b, o in pairs
        if b["cpu_ms_per_request"]
    )
    bare["rps_ratio"] = bare["p99_ratio"] = bare["cpu_ratio"] = 1.0
    return {
        "key": "e2e",
        "kind": "e2e",
        "title": f"end to end: FastAPI + asyncpg on uvicorn, pool_size={settings.pool_size} "
        f"max_overflow=0, {settings.e2e_connections} concurrent connections, "
        f"{settings.e2e_duration_s:g} s per run, calibrated generator ({generator})",
        "generator": generator,
        "rows": rows,
        "runs": runs,
    }
