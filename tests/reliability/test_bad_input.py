"""Bad input and secrets.

- Every ``OTEL_PYTHON_SQLALCHEMY_POOL_*`` variable and every ``instrument()`` keyword with a
  wrong type or value: exactly one clear warning naming it, the default is used, and the
  instrumentation still works.
- Pools we do not know (user subclasses of ``Pool``/``QueuePool``), SQLite, psycopg and
  asyncpg engines.
- A database URL with a password, query-string secrets and a unix-socket host: with every
  feature on, the secrets never appear in any telemetry (metric attributes, span names,
  attributes, events, links, status), in any log record (DEBUG included), nor in the names of
  the threads we start (log exporters send ``thread.name``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool, QueuePool

from opentelemetry.instrumentation.sqlalchemy_pool import holders
from opentelemetry.instrumentation.sqlalchemy_pool.config import OPTIONS, OPTIONS_BY_NAME

from .conftest import counter, gauges

SELECT_1 = sa.text("SELECT 1")

# Values each option must reject (env var text); pool_name has none: any non-blank text is a
# name, and a blank variable counts as unset.
BAD_ENV: dict[str, list[str]] = {
    "wait_span_threshold_ms": ["abc", "-1", "nan", "inf", "1e999"],
    "session_spans": ["sometimes", "1"],
    "session_span_threshold_ms": ["fast", "-0.5"],
    "statement_timing": ["always", "yes", "0"],
    "wait_spans_per_s": ["-1", "lots", "inf"],
    "leak_threshold_s": ["-3", "NaN", "10s"],
    "capture_code_site": ["maybe", "2"],
    "holders_limit": ["0", "-1", "2.5", "many"],
    "holders_log_interval_s": ["-1", "soon"],
    "pg_activity": ["perhaps", "enabled"],
    "pg_activity_interval_s": ["-15", "often"],
    "set_application_name": ["sure", "10"],
    "event_loop_monitor": ["watch", "2"],
    "event_loop_block_threshold_ms": ["-5", "slow", "inf"],
    "slow_statement_threshold_ms": ["-1", "100ms", "nan"],
}
BAD_KWARGS: dict[str, list[Any]] = {
    "pool_name": ["", "   ", [], {"a": 1}],
    "wait_span_threshold_ms": ["abc", -1, float("nan"), float("inf"), True, [100], {}],
    "session_spans": ["sometimes", 5, True, ["all"]],
    "session_span_threshold_ms": [-1, "x", object()],
    "statement_timing": ["sometimes", True, 1, ["all"]],
    "wait_spans_per_s": [-0.5, "x", float("nan"), [10]],
    "leak_threshold_s": [-1, "soon", float("nan"), False],
    "capture_code_site": ["maybe", 2, [], 0.5],
    "holders_limit": [0, -3, 2.5, "x", True],
    "holders_log_interval_s": [-0.1, "x"],
    "pg_activity": ["maybe", 3, {}],
    "pg_activity_interval_s": [-1, "x", float("inf")],
    "set_application_name": ["x", 7, None.__class__],
    "event_loop_monitor": ["x", 3, []],
    "event_loop_block_threshold_ms": [-1, "x", float("inf")],
    "slow_statement_threshold_ms": [-0.5, "x", float("nan")],
}


def test_every_option_has_bad_values_listed():
    assert set(BAD_KWARGS) == {option.name for option in OPTIONS}
    assert set(BAD_ENV) == {option.name for option in OPTIONS} - {"pool_name"}


def _sqlite_engine(tmp_path: Any, name: str) -> sa.Engine:
    return sa.create_engine(
        f"sqlite:///{tmp_path / (name + '.db')}", poolclass=QueuePool, pool_logging_name=name
    )


def _warnings(hook_errors: Any) -> list[str]:
    return [r.getMessage() for r in hook_errors.records if r.levelno >= logging.WARNING]


def _still_works(otel: Any, engine: sa.Engine, name: str) -> None:
    with engine.connect() as conn:
        assert conn.execute(SELECT_1).scalar() == 1
        assert gauges(otel, name).get("used") == 1
    assert gauges(otel, name).get("used") == 0


def _effective(otel: Any, option: str) -> Any:
    registry = otel.instrumentor._state.registry
    return getattr(registry.config, option)


@pytest.mark.parametrize(
    ("option", "raw"),
    [(option, raw) for option, values in BAD_ENV.items() for raw in values],
)
def test_bad_environment_variable(option, raw, otel, hook_errors, monkeypatch, tmp_path):
    env = OPTIONS_BY_NAME[option].env
    monkeypatch.setenv(env, raw)
    otel.instrument()
    warnings = _warnings(hook_errors)
    assert len(warnings) == 1, warnings
    assert env in warnings[0] and "using default" in warnings[0], warnings[0]
    assert _effective(otel, option) == OPTIONS_BY_NAME[option].default
    _still_works(otel, _sqlite_engine(tmp_path, "env"), "env")
    hook_errors.assert_none()


@pytest.mark.parametrize(
    ("option", "value"),
    [(option, value) for option, values in BAD_KWARGS.items() for value in values],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_bad_keyword_argument(option, value, otel, hook_errors, tmp_path):
    otel.instrument(**{option: value})
    warnings = _warnings(hook_errors)
    assert len(warnings) == 1, warnings
    assert f"{option}=" in warnings[0] and "using default" in warnings[0], warnings[0]
    assert _effective(otel, option) == OPTIONS_BY_NAME[option].default
    name = "kw" if option != "pool_name" else "kw-default-name"
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'kw.db'}", poolclass=QueuePool, pool_logging_name=name
    )
    _still_works(otel, engine, name)
    hook_errors.assert_none()


def test_good_environment_variables_are_used(otel, hook_errors, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_SQLALCHEMY_POOL_HOLDERS_LIMIT", " 7 ")
    monkeypatch.setenv("OTEL_PYTHON_SQLALCHEMY_POOL_SESSION_SPANS", "ALL")
    monkeypatch.setenv("OTEL_PYTHON_SQLALCHEMY_POOL_LEAK_THRESHOLD_S", "0")
    otel.instrument(holders_limit=3)  # the keyword wins over the variable
    assert _effective(otel, "holders_limit") == 3
    assert _effective(otel, "session_spans") == "all"
    assert _effective(otel, "leak_threshold_s") == 0
    assert _warnings(hook_errors) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"engine": "postgresql://someone:HUNTER2@db/app"},
        {"engine": 42},
        {"engines": [object()]},
        {"engines": "postgresql://someone:HUNTER2@db/app"},
        {"engines": 3.5},
    ],
    ids=["engine-url-string", "engine-int", "engines-object", "engines-string", "engines-float"],
)
def test_bad_engine_arguments(kwargs, otel, hook_errors, tmp_path):
    """Not an Engine: one warning naming the argument (never echoing its value, which may be
    a URL with a password), then every pool is instrumented (the default)."""
    otel.instrument(**kwargs)  # must not raise
    warnings = _warnings(hook_errors)
    assert len(warnings) == 1, warnings
    (argument,) = kwargs
    assert f"{argument}=" in warnings[0], warnings[0]
    assert "HUNTER2" not in warnings[0]
    _still_works(otel, _sqlite_engine(tmp_path, "any"), "any")
    hook_errors.assert_none()


def test_bad_engine_among_good_ones(otel, hook_errors, tmp_path):
    good = _sqlite_engine(tmp_path, "good")
    other = _sqlite_engine(tmp_path, "other")
    otel.instrument(engines=[good, "not an engine"])
    warnings = _warnings(hook_errors)
    assert len(warnings) == 1 and "engines=" in warnings[0], warnings
    _still_works(otel, good, "good")
    with other.connect():
        assert gauges(otel, "other") == {}  # only the valid engine is instrumented
    hook_errors.assert_none()


@pytest.mark.parametrize("argument", ["meter_provider", "tracer_provider"])
def test_bad_providers(argument, otel, hook_errors, tmp_path):
    """A provider of the wrong type: one warning naming it, the global provider is used."""
    otel.instrumentor.instrument(**{argument: "not a provider"})
    warnings = _warnings(hook_errors)
    assert len(warnings) == 1 and f"{argument}=" in warnings[0], warnings
    engine = _sqlite_engine(tmp_path, "prov")
    with engine.connect() as conn:
        assert conn.execute(SELECT_1).scalar() == 1
    hook_errors.assert_none()


# -- pools and engines we do not know ---------------------------------------------------------
class OneShotPool(Pool):
    """A user's own pool: a fresh connection per checkout (defined before instrument())."""

    def _do_get(self) -> Any:
        return self._create_connection()

    def _do_return_conn(self, record: Any) -> None:
        record.close()

    def dispose(self) -> None:
        pass

    def recreate(self) -> OneShotPool:
        return self.__class__(self._creator, dialect=self._dialect, _dispatch=self.dispatch)

    def status(self) -> str:
        return "OneShotPool"


