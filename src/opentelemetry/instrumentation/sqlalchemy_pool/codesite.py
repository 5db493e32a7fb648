"""Finding the user's line of code that holds a connection: where it is now, or where it took it.

Rule: the first frame outside SQLAlchemy, this package, FastAPI/Starlette/AnyIO, asyncio,
greenlet and the standard library.

Walking a stack is expensive (CPython builds a frame object for every level it visits: ~14
levels for an ORM query, twice that for an async session whose walk crosses the greenlet
boundary into the awaiting task), so the hot path does not do it: a checkout remembers its
*holder* (the asyncio task, or the thread) and :func:`holder_site` resolves where that holder
is only when someone needs to know (a slow wait's holder links, a holders snapshot, a long
hold). :func:`find_code_site` is the checkout-time walk, used only where nothing can be
resolved later (see ``hooks.py``). :func:`function_site` names a function (a request's
endpoint, a task's coroutine) without walking anything.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any, NamedTuple

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


def _first_user_site(frames: Iterable[FrameType]) -> CodeSite | None:
    """The first user frame of ``frames`` (innermost first)."""
    for frame in frames:
        code = frame.f_code
        cached = _skip_cache.get(id(code))
        skip = cached[1] if cached is not None and cached[0] is code else _is_library(code)
        if not skip:
            return CodeSite(code.co_name, code.co_filename, frame.f_lineno or 0)
    return None


def _thread_frames(frame: FrameType | None, max_depth: int) -> Iterable[FrameType]:
    while frame is not None and max_depth > 0:
        yield frame
        frame = frame.f_back
        max_depth -= 1


def _awaited_frames(coro: Any, max_depth: int) -> list[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, innermost first
    (``Task.get_stack()`` stops at the outermost coroutine)."""
    frames: list[FrameType] = []
    obj = coro
    while obj is not None and len(frames) < max_depth:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is None:
            frame = getattr(obj, "ag_frame", None)
        if frame is not None:
            frames.append(frame)
        awaited = getattr(obj, "cr_await", None)
        if awaited is None:
            awaited = getattr(obj, "gi_yieldfrom", None)
        if awaited is None:
            awaited = getattr(obj, "ag_await", None)
        obj = awaited
    frames.reverse()
    return frames


def holder_site(holder: Any, max_depth: int = 200) -> CodeSite | None:
    """Where a live holder is now: an asyncio ``Task`` (its awaited coroutine chain) or a
    thread (by ``threading.get_ident()``: its current stack). None when it is gone, done, or
    running only library code. Never raises."""
    try:
        if isinstance(holder, int):
            frame = sys._current_frames().get(holder)
            return _first_user_site(_thread_frames(frame, max_depth)) if frame else None
        if holder is None or holder.done():
            return None
        return _first_user_site(_awaited_frames(holder.get_coro(), max_depth))
    except Exception:  # a holder running in another thread can change under our feet
        return None


def function_site(function: Any) -> CodeSite | None:
    """A user function (or coroutine) by its definition line; None for library code."""
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None) or getattr(function, "cr_code", None)
    if not isinstance(code, CodeType):
        return None
    cached = _skip_cache.get(id(code))
    skip = cached[1] if cached is not None and cached[0] is code else _is_library(code)
    return None if skip else CodeSite(code.co_name, code.co_filename, code.co_firstlineno)
