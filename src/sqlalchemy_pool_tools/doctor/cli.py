"""``sqlalchemy-pool doctor``: read a window of pool figures, judge them, print the report.

Exit status: 0 every pool healthy, 1 problems found (or too little data to tell),
2 bad input or unreachable source (UserError, printed as one line by ``cli.main``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy_pool_tools.doctor.figures import (
    check_url,
    from_metrics_endpoint,
    from_prometheus,
    parse_window,
)
from sqlalchemy_pool_tools.doctor.report import exit_code, print_report
from sqlalchemy_pool_tools.doctor.verdict import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    diagnose,
)
from sqlalchemy_pool_tools.errors import UserError

DEFAULT_WINDOW = "5m"
DEFAULT_DURATION_S = 20.0
DEFAULT_INTERVAL_S = 1.0
# Sampling an endpoint longer than an hour is a job for Prometheus, not for a CLI that blocks.
MAX_DURATION_S = 3600.0

_EPILOG = """\
examples:
  sqlalchemy-pool doctor --prometheus http://prometheus:9090 --window 15m --selector 'job="api"'
  sqlalchemy-pool doctor --metrics-url http://127.0.0.1:9464/metrics --duration 30
  sqlalchemy-pool doctor --metrics-url http://a:9464/metrics --metrics-url http://b:9464/metrics

exit status: 0 healthy, 1 problems found or not enough data, 2 bad input or unreachable
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` sub-command (numbers are validated by ``run`` so every bad value
    is one clear UserError line)."""
    parser = subparsers.add_parser(
        "doctor",
        help="diagnose connection-pool exhaustion from metrics",
        description="Read pool metrics over a window (Prometheus or an app's /metrics "
        "endpoint), say what is wrong with each pool and what to do next.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source (one of)")
    source.add_argument("--prometheus", metavar="URL", help="Prometheus server base URL")
    source.add_argument(
        "--metrics-url",
        metavar="URL",
        action="append",
        help="an app's Prometheus text endpoint, sampled for --duration; repeat for several "
        "instances",
    )
    parser.add_argument("--pool", metavar="NAME", help="only this pool (default: every pool)")
    prom = parser.add_argument_group("with --prometheus")
    prom.add_argument("--window", help=f"look-back window, e.g. 15m (default {DEFAULT_WINDOW})")
    prom.add_argument("--selector", help='extra label matchers, e.g. job="api"')
    prom.add_argument("--at", metavar="TIME", help="evaluate at unix time or ISO 8601 (UTC)")
    sample = parser.add_argument_group("with --metrics-url")
    sample.add_argument(
        "--duration", metavar="S", help=f"sampling duration (default {DEFAULT_DURATION_S:g})"
    )
    sample.add_argument(
        "--interval", metavar="S", help=f"scrape interval (default {DEFAULT_INTERVAL_S:g})"
    )
    parser.add_argument(
        "--request-timeout",
        metavar="S",
        help="request timeout of the proxy/server in front of the app, for the "
        f"pool_timeout review (default: {DEFAULT_REQUEST_TIMEOUT_S:g} assumed, advice only)",
    )
    parser.add_argument(
        "--idle-timeout",
        metavar="S",
        default=str(DEFAULT_IDLE_TIMEOUT_S),
        help="shortest idle timeout between app and database, for the pool_recycle review "
        f"(default {DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def _seconds(flag: str, text: str | None, default: float, upper: float = math.inf) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a number of seconds") from None
    if not (0 < value <= upper) or math.isnan(value):
        limit = f" and at most {upper:g}" if upper != math.inf else ""
        raise UserError(f"{flag} {text!r}: must be greater than 0{limit}")
    return value


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--at {text!r}: expected unix seconds or ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def run(args: argparse.Namespace) -> int:
    """Validate, read the figures, diagnose every pool, print the report; return exit code."""
    prometheus: str | None = getattr(args, "prometheus", None)
    metrics_urls: Sequence[str] | None = getattr(args, "metrics_url", None)
    if bool(prometheus) == bool(metrics_urls):
        raise UserError("give exactly one source: --prometheus URL or --metrics-url URL")
    request_timeout = (
        _seconds("--request-timeout", args.request_timeout, DEFAULT_REQUEST_TIMEOUT_S)
        if args.request_timeout is not None
        else None  # unknown: the review assumes the default and only informs
    )
    idle_timeout = _seconds("--idle-timeout", args.idle_timeout, DEFAULT_IDLE_TIMEOUT_S)

    if prometheus:
        for flag, value in (("--duration", args.duration), ("--interval", args.interval)):
            if value is not None:
                raise UserError(f"{flag} applies to --metrics-url; use --window with --prometheus")
        base = check_url(prometheus, "Prometheus")
        window = args.window or DEFAULT_WINDOW
        parse_window(window)  # fail on a bad window before any network traffic
        at = _timestamp(args.at) if args.at else None
        source = f"Prometheus {base}, window {window}"
        figures = from_prometheus(base, args.pool, window, args.selector, at=at)
    else:
        for flag, value in (
            ("--window", args.window),
            ("--selector", args.selector),
            ("--at", args.at),
        ):
            if value is not None:
                raise UserError(
                    f"{flag} applies to --prometheus; use --duration with --metrics-url"
                )
        urls = [check_url(u, "metrics endpoint") for u in metrics_urls or ()]
        duration = _seconds("--duration", args.duration, DEFAULT_DURATION_S, MAX_DURATION_S)
        interval = _seconds("--interval", args.interval, DEFAULT_INTERVAL_S, duration)
        if sys.stderr.isatty():
            print(f"sampling {', '.join(urls)} for {duration:g} s ...", file=sys.stderr)
        source = f"metrics endpoint {', '.join(urls)}, sampled {duration:g} s"
        figures = from_metrics_endpoint(urls, duration, interval, pool=args.pool)

    diagnoses = [
        diagnose(fig, request_timeout_s=request_timeout, idle_timeout_s=idle_timeout)
        for fig in figures.values()
    ]
    print_report(diagnoses, source=source, as_json=args.json)
    return exit_code(diagnoses)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m sqlalchemy_pool_tools.doctor``), same contract as
    ``sqlalchemy-pool doctor``: a UserError is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="sqlalchemy-pool")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as exc:
        print(f"sqlalchemy-pool doctor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
