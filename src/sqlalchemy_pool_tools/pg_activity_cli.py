"""``sqlalchemy-pool pg-activity``: what PostgreSQL's pg_stat_activity says right now.

One sample, on a connection of its own: backends by state for the application scope and
the whole server, the oldest open transaction and running query, the connection limits,
and the sessions idle in transaction the longest (with their last statement, truncated).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import TextIO

from sqlalchemy.engine import URL, make_url

from opentelemetry.instrumentation.sqlalchemy_pool.pg_activity import (
    SCOPE_APPLICATION,
    SCOPE_SERVER,
    STANDARD_STATES,
    PgActivitySampler,
    PgActivitySnapshot,
)
from sqlalchemy_pool_tools.errors import UserError

_QUERY_DISPLAY_LIMIT = 100


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pg-activity",
        help="sample pg_stat_activity once: backends by state, oldest transaction, "
        "connection limits, sessions idle in transaction",
        description="Sample PostgreSQL's pg_stat_activity once on a connection of its own "
        "and print the figures the instrumentor exports as sqlalchemy.pool.pg.* metrics, "
        "plus the sessions idle in transaction the longest. Seeing other roles' sessions "
        "needs pg_read_all_stats (or pg_monitor).",
    )
    parser.add_argument(
        "database_url",
        metavar="DATABASE_URL",
        nargs="?",
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db "
        "(default: $DATABASE_URL; prefer the variable, argv is visible to other users)",
    )
    parser.add_argument(
        "--top",
        type=_non_negative_int,
        default=10,
        help="how many idle-in-transaction sessions to list (default: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--application-name",
        dest="application_names",
        metavar="NAME",
        action="append",
        help="application scope = backends with this application_name (repeatable); "
        "default: backends of the URL's database and user",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="connect timeout in seconds (default: 5)",
    )
    parser.set_defaults(func=run)


def _parse_url(text: str | None) -> URL:
    if not text:
        text = os.environ.get("DATABASE_URL")
    if not text:
        raise UserError("no DATABASE_URL given (argument or environment variable)")
    try:
        url = make_url(text)
    except Exception:
        # never echo the text: it may hold a password
        raise UserError(
            "DATABASE_URL is not a valid database URL "
            "(expected postgresql[+driver]://user:password@host:port/dbname)"
        ) from None
    backend = url.get_backend_name()
    if backend != "postgresql":
        raise UserError(f"pg-activity needs a PostgreSQL URL, got a {backend!r} URL")
    return url


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    url = _parse_url(args.database_url)
    redacted = url.render_as_string(hide_password=True)
    sampler = PgActivitySampler(
        url,
        application_names=args.application_names,
        top=args.top,
        connect_timeout_s=getattr(args, "connect_timeout", 5.0),
    )
    try:
        snapshot = sampler.sample_once()
    finally:
        sampler.stop()
    if snapshot is None:
        raise UserError(f"cannot sample pg_stat_activity on {redacted}: {sampler.last_error}")
    if args.json:
        document = {"url": redacted, "driver": sampler.driver, **snapshot.to_dict()}
        document["taken_at_iso"] = _iso(snapshot.taken_at)
        json.dump(document, out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(format_report(snapshot, redacted, args.top))
    return 0


# --------------------------------------------------------------------------------------------
# Human output
# --------------------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _compact(query: str, limit: int = _QUERY_DISPLAY_LIMIT) -> str:
    text = " ".join(query.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows as aligned text; columns in ``right`` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_report(snapshot: PgActivitySnapshot, redacted_url: str, top: int) -> str:
    """The human-readable report (no password: ``redacted_url`` is already redacted)."""
    lines: list[str] = [f"pg_stat_activity of {redacted_url} at {_iso(snapshot.taken_at)}"]
    if snapshot.application_names is not None:
        scope = "application_name in " + ", ".join(
            repr(n) for n in sorted(snapshot.application_names)
        )
    else:
        scope = f"database {snapshot.database!r}, user {snapshot.user!r}"
    lines.append(f"application scope: {scope} (this tool's own connection excluded)")
    lines.append("")

    limits: list[str] = []
    if snapshot.max_connections is not None:
        limits.append(f"max_connections {snapshot.max_connections}")
    if snapshot.reserved_connections is not None:
        limits.append(f"reserved {snapshot.reserved_connections}")
    limits.append(f"client backends {snapshot.total_backends}")
    if snapshot.max_connections is not None and snapshot.reserved_connections is not None:
        free = snapshot.max_connections - snapshot.reserved_connections - snapshot.total_backends
        limits.append(f"free for ordinary roles {free}")
    lines.append("connections: " + ", ".join(limits))
    lines.append("")

    states = list(STANDARD_STATES)
    for scope_counts in snapshot.backends_by_state.values():
        states += [s for s in scope_counts if s not in states]
    rows = [["backends", SCOPE_APPLICATION, SCOPE_SERVER]]
    for state in states:
        rows.append(
            [
                state,
                str(snapshot.backends_by_state[SCOPE_APPLICATION].get(state, 0)),
                str(snapshot.backends_by_state[SCOPE_SERVER].get(state, 0)),
            ]
        )
    rows.append(
        [
            "total",
            str(snapshot.backends(SCOPE_APPLICATION)),
            str(snapshot.backends(SCOPE_SERVER)),
        ]
    )
    rows.append(
        [
            "oldest transaction age",
            _age(snapshot.oldest_transaction_age_s[SCOPE_APPLICATION]),
            _age(snapshot.oldest_transaction_age_s[SCOPE_SERVER]),
        ]
    )
    rows.append(
        [
            "oldest query age",
            _age(snapshot.oldest_query_age_s[SCOPE_APPLICATION]),
            _age(snapshot.oldest_query_age_s[SCOPE_SERVER]),
        ]
    )
    lines += _table(rows, right={1, 2})
    if snapshot.hidden_backends:
        lines.append("")
        lines.append(
            f"note: {snapshot.hidden_backends} backend(s) of other roles are counted as "
            "'unknown': grant pg_read_all_stats (or pg_monitor) to see their state"
        )

    lines.append("")
    if top == 0:
        pass
    elif not snapshot.idle_in_transaction:
        lines.append("no session is idle in transaction")
    else:
        lines.append(f"idle in transaction the longest (top {top}):")
        table: list[list[str]] = [["pid", "application", "xact age", "idle for", "last query"]]
        for s in snapshot.idle_in_transaction:
            app = s.application_name or "-"
            if s.state != "idle in transaction":
                app += " (aborted)"
            table.append(
                [
                    str(s.pid),
                    app,
                    _age(s.transaction_age_s),
                    _age(s.state_age_s),
                    _compact(s.query),
                ]
            )
        lines += _table(table, right={0, 2, 3})
    return "\n".join(lines) + "\n"
