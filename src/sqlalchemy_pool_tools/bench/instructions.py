"""Instructions per checkout cycle, counted by valgrind: the steady cost measure.

On a shared machine wall and CPU time of the same block move ±30 % between rounds, which buries
differences of a few µs. The number of machine instructions the client process executes per
``with engine.connect(): pass`` barely moves (about ±0.7 %), so it compares variants closely,
on any machine. Each variant runs in a child interpreter under ``valgrind --tool=callgrind``
twice -- after the same warm-up, once with 0 and once with N measured cycles -- and the
difference divided by N is the cost of one cycle: startup, imports and warm-up cancel out. The SDK's
periodic reader does not collect during the run (its cost is in the timed scenarios).

The same is done for one request of the end-to-end app (``e2e_app``: FastAPI instrumentor,
request-scoped ``AsyncSession``, ``SELECT 1`` on asyncpg), driven in-process through httpx's
ASGI transport one request at a time: the steadier counterpart of the load run, whose
requests/s move by a third between identical runs on a shared machine.

Spans triggered by wall-clock thresholds (a checkout waiting >= 100 ms, a session holding a
connection >= 1 s) are switched off in the counted children: under valgrind, on a loaded
machine, a descheduled checkout can cross them and add a span's million instructions to a
run, which made the same variant's count move by several thousand instructions per cycle.

Needs ``valgrind`` (``apt-get install valgrind``); the scenario is skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import URL

from .e2e import MODE_LABELS, MODES
from .harness import (
    CYCLE_VARIANTS,
    V_BARE,
    V_FLOOR,
    V_OFFICIAL,
    V_OURS_DEFAULT,
    V_OURS_METRICS,
    child_env,
)

TITLE = "instructions per sync empty checkout cycle (psycopg), counted by valgrind"
VARIANTS = (V_BARE, V_FLOOR, V_OFFICIAL, V_OURS_METRICS, V_OURS_DEFAULT)
WARMUP_CYCLES = 200
WARMUP_REQUESTS = 50
# Thresholds on wall-clock time: far out of reach, so only the hot path is counted.
NO_TIMED_SPANS = {
    "OTEL_PYTHON_SQLALCHEMY_POOL_WAIT_SPAN_THRESHOLD_MS": "1e12",
    "OTEL_PYTHON_SQLALCHEMY_POOL_SESSION_SPAN_THRESHOLD_MS": "1e12",
}
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def available() -> bool:
    return shutil.which("valgrind") is not None


def callgrind_count(
    module: str, config: str, env: dict[str, str], timeout_s: float, what: str
) -> int:
    """Instructions ``python -m module config`` executes under callgrind (``what`` names the
    run in an error)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        module,
        config,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )
    match = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or match is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"valgrind run of {what} failed: {' | '.join(tail)}")
    return int(match.group(1))


def _count(url: URL, variant_key: str, cycles: int, timeout_s: float, kind: str = "cycle") -> int:
    """Instructions executed by a child that runs ``cycles`` cycles (or requests) after the
    warm-up."""
    config = json.dumps(
        {
            "url": url.render_as_string(hide_password=False),
            "variant": variant_key,
            "n": cycles,
            "kind": kind,
        }
    )
    return callgrind_count(__name__, config, child_env(**NO_TIMED_SPANS), timeout_s, variant_key)


def run_instructions_scenario(
    url_sync: URL,
    url_async: URL,
    cycles: int,
    requests: int,
    progress: Any,
    variant_keys: tuple[str, ...] | None = None,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    variants = [v for v in VARIANTS if variant_keys is None or v.key in variant_keys]
    runs = [("cycle", url_sync, v.key, n) for v in variants for n in (0, cycles)]
    runs += [("request", url_async, mode, n) for mode in MODES for n in (0, requests)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda run: _count(run[1], run[2], run[3], timeout_s, run[0]), runs)
        counts = {(kind, key, n): c for (kind, _, key, n), c in zip(runs, results, strict=True)}

    def per_unit(kind: str, key: str, n: int) -> float:
        return (counts[(kind, key, n)] - counts[(kind, key, 0)]) / n

    per_cycle = {v.key: per_unit("cycle", v.key, cycles) for v in variants}
    bare = per_cycle[V_BARE.key]
    floor, official = per_cycle.get(V_FLOOR.key), per_cycle.get(V_OFFICIAL.key)
    rows = []
    for variant in variants:
        value = per_cycle[variant.key]
        row: dict[str, Any] = {
            "variant": variant.key,
            "label": variant.label,
            "kind": variant.kind,
            "instructions": round(value),
            "ratio": value / bare,
            "added": value - bare,
            "beyond_floor": None,
            "beyond_floor_share_of_bare": None,
            "vs_official_added": None,
        }
        if variant.kind == "ours" and floor is not None:
            row["beyond_floor"] = value - floor
            row["beyond_floor_share_of_bare"] = (value - floor) / bare
        if variant.kind == "ours" and official is not None and official != bare:
            row["vs_official_added"] = (value - bare) / (official - bare)
        rows.append(row)
        progress(f"[instructions] {variant.key:<16} {value:>10,.0f} instructions/cycle")
    per_request = {mode: per_unit("request", mode, requests) for mode in MODES}
    request_rows = []
    for mode, value in per_request.items():
        request_rows.append(
            {
                "variant": mode,
                "label": MODE_LABELS[mode],
                "instructions": round(value),
                "ratio": value / per_request["bare"],
                "added": value - per_request["bare"],
            }
        )
        progress(f"[instructions] e2e request {mode:<5} {value:>12,.0f} instructions/request")
    return {
        "key": "instructions",
        "kind": "instructions",
        "title": TITLE,
        "cycles": cycles,
        "rows": rows,
        "requests": requests,
        "request_rows": request_rows,
    }


def _request_child(config: dict[str, Any]) -> None:
    """One e2e_app process, requests sent in-process one at a time (no sockets, no server)."""
    import asyncio

    os.environ["SQLA_POOL_BENCH_MODE"] = config["variant"]
    os.environ["SQLA_POOL_BENCH_DB_URL"] = config["url"]
    os.environ["SQLA_POOL_BENCH_EXPORT_INTERVAL_MS"] = "1e9"  # no collection while counting
    import httpx

    from .e2e_app import app

    async def send(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            (await client.get("/q")).raise_for_status()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await send(client, WARMUP_REQUESTS)
            await send(client, config["n"])

    asyncio.run(main())
    os._exit(0)


def _child(config: dict[str, Any]) -> None:
    if config.get("kind") == "request":
        _request_child(config)
    import sqlalchemy as sa

    from .harness import Active, make_providers
    from .micro import sync_cycle_loop

    variant = next(v for v in CYCLE_VARIANTS if v.key == config["variant"])
    engine = sa.create_engine(sa.engine.make_url(config["url"]), pool_size=5, max_overflow=10)
    providers = make_providers(1e9)  # no collection inside the counted cycles
    active = Active(variant, engine, providers)
    loop = sync_cycle_loop(variant, active, select=False)
    loop(engine, WARMUP_CYCLES)
    loop(engine, config["n"])
    # No teardown: exiting at once keeps the 0-cycle and N-cycle runs identical but for N.
    os._exit(0)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
