"""Every metric, span and attribute name this package emits, in one place.

Names under ``db.client.connection.*`` are the OpenTelemetry semantic conventions for
database client connection pools (semconv 1.26+; unit and instrument kind as specified there).
Everything the conventions do not cover lives under ``sqlalchemy.pool.*`` /
``sqlalchemy.session.*`` so it can never collide with a future convention.

Prometheus names (via the collector's ``prometheus`` exporter or
``opentelemetry-exporter-prometheus``): dots become underscores, the unit is appended
(``_seconds``), counters get ``_total``; e.g. ``db_client_connection_wait_time_seconds_bucket``,
``db_client_connection_timeouts_total``, ``sqlalchemy_pool_connection_closes_total``.
"""

from __future__ import annotations

from typing import Final

# --- semantic-convention metrics -------------------------------------------------------------
CONNECTION_COUNT: Final = "db.client.connection.count"  # UpDownCounter {connection}
CONNECTION_MAX: Final = "db.client.connection.max"  # UpDownCounter {connection}
CONNECTION_IDLE_MAX: Final = "db.client.connection.idle.max"  # UpDownCounter {connection}
CONNECTION_PENDING_REQUESTS: Final = "db.client.connection.pending_requests"  # {request}
CONNECTION_TIMEOUTS: Final = "db.client.connection.timeouts"  # Counter {timeout}
CONNECTION_WAIT_TIME: Final = "db.client.connection.wait_time"  # Histogram s
CONNECTION_CREATE_TIME: Final = "db.client.connection.create_time"  # Histogram s
CONNECTION_USE_TIME: Final = "db.client.connection.use_time"  # Histogram s

# --- this package's own metrics --------------------------------------------------------------
# Time a checked-out connection spent with no statement running (idle in transaction, or
# simply held across unrelated awaits). Recorded per checkout beside use_time.
CONNECTION_HELD_IDLE_TIME: Final = "sqlalchemy.pool.connection.held_idle_time"  # Histogram s
# Connections closed or thrown away by the pool, by reason (churn).
CONNECTION_CLOSES: Final = "sqlalchemy.pool.connection.closes"  # Counter {connection}
# Leaks and long holds, by kind (see LEAK_KIND_*).
LEAKS: Final = "sqlalchemy.pool.leaks"  # Counter {event}
# Pool configuration as numbers so the doctor and dashboards can review it.
CONFIG_TIMEOUT: Final = "sqlalchemy.pool.config.timeout"  # Gauge s
CONFIG_RECYCLE: Final = "sqlalchemy.pool.config.recycle"  # Gauge s (-1 = never)
CONFIG_PRE_PING: Final = "sqlalchemy.pool.config.pre_ping"  # Gauge 1/0
# Async session factories seen with expire_on_commit=True (a classic async footgun).
SESSIONS_EXPIRE_ON_COMMIT: Final = "sqlalchemy.session.expire_on_commit"  # Gauge 1/0

# Server-side figures from pg_stat_activity (optional sampler).
PG_BACKENDS: Final = "sqlalchemy.pool.pg.backends"  # Gauge {connection}; state, scope
PG_OLDEST_XACT_AGE: Final = "sqlalchemy.pool.pg.oldest_transaction_age"  # Gauge s; scope
PG_OLDEST_QUERY_AGE: Final = "sqlalchemy.pool.pg.oldest_query_age"  # Gauge s; scope
PG_MAX_CONNECTIONS: Final = "sqlalchemy.pool.pg.max_connections"  # Gauge {connection}
PG_RESERVED_CONNECTIONS: Final = "sqlalchemy.pool.pg.reserved_connections"  # Gauge

# --- attributes ------------------------------------------------------------------------------
POOL_NAME: Final = "db.client.connection.pool.name"
CONNECTION_STATE: Final = "db.client.connection.state"
STATE_IDLE: Final = "idle"
STATE_USED: Final = "used"
ERROR_TYPE: Final = "error.type"
HTTP_ROUTE: Final = "http.route"
CODE_FUNCTION: Final = "code.function.name"
CODE_FILE: Final = "code.file.path"
CODE_LINE: Final = "code.line.number"

