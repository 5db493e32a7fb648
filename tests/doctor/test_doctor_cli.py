"""The doctor sub-command (register + run) and the report rendering."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from sqlalchemy_pool_tools.doctor import cli as doctor_cli
from sqlalchemy_pool_tools.doctor.report import exit_code, render_json, render_text, to_dict
from sqlalchemy_pool_tools.doctor.verdict import diagnose
from sqlalchemy_pool_tools.errors import UserError

from .doctor_fakes import HEALTHY_FIGURES, POOL, SATURATED, FakePoolApp, fig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sqlalchemy-pool")
    doctor_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["doctor", *argv])


def test_register_wires_run() -> None:
    args = parse("--prometheus", "http://p:9090")
    assert args.func is doctor_cli.run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give exactly one source"),
        (("--prometheus", "http://p:9090", "--metrics-url", "http://a/metrics"), "exactly one"),
        (("--prometheus", "http://p:9090", "--window", "5 minutes"), "bad window"),
        (("--prometheus", "http://p:9090", "--window", "0s"), "at least 1s"),
        (("--prometheus", "localhost:9090"), "bad Prometheus URL"),
        (("--prometheus", "http://p:notaport"), "invalid port"),
        (("--prometheus", "http://p:9090", "--at", "yesterday"), "--at"),
        (("--prometheus", "http://p:9090", "--duration", "5"), "--duration applies to"),
        (("--metrics-url", "http://a/metrics", "--window", "5m"), "--window applies to"),
        (("--metrics-url", "ftp://a/metrics"), "bad metrics endpoint URL"),
        (("--metrics-url", "http://a/metrics", "--duration", "-1"), "greater than 0"),
        (("--metrics-url", "http://a/metrics", "--duration", "abc"), "number of seconds"),
        (("--metrics-url", "http://a/metrics", "--duration", "99999"), "at most 3600"),
        (("--metrics-url", "http://a/metrics", "--interval", "30"), "at most 20"),
        (("--metrics-url", "http://a/metrics", "--request-timeout", "0"), "greater than 0"),
    ],
)
def test_bad_input_is_one_user_error_line(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        doctor_cli.run(parse(*argv))
    assert "\n" not in str(info.value)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--prometheus", "http://127.0.0.1:{port}"],
        ["--metrics-url", "http://127.0.0.1:{port}/metrics", "--duration", "1"],
        ["--prometheus", "http://127.0.0.1:{port}", "--window", "5x"],
        ["--bogus-flag"],
    ],
)
def test_python_m_exits_2_without_traceback(argv: list[str]) -> None:
    port = _free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlalchemy_pool_tools.doctor",
            *(a.format(port=port) for a in argv),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    if argv != ["--bogus-flag"]:  # argparse prints its usage line before the error
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("sqlalchemy-pool doctor: error: ")


def test_main_reports_unknown_pool_as_exit_2(
    fake_app: FakePoolApp, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_app.pool_state(POOL, used=0, idle=1, limit=5, idle_max=5)
    code = doctor_cli.main(
        ["--metrics-url", fake_app.url, "--duration", "0.2", "--interval", "0.1", "--pool", "x"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"sqlalchemy-pool doctor: error: pool 'x' not found at {fake_app.url}; pools seen: main"
    )


def _healthy_app(app: FakePoolApp) -> None:
    app.pool_state(POOL, used=1, idle=4, limit=10, idle_max=5)
    app.on_scrape = lambda n: (
        n == 1 and app.checkouts(POOL, 40, wait=0.0002, use=0.004, held_idle=0.0001)
    )


def test_run_healthy_exits_0(fake_app: FakePoolApp, capsys: pytest.CaptureFixture[str]) -> None:
    _healthy_app(fake_app)
    code = doctor_cli.run(
        parse("--metrics-url", fake_app.url, "--duration", "0.4", "--interval", "0.2")
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Pool 'main', 1 instance(s): [OK] HEALTHY" in out
    assert "\033[" not in out  # not a TTY: no colour codes


def test_run_problem_exits_1_with_json(
    fake_app: FakePoolApp, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_app.pool_state(POOL, used=10, idle=0, limit=10, idle_max=5, pending=3)
    fake_app.on_scrape = lambda n: (
        n == 1 and fake_app.timeouts.add(5, {"db.client.connection.pool.name": POOL})
    )
    code = doctor_cli.run(
        parse("--metrics-url", fake_app.url, "--duration", "0.4", "--interval", "0.2", "--json")
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_code"] == 1 and doc["healthy"] is False
    (pool,) = doc["pools"]
    assert pool["pool"] == POOL and pool["figures"]["timeouts"] == 5
    assert pool["verdict"] == "insufficient_data"  # contended, but no hold-time figures
    assert pool["severity"] == "critical"


# --- report ----------------------------------------------------------------------------------
def test_render_text_is_aligned_and_plain() -> None:
    diagnoses = [
        diagnose(fig(SATURATED, timeouts=12, config_timeout=30), request_timeout_s=30),
        diagnose(replace(HEALTHY_FIGURES, pool="reports")),
    ]
    text = render_text(diagnoses, source="test source", colour=False, width=100)
    assert "\033[" not in text
    assert text.startswith("sqlalchemy-pool doctor - test source\n")
    assert "Pool 'main', 2 instance(s): [CRITICAL] UNDERSIZED POOL" in text
    assert "Pool 'reports', 2 instance(s): [OK] HEALTHY" in text
    assert "[WARNING] pool_timeout:" in text
    assert "1. metrics: " in text
    assert text.rstrip().endswith("2 pool(s), 1 not healthy (exit 1).")
    assert max(len(line) for line in text.splitlines()) <= 100
    # evidence values line up in one column per finding
    evidence = text.split("Evidence:\n", 1)[1].split("Culprits:")[0].splitlines()[:-1]
    starts = {re.match(r"^\s+\S.*?\s{2,}(\S)", line).start(1) for line in evidence}
    assert len(evidence) > 5 and len(starts) == 1

    coloured = render_text(diagnoses, colour=True, width=100)
    assert "\033[1;31m[CRITICAL]\033[0m" in coloured


def test_json_and_exit_code() -> None:
    healthy = diagnose(HEALTHY_FIGURES)
    sick = diagnose(fig(SATURATED, timeouts=3))
    assert exit_code([healthy]) == 0
    assert exit_code([healthy, sick]) == 1
    assert exit_code([]) == 1
    doc = json.loads(render_json([healthy, sick], "src"))
    assert doc["source"] == "src" and doc["exit_code"] == 1
    assert [p["verdict"] for p in doc["pools"]] == ["healthy", "undersized_pool"]
    finding = doc["pools"][1]["findings"][0]
    assert set(finding) == {"kind", "severity", "title", "evidence", "culprits", "next_steps"}
    assert finding["evidence"][0] == {
        "label": "checked out mean / max / limit",
        "value": "14.6 / 15 / 15",
    }
    assert to_dict(healthy)["figures"]["pool"] == "main"


def test_json_is_strict_even_with_infinite_or_unknown_values() -> None:
    diagnosis = diagnose(fig(config_timeout=math.inf, wait_p99=math.nan))
    doc = json.loads(render_json([diagnosis]))
    figures = doc["pools"][0]["figures"]
    assert figures["config_timeout"] == "inf" and figures["wait_p99"] is None
