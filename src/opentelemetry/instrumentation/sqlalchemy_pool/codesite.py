"""Finding the user's line of code that took a connection or opened a session.

Rule: the first frame outside SQLAlchemy, this package, FastAPI/Starlette/AnyIO, asyncio,
greenlet and the standard library. Async engines run the sync ORM inside a greenlet whose
stack stops at the greenlet boundary, so the walk continues in the parent greenlet (the
asyncio task that awaited), where the user's coroutine is.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from types import CodeType, FrameType
from typing import NamedTuple

try:  # greenlet is optional (SQLAlchemy 2.1 no longer requires it)
    from greenlet import getcurrent as _current_greenlet
except ImportError:  # pragma: no cover - depends on the environment
    _current_greenlet = None


class CodeSite(NamedTuple):
    function: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.function} ({self.file}:{self.line})"


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    stdlib = {paths.get("stdlib"), paths.get("platstdlib")}
    prefixes = {os.path.join(p, "") for p in stdlib if p}
    package_names = (
        "sqlalchemy", "fastapi", "starlette", "anyio", "greenlet", "asyncpg",
        "psycopg", "psycopg2", "uvicorn", "opentelemetry", "httpx", "httpcore",
    )  # fmt: skip
    for name in package_names:
        module = sys.modules.get(name)
        if module is not None:
            paths = getattr(module, "__path__", None)
        else:
            # Located, not imported: importing FastAPI, uvicorn, httpx... into an app that does
            # not use them would stall its first checkout.
            try:
                spec = importlib.util.find_spec(name)
            except Exception:
                continue
            paths = spec.submodule_search_locations if spec is not None else None
        for path in paths or ():
            prefixes.add(os.path.join(os.path.abspath(path), ""))
    return tuple(sorted(p for p in prefixes if p))


_prefixes: tuple[str, ...] | None = None
# id(code) -> (code, skip). Keyed by id because hashing a code object hashes its contents
# (~0.25 µs, per frame, per checkout); the code object is kept to make the id unambiguous.
_skip_cache: dict[int, tuple[CodeType, bool]] = {}


def _is_library(code: CodeType) -> bool:
    """Classify a code object, and cache it (find_code_site reads the cache inline)."""
    global _prefixes
    if _prefixes is None:
        _prefixes = _library_prefixes()
    filename = code.co_filename
    skip = (
        filename.startswith(_prefixes)
        or filename.startswith("<")  # SQLAlchemy-generated wrappers, frozen modules
        or os.path.abspath(filename).startswith(_prefixes)
    )
    if len(_skip_cache) >= 50_000:  # bounded: code objects are few, but be safe
        _skip_cache.clear()
    _skip_cache[id(code)] = (code, skip)
    return skip


def find_code_site(frame: FrameType | None = None, max_depth: int = 200) -> CodeSite | None:
    """The first user frame above ``frame`` (default: the caller), crossing greenlet bounds."""
    if frame is None:
        frame = sys._getframe(1)
    crossed: set[int] = set()
    depth = 0
    skip_cache = _skip_cache
    while depth < max_depth:
        while frame is not None and depth < max_depth:
            code = frame.f_code
            cached = skip_cache.get(id(code))  # inline: a call per frame is most of the walk
            skip = cached[1] if cached is not None and cached[0] is code else _is_library(code)
            if not skip:
                return CodeSite(code.co_name, code.co_filename, frame.f_lineno or 0)
            frame = frame.f_back
            depth += 1
        if _current_greenlet is None:
            return None
        # The stack ended: continue in the parent greenlet (the awaiting asyncio task).
        glet = _current_greenlet()
        for _ in range(len(crossed) + 1):
            glet = glet.parent if glet is not None else None
        if glet is None or id(glet) in crossed:
            return None
        crossed.add(id(glet))
        frame = glet.gr_frame
    return None
