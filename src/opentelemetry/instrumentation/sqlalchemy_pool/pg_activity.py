"""Server-side figures from ``pg_stat_activity``, sampled off the application's path.

:class:`PgActivitySampler` keeps ONE connection of its own (never one of the application's
pools, and never a SQLAlchemy ``Pool``, so pool instrumentation cannot see it) and a daemon
thread that samples ``pg_stat_activity`` and the connection limits every ``interval_s``
seconds. Metric callbacks (:func:`observe`) only read the latest
:class:`PgActivitySnapshot`: collecting metrics never does I/O and never waits for the
database, and the application never waits for the sampler.

The sampler talks to the driver module directly (psycopg 3, psycopg2 or asyncpg). For an
async URL (``postgresql+asyncpg://``) a sync driver is used when one is importable;
otherwise asyncpg runs in an event loop private to the sampler.

Failures (server down, bad URL, permissions) never raise into callers: the first failure of a
streak logs one WARNING (repeats log at DEBUG), the snapshot is marked stale, and the next
interval retries. Passwords never appear in log lines or error texts.

Query text is kept only in :attr:`PgActivitySnapshot.idle_in_transaction` (for the CLI);
it is never used as a metric attribute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import Pool

from .config import Config
from .recorder import PoolRecorder
from .semconv import (
    PG_BACKENDS,
    PG_MAX_CONNECTIONS,
    PG_OLDEST_QUERY_AGE,
    PG_OLDEST_XACT_AGE,
    PG_RESERVED_CONNECTIONS,
    PG_SCOPE,
    PG_STATE,
    POOL_NAME,
)

__all__ = [
    "SAMPLER_APPLICATION_NAME",
    "SCOPES",
    "SCOPE_APPLICATION",
    "SCOPE_SERVER",
    "STANDARD_STATES",
    "STATE_UNKNOWN",
    "IdleInTransactionSession",
    "PgActivitySampler",
    "PgActivitySamplers",
    "PgActivitySnapshot",
    "application_name_for",
    "apply_application_name",
    "observe",
]

_logger = logging.getLogger(__name__)

SCOPE_APPLICATION = "application"
SCOPE_SERVER = "server"
SCOPES: tuple[str, ...] = (SCOPE_APPLICATION, SCOPE_SERVER)

#: Always reported (0 when absent) so the time series never vanish.
STANDARD_STATES: tuple[str, ...] = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
)
#: Client backends whose state the sampler's role may not see (no pg_read_all_stats).
STATE_UNKNOWN = "unknown"

#: ``application_name`` of the sampler's own connection (visible in pg_stat_activity).
SAMPLER_APPLICATION_NAME = "otel-sqlalchemy-pool-pg-activity"

QUERY_TEXT_LIMIT = 200  # characters of query text kept for idle-in-transaction sessions
_APPLICATION_NAME_MAX_BYTES = 63  # NAMEDATALEN - 1
_SYNC_DRIVERS = ("psycopg", "psycopg2")
_DRIVERS = (*_SYNC_DRIVERS, "asyncpg")

# libpq connection keywords passed through from the URL query to psycopg / psycopg2.
_LIBPQ_KEYWORDS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "options",
        "sslmode",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "gssencmode",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    }
)
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})

_ACTIVITY_SQL = f"""
SELECT pid,
       application_name,
       state,
       (datname IS NOT DISTINCT FROM current_database()
        AND usename IS NOT DISTINCT FROM session_user) AS same_database_and_user,
       -- PostgreSQL clears xact_start when a transaction aborts: for sessions idle in an
       -- aborted transaction the time since the failed statement is a lower bound.
       EXTRACT(EPOCH FROM statement_timestamp() - COALESCE(
           xact_start,
           CASE WHEN state = 'idle in transaction (aborted)' THEN state_change END
       ))::float8 AS xact_age,
       CASE WHEN state = 'active'
            THEN EXTRACT(EPOCH FROM statement_timestamp() - query_start)::float8
       END AS query_age,
       EXTRACT(EPOCH FROM statement_timestamp() - state_change)::float8 AS state_age,
       CASE WHEN state IN ('idle in transaction', 'idle in transaction (aborted)')
            THEN left(query, {QUERY_TEXT_LIMIT})
       END AS query,
       usename,
       datname,
       backend_type IS NULL AS hidden
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND (backend_type = 'client backend' OR (backend_type IS NULL AND datname IS NOT NULL))
"""

_SETTINGS_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       current_setting('reserved_connections', true),
       current_database(),
       session_user::text
"""


