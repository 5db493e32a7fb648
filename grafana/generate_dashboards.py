"""Dashboards as code: writes grafana/dashboards/*.json (the output is committed).

    python grafana/generate_dashboards.py          # rewrite the JSON files
    python grafana/generate_dashboards.py --check  # exit 1 if the committed JSON is stale

Every query uses only metric names from docs/CONTRACT.md, the HTTP server duration metric of
the ASGI/FastAPI instrumentation (``OTEL_SEMCONV_STABILITY_OPT_IN=http``) and the collector's
span metrics (``traces_span_metrics_*``). Every aggregation keeps (job, instance, pool) so the
queries work for a direct scrape and for the collector's prometheus exporter alike.
Template variables are only used inside ``=~`` matchers (tests/pipeline/queries.py relies on it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
PROM = {"type": "prometheus", "uid": "prometheus"}

POOL = "db_client_connection_pool_name"
BY = f"job, instance, {POOL}"
SEL = f'job=~"$job", instance=~"$instance", {POOL}=~"$pool"'
# Σ over instances: ignores the instance variable on purpose.
SEL_ALL_INSTANCES = f'job=~"$job", {POOL}=~"$pool"'
SEL_PROC = 'job=~"$job", instance=~"$instance"'
HTTP_SEL = 'job=~"$job", instance=~"$instance", http_route=~"$route"'
WAIT_SPAN_SEL = f'span_name="sqlalchemy.pool.wait", {SEL}'
RATE = "$__rate_interval"


def q(expr: str, legend: str, *, exemplar: bool = False, instant: bool = False) -> dict:
    target: dict[str, Any] = {"datasource": PROM, "expr": expr, "legendFormat": legend}
    if exemplar:
        target["exemplar"] = True
    if instant:
        target.update(instant=True, range=False, format="table")
    return target


def quantiles(metric: str, sel: str, by: str, legend: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [
        q(
            f"histogram_quantile({x}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
            f"p{round(x * 100)} {legend}",
            exemplar=True,
        )
        for x in qs
    ]


def used_ratio(sel: str) -> str:
    return (
        f'sum by ({BY}) (db_client_connection_count{{db_client_connection_state="used", {sel}}})'
        f" / sum by ({BY}) (db_client_connection_max{{{sel}}} > 0)"
    )


def usable_max_connections(sel: str) -> str:
    by = f"job, {POOL}"
    return (
        f"(max by ({by}) (sqlalchemy_pool_pg_max_connections{{{sel}}})"
        f" - (max by ({by}) (sqlalchemy_pool_pg_reserved_connections{{{sel}}})"
        f" or max by ({by}) (sqlalchemy_pool_pg_max_connections{{{sel}}}) * 0))"
    )


class Layout:
    """Assigns ids and grid positions: panels flow left to right, 24 columns wide."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(
        self,
        title: str,
        targets: list[dict],
        *,
        w: int = 12,
        h: int = 8,
        unit: str = "short",
        kind: str = "timeseries",
        description: str = "",
        thresholds: list[tuple[float, str]] | None = None,
        base_color: str = "green",
        bars: bool = False,
        minimum: float | None = 0,
        maximum: float | None = None,
        options: dict | None = None,
        transformations: list[dict] | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        steps: list[dict[str, Any]] = [{"color": base_color, "value": None}]
        steps += [{"color": color, "value": value} for value, color in thresholds or []]
        defaults: dict[str, Any] = {
            "unit": unit,
            "thresholds": {"mode": "absolute", "steps": steps},
        }
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "bars" if bars else "line",
                "lineWidth": 1,
                "fillOpacity": 60 if bars else 10,
                "showPoints": "never",
                "spanNulls": False,
                "thresholdsStyle": {"mode": "dashed" if thresholds else "off"},
            }
        for ref, target in zip("ABCDEFGH", targets, strict=False):
            target["refId"] = ref
        panel: dict[str, Any] = {
            "id": self._id(),
            "type": kind,
            "title": title,
            "description": description,
            "datasource": PROM,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options
            or {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": targets,
        }
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": PROM,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
    }


