"""``sqlalchemy-pool pg-activity`` against a real PostgreSQL."""

from __future__ import annotations

import argparse
import json
import secrets
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from sqlalchemy_pool_tools import pg_activity_cli
from sqlalchemy_pool_tools.errors import UserError
from sqlalchemy_pool_tools.pg import with_driver

pytestmark = pytest.mark.timeout(30)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sqlalchemy-pool")
    subparsers = parser.add_subparsers(dest="command")
    pg_activity_cli.register(subparsers)
    return parser.parse_args(["pg-activity", *argv])


def _run(*argv: str) -> int:
    args = _parse(*argv)
    assert args.func is pg_activity_cli.run
    return args.func(args)


@pytest.fixture(scope="module")
def role_url(sync_url: URL) -> Iterator[tuple[URL, str]]:
    """A login role with a password (plus pg_read_all_stats) and its URL."""
    role, password = f"cli_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    admin = sa.create_engine(sync_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        c.exec_driver_sql(f"GRANT pg_read_all_stats TO {role}")
    yield sync_url.set(username=role, password=password), password
    with admin.connect() as c:
        c.exec_driver_sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        for _ in range(100):
            if not c.exec_driver_sql(
                f"SELECT 1 FROM pg_stat_activity WHERE usename = '{role}'"
            ).all():
                break
            time.sleep(0.05)
        c.exec_driver_sql(f"DROP ROLE {role}")
    admin.dispose()


@pytest.fixture
def idle_in_transaction(role_url: tuple[URL, str]) -> Iterator[psycopg.Connection]:
    url = with_driver(role_url[0], "psycopg")
    _, cparams = url.get_dialect()().create_connect_args(url)
    conn = psycopg.connect(**cparams, application_name="cli-test-app")
    conn.execute("SELECT 'held open' AS marker")
    time.sleep(0.2)
    yield conn
    conn.close()


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def test_human_report(role_url, idle_in_transaction, capsys: pytest.CaptureFixture) -> None:
    url, password = role_url
    assert _run(_url_text(url), "--top", "5") == 0
    out, err = capsys.readouterr()
    assert password not in out + err
    assert "***" in out  # the URL is shown redacted
    assert "max_connections" in out and "reserved" in out
    for state in ("active", "idle", "idle in transaction", "idle in transaction (aborted)"):
        assert state in out
    assert "oldest transaction age" in out and "oldest query age" in out
    assert "idle in transaction the longest (top 5)" in out
    line = next(x for x in out.splitlines() if str(idle_in_transaction.info.backend_pid) in x)
    assert "cli-test-app" in line and "SELECT 'held open' AS marker" in line
    assert f"user {url.username!r}" in out  # the default application scope


def test_json_report(role_url, idle_in_transaction, capsys: pytest.CaptureFixture) -> None:
    url, password = role_url
    assert _run(_url_text(url), "--json") == 0
    out, err = capsys.readouterr()
    assert password not in out + err
    doc = json.loads(out)
    assert "***" in doc["url"]
    assert doc["max_connections"] > 0 and doc["reserved_connections"] >= 0
    app = doc["backends_by_state"]["application"]
    assert app["idle in transaction"] == 1
    assert doc["oldest_transaction_age_s"]["application"] > 0
    [session] = [
        s for s in doc["idle_in_transaction"] if s["pid"] == idle_in_transaction.info.backend_pid
    ]
    assert session["application_name"] == "cli-test-app"
    assert session["query"] == "SELECT 'held open' AS marker"
    assert session["transaction_age_s"] > 0


def test_application_name_scope(
    role_url, idle_in_transaction, capsys: pytest.CaptureFixture
) -> None:
    url, _ = role_url
    text = _url_text(url)
    assert _run(text, "--json", "--application-name", "cli-test-app") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["application_names"] == ["cli-test-app"]
    assert sum(doc["backends_by_state"]["application"].values()) == 1

    assert _run(text, "--json", "--application-name", "nobody", "--application-name", "x") == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(doc["backends_by_state"]["application"].values()) == 0
    assert doc["backends_by_state"]["server"]["idle in transaction"] >= 1

    assert _run(text, "--application-name", "cli-test-app", "--top", "0") == 0
    out = capsys.readouterr().out
    assert "application_name in 'cli-test-app'" in out
    assert "idle in transaction the longest" not in out


def test_database_url_from_environment(
    role_url, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    url, password = role_url
    monkeypatch.setenv("DATABASE_URL", _url_text(url))
    assert _run() == 0
    out = capsys.readouterr().out
    assert "max_connections" in out and password not in out


def test_unreachable_server_is_one_clear_line(capsys: pytest.CaptureFixture) -> None:
    password = "n0t-the-real-pw"
    with pytest.raises(UserError) as info:
        _run(f"postgresql+psycopg://app:{password}@127.0.0.1:1/app", "--connect-timeout", "2")
    message = str(info.value)
    assert "\n" not in message
    assert "cannot sample pg_stat_activity" in message and "127.0.0.1" in message
    assert password not in message
    out, err = capsys.readouterr()
    assert password not in out + err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw-secret-1@host:notaport/db", "not a valid database URL"),
        ("::::", "not a valid database URL"),
        ("mysql+pymysql://u:pw-secret-1@host/db", "needs a PostgreSQL URL"),
    ],
)
def test_bad_url_is_a_user_error(url: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        _run(url)
    assert expected in str(info.value)
    assert "pw-secret-1" not in str(info.value)


def test_missing_url_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(UserError, match="no DATABASE_URL"):
        _run()


def test_negative_top_is_rejected(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parse("postgresql://localhost/db", "--top", "-1")
    assert "must be >= 0" in capsys.readouterr().err


def test_through_the_sqlalchemy_pool_entry_point(role_url, capsys: pytest.CaptureFixture) -> None:
    from sqlalchemy_pool_tools.cli import main

    url, password = role_url
    assert main(["pg-activity", _url_text(url), "--top", "3"]) == 0
    out, err = capsys.readouterr()
    assert "max_connections" in out and password not in out + err
    assert main(["pg-activity", "postgresql+psycopg://u:pw-x9@127.0.0.1:1/db"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "pw-x9" not in out + err
