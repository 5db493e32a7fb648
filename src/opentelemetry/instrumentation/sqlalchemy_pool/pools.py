"""Pools: discovery, naming and the registry of :class:`~.recorder.PoolRecorder` objects.

A pool is adopted on its first checkout (the checkout hook in ``hooks.py`` calls
:meth:`PoolRegistry.adopt`), or at ``instrument(engines=...)``. Nothing here touches
SQLAlchemy beyond reading a pool's configuration; every hook lives in ``hooks.py``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from sqlalchemy.engine import URL
from sqlalchemy.pool import Pool

from .config import Config
from .recorder import (
    POOL_RECORDER_ATTR,
    NewPoolListener,
    PoolRecorder,
    creator_key,
    log_hook_error,
)

_logger = logging.getLogger(__name__)

# Reads what create_engine's creator closes over (``cparams``, ``dialect``): a private read,
# so it lives in hooks.py and is given to the registry (see Hooks.creator_closure).
CreatorClosure = Callable[[Pool], Mapping[str, Any]]


class PoolRegistry:
    """Every recorder: which pools are ours, their names, which are statement-timed."""

    # The registry of the instrumentation currently installed (for holders.all_holders()).
    installed: ClassVar[PoolRegistry | None] = None

    def __init__(
        self,
        config: Config,
        creator_closure: CreatorClosure,
        new_pool_listeners: Iterable[NewPoolListener] = (),
    ):
        self.config = config
        self._creator_closure = creator_closure
        self._new_pool_listeners = tuple(new_pool_listeners)
        self._recorders: dict[int, PoolRecorder] = {}  # id(recorder) -> recorder
        self._lock = threading.RLock()
        self.adopted_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._explicit_engines: list[weakref.ref[Any]] | None = None
        self._explicit_keys: set[tuple[int, int]] = set()
        self._names_in_use: set[str] = set()
        self._counter = itertools.count(1)
        # Engines whose statements are timed; the Engine class itself = every engine.
        self._timed_engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._all_engines_timed = False

    # -- scope --------------------------------------------------------------------------------
    def limit_to(self, engines: Iterable[Any]) -> list[Any]:
        """Only these engines' pools are ours (instrument(engines=...)); adopts them now and
        returns their sync engines."""
        self._explicit_engines = []
        sync_engines = []
        for engine in engines:
            sync_engine = getattr(engine, "sync_engine", engine)
            self._explicit_engines.append(weakref.ref(sync_engine))
            self.adopt(sync_engine.pool, url=sync_engine.url)
            sync_engines.append(sync_engine)
        return sync_engines

    @property
    def explicit(self) -> bool:
        return self._explicit_engines is not None

    # -- statement timing ---------------------------------------------------------------------
    def mark_timed(self, engine: Any, all_engines: bool = False) -> bool:
        """Time statements of ``engine`` (or of every engine); False when it already was."""
        with self._lock:
            if all_engines:
                if self._all_engines_timed:
                    return False
                self._all_engines_timed = True
                for recorder in self._recorders.values():
                    recorder.statements_timed = True
                return True
            if engine in self._timed_engines:
                return False
            self._timed_engines.add(engine)
            recorder = engine.pool.__dict__.get(POOL_RECORDER_ATTR)
            if recorder:
                recorder.statements_timed = True
            return True

    # -- discovery ----------------------------------------------------------------------------
    def adopt(self, pool: Pool, url: URL | None = None) -> PoolRecorder | bool:
        """The recorder of ``pool`` (created on first sight), or False if we must not touch it."""
        with self._lock:
            existing = pool.__dict__.get(POOL_RECORDER_ATTR)
            if existing is not None:
                return existing
            key = creator_key(pool)
            outside_scope = self._explicit_engines is not None and url is None
            if outside_scope and key not in self._explicit_keys:
                pool.__dict__[POOL_RECORDER_ATTR] = False
                self.adopted_pools.add(pool)
                return False
            recorder = self._find_previous_generation(key)
            if recorder is not None:
                recorder.set_pool(pool)
            else:
                self.recorders()  # forgets pools that are gone: their names are free again
                closure = self._closure(pool)
                recorder = PoolRecorder(pool, self._name_for(pool, url, closure))
                recorder.statements_timed = self._all_engines_timed
                self._recorders[id(recorder)] = recorder
                if self._new_pool_listeners and url is None:
                    try:
                        url = url_from_closure(closure)
                    except Exception:
                        log_hook_error("new pool")
                for listener in self._new_pool_listeners:
                    try:
                        listener.on_new_pool(recorder, pool, url)
                    except Exception:
                        log_hook_error("new pool")
            if self._explicit_engines is not None:
                self._explicit_keys.add(key)
            pool.__dict__[POOL_RECORDER_ATTR] = recorder
            self.adopted_pools.add(pool)
            return recorder

    def _closure(self, pool: Pool) -> Mapping[str, Any]:
        try:
            return self._creator_closure(pool)
        except Exception:
            return {}

    def _find_previous_generation(self, key: tuple[int, int]) -> PoolRecorder | None:
        for recorder in self._recorders.values():
            if recorder.creator_key == key:
                return recorder
        return None

    def _name_for(self, pool: Pool, url: URL | None, closure: Mapping[str, Any]) -> str:
        configured = self.config.pool_name
        base: str | None = None
        if callable(configured):
            try:
                base = str(configured(pool))
            except Exception:
                _logger.warning("pool_name callable raised; using the default name", exc_info=True)
        elif configured:
            base = configured
        base = base or getattr(pool, "_orig_logging_name", None)
        if not base and url is not None:
            base = name_from_url(url)
        base = base or _name_from_closure(closure) or f"pool-{next(self._counter)}"
        name, n = base, 1
        while name in self._names_in_use:
            n += 1
            name = f"{base}#{n}"
        self._names_in_use.add(name)
        return name

    def recorders(self) -> list[PoolRecorder]:
        """Live recorders; forgets those whose pools are gone and hold nothing."""
        with self._lock:
            alive = []
            for key, recorder in list(self._recorders.items()):
                gone = recorder.pool_ref() is None and recorder.creator_ref() is None
                if gone and not recorder.holders and not recorder.waiters:
                    del self._recorders[key]
                    self._names_in_use.discard(recorder.name)
                    continue
                alive.append(recorder)
            return alive

    def clear(self) -> tuple[list[PoolRecorder], list[Pool]]:
        """Forget everything (uninstrument); returns what was known, for removing our stamps."""
        with self._lock:
            recorders, pools = list(self._recorders.values()), list(self.adopted_pools)
            self._recorders.clear()
            self._names_in_use.clear()
            self.adopted_pools = weakref.WeakSet()
            self._timed_engines = weakref.WeakSet()
            self._all_engines_timed = False
            return recorders, pools


# -- names and URLs (never the user or password on telemetry) -------------------------------------
def name_from_parts(host: Any, port: Any, database: Any) -> str | None:
    if host is None and database is None:
        return None
    if isinstance(host, (list, tuple)):
        host_text = ",".join(map(str, host))
    elif not host:  # no host: libpq and asyncpg use the server's default unix socket first
        host_text = "local socket"
    else:
        host_text = f"unix:{host}" if str(host).startswith("/") else str(host)
    location = f"{host_text}:{port}" if port else host_text
    return f"{location}/{database or ''}"


def name_from_url(url: URL) -> str | None:
    """host:port/database from a SQLAlchemy URL -- never the user or password."""
    host = url.host or url.query.get("host")
    return name_from_parts(host, url.port, url.database)


def _name_from_closure(closure: Mapping[str, Any]) -> str | None:
    """host:port/database from the connect arguments captured by create_engine's creator."""
    cparams = closure.get("cparams")
    if not isinstance(cparams, dict):
        return None
    return name_from_parts(
        cparams.get("host"), cparams.get("port"), cparams.get("dbname") or cparams.get("database")
    )


def url_from_closure(closure: Mapping[str, Any]) -> URL | None:
    """A URL rebuilt from create_engine's connect arguments, or None.

    Used only to open the pg_stat_activity sampler's own connection; it may carry the
    password and is never logged or put on telemetry.
    """
    cparams, dialect = closure.get("cparams"), closure.get("dialect")
    if not isinstance(cparams, dict) or dialect is None:
        return None
    host = cparams.get("host")
    query = {}
    if isinstance(host, str) and host.startswith("/"):
        query, host = {"host": host}, None
    return URL.create(
        f"{dialect.name}+{dialect.driver}",
        username=cparams.get("user"),
        password=cparams.get("password"),
        host=host,
        port=cparams.get("port"),
        database=cparams.get("dbname") or cparams.get("database"),
        query=query,
    )