POOL_VARIABLES = [
    variable("job", "Job / service", "label_values(db_client_connection_max, job)"),
    variable(
        "instance", "Instance", 'label_values(db_client_connection_max{job=~"$job"}, instance)'
    ),
    variable(
        "pool",
        "Pool",
        f'label_values(db_client_connection_max{{job=~"$job", instance=~"$instance"}}, {POOL})',
    ),
]


def dashboard(uid: str, title: str, description: str, layout: Layout, variables: list) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["sqlalchemy-pool", "opentelemetry"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: every panel on the same time axis
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["sqlalchemy-pool"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "SQLAlchemy pool",
            }
        ],
        "templating": {"list": variables},
        "panels": layout.panels,
    }


def pool_overview() -> dict:
    lay = Layout()
    lay.row("Pool state")
    lay.panel(
        "Connections: used / idle / max",
        [
            q(
                f"sum by ({BY}, db_client_connection_state) (db_client_connection_count{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} {{db_client_connection_state}}",
            ),
            q(
                f"sum by ({BY}) (db_client_connection_max{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} max",
            ),
            q(
                f"sum by ({BY}) (db_client_connection_idle_max{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} idle max",
            ),
        ],
        description="db.client.connection.count by state against db.client.connection.max "
        "(pool_size + max_overflow) and idle.max (pool_size).",
    )
    lay.panel(
        "Utilisation (used / max)",
        [q(used_ratio(SEL), "{{instance}} {{db_client_connection_pool_name}}")],
        unit="percentunit",
        thresholds=[(0.75, "orange"), (0.9, "red")],
        maximum=1,
        description="Alert SQLAlchemyPoolSaturated fires at 90% for 5 minutes.",
    )
    lay.panel(
        "Pending checkouts",
        [
            q(
                f"sum by ({BY}) (db_client_connection_pending_requests{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}}",
            )
        ],
        w=8,
        description="Callers waiting for a connection right now.",
    )
    lay.panel(
        "Checkout wait p50 / p95 / p99",
        quantiles(
            "db_client_connection_wait_time_seconds",
            SEL,
            BY,
            "{{instance}} {{db_client_connection_pool_name}}",
        ),
        w=8,
        unit="s",
        description="Exemplars link to the trace (sqlalchemy.pool.wait span, holders as links).",
    )
    lay.panel(
        "Checkout timeouts /s",
        [
            q(
                f"sum by ({BY}) (rate(db_client_connection_timeouts_total{{{SEL}}}[{RATE}]))",
                "{{instance}} {{db_client_connection_pool_name}}",
                exemplar=True,
            )
        ],
        w=8,
        unit="ops",
        bars=True,
        thresholds=[(0.0001, "red")],
        description="sqlalchemy.exc.TimeoutError raised by checkouts (pool_timeout reached).",
    )

    lay.row("Holding connections")
    lay.panel(
        "Use time p50 / p95 / p99",
        quantiles(
            "db_client_connection_use_time_seconds",
            SEL,
            BY,
            "{{instance}} {{db_client_connection_pool_name}}",
        ),
        w=8,
        unit="s",
        description="Checkout to checkin: how long each connection is held.",
    )
    lay.panel(
        "Held-idle share (held idle / use time)",
        [
            q(
                f"sum by ({BY}) "
                f"(rate(sqlalchemy_pool_connection_held_idle_time_seconds_sum{{{SEL}}}[{RATE}]))"
                f" / sum by ({BY}) "
                f"(rate(db_client_connection_use_time_seconds_sum{{{SEL}}}[{RATE}]))",
                "{{instance}} {{db_client_connection_pool_name}}",
            )
        ],
        w=8,
        unit="percentunit",
        maximum=1,
        thresholds=[(0.5, "orange"), (0.8, "red")],
        description="Share of the holding time with no statement running: connections held "
        "across awaits, external calls or idle in transaction.",
    )
    lay.panel(
        "Checkouts /s",
        [
            q(
                f"sum by ({BY}) "
                f"(rate(db_client_connection_use_time_seconds_count{{{SEL}}}[{RATE}]))",
                "{{instance}} {{db_client_connection_pool_name}}",
            )
        ],
        w=8,
        unit="ops",
        description="Connections returned per second: the pool's throughput. With use time p95 "
        "it gives the load (Little's law: used = checkouts/s x mean use time).",
    )
    lay.panel(
        "Leaks by kind",
        [
            q(
                f"sum by ({BY}, sqlalchemy_pool_leak_kind) "
                f"(increase(sqlalchemy_pool_leaks_total{{{SEL}}}[{RATE}]))",
                "{{instance}} {{db_client_connection_pool_name}} {{sqlalchemy_pool_leak_kind}}",
                exemplar=True,
            )
        ],
        bars=True,
        description="long_hold, outlived_response, garbage_collected, "
        "open_transaction_at_checkin. Flagged sessions are always kept by tail sampling.",
    )
    lay.panel(
        "Pool configuration",
        [
            q(f"max by ({BY}) (sqlalchemy_pool_config_timeout_seconds{{{SEL}}})", "", instant=True),
            q(f"max by ({BY}) (sqlalchemy_pool_config_recycle_seconds{{{SEL}}})", "", instant=True),
            q(f"max by ({BY}) (sqlalchemy_pool_config_pre_ping{{{SEL}}})", "", instant=True),
            q(
                f"max by (job, instance) (sqlalchemy_session_expire_on_commit{{{SEL_PROC}}})",
                "",
                instant=True,
            ),
        ],
        kind="table",
        minimum=None,
        options={"showHeader": True, "cellHeight": "sm"},
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "Value #A": "pool_timeout (s)",
                        "Value #B": "pool_recycle (s, -1 never)",
                        "Value #C": "pre_ping",
                        "Value #D": "expire_on_commit (async sessions)",
                    },
                },
            },
        ],
        description="pool_timeout, pool_recycle, pool_pre_ping; expire_on_commit=1 on an async "
        "session factory is a classic lazy-load footgun.",
    )

    by_route = f"job, {POOL}, http_route"
    lay.panel(
        "Use time p95 by route (top 10)",
        [
            q(
                f"topk(10, histogram_quantile(0.95, sum by ({by_route}, le) "
                f"(rate(db_client_connection_use_time_seconds_bucket{{{SEL}}}[{RATE}]))))",
                "{{http_route}} ({{job}} {{db_client_connection_pool_name}})",
                exemplar=True,
            )
        ],
        unit="s",
        description="Connection hold time by the HTTP route that took the connection (route "
        "templates, at most 50 per pool, then 'other'; no route outside requests).",
    )
    lay.panel(
        "Held-idle share by route (top 10)",
        [
            q(
                f"topk(10, sum by ({by_route}) "
                f"(rate(sqlalchemy_pool_connection_held_idle_time_seconds_sum{{{SEL}}}[{RATE}]))"
                f" / sum by ({by_route}) "
                f"(rate(db_client_connection_use_time_seconds_sum{{{SEL}}}[{RATE}])))",
                "{{http_route}} ({{job}} {{db_client_connection_pool_name}})",
            )
        ],
        unit="percentunit",
        maximum=1,
        thresholds=[(0.5, "orange"), (0.8, "red")],
        description="Routes that hold connections without using them: the first place to look "
        "in the session-lifecycle step of the runbook.",
    )

    lay.row("Connection churn")
    lay.panel(
        "Connect (create) time p50 / p99",
        quantiles(
            "db_client_connection_create_time_seconds",
            SEL,
            BY,
            "{{instance}} {{db_client_connection_pool_name}}",
            qs=(0.5, 0.99),
        ),
        unit="s",
    )
    lay.panel(
        "Closes by reason /s",
        [
            q(
                f"sum by ({BY}, sqlalchemy_pool_close_reason) "
                f"(rate(sqlalchemy_pool_connection_closes_total{{{SEL}}}[{RATE}]))",
                "{{instance}} {{db_client_connection_pool_name}} {{sqlalchemy_pool_close_reason}}",
            )
        ],
        unit="ops",
        bars=True,
        description="recycle, invalidated, pre_ping_failed, overflow, dispose, returned, "
        "detached, error.",
    )

    lay.row("PostgreSQL server (pg_stat_activity sampler, pg_activity=True)")
    lay.panel(
        "Backends by state (this application)",
        [
            q(
                f"sum by ({BY}, sqlalchemy_pool_pg_state) "
                f'(sqlalchemy_pool_pg_backends{{sqlalchemy_pool_pg_scope="application", {SEL}}})',
                "{{instance}} {{db_client_connection_pool_name}} {{sqlalchemy_pool_pg_state}}",
            )
        ],
        w=8,
    )
    lay.panel(
        "Backends by state (whole server)",
        [
            q(
                f"max by (job, {POOL}, sqlalchemy_pool_pg_state) "
                f'(sqlalchemy_pool_pg_backends{{sqlalchemy_pool_pg_scope="server", {SEL}}})',
                "{{job}} {{db_client_connection_pool_name}} {{sqlalchemy_pool_pg_state}}",
            )
        ],
        w=8,
        description="Every instance samples the same server: max over instances.",
    )
    lay.panel(
        "Oldest transaction / query age",
        [
            q(
                f"max by ({BY}, sqlalchemy_pool_pg_scope) "
                f"(sqlalchemy_pool_pg_oldest_transaction_age_seconds{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} transaction "
                "({{sqlalchemy_pool_pg_scope}})",
            ),
            q(
                f"max by ({BY}, sqlalchemy_pool_pg_scope) "
                f"(sqlalchemy_pool_pg_oldest_query_age_seconds{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} query "
                "({{sqlalchemy_pool_pg_scope}})",
            ),
        ],
        w=8,
        unit="s",
        thresholds=[(60, "red")],
        description="Alert SQLAlchemyPoolIdleInTransaction: oldest transaction > 60 s with "
        "backends idle in transaction.",
    )
    lay.panel(
        "max_connections headroom",
        [
            q(
                f"{usable_max_connections(SEL)} - max by (job, {POOL}) "
                f"(sum by ({BY}) "
                f'(sqlalchemy_pool_pg_backends{{sqlalchemy_pool_pg_scope="server", {SEL}}}))',
                "{{job}} {{db_client_connection_pool_name}} free connections",
            )
        ],
        minimum=None,
        base_color="red",
        thresholds=[(10, "orange"), (30, "green")],
        description="max_connections - reserved connections - backends on the server.",
    )
    lay.panel(
        "Capacity: Σ pool max over instances vs max_connections",
        [
            q(
                f"sum by ({BY}) (db_client_connection_max{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}} pool max",
            ),
            q(
                f"sum by (job, {POOL}) (db_client_connection_max{{{SEL_ALL_INSTANCES}}})",
                "Σ {{job}} {{db_client_connection_pool_name}} over instances",
            ),
            q(
                f"sum(db_client_connection_max{{{SEL_ALL_INSTANCES}}})",
                "Σ all selected pools",
            ),
            q(
                f"max(sqlalchemy_pool_pg_max_connections{{{SEL_ALL_INSTANCES}}})",
                "server max_connections",
            ),
            q(f"max({usable_max_connections(SEL_ALL_INSTANCES)})", "usable (minus reserved)"),
        ],
        description="If Σ pool max over instances exceeds the usable max_connections, a burst "
        "fails with 'too many clients' instead of queueing in the pools. Runbook: metrics, "
        "session lifecycle, explicit pool limits, load test, only then max_connections.",
    )
    return dashboard(
        "sqlalchemy-pool-overview",
        "SQLAlchemy pool overview",
        "Connection pools instrumented by opentelemetry-instrumentation-sqlalchemy-pool.",
        lay,
        POOL_VARIABLES,
    )


