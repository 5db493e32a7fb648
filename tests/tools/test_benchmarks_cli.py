"""``sqlalchemy-pool benchmarks`` in its tiny mode: every scenario, every row, every figure a
number, and every checkout recorded. Timings are never asserted (they are goals, shown in
the report, and meaningless at this size)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from sqlalchemy_pool_tools import benchmarks_cli
from sqlalchemy_pool_tools.bench import instructions, suite
from sqlalchemy_pool_tools.bench.harness import CYCLE_VARIANTS, WAIT_VARIANTS
from sqlalchemy_pool_tools.errors import UserError

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
CYCLE_SCENARIOS = ("sync", "async", "sync-select", "async-select")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sqlalchemy-pool")
    subparsers = parser.add_subparsers(dest="command")
    benchmarks_cli.register(subparsers)
    return parser.parse_args(["benchmarks", *argv])


@pytest.fixture(scope="module")
def tiny(pg_server_url: URL, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("benchmarks")
    args = _parse(
        "--tiny",
        "--quiet",
        "--database-url",
        pg_server_url.render_as_string(hide_password=False),
        "--json",
        str(out / "results.json"),
        "--markdown",
        str(out / "results.md"),
    )
    assert args.func is benchmarks_cli.run
    status = args.func(args)
    return {
        "status": status,
        "results": json.loads((out / "results.json").read_text(encoding="utf-8")),
        "markdown": (out / "results.md").read_text(encoding="utf-8"),
    }


def _scenario(tiny: dict[str, Any], key: str) -> dict[str, Any]:
    return next(s for s in tiny["results"]["scenarios"] if s["key"] == key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_exit_status_is_zero_when_every_checkout_was_recorded(tiny: dict[str, Any]) -> None:
    assert tiny["status"] == 0
    assert benchmarks_cli.failed_verifications(tiny["results"]) == []


def test_every_scenario_runs(tiny: dict[str, Any]) -> None:
    keys = [s["key"] for s in tiny["results"]["scenarios"]]
    assert keys == list(suite.SCENARIOS)


@pytest.mark.parametrize("key", CYCLE_SCENARIOS)
def test_cycle_scenarios_have_every_variant_with_numbers(tiny: dict[str, Any], key: str) -> None:
    scenario = _scenario(tiny, key)
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert list(rows) == [v.key for v in CYCLE_VARIANTS]
    for row in rows.values():
        assert _is_number(row["wall_us"]) and row["wall_us"] > 0, row["variant"]
        assert _is_number(row["cpu_us"]) and row["cpu_us"] >= 0, row["variant"]
        assert _is_number(row["ratio"]["wall"]) and _is_number(row["ratio"]["cpu"])
        assert len(row["samples"]) == scenario["rounds"]
    assert rows["bare"]["ratio"]["wall"] == 1.0
    for key_ in ("ours-metrics", "ours-default", "ours-leak-site", "official-metric"):
        assert _is_number(rows[key_]["added_us"]["wall"])
        assert _is_number(rows[key_]["beyond_floor_us"]["wall"])
    for key_ in ("ours-metrics", "ours-default", "ours-leak-site"):
        assert _is_number(rows[key_]["vs_official_added"]["wall"])
        assert rows[key_]["targets"], "our rows carry their goals"
        assert all(t["met"] in (True, False) for t in rows[key_]["targets"])


@pytest.mark.parametrize("key", CYCLE_SCENARIOS)
def test_every_checkout_was_recorded(tiny: dict[str, Any], key: str) -> None:
    """wait_time histogram count == checkouts made, for our variants (and the floor's
    two histograms), collected by a real periodic reader."""
    for row in _scenario(tiny, key)["rows"]:
        if row["kind"] in ("ours", "floor"):
            assert row["verified"] is True, row["variant"]
            assert row["checkouts_recorded"] == row["checkouts_expected"] > 0
            for sample in row["samples"]:
                assert sample["recorded_checkouts"] == sample["expected_checkouts"]
                assert sample["exports"] >= 0
        else:
            assert row["verified"] is None
            assert row["checkouts_recorded"] is None


def test_wait_heavy_rows_and_spans(tiny: dict[str, Any]) -> None:
    scenario = _scenario(tiny, "wait")
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert list(rows) == [v.key for v in WAIT_VARIANTS]
    assert scenario["cycles_per_block"] == 200  # 200 waiters x 1 checkout each in tiny mode
    for row in rows.values():
        assert _is_number(row["wall_us"]) and row["wall_us"] > 0
        if row["kind"] == "ours":
            assert row["verified"] is True, row["variant"]
    # threshold 0: every checkout waited "long enough", so every one has a wait span
    spans = rows["ours-wait-spans"]["spans"].get("sqlalchemy.pool.wait", 0)
    assert spans == rows["ours-wait-spans"]["checkouts_expected"]


def test_e2e_rows(tiny: dict[str, Any]) -> None:
    scenario = _scenario(tiny, "e2e")
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert set(rows) == {"bare", "ours"}
    for row in rows.values():
        assert _is_number(row["rps"]) and row["rps"] > 0
        assert _is_number(row["p99_ms"]) and row["p99_ms"] > 0
        assert _is_number(row["cpu_ms_per_request"]) and row["cpu_ms_per_request"] > 0
        assert row["errors"] == 0
        assert row["requests"] > 0
    assert rows["ours"]["verified"] is True
    assert rows["ours"]["checkouts_recorded"] == rows["ours"]["requests"]
    for key in ("rps_ratio", "p99_ratio", "cpu_ratio"):
        assert _is_number(rows["ours"][key]), key


def test_memory_rows(tiny: dict[str, Any]) -> None:
    scenario = _scenario(tiny, "memory")
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert set(rows) == {"bare", "ours-default"}
    for row in rows.values():
        for phase in ("checkouts", "sessions"):
            assert _is_number(row[phase]["rss_growth_mb"])
            assert isinstance(row[phase]["gc_objects_growth"], int)
            assert _is_number(row[phase]["tracemalloc"]["net_kb"])
    ours = rows["ours-default"]
    assert ours["verified"] is True
    assert ours["recorded_checkouts"] == ours["checkouts_made"]
    assert ours["holders_left"] == 0
    assert ours["leaked_sessions"] > 0
    assert ours["gc_leaks_recorded"] == ours["leaked_sessions"]


def test_markdown_report(tiny: dict[str, Any]) -> None:
    text = tiny["markdown"]
    machine = tiny["results"]["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    for needle in (
        machine["cpu"],
        "cores",
        "CPython" if sys.implementation.name == "cpython" else "Python",
        "SQLAlchemy",
        "opentelemetry-api/sdk",
        tiny["results"]["date"],
    ):
        assert needle in text
    for scenario in tiny["results"]["scenarios"]:
        assert scenario["title"] in text
        for row in scenario["rows"]:
            assert f"`{row['variant']}`" in text
    assert "goal" in text


def test_unknown_scenario_is_a_user_error() -> None:
    args = _parse("--tiny", "--only", "sync,nonsense")
    with pytest.raises(UserError, match="nonsense"):
        benchmarks_cli.run(args)


def test_only_accepts_aliases() -> None:
    assert suite.parse_only("select,sync") == ("sync", "sync-select", "async-select")
    assert suite.parse_only(None) == suite.SCENARIOS
    assert suite.parse_only("all") == suite.SCENARIOS


def test_source_checkout_wrapper_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--only" in done.stdout and "--json" in done.stdout and "--quick" in done.stdout


def test_instruction_counts(tiny: dict[str, Any]) -> None:
    scenario = _scenario(tiny, "instructions")
    if not instructions.available():
        assert scenario["kind"] == "skipped" and "valgrind" in scenario["reason"]
        assert "Skipped: valgrind" in tiny["markdown"]
        return
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert list(rows) == ["bare", "ours-metrics"]
    # A real count: tens of thousands of instructions per cycle, ours above bare.
    assert 10_000 < rows["bare"]["instructions"] < rows["ours-metrics"]["instructions"]
    assert rows["ours-metrics"]["ratio"] > 1.0
    assert "instructions/cycle" in tiny["markdown"]
    # Per e2e request: FastAPI, the ORM and asyncpg are millions of instructions. At this size
    # run-to-run noise can exceed our cost, so only the magnitude is checked.
    requests = {row["variant"]: row for row in scenario["request_rows"]}
    assert list(requests) == ["bare", "ours"]
    assert all(row["instructions"] > 500_000 for row in requests.values())
    assert 0.8 < requests["ours"]["ratio"] < 2.0
    assert "instructions/request" in tiny["markdown"]


def test_realapp_rows(tiny: dict[str, Any]) -> None:
    """The app under opentelemetry-instrument, ours off and on: every request served (the
    generator sent the token header: no 401), ours really off (no pool metric on the
    Prometheus endpoint) and really on (one recorded checkout per request served), the
    official SQLAlchemy and FastAPI spans present."""
    scenario = _scenario(tiny, "realapp")
    rows = {row["variant"]: row for row in scenario["rows"]}
    assert list(rows) == ["off", "on"]
    for row in rows.values():
        assert row["verified"] is True, row["variant"]
        assert row["errors"] == 0 and row["requests"] > 0
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request"):
            assert _is_number(row[key]) and row[key] > 0, key
        assert row["spans_per_request"]["GET /me"] == pytest.approx(1.0, abs=0.05)
        assert row["spans_per_request"]["SELECT"] == pytest.approx(1.0, abs=0.05)
    for key in ("rps_ratio", "p50_ratio", "p99_ratio", "cpu_ratio"):
        assert _is_number(rows["on"][key]), key
    runs = scenario["runs"]
    assert [r["mode"] for r in runs] == ["off", "on"]
    assert runs[0]["recorded_checkouts"] is None
    assert runs[1]["recorded_checkouts"] == runs[1]["served_total"] > 0
    assert "real app" in tiny["markdown"]
