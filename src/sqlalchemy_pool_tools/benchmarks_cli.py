"""``sqlalchemy-pool benchmarks``: the overhead of the instrumentor, measured side by side.

Bare SQLAlchemy, the official ``opentelemetry-instrumentation-sqlalchemy`` pool metric and
our instrumentor in three configurations, on a real PostgreSQL (embedded unless
``--database-url``/``$DATABASE_URL``), with a real OTel SDK collecting periodically:
checkout cycles (sync/async, empty or ``SELECT 1``), 200 asyncio waiters on a pool of 5,
FastAPI + asyncpg on uvicorn under a calibrated load generator, the OTel stack a user runs
(realapp), and memory growth. Prints a markdown report; targets
are shown next to the results and never change the exit status. Exit 1 only when a
verification fails (a checkout the wait_time histogram did not record).

The same suite runs from a source checkout with ``python -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy_pool_tools.errors import UserError

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="fewer cycles and rounds (a few minutes)"
    )
    size.add_argument(
        "--tiny",
        action="store_true",
        help="a few hundred cycles: checks every scenario runs (numbers are meaningless)",
    )
    parser.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated scenarios: sync, async, sync-select, async-select, wait, e2e, "
        "memory, instructions (valgrind; skipped when not installed), realapp (the OTel stack "
        "under opentelemetry-instrument, ours off vs on; needs hey) (aliases: select, "
        "cycles, all); default: all",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH (JSON)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown report to PATH")
    parser.add_argument(
        "--rounds", type=_positive_int, metavar="N", help="rounds per scenario (overrides profile)"
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL server to use (default: $DATABASE_URL, else an embedded server)",
    )
    parser.add_argument(
        "--export-interval-ms",
        type=_positive_float,
        default=100.0,
        metavar="MS",
        help="metric collection interval of the periodic reader (default: 100)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("builtin", "hey"),
        default="builtin",
        help="load generator of the e2e and realapp scenarios (sqlalchemy_pool_tools.loadgen; "
        "default: builtin)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile the sync empty cycle (ours-metrics and ours-default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmarks",
        help="measure the instrumentor's overhead against bare SQLAlchemy and the official "
        "instrumentor",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> Any:
    from sqlalchemy_pool_tools.bench.suite import PROFILES

    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = PROFILES[profile]
    changes: dict[str, Any] = {
        "export_interval_ms": args.export_interval_ms,
        "load_generator": args.load_generator,
    }
    if args.rounds:
        changes["rounds"] = args.rounds
    return dataclasses.replace(settings, **changes)


def run(args: argparse.Namespace) -> int:
    from sqlalchemy import exc as sa_exc

    from sqlalchemy_pool_tools.bench import report, suite

    try:
        scenarios = suite.parse_only(args.only)
    except ValueError as error:
        raise UserError(str(error)) from None
    settings = settings_from(args)

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    def save(partial: dict[str, Any]) -> None:
        if args.json:  # after every scenario: a long run interrupted late keeps its figures
            Path(args.json).write_text(json.dumps(partial, indent=2, default=str), "utf-8")

    try:
        results = suite.run_suite(settings, scenarios, args.database_url, progress, save)
        if args.profile:
            results["profiles"] = _profiles(args, settings, progress)
    except sa_exc.OperationalError as error:
        first = str(error.orig or error).strip().splitlines()[0]
        raise UserError(f"cannot use the PostgreSQL server: {first}") from None
    for scenario in results["scenarios"]:
        report.evaluate_targets(scenario)
    text = report.markdown(results)
    if results.get("profiles"):
        from sqlalchemy_pool_tools.bench.profile import profile_markdown

        text += "\n" + "\n".join(profile_markdown(p) for p in results["profiles"])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 1 if failed_verifications(results) else 0


def _profiles(args: argparse.Namespace, settings: Any, progress: Any) -> list[dict[str, Any]]:
    from sqlalchemy_pool_tools.bench.profile import profile_sync_cycle
    from sqlalchemy_pool_tools.bench.suite import server_url
    from sqlalchemy_pool_tools.pg import with_driver

    cycles = max(200, settings.cycles["sync"])
    out = []
    with server_url(args.database_url) as base:
        for variant in ("ours-metrics", "ours-default"):
            progress(f"== profile {variant}")
            out.append(
                profile_sync_cycle(
                    with_driver(base, "psycopg"), variant, cycles, settings.export_interval_ms
                )
            )
    return out


def failed_verifications(results: dict[str, Any]) -> list[str]:
    """Failed scenarios, and rows whose recorded checkouts did not match the checkouts made
    (or that stalled)."""
    failed = [s["key"] for s in results["scenarios"] if s["kind"] == "error"]
    return failed + [
        f"{scenario['key']}/{row['variant']}"
        for scenario in results["scenarios"]
        for row in scenario["rows"]
        if row.get("verified") is False
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m benchmarks.run``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
