"""Memory: RSS, live GC objects and tracemalloc growth over many checkouts and sessions.

Each variant runs in a fresh interpreter (``python -m sqlalchemy_pool_tools.bench.memory
CONFIG_JSON``, one JSON line out) so RSS figures are not polluted by earlier scenarios.

Two phases, each measured from a warmed-up steady state (after ``gc.collect()``):

1. ``checkouts`` sync ``engine.connect()``/close cycles;
2. ``sessions`` ORM ``Session`` objects running ``SELECT 1``; every ``leak_every``-th one is
   never closed, so its connection is reclaimed by the garbage collector (a leak our
   instrumentor reports).

RSS and GC-object deltas cover the whole phase; tracemalloc (slow) covers a trailing window
only, and names the top allocation sites still alive at its end.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
import warnings
from collections import Counter
from typing import Any

MB = 1024 * 1024


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class Phase:
    """Measures one phase: steady-state snapshot, run, snapshot, tracemalloc window."""

    def __init__(self) -> None:
        gc.collect()
        self.rss0 = _rss()
        self.types0 = _type_counts()
        self.objects0 = sum(self.types0.values())

    def end(self) -> dict[str, Any]:
        gc.collect()
        rss1 = _rss()
        types1 = _type_counts()
        growth = types1 - self.types0
        return {
            "rss_before_mb": self.rss0 / MB,
            "rss_after_mb": rss1 / MB,
            "rss_growth_mb": (rss1 - self.rss0) / MB,
            "gc_objects_before": self.objects0,
            "gc_objects_growth": sum(types1.values()) - self.objects0,
            "top_type_growth": dict(growth.most_common(5)),
        }


def _tracemalloc_window(run: Any, n: int) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start(5)
    try:
        before = tracemalloc.take_snapshot()
        run(n)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    net = sum(s.size_diff for s in stats)
    top = [
        {
            "site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
            "size_diff_kb": s.size_diff / 1024,
            "count_diff": s.count_diff,
        }
        for s in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:5]
        if s.size_diff > 0
    ]
    return {"window": n, "net_kb": net / 1024, "bytes_per_op": net / n if n else 0.0, "top": top}


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session

    from .harness import WAIT_TIME, Active, Variant, make_providers

    warnings.filterwarnings("ignore", category=sa.exc.SAWarning)
    variant = Variant(
        config["variant"], config["variant"], config["kind"], tuple(config["options"])
    )
    url = make_url(config["url"])
    engine = sa.create_engine(url, pool_size=5, max_overflow=20)
    providers = make_providers(config["export_interval_ms"])
    active = Active(variant, engine, providers)
    select_1 = sa.text("SELECT 1")
    done = {"checkouts": 0}
    leaked = {"sessions": 0}

    def checkouts(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            with connect():
                pass
        done["checkouts"] += n

    leak_every = config["leak_every"]

    def sessions(n: int) -> None:
        for i in range(n):
            session = Session(engine)
            session.execute(select_1).scalar()
            if leak_every and i % leak_every == leak_every - 1:
                leaked["sessions"] += 1  # dropped while holding its connection: GC reclaims it
            else:
                session.close()
            del session
        done["checkouts"] += n

    result: dict[str, Any] = {"variant": variant.key}
    try:
        warm = config["warmup"]
        checkouts(warm)
        sessions(min(warm, 2_000))
        gc.collect()
        phase = Phase()
        checkouts(config["checkouts"])
        result["checkouts"] = {"n": config["checkouts"], **phase.end()}
        result["checkouts"]["tracemalloc"] = _tracemalloc_window(checkouts, config["window"])

        phase = Phase()
        sessions(config["sessions"])
        result["sessions"] = {
            "n": config["sessions"],
            "leak_every": leak_every,
            **phase.end(),
        }
        result["sessions"]["tracemalloc"] = _tracemalloc_window(sessions, config["session_window"])
        gc.collect()
        result["checkouts_made"] = done["checkouts"]
        result["leaked_sessions"] = leaked["sessions"]
        result["recorded_checkouts"] = active.recorded_checkouts()
        if variant.kind == "ours":
            from opentelemetry.instrumentation.sqlalchemy_pool import holders, semconv

            result["holders_left"] = len(holders(engine))
            result["gc_leaks_recorded"] = providers.metrics.counter_value(
                semconv.LEAKS, **{semconv.LEAK_KIND: semconv.LEAK_KIND_GARBAGE_COLLECTED}
            )
            result["wait_time_metric"] = WAIT_TIME
        result["rss_final_mb"] = _rss() / MB
    finally:
        active.off()
        providers.shutdown()
        engine.dispose()
    return result


def run_subprocess(config: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_tools.bench.memory", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory benchmark failed ({done.returncode}): {tail[0]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
