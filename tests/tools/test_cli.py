"""The ``sqlalchemy-pool`` entry point: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import types

import pytest

from sqlalchemy_pool_tools import cli
from sqlalchemy_pool_tools.errors import UserError


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pool_tools", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sqlalchemy-pool"), stderr
    assert "error:" in lines[0]


def test_help_lists_own_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: sqlalchemy-pool" in out
    assert "demo" in out
    assert "loadtest" in out


def test_every_registered_command_has_help() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"demo", "loadtest"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0, name


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert_one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest", "http://127.0.0.1:9/", "--no-such-flag"],
        ["loadtest", "http://127.0.0.1:9/", "--duration", "soon"],
        ["loadtest"],
        ["demo", "--scenario", "nonsense"],
        ["demo", "--duration", "x"],
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert_one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest", "http://127.0.0.1:{port}/"],
        ["loadtest", "http://203.0.113.7/"],  # TEST-NET-3: refused before any packet is sent
        ["loadtest", "ftp://127.0.0.1/"],
        ["loadtest", "http://127.0.0.1:{port}/", "--duration", "0"],
        ["loadtest", "http://127.0.0.1:{port}/", "--connections", "0"],
        ["loadtest", "http://127.0.0.1:{port}/", "--compare", "/nonexistent/before.json"],
        ["demo", "--duration", "100000"],
    ],
)
def test_bad_input_is_a_user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert cli.main([a.format(port=port) for a in argv]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert err.startswith("sqlalchemy-pool: error: ")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--tool", "wrk"], "fail the calibration"),
        (["--repeat", "0"], "--repeat must be"),
        (["--versus", "http://203.0.113.7/x"], "not a loopback"),  # before any load runs
        (["--rate", "-1"], "--rate must be positive"),
        (["--compare", "a.json", "--versus", "http://127.0.0.1:1/"], "pick one"),
    ],
)
def test_bad_loadtest_options_are_refused_before_any_load(
    extra: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["loadtest", f"http://127.0.0.1:{closed_port()}/", *extra]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert reason in err


def test_a_missing_generator_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no hey on the PATH
    assert cli.main(["loadtest", f"http://127.0.0.1:{closed_port()}/", "--tool", "hey"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "hey is not installed" in err


def test_unreachable_url_in_a_real_process() -> None:
    proc = run_cli("loadtest", f"http://127.0.0.1:{closed_port()}/orders", "--duration", "1")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert "cannot reach" in proc.stderr
    assert proc.stdout == ""


def test_help_in_a_real_process() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "loadtest" in proc.stdout


def _fake_command(name: str, behaviour: BaseException) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}")

    def run(args: argparse.Namespace) -> int:
        raise behaviour

    def register(subparsers: argparse._SubParsersAction) -> None:
        subparsers.add_parser(name).set_defaults(func=run)

    module.register = register  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    ("behaviour", "code", "message"),
    [
        (UserError("the database said no"), 2, "sqlalchemy-pool: error: the database said no"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_errors_and_interrupts_from_a_command(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    behaviour: BaseException,
    code: int,
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "fake_cmd", _fake_command("boom", behaviour))
    monkeypatch.setattr(cli, "COMMAND_MODULES", {"boom": "fake_cmd"})
    assert cli.main(["boom"]) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_tool_that_cannot_be_imported_is_listed_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken_tool.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli,
        "COMMAND_MODULES",
        {
            "loadtest": "sqlalchemy_pool_tools.loadtest",
            "absent": "sqlalchemy_pool_tools.no_such_module",
            "broken": "broken_tool",
        },
    )
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "loadtest" in out
    # A module that is not there is as loud as a broken one: nothing disappears silently.
    assert "absent" in out and "no_such_module" in out
    assert "broken" in out and "unavailable" in out
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "no_such_dependency_xyz" in err
