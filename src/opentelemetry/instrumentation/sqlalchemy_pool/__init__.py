"""OpenTelemetry instrumentation for SQLAlchemy connection pools.

Makes pool exhaustion ("QueuePool limit of size 5 overflow 10 reached, connection timed out")
diagnosable: semantic-convention pool metrics (``db.client.connection.*``), a span for every slow
or timed-out checkout that links to the holders of the pool, session lifetime spans with the code
site that opened them, leak and long-hold detection, and optional pg_stat_activity figures.

No code change (the ``opentelemetry_instrumentor`` entry point)::

    opentelemetry-instrument uvicorn app:app

Programmatic::

    from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor

    SQLAlchemyPoolInstrumentor().instrument()                  # every pool in the process
    SQLAlchemyPoolInstrumentor().instrument(engine=engine)     # or only these engines
    SQLAlchemyPoolInstrumentor().instrument(
        engines=[engine_a, async_engine_b],
        wait_span_threshold_ms=50,
        session_spans="all",
        leak_threshold_s=10,
        pg_activity=True,
    )

    from opentelemetry.instrumentation.sqlalchemy_pool import holders
    holders(engine)   # who holds the connections right now, oldest first

Every option is also an ``OTEL_PYTHON_SQLALCHEMY_POOL_*`` environment variable (see
``config.py`` and the README). ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=sqlalchemy_pool``
turns the auto-instrumentation off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import get_meter

from opentelemetry import trace

from .config import OPTIONS, load_config
from .eventloop import EventLoopMonitor, monitor_for
from .holders import HolderForensics, holders
from .hooks import Hooks, creator_closure
from .leaks import LeakDetector
from .metrics import Telemetry, telemetry_for
from .package import _instruments
from .pg_activity import PgActivitySamplers
from .pools import PoolRegistry
from .process import observe_process_cpu
from .sessions import SessionTracking
from .version import __version__
from .wait import WaitTimer

__all__ = ["SQLAlchemyPoolInstrumentor", "__version__", "holders"]

_logger = logging.getLogger(__name__)
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"


@dataclass(frozen=True)
class Installed:
    """The parts of one instrument() run (what uninstrument() stops)."""

    registry: PoolRegistry
    telemetry: Telemetry
    leaks: LeakDetector
    sessions: SessionTracking
    hooks: Hooks
    pg_activity: PgActivitySamplers | None
    loop_monitor: EventLoopMonitor | None


class SQLAlchemyPoolInstrumentor(BaseInstrumentor):
    """Instrument SQLAlchemy connection pools (see the module docstring)."""

    _state_lock = threading.Lock()
    _state: Installed | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        config = load_config({k: v for k, v in kwargs.items() if k in _OPTION_NAMES})
        meter_provider = _provider(kwargs, "meter_provider", "get_meter")
        tracer_provider = _provider(kwargs, "tracer_provider", "get_tracer")
        meter = get_meter(__name__, __version__, meter_provider, schema_url=_SCHEMA_URL)
        tracer = trace.get_tracer(__name__, __version__, tracer_provider, schema_url=_SCHEMA_URL)
        engines = _engines_from(kwargs)

        # Built in dependency order; data flows hooks -> recorders -> instruments and spans.
        pg = PgActivitySamplers(config) if config.pg_activity else None
        loop_monitor = None
        if config.event_loop_monitor:
            observe_process_cpu(meter)
            loop_monitor = monitor_for(meter, config.event_loop_block_threshold_ms / 1000.0)
        # The instruments read the registry's pools at collection time, and start the counter
        # series of every new pool at 0 (a new-pool listener of the registry).
        telemetry = telemetry_for(
            meter, lambda: registry.recorders(), pg.items if pg is not None else list
        )
        new_pool_listeners = [telemetry] + [x for x in (pg, loop_monitor) if x is not None]
        registry = PoolRegistry(config, creator_closure, new_pool_listeners)
        leaks = LeakDetector(config, telemetry, registry.recorders)
        # Session tracking always runs (it feeds held-idle time and leak flags); the
        # session_spans option only decides which sessions become spans.
        sessions = SessionTracking(config, leaks, tracer)
        waits = WaitTimer(config, telemetry, tracer, HolderForensics(config))
        hooks = Hooks(config, registry, telemetry, waits, sessions, leaks, loop_monitor)

        with self._state_lock:
            hooks.install(engines)
            leaks.start()
            if loop_monitor is not None:
                loop_monitor.attach_running_loop()  # instrument() called inside the loop
        self._state = Installed(registry, telemetry, leaks, sessions, hooks, pg, loop_monitor)

    def _uninstrument(self, **kwargs: Any) -> None:
        state = self._state
        if state is None:
            return
        with self._state_lock:
            if state.loop_monitor is not None:
                state.loop_monitor.detach()
            state.leaks.stop()
            state.hooks.uninstall()
            state.telemetry.drain()  # what garbage collections queued
            if state.pg_activity is not None:
                state.pg_activity.stop()
        self._state = None


_OPTION_NAMES = frozenset(option.name for option in OPTIONS)


def _engines_from(kwargs: dict[str, Any]) -> list[Any] | None:
    """The Engine/AsyncEngine objects given; anything else is ignored with one warning
    (naming the argument, never echoing the value: it may be a URL with a password)."""
    candidates: list[tuple[str, Any]] = []
    if kwargs.get("engine") is not None:
        candidates.append(("engine", kwargs["engine"]))
    many = kwargs.get("engines")
    if many is not None:
        if _is_engine(many) or not isinstance(many, (list, tuple, set, frozenset)):
            candidates.append(("engines", many))
        else:
            candidates.extend(("engines", engine) for engine in many)
    engines = []
    for argument, engine in candidates:
        if _is_engine(engine):
            engines.append(engine)
        else:
            _logger.warning(
                "opentelemetry-instrumentation-sqlalchemy-pool: invalid %s= (a %s, not a "
                "SQLAlchemy Engine or AsyncEngine); ignored",
                argument,
                type(engine).__name__,
            )
    return engines or None


def _is_engine(obj: Any) -> bool:
    return hasattr(getattr(obj, "sync_engine", obj), "pool")


def _provider(kwargs: dict[str, Any], argument: str, method: str) -> Any:
    """``kwargs[argument]`` if it is a provider, else None (the global one) and a warning."""
    provider = kwargs.get(argument)
    if provider is not None and not callable(getattr(provider, method, None)):
        _logger.warning(
            "opentelemetry-instrumentation-sqlalchemy-pool: invalid %s= (a %s); using the "
            "global provider",
            argument,
            type(provider).__name__,
        )
        return None
    return provider
