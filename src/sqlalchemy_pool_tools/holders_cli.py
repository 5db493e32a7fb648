"""``sqlalchemy-pool holders URL``: print who holds a running app's pool connections.

The app must add the optional holders route, e.g.::

    from opentelemetry.instrumentation.sqlalchemy_pool.holders import make_asgi_app
    app.add_route("/_debug/pool-holders", make_asgi_app())
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import UserError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "holders",
        help="print who holds the pool connections of a running app (its holders route)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url", help="the app's holders route, e.g. http://127.0.0.1:8000/_debug/pool-holders"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout in seconds")
    parser.set_defaults(func=run)


def fetch(url: str, timeout: float) -> dict[str, list[dict[str, Any]]]:
    import httpx

    if not url.startswith(("http://", "https://")):
        raise UserError(f"not an http(s) URL: {url!r}")
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
        return response.json()["pools"]
    except httpx.HTTPError as exc:
        raise UserError(f"cannot read holders from {url}: {exc}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{url} did not answer with a holders JSON document") from None


def render(pools: dict[str, list[dict[str, Any]]]) -> str:
    if not pools:
        return "no instrumented pools (is SQLAlchemyPoolInstrumentor enabled in the app?)"
    lines = []
    for pool, rows in pools.items():
        lines.append(f"pool {pool}: {len(rows)} connection(s) held")
        if rows:
            lines.append(
                f"  {'age':>8}  {'stmts':>5}  {'idle-in-tx':>10}  {'route':<24}  code site"
            )
        for row in rows:
            lines.append(
                f"  {row['age_s']:>7.2f}s  {row['statements']:>5}  "
                f"{row['idle_in_transaction_s']:>9.2f}s  {(row['http_route'] or '-'):<24}  "
                f"{row['code_site'] or '-'}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    pools = fetch(args.url, args.timeout)
    print(json.dumps(pools, indent=2) if args.json else render(pools))
    return 0
