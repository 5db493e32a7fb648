"""The code site: the first frame outside the libraries, across SQLAlchemy's greenlet bound."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import sqlalchemy
from sqlalchemy.util.concurrency import greenlet_spawn

from opentelemetry.instrumentation.sqlalchemy_pool.codesite import find_code_site

# Functions whose code claims to live inside SQLAlchemy: library frames for the walk.
_LIBRARY_SOURCE = """
def library_call(depth, then):
    if depth == 0:
        return then()
    return library_call(depth - 1, then)
"""
_library: dict = {}
# Test fixture: code objects whose file name is inside SQLAlchemy.
exec(
    compile(
        _LIBRARY_SOURCE,
        os.path.join(os.path.dirname(sqlalchemy.__file__), "_fake_library.py"),
        "exec",
    ),
    _library,
)
library_call = _library["library_call"]


def user_function():
    return library_call(8, find_code_site)  # the line the site must name


def test_first_frame_outside_the_libraries():
    site = user_function()
    assert site is not None
    assert site.function == "user_function"
    assert site.file == __file__
    assert site.line == user_function.__code__.co_firstlineno + 1
    # Repeated walks use the classification cache and give the same answer.
    assert user_function() == site


def test_walk_continues_in_the_awaiting_task():
    async def user_coroutine():
        # Inside greenlet_spawn, the greenlet's stack ends at SQLAlchemy's boundary; the
        # user's line is in the parent greenlet (this coroutine).
        return await greenlet_spawn(library_call, 5, find_code_site)

    site = asyncio.run(user_coroutine())
    assert site is not None and site.function == "user_coroutine"
    assert site.file == __file__


def test_finding_library_paths_imports_nothing():
    code = (
        "import sys\n"
        "from opentelemetry.instrumentation.sqlalchemy_pool.codesite import find_code_site\n"
        "find_code_site()\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx', 'anyio') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
