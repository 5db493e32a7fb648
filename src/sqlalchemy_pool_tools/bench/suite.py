"""The benchmark suite: settings profiles, the database, the machine, and running scenarios."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from sqlalchemy_pool_tools.pg import database_url, with_driver

from . import e2e, instructions, memory, micro, realapp
from .harness import V_BARE, V_OURS_DEFAULT

Progress = Callable[[str], None]

SCENARIOS: tuple[str, ...] = (
    "sync",
    "async",
    "sync-select",
    "async-select",
    "wait",
    "e2e",
    "memory",
    "instructions",
    "realapp",
)
ALIASES: dict[str, tuple[str, ...]] = {
    "select": ("sync-select", "async-select"),
    "cycles": ("sync", "async", "sync-select", "async-select"),
    "all": SCENARIOS,
}


@dataclass(frozen=True)
class Settings:
    profile: str
    rounds: int
    cycles: dict[str, int]
    wait_per_task: int
    e2e_duration_s: float
    e2e_warmup_s: float
    e2e_pairs: int
    memory_checkouts: int
    memory_sessions: int
    memory_window: int
    memory_session_window: int
    instruction_cycles: int = 5_000
    instruction_requests: int = 200
    instruction_variants: tuple[str, ...] | None = None  # None: all of instructions.VARIANTS
    wait_tasks: int = 200
    pool_size: int = 5
    e2e_connections: int = 20
    memory_leak_every: int = 10
    export_interval_ms: float = 100.0
    load_generator: str = "builtin"  # loadgen: builtin | hey
    memory_gc: str = "natural"  # natural | explicit (see bench/memory.py)
    memory_stall_s: float = 90.0
    # realapp (issue 16): the OTel stack a user runs, ours off vs on
    realapp_clients: int = 64
    realapp_duration_s: float = 20.0
    realapp_warmup_s: float = 3.0
    realapp_pairs: int = 3
    realapp_requests: int = 200  # instruction count per request (valgrind); 0 = skip
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES: dict[str, Settings] = {
    "full": Settings(
        profile="full",
        rounds=15,
        cycles={"sync": 10_000, "async": 5_000, "sync-select": 2_000, "async-select": 2_000},
        wait_per_task=10,
        e2e_duration_s=10.0,
        e2e_warmup_s=2.0,
        e2e_pairs=3,
        memory_checkouts=1_000_000,
        memory_sessions=100_000,
        memory_window=100_000,
        memory_session_window=10_000,
    ),
    "quick": Settings(
        profile="quick",
        rounds=5,
        cycles={"sync": 5_000, "async": 3_000, "sync-select": 1_000, "async-select": 1_000},
        wait_per_task=5,
        e2e_duration_s=4.0,
        e2e_warmup_s=1.0,
        e2e_pairs=1,
        memory_checkouts=100_000,
        memory_sessions=10_000,
        memory_window=20_000,
        memory_session_window=2_000,
        instruction_cycles=2_000,
        instruction_requests=100,
        realapp_duration_s=8.0,
        realapp_warmup_s=2.0,
        realapp_pairs=2,
        realapp_requests=100,
    ),
    # For the test suite: every row, every verification, numbers meaningless.
    "tiny": Settings(
        profile="tiny",
        rounds=2,
        cycles={"sync": 300, "async": 200, "sync-select": 100, "async-select": 100},
        wait_per_task=1,
        e2e_duration_s=1.0,
        e2e_warmup_s=0.5,
        e2e_pairs=1,
        memory_checkouts=3_000,
        memory_sessions=600,
        memory_window=500,
        memory_session_window=200,
        instruction_cycles=300,
        instruction_requests=50,  # fewer: one wake-up more or less outweighs our cost
        instruction_variants=("bare", "ours-metrics"),  # valgrind runs are slow: two suffice
        memory_gc="explicit",  # deterministic: no finalizer runs inside SDK threads
        realapp_clients=8,
        realapp_duration_s=1.0,
        realapp_warmup_s=0.5,
        realapp_pairs=1,
        realapp_requests=0,  # the instruction count is covered by the instructions scenario
    ),
}


def parse_only(text: str | None) -> tuple[str, ...]:
    """``sync,async,...`` (aliases: select, cycles, all) -> scenario keys in suite order."""
    if not text:
        return SCENARIOS
    wanted: set[str] = set()
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in SCENARIOS:
            wanted.add(name)
        else:
            choices = ", ".join((*SCENARIOS, *ALIASES))
            raise ValueError(f"unknown scenario {name!r} (choose from {choices})")
    if not wanted:
        raise ValueError("no scenario selected")
    return tuple(s for s in SCENARIOS if s in wanted)


# --------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _postgres_version(url: URL) -> str | None:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW server_version").scalar())
    except Exception:
        return None
    finally:
        engine.dispose()


def _ours_source() -> dict[str, Any]:
    """Which instrumentor code was measured: a digest of its sources and the git commit."""
    import hashlib
    from pathlib import Path

    import opentelemetry.instrumentation.sqlalchemy_pool as ours

    package = Path(ours.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"path": str(package), "digest": digest.hexdigest()[:12], "git": None}
    if shutil.which("git"):
        try:
            head = subprocess.run(
                ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if head.returncode == 0:
                info["git"] = head.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_info(url_sync: URL | None) -> dict[str, Any]:
    packages = (
        "SQLAlchemy",
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-sqlalchemy-pool",
        "opentelemetry-instrumentation-sqlalchemy",
        "opentelemetry-instrumentation-fastapi",
        "psycopg",
        "asyncpg",
        "fastapi",
        "uvicorn",
    )
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": {p: _version(p) for p in packages},
        "postgresql": _postgres_version(url_sync) if url_sync is not None else None,
        "loadavg_start": load,
        "ours_source": _ours_source(),
    }


# --------------------------------------------------------------------------------------------
# Memory scenario (one subprocess per variant)
# --------------------------------------------------------------------------------------------
MEMORY_VARIANTS = (
    (V_BARE.key, "bare", ()),
    (V_OURS_DEFAULT.key, "ours", ()),  # the heaviest per-checkout state: holds, sites, sessions
)


def run_memory_scenario(url_sync: URL, settings: Settings, progress: Progress) -> dict[str, Any]:
    rows = []
    for key, kind, options in MEMORY_VARIANTS:
        config = {
            "variant": key,
            "kind": kind,
            "options": [list(o) for o in options],
            "url": url_sync.render_as_string(hide_password=False),
            "warmup": max(200, settings.memory_checkouts // 50),
            "checkouts": settings.memory_checkouts,
            "sessions": settings.memory_sessions,
            "window": settings.memory_window,
            "session_window": settings.memory_session_window,
            "leak_every": settings.memory_leak_every,
            "export_interval_ms": settings.export_interval_ms,
            "gc_mode": settings.memory_gc,
            "stall_s": settings.memory_stall_s,
        }
        stall: dict[str, Any] | None = None
        try:
            result = memory.run_subprocess(config, timeout_s=3600)
        except memory.Stalled as stalled:
            # A hang (seen: a GC finalizer re-entering an OTel SDK lock). Report it, then
            # measure memory again with leaked sessions reclaimed in the main thread.
            stall = {
                "gc_mode": config["gc_mode"],
                "message": str(stalled),
                "frames": memory.summarize_stacks(stalled.stacks),
                "stacks": stalled.stacks,
            }
            progress(f"[memory] {key}: {stalled} -- rerunning with explicit GC")
            result = memory.run_subprocess({**config, "gc_mode": "explicit"}, timeout_s=3600)
        result["stalled"] = stall
        if kind == "ours":
            result["verified"] = stall is None and (
                result["recorded_checkouts"] == result["checkouts_made"]
                and result["holders_left"] == 0
                and result["gc_leaks_recorded"] == result["leaked_sessions"]
            )
        else:
            result["verified"] = False if stall is not None else None
        rows.append(result)
        progress(
            f"[memory] {key:<14} checkouts RSS {result['checkouts']['rss_growth_mb']:+.2f} MB, "
            f"sessions RSS {result['sessions']['rss_growth_mb']:+.2f} MB"
        )
    return {
        "key": "memory",
        "kind": "memory",
        "title": f"memory: {settings.memory_checkouts:,} sync checkouts, then "
        f"{settings.memory_sessions:,} sessions (every {settings.memory_leak_every}th never "
        f"closed, reclaimed by the GC: {settings.memory_gc} collection)",
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def server_url(explicit: str | None) -> Iterator[URL]:
    """The driver-less base URL: ``--database-url``, else $DATABASE_URL, else embedded."""
    if explicit:
        yield make_url(explicit).set(drivername="postgresql")
        return
    with database_url() as url:
        yield url


def run_suite(
    settings: Settings,
    scenarios: Sequence[str],
    database: str | None = None,
    progress: Progress = lambda line: None,
    on_scenario: Callable[[dict[str, Any]], None] = lambda results: None,
) -> dict[str, Any]:
    started = dt.datetime.now(dt.timezone.utc)
    with server_url(database) as base:
        url_sync = with_driver(base, "psycopg")
        url_async = with_driver(base, "asyncpg")
        results: dict[str, Any] = {
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info(url_sync),
            "settings": settings.as_dict(),
            "scenarios": [],
        }
        for name in scenarios:
            progress(f"== {name}")
            try:
                result = _run_scenario(name, url_sync, url_async, settings, progress)
            except Exception as error:  # one broken scenario must not lose the others
                if isinstance(error, OperationalError) and not results["scenarios"]:
                    raise
                result = {"key": name, "kind": "error", "title": name, "rows": []}
                result["error"] = f"{type(error).__name__}: {error}"
                progress(f"[{name}] FAILED: {result['error']}")
            results["scenarios"].append(result)
            on_scenario(results)
    try:
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    results["duration_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    return results


def _run_scenario(
    name: str, url_sync: URL, url_async: URL, settings: Settings, progress: Progress
) -> dict[str, Any]:
    if name in micro.CYCLE_SCENARIOS:
        scenario = micro.CYCLE_SCENARIOS[name]
        return micro.run_cycle_scenario(scenario, url_sync, url_async, settings, progress)
    if name == "wait":
        return micro.run_wait_scenario(url_async, settings, progress)
    if name == "e2e":
        return e2e.run_e2e_scenario(url_async, settings, progress)
    if name == "memory":
        return run_memory_scenario(url_sync, settings, progress)
    if name == "realapp":
        return realapp.run_realapp_scenario(url_sync, url_async, settings, progress)
    if name == "instructions":
        if not instructions.available():
            progress("[instructions] skipped: valgrind is not installed")
            return {
                "key": name,
                "kind": "skipped",
                "title": instructions.TITLE,
                "reason": "valgrind is not installed (apt-get install valgrind)",
                "rows": [],
            }
        return instructions.run_instructions_scenario(
            url_sync,
            url_async,
            settings.instruction_cycles,
            settings.instruction_requests,
            progress,
            settings.instruction_variants,
        )
    raise ValueError(f"unknown scenario {name!r}")