def latency_vs_saturation() -> dict:
    lay = Layout()
    lay.panel(
        "HTTP request duration p95 / p99",
        quantiles(
            "http_server_request_duration_seconds",
            HTTP_SEL,
            "job",
            "{{job}}",
            qs=(0.95, 0.99),
        ),
        w=24,
        unit="s",
        description="http.server.request.duration from the ASGI/FastAPI instrumentation "
        "(OTEL_SEMCONV_STABILITY_OPT_IN=http). Exemplars link to the slow requests' traces.",
    )
    lay.panel(
        "Pool utilisation (used / max)",
        [q(used_ratio(SEL), "{{instance}} {{db_client_connection_pool_name}}")],
        w=24,
        h=6,
        unit="percentunit",
        maximum=1,
        thresholds=[(0.75, "orange"), (0.9, "red")],
    )
    lay.panel(
        "Pending checkouts",
        [
            q(
                f"sum by ({BY}) (db_client_connection_pending_requests{{{SEL}}})",
                "{{instance}} {{db_client_connection_pool_name}}",
            )
        ],
        w=24,
        h=6,
    )
    lay.panel(
        "Checkout wait p99 (metrics and pool-wait spans)",
        [
            *quantiles(
                "db_client_connection_wait_time_seconds",
                SEL,
                BY,
                "{{instance}} {{db_client_connection_pool_name}}",
                qs=(0.99,),
            ),
            q(
                f"histogram_quantile(0.99, sum by ({BY}, le) "
                f"(rate(traces_span_metrics_duration_seconds_bucket{{{WAIT_SPAN_SEL}}}[{RATE}])))",
                "p99 sqlalchemy.pool.wait span {{instance}} {{db_client_connection_pool_name}}",
                exemplar=True,
            ),
        ],
        w=24,
        unit="s",
        description="The span-metrics series (collector path only) covers the checkouts that "
        "waited past the wait-span threshold; its exemplars open those traces.",
    )
    lay.panel(
        "Checkout timeouts and slow checkouts /s",
        [
            q(
                f"sum by ({BY}) (rate(db_client_connection_timeouts_total{{{SEL}}}[{RATE}]))",
                "timeouts {{instance}} {{db_client_connection_pool_name}}",
            ),
            q(
                f"sum by ({BY}) (rate(traces_span_metrics_calls_total{{{WAIT_SPAN_SEL}}}[{RATE}]))",
                "sqlalchemy.pool.wait spans {{instance}} {{db_client_connection_pool_name}}",
            ),
        ],
        w=24,
        h=6,
        unit="ops",
        bars=True,
    )
    lay.panel(
        "HTTP requests /s and 5xx /s",
        [
            q(
                f"sum by (job) "
                f"(rate(http_server_request_duration_seconds_count{{{HTTP_SEL}}}[{RATE}]))",
                "requests {{job}}",
            ),
            q(
                f"sum by (job) (rate(http_server_request_duration_seconds_count"
                f'{{http_response_status_code=~"5..", {HTTP_SEL}}}[{RATE}]))',
                "5xx {{job}}",
            ),
        ],
        w=24,
        h=6,
        unit="reqps",
    )
    variables = [
        *POOL_VARIABLES,
        variable(
            "route",
            "HTTP route",
            'label_values(http_server_request_duration_seconds_count{job=~"$job"}, http_route)',
        ),
    ]
    return dashboard(
        "sqlalchemy-pool-latency",
        "SQLAlchemy pool: latency vs pool saturation",
        "Request latency on the same time axis as pool utilisation, pending checkouts and "
        "checkout wait, with exemplars.",
        lay,
        variables,
    )


DASHBOARDS = {
    "sqlalchemy-pool-overview.json": pool_overview,
    "sqlalchemy-pool-latency-vs-saturation.json": latency_vs_saturation,
}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
