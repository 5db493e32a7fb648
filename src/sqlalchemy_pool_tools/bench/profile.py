"""cProfile of the hot path: the sync empty checkout cycle with one of our variants on.

cProfile adds a fixed cost to every Python call, so absolute figures are inflated (calls
into C are cheap, many tiny Python functions look expensive); use the shares and the
ranking, and confirm any gain with the wall/CPU benchmarks.
"""

from __future__ import annotations

import cProfile
import pstats
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from .harness import CYCLE_VARIANTS, Active, make_providers

GROUPS = (
    ("ours", ("/opentelemetry/instrumentation/sqlalchemy_pool/",)),
    ("otel-sdk", ("/opentelemetry/sdk/",)),
    ("otel-api", ("/opentelemetry/",)),
    ("sqlalchemy", ("/sqlalchemy/",)),
    ("psycopg", ("/psycopg",)),
)


def _group(filename: str) -> str:
    for name, needles in GROUPS:
        if any(needle in filename for needle in needles):
            return name
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    return "other"


def profile_sync_cycle(
    url: URL, variant_key: str = "ours-metrics", cycles: int = 20_000, interval_ms: float = 100.0
) -> dict[str, Any]:
    variant = next(v for v in CYCLE_VARIANTS if v.key == variant_key)
    engine = sa.create_engine(url, pool_size=5)
    providers = make_providers(interval_ms)
    active = Active(variant, engine, providers)
    connect = engine.connect
    try:
        for _ in range(max(100, cycles // 10)):
            with connect():
                pass
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(cycles):
            with connect():
                pass
        profiler.disable()
    finally:
        active.off()
        providers.shutdown()
        engine.dispose()
    stats = pstats.Stats(profiler)
    functions = []
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        group = _group(filename)
        groups[group] = groups.get(group, 0.0) + tottime
        total += tottime
        functions.append(
            {
                "function": f"{_short(filename)}:{line}({name})",
                "group": group,
                "calls_per_cycle": ncalls / cycles,
                "self_us": tottime / cycles * 1e6,
                "cumulative_us": cumtime / cycles * 1e6,
            }
        )
    functions.sort(key=lambda f: f["self_us"], reverse=True)
    return {
        "variant": variant_key,
        "cycles": cycles,
        "profiled_us_per_cycle": total / cycles * 1e6,
        "groups_us": {k: v / cycles * 1e6 for k, v in sorted(groups.items(), key=lambda i: -i[1])},
        "functions": functions,
    }


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile_markdown(profile: dict[str, Any], top: int = 25, ours_top: int = 15) -> str:
    lines = [
        f"### cProfile: sync empty cycle, `{profile['variant']}` "
        f"({profile['cycles']:,} cycles, {profile['profiled_us_per_cycle']:.1f} µs/cycle "
        "under the profiler)",
        "",
        "| group | self µs/cycle | share |",
        "|---|---:|---:|",
    ]
    total = profile["profiled_us_per_cycle"] or 1.0
    for group, us in profile["groups_us"].items():
        lines.append(f"| {group} | {us:.2f} | {us / total:.0%} |")
    lines += [
        "",
        "| function | group | calls/cycle | self µs/cycle | cumulative µs/cycle |",
        "|---|---|---:|---:|---:|",
    ]
    shown = profile["functions"][:top]
    ours = [f for f in profile["functions"] if f["group"] == "ours"][:ours_top]
    for f in shown + [f for f in ours if f not in shown]:
        lines.append(
            f"| `{f['function']}` | {f['group']} | {f['calls_per_cycle']:.2f} "
            f"| {f['self_us']:.2f} | {f['cumulative_us']:.2f} |"
        )
    return "\n".join([*lines, ""])