CLOSE_REASON: Final = "sqlalchemy.pool.close.reason"
CLOSE_REASON_RECYCLE: Final = "recycle"
CLOSE_REASON_INVALIDATED: Final = "invalidated"
CLOSE_REASON_PRE_PING: Final = "pre_ping_failed"
CLOSE_REASON_OVERFLOW: Final = "overflow"
CLOSE_REASON_DISPOSE: Final = "dispose"
CLOSE_REASON_NULLPOOL: Final = "returned"
CLOSE_REASON_DETACHED: Final = "detached"
CLOSE_REASON_ERROR: Final = "error"

LEAK_KIND: Final = "sqlalchemy.pool.leak.kind"
LEAK_KIND_LONG_HOLD: Final = "long_hold"
LEAK_KIND_OUTLIVED_RESPONSE: Final = "outlived_response"
LEAK_KIND_GARBAGE_COLLECTED: Final = "garbage_collected"
LEAK_KIND_OPEN_TRANSACTION_AT_CHECKIN: Final = "open_transaction_at_checkin"
# Every value of the two attributes above (each counter series starts at 0 for a new pool).
CLOSE_REASONS: Final = (
    CLOSE_REASON_RECYCLE, CLOSE_REASON_INVALIDATED, CLOSE_REASON_PRE_PING, CLOSE_REASON_OVERFLOW,
    CLOSE_REASON_DISPOSE, CLOSE_REASON_NULLPOOL, CLOSE_REASON_DETACHED, CLOSE_REASON_ERROR,
)  # fmt: skip
LEAK_KINDS: Final = (
    LEAK_KIND_LONG_HOLD, LEAK_KIND_OUTLIVED_RESPONSE, LEAK_KIND_GARBAGE_COLLECTED,
    LEAK_KIND_OPEN_TRANSACTION_AT_CHECKIN,
)  # fmt: skip

PG_STATE: Final = "sqlalchemy.pool.pg.state"
PG_SCOPE: Final = "sqlalchemy.pool.pg.scope"  # "application" | "server"

# Wait span attributes.
POOL_SIZE: Final = "sqlalchemy.pool.size"
POOL_MAX_OVERFLOW: Final = "sqlalchemy.pool.max_overflow"
POOL_CHECKED_OUT: Final = "sqlalchemy.pool.checked_out"
POOL_PENDING: Final = "sqlalchemy.pool.pending"
POOL_TIMEOUT: Final = "sqlalchemy.pool.timeout"
POOL_CLASS: Final = "sqlalchemy.pool.class"
# Slow waits of this pool that got no span (wait_spans_per_s budget) since the previous span.
WAITS_WITHOUT_SPAN: Final = "sqlalchemy.pool.waits_without_span"
# Holders snapshot (pool-timeout forensics) on wait spans.
HOLDERS_COUNT: Final = "sqlalchemy.pool.holders.count"
HOLDERS_TOP_SITES: Final = "sqlalchemy.pool.holders.top_code_sites"
HOLDERS_IDLE_IN_TX_SHARE: Final = "sqlalchemy.pool.holders.idle_in_transaction_share"
HOLDER_AGE: Final = "sqlalchemy.pool.holder.age"
HOLDER_STATEMENTS: Final = "sqlalchemy.pool.holder.statements"
HOLDER_IDLE_IN_TX: Final = "sqlalchemy.pool.holder.idle_in_transaction"