# --------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleInTransactionSession:
    """One session idle in transaction (for humans: the CLI; never a metric attribute)."""

    pid: int
    application_name: str
    state: str
    transaction_age_s: float
    state_age_s: float  # time since its last statement finished
    query: str  # last statement, truncated to 200 characters
    user: str | None = None
    database: str | None = None
    in_application_scope: bool = False


@dataclass(frozen=True)
class PgActivitySnapshot:
    """What one sample saw. Mappings are keyed by scope (``"application"``, ``"server"``).

    The sampler's own backend is never counted. ``backends_by_state[scope]`` always holds
    the four :data:`STANDARD_STATES` (0 when absent) plus any other state seen, including
    ``"unknown"`` for client backends whose state the sampler's role may not read.
    Ages are ``None`` when the scope has no open transaction / running query.
    """

    taken_at: float  # time.time() when the sample was taken
    backends_by_state: Mapping[str, Mapping[str, int]]
    oldest_transaction_age_s: Mapping[str, float | None]
    oldest_query_age_s: Mapping[str, float | None]
    max_connections: int | None
    reserved_connections: int | None  # superuser_reserved_connections + reserved_connections
    superuser_reserved_connections: int | None
    total_backends: int  # client backends on the server (visible ones, sampler excluded)
    hidden_backends: int  # rows whose details need pg_read_all_stats / pg_monitor
    idle_in_transaction: tuple[IdleInTransactionSession, ...] = ()
    database: str | None = None
    user: str | None = None
    application_names: frozenset[str] | None = None
    stale: bool = False
    error: str | None = None

    def backends(self, scope: str = SCOPE_APPLICATION) -> int:
        """Total client backends in ``scope``."""
        return sum(self.backends_by_state.get(scope, {}).values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (used by the CLI's ``--json``)."""
        data = dataclasses.asdict(self)
        data["backends_by_state"] = {k: dict(v) for k, v in self.backends_by_state.items()}
        data["oldest_transaction_age_s"] = dict(self.oldest_transaction_age_s)
        data["oldest_query_age_s"] = dict(self.oldest_query_age_s)
        data["idle_in_transaction"] = [dataclasses.asdict(s) for s in self.idle_in_transaction]
        data["application_names"] = (
            sorted(self.application_names) if self.application_names is not None else None
        )
        return data


def _build_snapshot(
    activity_rows: Iterable[tuple[Any, ...]],
    settings_row: tuple[Any, ...],
    application_names: frozenset[str] | None,
    top: int,
) -> PgActivitySnapshot:
    max_conn, su_reserved, reserved_raw, database, user = settings_row
    reserved_extra = int(reserved_raw) if reserved_raw not in (None, "") else 0
    reserved = None if su_reserved is None else int(su_reserved) + reserved_extra

    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(STANDARD_STATES, 0) for s in SCOPES}
    oldest_xact: dict[str, float | None] = dict.fromkeys(SCOPES)
    oldest_query: dict[str, float | None] = dict.fromkeys(SCOPES)
    idle_tx: list[IdleInTransactionSession] = []
    total = hidden = 0

    for row in activity_rows:
        pid, app_name, state, same_db_user, xact_age, query_age, state_age, query = row[:8]
        usename, datname, is_hidden = row[8:11]
        app_name = app_name or ""
        total += 1
        hidden += bool(is_hidden)
        if application_names is not None:
            in_app = app_name in application_names
        else:
            in_app = bool(same_db_user)
        scopes = SCOPES if in_app else (SCOPE_SERVER,)
        state_key = state or STATE_UNKNOWN
        xact_age = None if xact_age is None else max(0.0, float(xact_age))
        query_age = None if query_age is None else max(0.0, float(query_age))
        for scope in scopes:
            counts[scope][state_key] = counts[scope].get(state_key, 0) + 1
            if xact_age is not None:
                prev = oldest_xact[scope]
                oldest_xact[scope] = xact_age if prev is None else max(prev, xact_age)
            if query_age is not None:
                prev = oldest_query[scope]
                oldest_query[scope] = query_age if prev is None else max(prev, query_age)
        if state in ("idle in transaction", "idle in transaction (aborted)"):
            idle_tx.append(
                IdleInTransactionSession(
                    pid=int(pid),
                    application_name=app_name,
                    state=state,
                    transaction_age_s=xact_age or 0.0,
                    state_age_s=0.0 if state_age is None else max(0.0, float(state_age)),
                    query=(query or "")[:QUERY_TEXT_LIMIT],
                    user=usename,
                    database=datname,
                    in_application_scope=in_app,
                )
            )

    idle_tx.sort(key=lambda s: s.transaction_age_s, reverse=True)
    return PgActivitySnapshot(
        taken_at=time.time(),
        backends_by_state=counts,
        oldest_transaction_age_s=oldest_xact,
        oldest_query_age_s=oldest_query,
        max_connections=None if max_conn is None else int(max_conn),
        reserved_connections=reserved,
        superuser_reserved_connections=None if su_reserved is None else int(su_reserved),
        total_backends=total,
        hidden_backends=hidden,
        idle_in_transaction=tuple(idle_tx[: max(0, top)]),
        database=database,
        user=user,
        application_names=application_names,
    )


# --------------------------------------------------------------------------------------------
# Driver adapters (the sampler's own single connection)
# --------------------------------------------------------------------------------------------


class _SampleError(Exception):
    """A sampling failure whose message is already safe to log."""


class _Connection(Protocol):
    def fetch(self, sql: str) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str) -> None: ...

    def close(self) -> None: ...

    def abandon(self) -> None: ...


