"""Run the demo app under uvicorn on a loopback address.

    python -m sqlalchemy_pool_tools.demo.server --database-url postgresql://... \\
        --build leaky --port 8000 [--init-db]

(or the URL in $SQLALCHEMY_POOL_DEMO_DATABASE_URL, which keeps a password off ``ps``).

Used by ``sqlalchemy-pool demo`` (one subprocess per scenario) and handy on its own.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from sqlalchemy_pool_tools.demo import DATABASE_URL_ENV
from sqlalchemy_pool_tools.demo.app import BUILDS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sqlalchemy_pool_tools.demo.server")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help=f"postgresql:// URL (default: ${DATABASE_URL_ENV})",
    )
    parser.add_argument("--build", choices=BUILDS, default="fixed")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--max-overflow", type=int, default=5)
    parser.add_argument("--pool-timeout", type=float, default=5.0)
    parser.add_argument("--pool-recycle", type=int, default=1800)
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--slow-io-ms", type=float, default=500.0)
    parser.add_argument("--pool-name", default="demo")
    parser.add_argument("--pg-activity-interval", type=float, default=1.0)
    parser.add_argument("--leak-threshold", type=float, default=5.0)
    parser.add_argument("--sqlalchemy-spans", action="store_true")
    parser.add_argument("--init-db", action="store_true", help="create tables and data first")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the starting process dies"
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error(f"--database-url (or ${DATABASE_URL_ENV}) is required")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        parser.error("the demo app only binds loopback addresses")
    return args


def exit_with_parent() -> None:
    """The demo runner starts the app in a session of its own (a terminal Ctrl-C reaches only
    the runner, which then stops the app); should the runner be killed outright, the app
    must not outlive it. SIGTERM lets uvicorn shut down gracefully."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Stable HTTP semantic conventions: http.server.request.duration by http.route (the
    # doctor reads it, and it has far fewer series than the old per-URL http.target).
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    import uvicorn

    from sqlalchemy_pool_tools.demo.app import create_app, create_schema

    if args.exit_with_parent:
        exit_with_parent()
    if args.init_db:
        create_schema(args.database_url)
    app = create_app(
        args.database_url,
        args.build,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        pool_timeout=args.pool_timeout,
        pool_recycle=args.pool_recycle,
        work_ms=args.work_ms,
        slow_io_ms=args.slow_io_ms,
        pool_name=args.pool_name,
        pg_activity_interval_s=args.pg_activity_interval,
        leak_threshold_s=args.leak_threshold,
        sqlalchemy_spans=args.sqlalchemy_spans,
    )
    # One worker, no access log: the load generator measures, the app should not print.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