# Session span attributes.
SESSION_STATEMENTS: Final = "sqlalchemy.session.statements"
SESSION_TRANSACTIONS: Final = "sqlalchemy.session.transactions"
SESSION_OUTCOME: Final = "sqlalchemy.session.outcome"
SESSION_HELD_IDLE: Final = "sqlalchemy.session.held_idle"  # seconds, double
SESSION_OUTLIVED_RESPONSE: Final = "sqlalchemy.session.outlived_response"
SESSION_ASYNC: Final = "sqlalchemy.session.async"
# On the OUTLIVED_RESPONSE_EVENT: what the session did after its response was sent.
OUTLIVED_ACTION: Final = "sqlalchemy.session.outlived_action"
OUTLIVED_TOOK_CONNECTION: Final = "took_connection"
OUTLIVED_RAN_STATEMENT: Final = "ran_statement"
OUTLIVED_HELD_AT_REQUEST_END: Final = "held_at_request_end"
OUTCOME_COMMIT: Final = "commit"
OUTCOME_ROLLBACK: Final = "rollback"
OUTCOME_CLOSE: Final = "close"
OUTCOME_GARBAGE_COLLECTED: Final = "garbage_collected"

# --- spans and span events -------------------------------------------------------------------
WAIT_SPAN_NAME: Final = "sqlalchemy.pool.wait"
SESSION_SPAN_NAME: Final = "sqlalchemy.session"
LONG_HOLD_EVENT: Final = "sqlalchemy.pool.long_hold"
# On the session span, at the moment the session was flagged (attribute OUTLIVED_ACTION).
OUTLIVED_RESPONSE_EVENT: Final = "sqlalchemy.session.outlived_response"

# --- histogram buckets (seconds): 100 µs .. 30 s -----------------------------------------------
DURATION_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# --- around the pool: what only looks like a pool problem ------------------------------------
# Event-loop health (asyncio apps; eventloop.py). Modelled on the Node.js conventions
# (nodejs.eventloop.delay / nodejs.eventloop.time{state}), in this package's namespace.
EVENT_LOOP_LAG: Final = "sqlalchemy.pool.event_loop.lag"  # Histogram s
EVENT_LOOP_TIME: Final = "sqlalchemy.pool.event_loop.time"  # Counter s; state
EVENT_LOOP_BLOCKED_TIME: Final = "sqlalchemy.pool.event_loop.blocked_time"  # Counter s; code.*
# The loop thread's scheduler time (Linux schedstat): on a CPU, or runnable but waiting for
# one (the host is short of CPU). Tells a CPU-bound loop from one blocked in a sleeping call.
EVENT_LOOP_THREAD_TIME: Final = "sqlalchemy.pool.event_loop.thread.time"  # Counter s; state
EVENT_LOOP_THREAD_STATE: Final = "sqlalchemy.pool.event_loop.thread.state"
EVENT_LOOP_THREAD_STATE_CPU: Final = "cpu"
EVENT_LOOP_THREAD_STATE_RUNQUEUE: Final = "runqueue"
EVENT_LOOP_STATE: Final = "sqlalchemy.pool.event_loop.state"
EVENT_LOOP_STATE_ACTIVE: Final = "active"
EVENT_LOOP_STATE_IDLE: Final = "idle"
# Process CPU (process.py): semconv process.cpu.time's meaning, in our namespace.
PROCESS_CPU_TIME: Final = "sqlalchemy.pool.process.cpu.time"  # Counter s; cpu.mode
CPU_MODE: Final = "cpu.mode"
# Connects that failed, by error.type (the DBAPI error class) and, when the driver gives one,
# db.response.status_code (SQLSTATE; 53300 = the server has no connection slot left).
CONNECTION_CONNECT_ERRORS: Final = "sqlalchemy.pool.connection.connect_errors"  # Counter
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"
# Time in statements longer than slow_statement_threshold_ms, by code site and route: only
# slow statements are recorded, so the common checkout pays a comparison.
SLOW_STATEMENT_TIME: Final = "sqlalchemy.pool.statement.slow_time"  # Counter s; code.*, route
# On held_idle_time: whether the idle time was inside a database transaction.
HELD_IDLE_IN_TRANSACTION: Final = "sqlalchemy.pool.held_idle.in_transaction"  # bool