class AuditedQueuePool(QueuePool):
    """A user's QueuePool subclass whose _do_get calls super() (defined before instrument())."""

    checkouts = 0

    def _do_get(self) -> Any:
        type(self).checkouts += 1
        return super()._do_get()


def test_user_pool_subclass(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(poolclass=OneShotPool, pool_logging_name="oneshot")
    otel.instrument()
    with engine.connect() as first, engine.connect() as second:
        assert first.execute(SELECT_1).scalar() == second.execute(SELECT_1).scalar() == 1
        assert gauges(otel, "oneshot")["used"] == 2
    figures = gauges(otel, "oneshot")
    assert figures["used"] == 0 and figures["pending"] == 0, figures
    assert figures["idle"] == 0
    assert counter(otel, "sqlalchemy.pool.connection.closes", "oneshot") == 2
    hook_errors.assert_none()


def test_queue_pool_subclass_calling_super_counts_once(otel, hook_errors, make_sync_engine):
    engine = make_sync_engine(
        poolclass=AuditedQueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
        pool_logging_name="audited",
    )
    otel.instrument()
    held = engine.connect()
    with pytest.raises(sa.exc.TimeoutError):
        engine.connect()
    assert counter(otel, "db.client.connection.timeouts", "audited") == 1
    assert len(otel.spans("sqlalchemy.pool.wait")) == 1
    (span,) = otel.spans("sqlalchemy.pool.wait")
    assert span.attributes["sqlalchemy.pool.pending"] == 1
    wait_time = otel.value(
        "db.client.connection.wait_time", db__client__connection__pool__name="audited"
    )
    assert wait_time == 2
    held.close()
    figures = gauges(otel, "audited")
    assert figures["used"] == 0 and figures["pending"] == 0 and figures["idle"] == 1
    hook_errors.assert_none()


def test_pool_subclass_defined_after_instrument(otel, hook_errors, make_sync_engine):
    otel.instrument()

    class LatePool(QueuePool):
        def _do_get(self) -> Any:
            return super()._do_get()

    engine = make_sync_engine(
        poolclass=LatePool, pool_size=1, max_overflow=0, pool_timeout=0.05, pool_logging_name="late"
    )
    with engine.connect():
        assert gauges(otel, "late")["used"] == 1
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    assert counter(otel, "db.client.connection.timeouts", "late") == 1
    assert gauges(otel, "late")["used"] == 0
    hook_errors.assert_none()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_sqlite_engines(kind, otel, hook_errors, tmp_path):
    url = "sqlite://" if kind == "memory" else f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = sa.create_engine(url, pool_logging_name=f"sqlite-{kind}")
    otel.instrument(pg_activity=True, set_application_name=True, session_spans="all")
    with Session(engine) as session:
        assert session.execute(SELECT_1).scalar() == 1
        assert gauges(otel, f"sqlite-{kind}")["used"] == 1
        session.commit()
    assert gauges(otel, f"sqlite-{kind}")["used"] == 0
    assert len(otel.spans("sqlalchemy.session")) == 1
    assert otel.points("sqlalchemy.pool.pg.backends") == []  # not PostgreSQL: no sampler
    engine.dispose()
    hook_errors.assert_none()


# -- secrets ----------------------------------------------------------------------------------
def _scan_telemetry(otel: Any) -> list[str]:
    """Every string the instrumentation emitted, as text."""
    texts: list[str] = []
    data = otel.reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                texts += [metric.name, metric.description or "", metric.unit or ""]
                for point in metric.data.data_points:
                    texts.append(repr(dict(point.attributes or {})))
                    for exemplar in getattr(point, "exemplars", None) or []:
                        texts.append(repr(dict(exemplar.filtered_attributes or {})))
    for span in otel.exporter.get_finished_spans():
        texts += [span.name, repr(dict(span.attributes or {})), span.status.description or ""]
        for span_event in span.events:
            texts += [span_event.name, repr(dict(span_event.attributes or {}))]
        for link in span.links:
            texts.append(repr(dict(link.attributes or {})))
    return texts


def _scan_logs(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter()
    texts = []
    for record in records:
        texts += [record.getMessage(), repr(record.args), record.threadName or "", record.name]
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    return texts


@pytest.fixture
def secret_role(admin):
    role = f"r_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(12)}"
    admin.conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    yield role, password
    admin.terminate(
        [
            row[0]
            for row in admin.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,)
            ).fetchall()
        ]
    )
    admin.conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.parametrize("discovery", ["explicit-engines", "all-pools"])
