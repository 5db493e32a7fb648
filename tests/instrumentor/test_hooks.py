"""hooks.py: every hook we install is in its table, and uninstrument() undoes all of them.

The comparison does not trust the table: it snapshots every attribute of every SQLAlchemy,
Starlette and OTel class or module we could touch, SQLAlchemy's whole event registry and
``gc.callbacks`` before instrument(), and compares after uninstrument().
"""

from __future__ import annotations

import gc
import inspect
import sys
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.event import registry as event_registry
from sqlalchemy.orm import Session
from starlette.applications import Starlette

from opentelemetry.instrumentation.sqlalchemy_pool.hooks import GcCallback, Hooks, Listen, Patch

SELECT_1 = sa.text("SELECT 1")


def _foreign_modules() -> list[ModuleType]:
    prefixes = ("sqlalchemy.", "starlette.", "opentelemetry.context", "opentelemetry.trace")
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name.startswith(prefixes) or name == "sqlalchemy")
    ]


def foreign_state() -> dict[str, Any]:
    """Everything of code we do not own that a hook could change, by identity."""
    state: dict[str, Any] = {}
    for module in _foreign_modules():
        for name, value in list(vars(module).items()):
            state[f"{module.__name__}.{name}"] = id(value)
            if inspect.isclass(value) and value.__module__ == module.__name__:
                for attr, member in list(vars(value).items()):
                    state[f"{module.__name__}.{name}.{attr}"] = id(member)
    # Every listener of every target: (target id, event name, listener key).
    state["event registry"] = frozenset(event_registry._key_to_collection)
    state["gc.callbacks"] = tuple(id(cb) for cb in gc.callbacks)
    return state


# SQLAlchemy sets this class flag when any class-level do_connect listener is added and never
# clears it (event.remove does not): resetting it could silence the application's own
# class-level listeners, so it stays (each new connection then runs an empty listener loop).
SQLALCHEMY_STICKY = {"sqlalchemy.engine.interfaces.Dialect._has_events"}


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed of what existed before (modules imported since are new, not changed)."""
    return sorted(
        key for key in before if before[key] != after.get(key) and key not in SQLALCHEMY_STICKY
    )


def test_uninstrument_restores_every_patched_attribute_and_listener(otel, make_sync_engine):
    engine = make_sync_engine(pool_size=2, pool_logging_name="hooks")
    with engine.connect() as conn:  # the engine's own first-connect setup happens before
        conn.execute(SELECT_1)
    Session(engine).close()
    import sqlalchemy.ext.asyncio  # noqa: F401  (imported by session tracking; sets a global)

    before = foreign_state()

    otel.instrument(
        session_spans="all",
        statement_timing="all",  # brings the _ConnectionFairy._reset wrapper at once
        set_application_name=True,
        leak_threshold_s=1,
    )
    hooks: Hooks = otel.instrumentor._state.hooks
    installed = hooks.installed()
    kinds = {type(entry) for entry in installed}
    assert kinds == {Patch, Listen, GcCallback}
    patched = {
        (entry.target.__name__, entry.attribute) for entry in installed if isinstance(entry, Patch)
    }
    assert patched == {
        ("_ConnectionRecord", "checkout"),
        ("_ConnectionRecord", "checkin"),
        ("_ConnectionRecord", "_ConnectionRecord__connect"),
        ("Connection", "_execute_context"),
        ("_ConnectionFairy", "_reset"),
        ("Starlette", "__call__"),
        ("BackgroundTask", "__call__"),
    }
    assert {(e.target.__name__, e.name) for e in installed if isinstance(e, Listen)} == {
        ("Pool", "detach"),
        ("Pool", "close"),
        ("Pool", "invalidate"),
        ("Session", "after_begin"),
        ("Session", "after_commit"),
        ("Session", "after_rollback"),
        ("Engine", "do_connect"),
    }
    during = foreign_state()
    changed = differences(before, during)
    # Every entry of the table is visible to the comparison...
    for cls, attribute in patched:
        assert any(key.endswith(f".{cls}.{attribute}") for key in changed), (cls, attribute)
    assert "event registry" in changed and "gc.callbacks" in changed

    held = engine.connect()  # held across uninstrument()
    with Session(engine) as session:
        session.execute(SELECT_1)
        session.commit()
    otel.instrumentor.uninstrument()

    # ...and none is left after uninstrument().
    assert differences(before, foreign_state()) == []
    held.close()
    assert hooks.installed() == []


def test_the_comparison_sees_each_kind_of_leftover(otel):
    """A hook that uninstrument() forgot is reported (so the test above can fail)."""
    otel.instrument()
    hooks: Hooks = otel.instrumentor._state.hooks
    otel.instrumentor.uninstrument()
    before = foreign_state()
    for entry in (
        Patch(Starlette, "__call__", lambda original: lambda *a: original(*a)),
        Listen(Session, "after_begin", lambda *a: None),
        GcCallback(),
    ):
        undo = entry.apply()
        try:
            assert differences(before, foreign_state()), entry
        finally:
            undo()
        assert differences(before, foreign_state()) == [], entry
    assert hooks.installed() == []
