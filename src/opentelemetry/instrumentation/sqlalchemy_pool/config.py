"""Every option of the instrumentor: keyword argument, environment variable, default, parsing.

Precedence: keyword argument > ``OTEL_PYTHON_SQLALCHEMY_POOL_*`` environment variable > default.
An invalid value never raises: it logs one warning naming the option and uses the default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_logger = logging.getLogger(__name__)

ENV_PREFIX = "OTEL_PYTHON_SQLALCHEMY_POOL_"

SESSION_SPANS_ALL = "all"
SESSION_SPANS_ANOMALIES = "anomalies"
SESSION_SPANS_NONE = "none"
_SESSION_SPAN_MODES = (SESSION_SPANS_ALL, SESSION_SPANS_ANOMALIES, SESSION_SPANS_NONE)

STATEMENT_TIMING_SESSIONS = "sessions"
STATEMENT_TIMING_ALL = "all"
STATEMENT_TIMING_OFF = "off"
_STATEMENT_TIMING_MODES = (STATEMENT_TIMING_SESSIONS, STATEMENT_TIMING_ALL, STATEMENT_TIMING_OFF)


@dataclass(frozen=True)
class Option:
    """One option: its kwarg name, env var, default and parser (str -> value, raises ValueError).

    ``doc`` is the option's row in the README's option table (markdown), ``shown_default`` its
    default there when the value itself says too little (tests/test_docs.py keeps them equal).
    """

    name: str
    default: Any
    parse: Callable[[str], Any]
    doc: str
    shown_default: str = ""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ValueError("must be a finite number >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return lowered

    return parse


def _pool_name(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        raise ValueError("must not be empty")
    return stripped


OPTIONS: tuple[Option, ...] = (
    Option("pool_name", None, _pool_name,
           '`db.client.connection.pool.name`; a callable `(pool) -> str` as kwarg. Never contains '
           'credentials; a second pool with the same name gets `#2`',
           shown_default="pool's `logging_name`, else `host:port/database`"),
    Option("wait_span_threshold_ms", 100.0, _non_negative_float,
           'a checkout that waited at least this long gets a `sqlalchemy.pool.wait` span; timeouts '
           'always do'),
    Option("wait_spans_per_s", 10.0, _non_negative_float,
           'at most this many slow-wait spans per second per pool (`0` = no limit): at saturation '
           'most checkouts cross the threshold, a few spans per second show the picture. Timeouts '
           'always get a span; the next span carries `sqlalchemy.pool.waits_without_span`. '
           '`wait_time` records every checkout regardless'),
    Option("session_spans", SESSION_SPANS_ANOMALIES, _one_of(*_SESSION_SPAN_MODES),
           '`all`, `anomalies` (held ≥ threshold, outlived its response, or garbage collected) or '
           '`none`; metrics are recorded either way'),
    Option("session_span_threshold_ms", 1000.0, _non_negative_float,
           'the duration that makes a session an anomaly'),
    Option("statement_timing", STATEMENT_TIMING_SESSIONS, _one_of(*_STATEMENT_TIMING_MODES),
           'which engines have their statements timed (held-idle time, statement counts on '
           'holders, open-transaction-at-checkin check): `sessions` = an engine from the moment a '
           '`Session`/`AsyncSession` first uses it, `all` = every engine (Core-only apps), `off` = '
           'none (and no statement wrapper at all). Statements are timed by a wrapper of '
           '`Connection._execute_context`; the open-transaction check is a wrapper of '
           '`_ConnectionFairy._reset`, installed with the first timed engine (no pool event '
           'listener on the hot path)'),
    Option("leak_threshold_s", 30.0, _non_negative_float,
           'report a connection still checked out after this long (`0` = off). 30 s is above any '
           'sane request timeout, so it only fires on real leaks and stuck work'),
    Option("capture_code_site", True, _bool,
           'name the user code (first frame outside SQLAlchemy, this package, FastAPI/Starlette, '
           'asyncio, stdlib) holding each connection/session. Resolved only when asked (wait '
           'span links, holders, leak reports): the line a live holder runs now, else its '
           "request's endpoint; no stack walk at checkout except with `session_spans=all` and "
           'in plain threads outside any request'),
    Option("holders_limit", 5, _positive_int,
           'how many of the oldest holders a wait span links to'),
    Option("holders_log_interval_s", 60.0, _non_negative_float,
           'at most one "who holds the pool" WARNING per pool per interval'),
    Option("pg_activity", False, _bool,
           'sample `pg_stat_activity` for PostgreSQL pools on a dedicated connection and thread'),
    Option("pg_activity_interval_s", 15.0, _non_negative_float,
           'seconds between samples'),
    Option("set_application_name", False, _bool,
           'set `application_name` per pool at connect, so server rows map to pools'),
    Option("event_loop_monitor", True, _bool,
           'watch the asyncio event loop the app runs on (lag, busy time, the code sites that '
           'block it; a watchdog thread) and export process CPU time, so the doctor can tell a '
           'blocked or CPU-bound worker from a small pool'),
    Option("event_loop_block_threshold_ms", 20.0, _non_negative_float,
           'a loop iteration at least this long counts as blocked: the watchdog samples the '
           'loop thread\'s stack once and its time goes to `sqlalchemy.pool.event_loop.'
           'blocked_time` under the first user frame'),
    Option("slow_statement_threshold_ms", 100.0, _non_negative_float,
           'a timed statement at least this long adds its time to `sqlalchemy.pool.statement.'
           'slow_time` by the code site that took the connection and the route (`0` = off); '
           'faster statements cost one comparison'),
)  # fmt: skip

OPTIONS_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Config:
    pool_name: str | Callable[[Any], str] | None
    wait_span_threshold_ms: float
    wait_spans_per_s: float
    session_spans: str
    session_span_threshold_ms: float
    statement_timing: str
    leak_threshold_s: float
    capture_code_site: bool
    holders_limit: int
    holders_log_interval_s: float
    pg_activity: bool
    pg_activity_interval_s: float
    set_application_name: bool
    event_loop_monitor: bool
    event_loop_block_threshold_ms: float
    slow_statement_threshold_ms: float

    @property
    def wait_span_threshold_s(self) -> float:
        return self.wait_span_threshold_ms / 1000.0

    @property
    def session_span_threshold_s(self) -> float:
        return self.session_span_threshold_ms / 1000.0


def _resolve(option: Option, kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    if option.name in kwargs and kwargs[option.name] is not None:
        value = kwargs[option.name]
        if option.name == "pool_name" and callable(value):
            return value
        source = f"{option.name}={value!r}"
        try:
            # Parse kwargs through the same validator as env values: one rule for both.
            return option.parse(value if isinstance(value, str) else _as_text(value))
        except (TypeError, ValueError) as exc:
            _warn(source, exc, option.default)
            return option.default
    raw = environ.get(option.env)
    if raw is None or raw.strip() == "":
        return option.default
    try:
        return option.parse(raw)
    except (TypeError, ValueError) as exc:
        _warn(f"{option.env}={raw!r}", exc, option.default)
        return option.default


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"unsupported type {type(value).__name__}")


def _warn(source: str, exc: Exception, default: Any) -> None:
    _logger.warning(
        "opentelemetry-instrumentation-sqlalchemy-pool: invalid %s (%s); using default %r",
        source,
        exc,
        default,
    )


def load_config(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration from instrument() kwargs and the environment."""
    env = os.environ if environ is None else environ
    values = {option.name: _resolve(option, kwargs, env) for option in OPTIONS}
    return Config(**values)