async def test_secrets_never_emitted(discovery, otel, secret_role, sync_url, admin, caplog):
    role, password = secret_role
    query_secret = f"qs-{secrets.token_hex(12)}"
    query = {**sync_url.query, "passfile": f"/nonexistent/{query_secret}"}
    base = sync_url.set(username=role, password=password, query=query)
    sync_engine = sa.create_engine(
        base.set(query={**query, "sslpassword": query_secret}),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    from sqlalchemy.ext.asyncio import create_async_engine

    async_engine = create_async_engine(
        base.set(drivername="postgresql+asyncpg"), pool_size=1, max_overflow=0, pool_timeout=0.05
    )
    for url in (sync_engine.url, async_engine.url):
        assert password in url.render_as_string(hide_password=False)
        assert query_secret in str(url)  # the query string is not hidden by SQLAlchemy
    caplog.set_level(logging.DEBUG)
    options = {
        "session_spans": "all",
        "pg_activity": True,
        "pg_activity_interval_s": 0.1,
        "leak_threshold_s": 0.2,
        "set_application_name": True,
        "wait_span_threshold_ms": 0,
    }
    if discovery == "explicit-engines":
        options["engines"] = [sync_engine, async_engine]
    otel.instrument(**options)
    tracer = otel.tracer_provider.get_tracer("test")
    try:
        # Sync: a session, a timeout while a request holds the connection past the leak
        # threshold, a connection dropped without close (garbage collected), a disconnect.
        with tracer.start_as_current_span("GET /secret"):
            with Session(sync_engine) as session:
                assert session.execute(sa.text("SELECT current_user")).scalar() == role
                session.commit()
            held = sync_engine.connect()
            with pytest.raises(sa.exc.TimeoutError):
                sync_engine.connect()
            time.sleep(0.5)  # past leak_threshold_s: a long-hold report
            held_rows = holders(sync_engine)
            held.close()
        leaked = sync_engine.connect()
        leaked.execute(SELECT_1)
        del leaked
        gc.collect()
        with sync_engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        admin.terminate([pid])
        with pytest.raises(sa.exc.OperationalError), sync_engine.connect() as conn:
            conn.execute(SELECT_1)

        # Async: the same through asyncpg.
        async with async_engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT current_user"))).scalar() == role
            with pytest.raises(sa.exc.TimeoutError):
                await async_engine.connect()
            await asyncio.sleep(0.4)
        deadline = time.monotonic() + 5
        while not otel.points("sqlalchemy.pool.pg.backends") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

        texts = _scan_telemetry(otel) + _scan_logs(caplog.records)
        texts += [repr(row) for row in held_rows]
        texts += [thread.name for thread in threading.enumerate()]
        # The scan is not vacuous: the traffic produced what we scan.
        assert otel.spans("sqlalchemy.pool.wait") and otel.spans("sqlalchemy.session")
        assert otel.points("sqlalchemy.pool.pg.backends")
        assert counter(otel, "db.client.connection.timeouts", _pool_name(otel, sync_engine)) == 1
        assert [r for r in caplog.records if "leak threshold" in r.getMessage()]
        assert held_rows
        for secret in (password, query_secret):
            leaks = [text for text in texts if secret in text]
            assert not leaks, leaks[:3]
    finally:
        await async_engine.dispose()
        sync_engine.dispose()


def _pool_name(otel: Any, engine: sa.Engine) -> str:
    from opentelemetry.instrumentation.sqlalchemy_pool.recorder import POOL_RECORDER_ATTR

    return engine.pool.__dict__[POOL_RECORDER_ATTR].name
