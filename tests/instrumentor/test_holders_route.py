"""The optional holders ASGI route and the `sqlalchemy-pool holders` CLI, on a real uvicorn."""

from __future__ import annotations

import argparse
import threading

import pytest
import sqlalchemy as sa
from tests.uvicorn_thread import UvicornThread

from opentelemetry.instrumentation.sqlalchemy_pool.holders import make_asgi_app
from sqlalchemy_pool_tools import holders_cli
from sqlalchemy_pool_tools.errors import UserError


def hold_one(engine, ready, release):
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        ready.set()
        release.wait(10)


def test_holders_route_and_cli(otel, make_sync_engine, capsys):
    otel.instrument()
    engine = make_sync_engine(pool_logging_name="route")
    ready, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=hold_one, args=(engine, ready, release))
    thread.start()
    try:
        assert ready.wait(5)
        from fastapi import FastAPI

        app = FastAPI()
        app.add_route("/_debug/pool-holders", make_asgi_app())
        with UvicornThread(app) as server:
            server.url += "/_debug/pool-holders"
            pools = holders_cli.fetch(server.url, timeout=5)
            assert [row["code_function"] for row in pools["route"]] == ["hold_one"]
            parser = argparse.ArgumentParser()
            holders_cli.register(parser.add_subparsers())
            args = parser.parse_args(["holders", server.url])
            assert args.func(args) == 0
            out = capsys.readouterr().out
            assert "pool route: 1 connection(s) held" in out and "hold_one" in out
            assert "password" not in out.lower()
    finally:
        release.set()
        thread.join()


def test_holders_cli_unreachable():
    with pytest.raises(UserError, match="cannot read holders"):
        holders_cli.fetch("http://127.0.0.1:9/x", timeout=1)
    with pytest.raises(UserError, match="not an http"):
        holders_cli.fetch("ftp://x", timeout=1)
