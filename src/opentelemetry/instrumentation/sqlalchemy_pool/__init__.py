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
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import get_meter

from opentelemetry import trace

from .config import OPTIONS, Config, load_config
from .holders import HolderForensics, holders
from .leaks import LeakDetector
from .metrics import telemetry_for, watch_gc
from .package import _instruments
from .pools import PoolRecorder, PoolRegistry
from .sessions import SessionTracking
from .version import __version__
from .wait import WaitTimer

__all__ = ["SQLAlchemyPoolInstrumentor", "__version__", "holders"]

_logger = logging.getLogger(__name__)
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"


class SQLAlchemyPoolInstrumentor(BaseInstrumentor):
    """Instrument SQLAlchemy connection pools (see the module docstring)."""

    _state_lock = threading.Lock()

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        config = load_config({k: v for k, v in kwargs.items() if k in _OPTION_NAMES})
        meter_provider = _provider(kwargs, "meter_provider", "get_meter")
        tracer_provider = _provider(kwargs, "tracer_provider", "get_tracer")
        meter = get_meter(__name__, __version__, meter_provider, schema_url=_SCHEMA_URL)
        tracer = trace.get_tracer(__name__, __version__, tracer_provider, schema_url=_SCHEMA_URL)
        engines = _engines_from(kwargs)
        registry_box: list[PoolRegistry] = []

        def recorders() -> list[PoolRecorder]:
            return registry_box[0].recorders() if registry_box else []

        telemetry = telemetry_for(meter)
        telemetry.bind(recorders)
        leaks = LeakDetector(config, telemetry, recorders)
        forensics = HolderForensics(config)
        waits = WaitTimer(config, telemetry, tracer, forensics)
        registry = PoolRegistry(config, telemetry, leaks, waits.wrap)
        registry_box.append(registry)

        # Session tracking always runs (it feeds held-idle time and leak flags); the
        # session_spans option only decides which sessions become spans.
        sessions = SessionTracking(config, telemetry, leaks, tracer, registry)
        registry.sessions = sessions
        telemetry.release_hooks.append(sessions.on_release)
        telemetry.release_hooks.append(leaks.on_release)

        pg = _PgActivity(config) if config.pg_activity else None
        if pg is not None:
            telemetry.pg_samplers = lambda: list(pg.samplers.items())
            registry.on_new_recorder.append(pg.add)
        if config.set_application_name:
            registry.on_new_recorder.append(_ApplicationName.enable)

        with self._state_lock:
            registry.install(engines)
            sessions.install()
            leaks.start()
            watch_gc(True)
        self._state = (registry, sessions, leaks, pg)

    def _uninstrument(self, **kwargs: Any) -> None:
        state = getattr(self, "_state", None)
        if state is None:
            return
        registry, sessions, leaks, pg = state
        with self._state_lock:
            watch_gc(False)
            leaks.stop()
            registry.telemetry.drain()  # what garbage collections queued
            sessions.uninstall()
            if pg is not None:
                pg.stop()
            _ApplicationName.disable()
            registry.uninstall()
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


class _PgActivity:
    """One pg_stat_activity sampler per PostgreSQL pool (own connection, own thread)."""

    def __init__(self, config: Config):
        self.config = config
        self.samplers: dict[str, Any] = {}

    def add(self, recorder: PoolRecorder, pool: Any, url: Any) -> None:
        from .pg_activity import PgActivitySampler, application_name_for
        from .pools import url_from_pool

        url = url or url_from_pool(pool)
        if url is None or url.get_backend_name() != "postgresql":
            return
        names = {application_name_for(recorder.name)} if self.config.set_application_name else None
        sampler = PgActivitySampler(
            url, application_names=names, interval_s=self.config.pg_activity_interval_s
        )
        sampler.start()
        self.samplers[recorder.name] = sampler

    def stop(self) -> None:
        for sampler in self.samplers.values():
            sampler.stop()
        self.samplers.clear()


class _ApplicationName:
    """Sets application_name per pool at connect time, so server rows map to pools."""

    _enabled = False

    @classmethod
    def enable(cls, recorder: PoolRecorder, pool: Any, url: Any) -> None:
        if cls._enabled:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "do_connect", _set_application_name)
        cls._enabled = True

    @classmethod
    def disable(cls) -> None:
        if not cls._enabled:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.remove(Engine, "do_connect", _set_application_name)
        cls._enabled = False


def _set_application_name(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
    try:
        from .pg_activity import application_name_for, apply_application_name
        from .pools import recorder_of

        recorder = recorder_of(record) if record is not None else None
        if recorder is not None and dialect.name == "postgresql":
            apply_application_name(dialect.driver, cparams, application_name_for(recorder.name))
    except Exception:
        _logger.debug("could not set application_name", exc_info=True)
