"""Checkout-cycle micro-benchmarks (sync/async, empty or ``SELECT 1``) and the wait-heavy run.

Each block builds a fresh engine, switches one variant on, warms up, then times a fixed number
of cycles. Variants run round-robin inside every round (the order rotates), so slow phases
of a noisy machine hit all of them alike; results are medians over rounds, and ratios are
medians of same-round ratios to bare SQLAlchemy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from .harness import (
    BARE,
    CYCLE_VARIANTS,
    FLOOR,
    FLOOR_ATTRS,
    OFFICIAL,
    V_OFFICIAL,
    WAIT_VARIANTS,
    Active,
    Sample,
    Stopwatch,
    Variant,
    difference,
    make_providers,
    median,
    paired,
    ratio,
    rotated,
)

SELECT_1 = sa.text("SELECT 1")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CycleScenario:
    key: str
    title: str
    is_async: bool
    select: bool


CYCLE_SCENARIOS: dict[str, CycleScenario] = {
    s.key: s
    for s in (
        CycleScenario("sync", "sync (psycopg): checkout + checkin, no statement", False, False),
        CycleScenario("async", "async (asyncpg): checkout + checkin, no statement", True, False),
        CycleScenario("sync-select", "sync (psycopg): one SELECT 1 per checkout", False, True),
        CycleScenario("async-select", "async (asyncpg): one SELECT 1 per checkout", True, True),
    )
}


# --------------------------------------------------------------------------------------------
# The measured loops (kept free of any per-iteration branching)
# --------------------------------------------------------------------------------------------
def _sync_empty(engine: sa.Engine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        with connect():
            pass


def _sync_select(engine: sa.Engine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        with connect() as conn:
            conn.execute(SELECT_1).scalar()


def _sync_floor(select: bool, active: Active) -> Callable[[sa.Engine, int], None]:
    record_a, record_b = active.floor  # type: ignore[misc]
    a, b = record_a.record, record_b.record

    def loop(engine: sa.Engine, n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            with connect() as conn:
                a(0.0001, FLOOR_ATTRS)
                if select:
                    conn.execute(SELECT_1).scalar()
            b(0.0001, FLOOR_ATTRS)

    return loop


async def _async_empty(engine: Any, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        async with connect():
            pass


async def _async_select(engine: Any, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        async with connect() as conn:
            (await conn.execute(SELECT_1)).scalar()


def _async_floor(select: bool, active: Active) -> Callable[[Any, int], Any]:
    record_a, record_b = active.floor  # type: ignore[misc]
    a, b = record_a.record, record_b.record

    async def loop(engine: Any, n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            async with connect() as conn:
                a(0.0001, FLOOR_ATTRS)
                if select:
                    (await conn.execute(SELECT_1)).scalar()
            b(0.0001, FLOOR_ATTRS)

    return loop


# --------------------------------------------------------------------------------------------
# One block
# --------------------------------------------------------------------------------------------
def _finish(sw: Stopwatch, ops: int, active: Active, expected: int, exports: int) -> Sample:
    recorded = active.recorded_checkouts()
    return Sample(
        wall_us=sw.wall / ops * 1e6,
        cpu_us=sw.cpu / ops * 1e6,
        expected=expected if recorded is not None else None,
        recorded=recorded,
        exports=exports,
    )


def _close(sample: Sample | None, active: Active, providers: Any) -> None:
    active.off()
    providers.shutdown()
    if sample is not None:
        sample.spans = dict(providers.spans.by_name)


def sync_cycle_loop(
    variant: Variant, active: Active, select: bool
) -> Callable[[sa.Engine, int], None]:
    """The measured sync loop of ``variant`` (the floor records inside the loop itself)."""
    if variant.kind == FLOOR:
        return _sync_floor(select, active)
    return _sync_select if select else _sync_empty


def sync_block(
    scenario: CycleScenario, variant: Variant, url: URL, cycles: int, warmup: int, interval: float
) -> Sample:
    engine = sa.create_engine(url, pool_size=5, max_overflow=10)
    providers = make_providers(interval)
    active = Active(variant, engine, providers)
    sample: Sample | None = None
    try:
        loop = sync_cycle_loop(variant, active, scenario.select)
        loop(engine, warmup)
        exports0 = providers.metrics.exports
        with Stopwatch() as sw:
            loop(engine, cycles)
        exports = providers.metrics.exports - exports0
        sample = _finish(sw, cycles, active, warmup + cycles, exports)
    finally:
        _close(sample, active, providers)
        engine.dispose()
    return sample


async def _async_block(
    scenario: CycleScenario, variant: Variant, url: URL, cycles: int, warmup: int, interval: float
) -> Sample:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, pool_size=5, max_overflow=10)
    providers = make_providers(interval)
    active = Active(variant, engine, providers)
    sample: Sample | None = None
    try:
        if variant.kind == FLOOR:
            loop = _async_floor(scenario.select, active)
        else:
            loop = _async_select if scenario.select else _async_empty
        await loop(engine, warmup)
        exports0 = providers.metrics.exports
        with Stopwatch() as sw:
            await loop(engine, cycles)
        exports = providers.metrics.exports - exports0
        sample = _finish(sw, cycles, active, warmup + cycles, exports)
    finally:
        _close(sample, active, providers)
        await engine.dispose()
    return sample


def cycle_block(
    scenario: CycleScenario, variant: Variant, url: URL, cycles: int, interval: float
) -> Sample:
    warmup = max(50, cycles // 10)
    if scenario.is_async:
        return asyncio.run(_async_block(scenario, variant, url, cycles, warmup, interval))
    return sync_block(scenario, variant, url, cycles, warmup, interval)


# --------------------------------------------------------------------------------------------
# Wait-heavy: many asyncio tasks queueing on a small pool
# --------------------------------------------------------------------------------------------
async def _wait_block(
    variant: Variant, url: URL, tasks: int, per_task: int, pool_size: int, interval: float
) -> Sample:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=600)
    providers = make_providers(interval)
    active = Active(variant, engine, providers)
    sample: Sample | None = None

    async def worker(n: int) -> None:
        for _ in range(n):
            async with engine.connect() as conn:
                await conn.execute(SELECT_1)

    try:
        warmup = pool_size * 4
        await asyncio.gather(*(worker(1) for _ in range(warmup)))  # opens every connection
        exports0 = providers.metrics.exports
        with Stopwatch() as sw:
            await asyncio.gather(*(worker(per_task) for _ in range(tasks)))
        exports = providers.metrics.exports - exports0
        sample = _finish(sw, tasks * per_task, active, warmup + tasks * per_task, exports)
    finally:
        _close(sample, active, providers)
        await engine.dispose()
    return sample


# --------------------------------------------------------------------------------------------
# Rounds and summaries
# --------------------------------------------------------------------------------------------
def _rounds(
    variants: Sequence[Variant],
    rounds: int,
    block: Callable[[Variant], Sample],
    progress: Progress,
    name: str,
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {v.key: [] for v in variants}
    for r in range(rounds):
        for variant in rotated(variants, r):
            sample = block(variant)
            samples[variant.key].append(sample)
            check = "" if sample.verified is None else (" ok" if sample.verified else " MISMATCH")
            progress(
                f"[{name}] round {r + 1}/{rounds} {variant.key:<16} "
                f"{sample.wall_us:9.2f} µs wall {sample.cpu_us:9.2f} µs cpu{check}"
            )
    return samples


def summarize(variants: Sequence[Variant], samples: dict[str, list[Sample]]) -> list[dict]:
    bare = samples["bare"]
    floor = samples.get("floor")
    official = samples.get(V_OFFICIAL.key)
    official_added = paired(official, bare, difference) if official else None
    rows = []
    for variant in variants:
        own = samples[variant.key]
        added = paired(own, bare, difference)
        row: dict[str, Any] = {
            "variant": variant.key,
            "label": variant.label,
            "kind": variant.kind,
            "options": dict(variant.options),
            "wall_us": median(s.wall_us for s in own),
            "cpu_us": median(s.cpu_us for s in own),
            "wall_best_us": min(s.wall_us for s in own),
            "cpu_best_us": min(s.cpu_us for s in own),
            "ratio": paired(own, bare, ratio),
            "added_us": added,
            "beyond_floor_us": (
                paired(own, floor, difference)
                if floor is not None and variant.kind not in (BARE, FLOOR)
                else None
            ),
            "vs_official_added": (
                {k: ratio(added[k], official_added[k]) for k in ("wall", "cpu")}
                if official_added is not None and variant.kind not in (BARE, FLOOR, OFFICIAL)
                else None
            ),
            "verified": _verified(own),
            "checkouts_expected": _sum(s.expected for s in own),
            "checkouts_recorded": _sum(s.recorded for s in own),
            "exports_per_block": median(s.exports for s in own),
            "spans": _span_totals(own),
            "samples": [s.as_dict() for s in own],
        }
        rows.append(row)
    return rows


def _verified(samples: Sequence[Sample]) -> bool | None:
    flags = [s.verified for s in samples if s.verified is not None]
    return all(flags) if flags else None


def _sum(values: Any) -> int | None:
    data = [v for v in values if v is not None]
    return sum(data) if data else None


def _span_totals(samples: Sequence[Sample]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for sample in samples:
        for name, count in sample.spans.items():
            totals[name] = totals.get(name, 0) + count
    return totals


def run_cycle_scenario(
    scenario: CycleScenario, url_sync: URL, url_async: URL, settings: Any, progress: Progress
) -> dict[str, Any]:
    cycles = settings.cycles[scenario.key]
    url = url_async if scenario.is_async else url_sync
    samples = _rounds(
        CYCLE_VARIANTS,
        settings.rounds,
        lambda v: cycle_block(scenario, v, url, cycles, settings.export_interval_ms),
        progress,
        scenario.key,
    )
    return {
        "key": scenario.key,
        "kind": "cycles",
        "title": scenario.title,
        "unit": "µs/cycle",
        "cycles_per_block": cycles,
        "rounds": settings.rounds,
        "rows": summarize(CYCLE_VARIANTS, samples),
    }


def run_wait_scenario(url_async: URL, settings: Any, progress: Progress) -> dict[str, Any]:
    tasks, per_task, pool_size = settings.wait_tasks, settings.wait_per_task, settings.pool_size

    def block(variant: Variant) -> Sample:
        return asyncio.run(
            _wait_block(variant, url_async, tasks, per_task, pool_size, settings.export_interval_ms)
        )

    samples = _rounds(WAIT_VARIANTS, settings.rounds, block, progress, "wait")
    return {
        "key": "wait",
        "kind": "cycles",
        "title": f"wait-heavy (asyncpg): {tasks} tasks on a pool of {pool_size} "
        f"(max_overflow=0), SELECT 1 per checkout",
        "unit": "µs/checkout",
        "cycles_per_block": tasks * per_task,
        "rounds": settings.rounds,
        "rows": summarize(WAIT_VARIANTS, samples),
    }