def _libpq_params(url: URL) -> dict[str, Any]:
    """libpq keywords for ``url`` (unknown / driver-specific query keys are dropped)."""
    params: dict[str, Any] = {}
    if url.host:
        params["host"] = url.host
    if url.port:
        params["port"] = url.port
    if url.username:
        params["user"] = url.username
    if url.password:
        params["password"] = url.password
    if url.database:
        params["dbname"] = url.database
    query = dict(url.query)
    ssl = query.pop("ssl", None)
    if isinstance(ssl, str) and ssl in _SSL_MODES:
        query.setdefault("sslmode", ssl)
    hosts = query.get("host")
    if isinstance(hosts, tuple):  # SQLAlchemy multi-host form: ?host=h1:5432&host=h2:5433
        names, ports = [], []
        for item in hosts:
            name, _, port = item.rpartition(":") if ":" in item else (item, "", "")
            names.append(name)
            ports.append(port)
        query["host"] = ",".join(names)
        if any(ports):
            query["port"] = ",".join(ports)
    for key, value in query.items():
        if key in _LIBPQ_KEYWORDS and not isinstance(value, tuple):
            params[key] = value
    return params


class _PsycopgConnection:
    def __init__(self, params: dict[str, Any], connect_timeout_s: float) -> None:
        import psycopg

        self._conn = psycopg.connect(
            **params,
            autocommit=True,
            prepare_threshold=None,  # PgBouncer-friendly: no server-side prepared statements
            connect_timeout=max(2, math.ceil(connect_timeout_s)),
            application_name=SAMPLER_APPLICATION_NAME,
        )

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def execute(self, sql: str) -> None:
        self._conn.execute(sql)

    def close(self) -> None:
        self._conn.close()

    def abandon(self) -> None:  # after fork: psycopg never closes a parent's socket
        _ABANDONED.append(self._conn)


class _Psycopg2Connection:
    def __init__(self, params: dict[str, Any], connect_timeout_s: float) -> None:
        import psycopg2  # type: ignore[import-not-found]

        self._conn = psycopg2.connect(
            **params,
            connect_timeout=max(2, math.ceil(connect_timeout_s)),
            application_name=SAMPLER_APPLICATION_NAME,
        )
        self._conn.autocommit = True

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def execute(self, sql: str) -> None:
        with self._conn.cursor() as cur:
            cur.execute(sql)

    def close(self) -> None:
        self._conn.close()

    def abandon(self) -> None:
        _ABANDONED.append(self._conn)


