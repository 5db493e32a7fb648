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

GC modes for the leaked sessions: ``natural`` leaves reclamation to Python's automatic
collections, which run at any allocation in any thread -- including inside the OTel SDK's
collection thread while it holds its locks; ``explicit`` disables automatic collection
during the phase and reclaims each leaked session with ``gc.collect(1)`` in the main thread.
A stall watchdog turns a hang (no progress for ``stall_s``) into a stack dump of every
thread on stderr and exit status 3, so a deadlock is reported instead of hanging the suite.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from collections import Counter
from typing import Any

MB = 1024 * 1024
STALL_EXIT = 3
_progress = [0]


def _rss() -> int:
    """Current resident set size in bytes (psutil, else /proc, else the peak from rusage)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process().memory_info().rss
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class Phase:
    """Measures one phase: steady-state snapshot, run, snapshot."""

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


def _start_stall_watchdog(stall_s: float) -> None:
    def watch() -> None:
        last, since = _progress[0], time.monotonic()
        while True:
            time.sleep(min(5.0, stall_s / 4))
            if _progress[0] != last:
                last, since = _progress[0], time.monotonic()
            elif time.monotonic() - since > stall_s:
                sys.stderr.write(f"STALLED: no progress for {stall_s:.0f} s\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(STALL_EXIT)

    threading.Thread(target=watch, name="bench-stall-watchdog", daemon=True).start()


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session

    from .harness import Active, Variant, make_providers, ours_file

    _start_stall_watchdog(config.get("stall_s", 90.0))
    warnings.filterwarnings("ignore", category=sa.exc.SAWarning)
    options = tuple(tuple(o) for o in config["options"])
    variant = Variant(config["variant"], config["variant"], config["kind"], options)
    engine = sa.create_engine(make_url(config["url"]), pool_size=5, max_overflow=20)
    providers = make_providers(config["export_interval_ms"])
    active = Active(variant, engine, providers)
    select_1 = sa.text("SELECT 1")
    counts = {"checkouts": 0, "leaked": 0}
    leak_every = config["leak_every"]
    explicit_gc = config.get("gc_mode", "natural") == "explicit"
    progress = _progress

    def checkouts(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            with connect():
                pass
            progress[0] += 1
        counts["checkouts"] += n

    def sessions(n: int) -> None:
        if explicit_gc:
            gc.disable()
        try:
            for i in range(n):
                session = Session(engine)
                session.execute(select_1).scalar()
                if leak_every and i % leak_every == leak_every - 1:
                    counts["leaked"] += 1  # dropped holding its connection: the GC reclaims it
                    del session
                    if explicit_gc:
                        gc.collect(1)
                else:
                    session.close()
                    del session
                progress[0] += 1
        finally:
            if explicit_gc:
                gc.enable()
        counts["checkouts"] += n

    result: dict[str, Any] = {
        "variant": variant.key,
        "gc_mode": config.get("gc_mode"),
        "ours_file": ours_file(),
    }
    try:
        warm = config["warmup"]
        checkouts(warm)
        sessions(min(warm, 2_000))
        phase = Phase()
        checkouts(config["checkouts"])
        result["checkouts"] = {"n": config["checkouts"], **phase.end()}
        result["checkouts"]["tracemalloc"] = _tracemalloc_window(checkouts, config["window"])

        phase = Phase()
        sessions(config["sessions"])
        result["sessions"] = {"n": config["sessions"], "leak_every": leak_every, **phase.end()}
        window = config["session_window"]
        result["sessions"]["tracemalloc"] = _tracemalloc_window(sessions, window)
        gc.collect()
        # Telemetry of connections reclaimed inside a GC is done at the next checkout (the
        # instrumentor never calls the SDK from a GC finalizer): make that safe point happen.
        checkouts(1)
        result["checkouts_made"] = counts["checkouts"]
        result["leaked_sessions"] = counts["leaked"]
        result["recorded_checkouts"] = active.recorded_checkouts()
        if variant.kind == "ours":
            from opentelemetry.instrumentation.sqlalchemy_pool import holders, semconv

            result["holders_left"] = len(holders(engine))
            result["gc_leaks_recorded"] = providers.metrics.counter_value(
                semconv.LEAKS, **{semconv.LEAK_KIND: semconv.LEAK_KIND_GARBAGE_COLLECTED}
            )
        result["rss_final_mb"] = _rss() / MB
    finally:
        active.off()
        providers.shutdown()
        engine.dispose()
    return result


class Stalled(RuntimeError):
    """The subprocess made no progress: its stack dump is attached."""

    def __init__(self, message: str, stacks: str):
        super().__init__(message)
        self.stacks = stacks


def run_subprocess(config: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    from .harness import child_env

    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_tools.bench.memory", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=child_env(),
    )
    if done.returncode == STALL_EXIT:
        stderr = done.stderr or ""
        start = stderr.find("STALLED")
        raise Stalled(stderr[start:].splitlines()[0], stderr[start:])
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory benchmark failed ({done.returncode}): {tail[0]}")
    return json.loads(lines[-1])


def summarize_stacks(stacks: str, limit: int = 12) -> list[str]:
    """The frames worth reading in a faulthandler dump: ours, SQLAlchemy's finalizer, SDK locks."""
    keep = ("sqlalchemy_pool/", "pool/base.py", "weakref.py", "aggregation.py", "Thread 0x")
    lines = [line.strip() for line in stacks.splitlines()]
    return [line for line in lines if any(k in line for k in keep)][:limit]


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