_T = TypeVar("_T")


class _AsyncpgConnection:
    """asyncpg on an event loop private to the sampler (used from sync code only)."""

    def __init__(self, params: dict[str, Any], connect_timeout_s: float) -> None:
        import asyncpg

        self._timeout = connect_timeout_s
        kwargs: dict[str, Any] = {
            "timeout": connect_timeout_s,
            "statement_cache_size": 0,
            "server_settings": {"application_name": SAMPLER_APPLICATION_NAME},
        }
        for src, dst in (
            ("host", "host"),
            ("port", "port"),
            ("user", "user"),
            ("password", "password"),
            ("dbname", "database"),
            ("passfile", "passfile"),
            ("target_session_attrs", "target_session_attrs"),
        ):
            if src in params:
                kwargs[dst] = params[src]
        if "sslmode" in params:
            kwargs["ssl"] = params["sslmode"]
        if isinstance(kwargs.get("host"), str) and "," in kwargs["host"]:
            kwargs["host"] = kwargs["host"].split(",")
            if isinstance(kwargs.get("port"), str) and "," in kwargs["port"]:
                kwargs["port"] = [int(p) if p else 5432 for p in kwargs["port"].split(",")]
        self._loop = asyncio.new_event_loop()
        try:
            self._conn = self._run(asyncpg.connect(**kwargs))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(coro)
        # Called from inside a running event loop (e.g. an async test or app code calling
        # sample_once()): drive the private loop from a helper thread instead.
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = self._loop.run_until_complete(coro)
            except BaseException as exc:
                box["error"] = exc

        helper = threading.Thread(target=target, name="pg-activity-asyncpg", daemon=True)
        helper.start()
        helper.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        records = self._run(self._conn.fetch(sql, timeout=self._timeout * 2))
        return [tuple(r) for r in records]

    def execute(self, sql: str) -> None:
        self._run(self._conn.execute(sql, timeout=self._timeout * 2))

    def close(self) -> None:
        try:
            self._run(self._conn.close(timeout=self._timeout))
        except Exception:
            self._conn.terminate()
        finally:
            self._loop.close()

    def abandon(self) -> None:
        _ABANDONED.append((self._conn, self._loop))


# Connections inherited across fork(): kept referenced so the child never closes the
# parent's socket through a finaliser.
_ABANDONED: list[Any] = []

_ADAPTERS: dict[str, Callable[[dict[str, Any], float], _Connection]] = {
    "psycopg": _PsycopgConnection,
    "psycopg2": _Psycopg2Connection,
    "asyncpg": _AsyncpgConnection,
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _choose_driver(url_driver: str | None) -> str | None:
    """The sync driver of the URL when importable, else psycopg, psycopg2, then asyncpg."""
    if url_driver == "psycopg_async":
        url_driver = "psycopg"
    candidates = [url_driver] if url_driver in _SYNC_DRIVERS else []
    candidates += [d for d in _DRIVERS if d not in candidates]
    for driver in candidates:
        if _importable(driver):
            return driver
    return None


def _one_line(exc: BaseException, secrets: Iterable[str]) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

_LIVE_SAMPLERS: weakref.WeakSet[PgActivitySampler] = weakref.WeakSet()


class PgActivitySampler:
    """Samples ``pg_stat_activity`` on its own connection in its own daemon thread.

    ``url``: SQLAlchemy URL (or string) of the application's database; drivers psycopg,
    psycopg2 or asyncpg. ``application_names``: the application scope is the backends whose
    ``application_name`` is one of these; when ``None`` it is the backends of the same
    database and user as ``url``. The sampler's own backend is always excluded.

    ``driver`` forces the driver module used by the sampler (``"psycopg"``, ``"psycopg2"``,
    ``"asyncpg"``); by default the URL's driver when it is sync, else the first importable
    of psycopg, psycopg2, asyncpg. ``top``: how many idle-in-transaction sessions to keep.
    """

    def __init__(
        self,
        url: URL | str,
        *,
        application_names: Iterable[str] | None = None,
        interval_s: float = 15.0,
        logger: logging.Logger | None = None,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 5.0,
        top: int = 10,
        driver: str | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        if driver is not None and driver not in _DRIVERS:
            raise ValueError(f"driver must be one of {', '.join(_DRIVERS)}, got {driver!r}")
        self.interval_s = float(interval_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.statement_timeout_s = float(statement_timeout_s)
        self.top = int(top)
        self.application_names = (
            frozenset(application_names) if application_names is not None else None
        )
        self._logger = logger or _logger
        self._url: URL | None = None
        self._url_error: str | None = None
        self._secrets: tuple[str, ...] = ()
        self.redacted_url = "<invalid URL>"
        self.driver: str | None = None
        try:
            parsed = make_url(url)
            # The query string may carry secrets too (sslpassword, passfile, ...): keep only
            # the host (a unix socket directory) and port.
            shown = {k: v for k, v in parsed.query.items() if k in ("host", "port")}
            self.redacted_url = parsed.set(query=shown).render_as_string(hide_password=True)
            self._secrets = (parsed.password,) if parsed.password else ()
            if parsed.get_backend_name() != "postgresql":
                raise _SampleError(f"not a PostgreSQL URL (backend {parsed.get_backend_name()!r})")
            self._url = parsed
            self.driver = driver or _choose_driver(parsed.get_driver_name())
            if self.driver is None:
                self._url_error = "no PostgreSQL driver importable (psycopg, psycopg2, asyncpg)"
        except _SampleError as exc:
            self._url_error = str(exc)
        except Exception:
            # Never echo the text of a bad URL: it may contain a password.
            self._url_error = (
                "invalid database URL (expected postgresql[+driver]://user:password@host/dbname)"
            )

        self._latest: PgActivitySnapshot | None = None
        self.last_error: str | None = None
        self._failures = 0  # consecutive failures
        self._conn: _Connection | None = None
        self._io_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._running = False
        _LIVE_SAMPLERS.add(self)

    # -- public API ---------------------------------------------------------------------------

    @property
    def max_snapshot_age_s(self) -> float:
        """Older snapshots are treated as stale by :func:`observe` (thread stuck or stopped)."""
        return 2 * self.interval_s + self.connect_timeout_s + self.statement_timeout_s

    def latest(self) -> PgActivitySnapshot | None:
        """The latest snapshot (``stale=True`` after a failed sample), ``None`` before any."""
        return self._latest

    def start(self) -> None:
        """Start the background thread (samples at once, then every ``interval_s``)."""
        with self._state_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._running = True
            self._stop_event = threading.Event()
            self._thread = threading.Thread(
                target=self._loop,
                args=(self._stop_event,),
                name=f"otel-pg-activity {self.redacted_url}",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the thread (waits for a sample in progress) and close the connection."""
        with self._state_lock:
            self._running = False
            self._stop_event.set()
            thread, self._thread = self._thread, None
        if timeout_s is None:
            timeout_s = self.connect_timeout_s + 2 * self.statement_timeout_s + 1
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        if self._io_lock.acquire(timeout=timeout_s):
            try:
                self._close_connection()
            finally:
                self._io_lock.release()

    def sample_once(self) -> PgActivitySnapshot | None:
        """Sample now (synchronously). Returns the new snapshot, or ``None`` on failure
        (then :attr:`last_error` says why in one password-free line). Never raises."""
        with self._io_lock:
            try:
                snapshot = self._sample()
            except Exception as exc:
                message = str(exc) if isinstance(exc, _SampleError) else self._describe(exc)
                self._record_failure(message)
                return None
        self._record_success(snapshot)
        return snapshot

    def __enter__(self) -> PgActivitySampler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgActivitySampler {self.redacted_url} driver={self.driver}>"

    # -- internals ----------------------------------------------------------------------------

    def _loop(self, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                self.sample_once()
            except Exception:  # pragma: no cover - sample_once never raises; belt and braces
                self._logger.debug("pg_activity sampler iteration failed", exc_info=True)
            stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        # stop() may have given up waiting for a slow sample: close the connection here.
        with self._io_lock:
            if not self._running:
                self._close_connection()

    def _describe(self, exc: BaseException) -> str:
        return _one_line(exc, self._secrets)

    def _connect(self) -> _Connection:
        assert self._url is not None and self.driver is not None
        params = _libpq_params(self._url)
        conn = _ADAPTERS[self.driver](params, self.connect_timeout_s)
        try:
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                self._logger.debug("closing the pg_activity connection failed", exc_info=True)

    def _query(self) -> PgActivitySnapshot:
        if self._conn is None:
            self._conn = self._connect()
        settings = self._conn.fetch(_SETTINGS_SQL)[0]
        rows = self._conn.fetch(_ACTIVITY_SQL)
        return _build_snapshot(rows, settings, self.application_names, self.top)

    def _sample(self) -> PgActivitySnapshot:
        if self._url_error is not None:
            raise _SampleError(self._url_error)
        reused = self._conn is not None
        try:
            return self._query()
        except Exception:
            self._close_connection()
            if not reused:
                raise
        # The kept connection may have died (server restart, idle timeout, terminated):
        # one immediate retry on a fresh connection before reporting a failure.
        try:
            return self._query()
        except Exception:
            self._close_connection()
            raise

    def _record_success(self, snapshot: PgActivitySnapshot) -> None:
        if self._failures:
            self._logger.info(
                "pg_stat_activity sampling of %s recovered after %d failed attempt(s)",
                self.redacted_url,
                self._failures,
            )
        self._failures = 0
        self.last_error = None
        self._latest = snapshot

    def _record_failure(self, message: str) -> None:
        self._failures += 1
        self.last_error = message
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        retry = f", retrying every {self.interval_s:g}s" if self._running else ""
        self._logger.log(
            level,
            "pg_stat_activity sampling of %s failed (attempt %d%s): %s",
            self.redacted_url,
            self._failures,
            retry,
            message,
        )
        previous = self._latest
        if previous is not None:
            self._latest = dataclasses.replace(previous, stale=True, error=message)

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here and its socket must not be used or closed.
        self._io_lock = threading.Lock()
        self._state_lock = threading.Lock()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()
        self._thread = None
        if self._running:
            self._running = False
            self.start()


def _reinit_samplers_after_fork() -> None:
    for sampler in list(_LIVE_SAMPLERS):
        try:
            sampler._after_fork_in_child()
        except Exception:  # pragma: no cover - never break the child process
            _logger.debug("pg_activity sampler re-init after fork failed", exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_samplers_after_fork)


# --------------------------------------------------------------------------------------------
# OpenTelemetry observation
# --------------------------------------------------------------------------------------------

SamplersProvider = Callable[[], Iterable[tuple[str, PgActivitySampler]]]


def _fresh_snapshots(
    samplers_provider: SamplersProvider,
) -> list[tuple[str, PgActivitySnapshot]]:
    out: list[tuple[str, PgActivitySnapshot]] = []
    try:
        pairs = list(samplers_provider())
    except Exception:
        _logger.debug("pg_activity samplers provider failed", exc_info=True)
        return out
    now = time.time()
    for pool_name, sampler in pairs:
        snapshot = sampler.latest()
        if snapshot is None or snapshot.stale:
            continue
        if now - snapshot.taken_at > sampler.max_snapshot_age_s:
            continue
        out.append((pool_name, snapshot))
    return out


class PgActivitySamplers:
    """One sampler per PostgreSQL pool (a new-pool listener of the registry)."""

    def __init__(self, config: Config):
        self.config = config
        self._samplers: dict[str, PgActivitySampler] = {}

    def on_new_pool(self, recorder: PoolRecorder, pool: Pool, url: URL | None) -> None:
        if url is None or url.get_backend_name() != "postgresql":
            return
        names = {application_name_for(recorder.name)} if self.config.set_application_name else None
        sampler = PgActivitySampler(
            url, application_names=names, interval_s=self.config.pg_activity_interval_s
        )
        sampler.start()
        self._samplers[recorder.name] = sampler

    def items(self) -> list[tuple[str, PgActivitySampler]]:
        """(pool name, sampler) pairs: the ``SamplersProvider`` of :func:`observe`."""
        return list(self._samplers.items())

    def stop(self) -> None:
        for sampler in self._samplers.values():
            sampler.stop()
        self._samplers.clear()


def observe(meter: Meter, samplers_provider: SamplersProvider) -> None:
    """Create the ``sqlalchemy.pool.pg.*`` observable gauges on ``meter``.

    ``samplers_provider()`` returns ``(pool_name, sampler)`` pairs; every observation carries
    ``db.client.connection.pool.name``. Callbacks only read ``sampler.latest()`` (no I/O);
    stale or missing snapshots are skipped (a gap, not a wrong value). The four standard
    states are always reported per scope (0 when absent); ages are 0 when nothing is open.
    """

    def backends(_options: CallbackOptions) -> Iterable[Observation]:
        for pool_name, snap in _fresh_snapshots(samplers_provider):
            for scope in SCOPES:
                by_state = snap.backends_by_state.get(scope, {})
                states = dict.fromkeys(STANDARD_STATES, 0)
                states.update(by_state)
                for state, count in states.items():
                    yield Observation(
                        count, {POOL_NAME: pool_name, PG_STATE: state, PG_SCOPE: scope}
                    )

    def ages(
        attribute: str,
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            for pool_name, snap in _fresh_snapshots(samplers_provider):
                values: Mapping[str, float | None] = getattr(snap, attribute)
                for scope in SCOPES:
                    value = values.get(scope)
                    yield Observation(
                        0.0 if value is None else value, {POOL_NAME: pool_name, PG_SCOPE: scope}
                    )

        return callback

    def limit(attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            for pool_name, snap in _fresh_snapshots(samplers_provider):
                value = getattr(snap, attribute)
                if value is not None:
                    yield Observation(value, {POOL_NAME: pool_name})

        return callback

    meter.create_observable_gauge(
        PG_BACKENDS,
        callbacks=[backends],
        unit="{connection}",
        description="PostgreSQL client backends by state, from pg_stat_activity "
        "(scope=application: this application's backends; server: all visible)",
    )
    meter.create_observable_gauge(
        PG_OLDEST_XACT_AGE,
        callbacks=[ages("oldest_transaction_age_s")],
        unit="s",
        description="Age of the oldest open transaction, from pg_stat_activity (0 = none)",
    )
    meter.create_observable_gauge(
        PG_OLDEST_QUERY_AGE,
        callbacks=[ages("oldest_query_age_s")],
        unit="s",
        description="Run time of the oldest active query, from pg_stat_activity (0 = none)",
    )
    meter.create_observable_gauge(
        PG_MAX_CONNECTIONS,
        callbacks=[limit("max_connections")],
        unit="{connection}",
        description="PostgreSQL max_connections",
    )
    meter.create_observable_gauge(
        PG_RESERVED_CONNECTIONS,
        callbacks=[limit("reserved_connections")],
        unit="{connection}",
        description="Connection slots reserved for superusers / pg_use_reserved_connections "
        "(superuser_reserved_connections + reserved_connections)",
    )


# --------------------------------------------------------------------------------------------
# application_name mapping
# --------------------------------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9 ._:/@+=,\-\[\]()#]")


def application_name_for(pool_name: str) -> str:
    """A PostgreSQL ``application_name`` for ``pool_name``: printable ASCII, at most 63 bytes.

    Deterministic (the sampler's ``application_names`` and the pool's connections must
    agree); names that had to be shortened keep a short hash so they stay distinct.
    """
    text = _UNSAFE_CHARS.sub("_", " ".join(str(pool_name).split())) or "sqlalchemy-pool"
    if len(text) <= _APPLICATION_NAME_MAX_BYTES:
        return text
    digest = hashlib.sha1(str(pool_name).encode("utf-8")).hexdigest()[:8]
    return f"{text[: _APPLICATION_NAME_MAX_BYTES - 9]}~{digest}"


def apply_application_name(
    driver: str, cparams: MutableMapping[str, Any], application_name: str
) -> None:
    """Put ``application_name`` into DBAPI connect parameters, e.g. from a ``do_connect``
    event: ``apply_application_name(dialect.driver, cparams, application_name_for(name))``.

    psycopg / psycopg2 / pg8000 take ``application_name``; asyncpg takes it in
    ``server_settings`` (merged with any the application already passes).
    """
    if driver == "asyncpg":
        settings = dict(cparams.get("server_settings") or {})
        settings["application_name"] = application_name
        cparams["server_settings"] = settings
    else:
        cparams["application_name"] = application_name
