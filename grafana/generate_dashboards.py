"""Dashboards as code with Grafana's Foundation SDK: writes grafana/dashboards/*.json (committed).

    python grafana/generate_dashboards.py          # rewrite the JSON files
    python grafana/generate_dashboards.py --check  # exit 1 if the committed JSON is stale

Needs ``grafana-foundation-sdk`` (the ``test`` extra pins the build for Grafana 11.6's schema;
Grafana migrates it forward on load). Every query uses only metric names from
docs/CONTRACT.md, the HTTP server duration metric of the ASGI/FastAPI instrumentation under
both its default name (``http_server_duration_milliseconds``) and the stable one
(``http_server_request_duration_seconds``, ``OTEL_SEMCONV_STABILITY_OPT_IN=http``), and the
collector's span metrics (``traces_span_metrics_*``). Every aggregation keeps (job, instance,
pool) so the queries work for a direct scrape and for the collector's prometheus exporter alike.
Template variables are only used inside ``=~`` matchers (tests/pipeline/queries.py relies on it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
PROM = model.DataSourceRef(type_val="prometheus", uid="prometheus")

POOL = "db_client_connection_pool_name"
BY = f"job, instance, {POOL}"
SEL = f'job=~"$job", instance=~"$instance", {POOL}=~"$pool"'
# Σ over instances: ignores the instance variable on purpose.
SEL_ALL_INSTANCES = f'job=~"$job", {POOL}=~"$pool"'
SEL_PROC = 'job=~"$job", instance=~"$instance"'
WAIT_SPAN_SEL = f'span_name="sqlalchemy.pool.wait", {SEL}'
RATE = "$__rate_interval"
LEGEND = "{{instance}} {{db_client_connection_pool_name}}"

# HTTP server duration of the ASGI/FastAPI instrumentation, under both of its names. The
# default (old semconv) histogram is in milliseconds and carries the route template in
# http_target (FastAPI passes the route's path format, never the raw path); the stable one
# (OTEL_SEMCONV_STABILITY_OPT_IN=http or http/dup) is in seconds with http_route. Every HTTP
# query reads the stable name and falls back to the default one (`or`), so a panel shows data
# with either setting and counts nothing twice with http/dup.
HTTP_NEW = "http_server_request_duration_seconds"
HTTP_OLD = "http_server_duration_milliseconds"
HTTP_NEW_SEL = 'job=~"$job", instance=~"$instance", http_route=~"$route"'
HTTP_OLD_SEL = 'job=~"$job", instance=~"$instance", http_target=~"$route"'


def q(expr: str, legend: str = "", *, exemplar: bool = False, instant: bool = False):
    target = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(PROM)
    if exemplar:
        target = target.exemplar(True)
    if instant:
        target = target.instant().format(prometheus_model.PromQueryFormat.TABLE)
    return target


def quantile(x: float, metric: str, sel: str, by: str) -> str:
    return f"histogram_quantile({x}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))"


def quantiles(metric: str, sel: str, by: str, legend: str, qs=(0.5, 0.95, 0.99)) -> list:
    return [
        q(quantile(x, metric, sel, by), f"p{round(x * 100)} {legend}", exemplar=True) for x in qs
    ]


def or_zero(expr: str, sel: str = SEL) -> str:
    """``expr`` (by job, instance, pool and maybe more), or 0 for every pool without a series:
    a counter has no series before its first event, and the panel should say 0, not No data."""
    return f"{expr} or on ({BY}) (sum by ({BY}) (db_client_connection_max{{{sel}}}) * 0)"


def http_rate(new_matchers: str = "", old_matchers: str = "") -> str:
    new = f"sum by (job) (rate({HTTP_NEW}_count{{{new_matchers}{HTTP_NEW_SEL}}}[{RATE}]))"
    old = f"sum by (job) (rate({HTTP_OLD}_count{{{old_matchers}{HTTP_OLD_SEL}}}[{RATE}]))"
    return f"{new} or {old}"


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


def thresholds(steps: list[tuple[float, str]], base: str = "green"):
    return (
        builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(color=base, value=None)]
               + [model.Threshold(color=color, value=value) for value, color in steps])
    )  # fmt: skip


class Board:
    """A dashboard under construction: panels get ids in order; the SDK places them left to
    right, 24 columns wide."""

    def __init__(self, uid: str, title: str, description: str, variables: list) -> None:
        self.next_id = 1
        self.builder = (
            builders.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["sqlalchemy-pool", "opentelemetry"])
            .timezone("browser")
            .editable()
            .tooltip(model.DashboardCursorSync.CROSSHAIR)  # every panel on one time axis
            .refresh("30s")
            .time("now-1h", "now")
            .link(
                builders.DashboardLink("SQLAlchemy pool")
                .type(model.DashboardLinkType.DASHBOARDS)
                .tags(["sqlalchemy-pool"])
                .as_dropdown(False)
                .include_vars(True)
                .keep_time(True)
            )
            .variables(variables)
        )

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.builder.with_row(builders.Row(title).id(self._id()))

    def panel(
        self,
        title: str,
        targets: list,
        *,
        w: int = 12,
        h: int = 8,
        unit: str = "short",
        description: str = "",
        steps: list[tuple[float, str]] | None = None,
        base_color: str = "green",
        bars: bool = False,
        minimum: float | None = 0,
        maximum: float | None = None,
    ) -> None:
        panel = (
            timeseries.Panel()
            .title(title)
            .description(description)
            .datasource(PROM)
            .span(w)
            .height(h)
            .unit(unit)
            .thresholds(thresholds(steps or [], base_color))
            .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
            .line_width(1)
            .fill_opacity(60 if bars else 10)
            .show_points(common.VisibilityMode.NEVER)
            .span_nulls(False)
            .thresholds_style(
                common_builders.GraphThresholdsStyleConfig().mode(
                    common.GraphThresholdsStyleMode.DASHED
                    if steps
                    else common.GraphThresholdsStyleMode.OFF
                )
            )
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
        )
        if minimum is not None:
            panel = panel.min(minimum)
        if maximum is not None:
            panel = panel.max(maximum)
        self._add(panel, targets)

    def table(self, title: str, targets: list, *, w: int, h: int, renames: dict[str, str],
              description: str = "") -> None:  # fmt: skip
        panel = (
            table.Panel()
            .title(title)
            .description(description)
            .datasource(PROM)
            .span(w)
            .height(h)
            .show_header(True)
            .cell_height(common.TableCellHeight.SM)
            .thresholds(thresholds([]))
            .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(
                model.DataTransformerConfig(
                    id_val="organize",
                    options={"excludeByName": {"Time": True}, "renameByName": renames},
                )
            )
        )
        self._add(panel, targets)

    def _add(self, panel, targets: list) -> None:
        for ref, target in zip("ABCDEFGH", targets, strict=False):
            panel = panel.with_target(target.ref_id(ref))
        self.builder.with_panel(panel.id(self._id()))

    def build(self):
        return self.builder.build()


def variable(name: str, label: str, query: str, regex: str = ""):
    built = (
        builders.QueryVariable(name)
        .label(label)
        .datasource(PROM)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .multi(True)
        .all_value(".*")
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return built.regex(regex) if regex else built


def pool_variables() -> list:
    return [
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


def pool_overview():
    board = Board(
        "sqlalchemy-pool-overview",
        "SQLAlchemy pool overview",
        "Connection pools instrumented by opentelemetry-instrumentation-sqlalchemy-pool.",
        pool_variables(),
    )
    board.row("Pool state")
    board.panel(
        "Connections: used / idle / max",
        [
            q(
                f"sum by ({BY}, db_client_connection_state) (db_client_connection_count{{{SEL}}})",
                f"{LEGEND} {{{{db_client_connection_state}}}}",
            ),
            q(f"sum by ({BY}) (db_client_connection_max{{{SEL}}})", f"{LEGEND} max"),
            q(f"sum by ({BY}) (db_client_connection_idle_max{{{SEL}}})", f"{LEGEND} idle max"),
        ],
        description="db.client.connection.count by state against db.client.connection.max "
        "(pool_size + max_overflow) and idle.max (pool_size).",
    )
    board.panel(
        "Utilisation (used / max)",
        [q(used_ratio(SEL), LEGEND)],
        unit="percentunit",
        steps=[(0.75, "orange"), (0.9, "red")],
        maximum=1,
        description="Alert SQLAlchemyPoolSaturated fires at 90% for 5 minutes.",
    )
    board.panel(
        "Pending checkouts",
        [q(f"sum by ({BY}) (db_client_connection_pending_requests{{{SEL}}})", LEGEND)],
        w=8,
        description="Callers waiting for a connection right now.",
    )
    board.panel(
        "Checkout wait p50 / p95 / p99",
        quantiles("db_client_connection_wait_time_seconds", SEL, BY, LEGEND),
        w=8,
        unit="s",
        description="Exemplars link to the trace (sqlalchemy.pool.wait span, holders as links).",
    )
    board.panel(
        "Checkout timeouts /s",
        [
            q(
                or_zero(
                    f"sum by ({BY}) (rate(db_client_connection_timeouts_total{{{SEL}}}[{RATE}]))"
                ),
                LEGEND,
                exemplar=True,
            )
        ],
        w=8,
        unit="ops",
        bars=True,
        steps=[(0.0001, "red")],
        description="sqlalchemy.exc.TimeoutError raised by checkouts (pool_timeout reached).",
    )

    board.row("Holding connections")
    board.panel(
        "Use time p50 / p95 / p99",
        quantiles("db_client_connection_use_time_seconds", SEL, BY, LEGEND),
        w=8,
        unit="s",
        description="Checkout to checkin: how long each connection is held.",
    )
    board.panel(
        "Held-idle share (held idle / use time)",
        [
            q(
                f"sum by ({BY}) "
                f"(rate(sqlalchemy_pool_connection_held_idle_time_seconds_sum{{{SEL}}}[{RATE}]))"
                f" / sum by ({BY}) "
                f"(rate(db_client_connection_use_time_seconds_sum{{{SEL}}}[{RATE}]))",
                LEGEND,
            )
        ],
        w=8,
        unit="percentunit",
        maximum=1,
        steps=[(0.5, "orange"), (0.8, "red")],
        description="Share of the holding time with no statement running: connections held "
        "across awaits, external calls or idle in transaction.",
    )
    board.panel(
        "Checkouts /s",
        [
            q(
                f"sum by ({BY}) "
                f"(rate(db_client_connection_use_time_seconds_count{{{SEL}}}[{RATE}]))",
                LEGEND,
            )
        ],
        w=8,
        unit="ops",
        description="Connections returned per second: the pool's throughput. With use time p95 "
        "it gives the load (Little's law: used = checkouts/s x mean use time).",
    )
    board.panel(
        "Leaks by kind",
        [
            q(
                or_zero(
                    f"sum by ({BY}, sqlalchemy_pool_leak_kind) "
                    f"(increase(sqlalchemy_pool_leaks_total{{{SEL}}}[{RATE}]))"
                ),
                f"{LEGEND} {{{{sqlalchemy_pool_leak_kind}}}}",
                exemplar=True,
            )
        ],
        bars=True,
        description="long_hold, outlived_response, garbage_collected, "
        "open_transaction_at_checkin. Flagged sessions are always kept by tail sampling.",
    )
    board.table(
        "Pool configuration",
        [
            q(f"max by ({BY}) (sqlalchemy_pool_config_timeout_seconds{{{SEL}}})", instant=True),
            q(f"max by ({BY}) (sqlalchemy_pool_config_recycle_seconds{{{SEL}}})", instant=True),
            q(f"max by ({BY}) (sqlalchemy_pool_config_pre_ping{{{SEL}}})", instant=True),
            q(
                f"max by (job, instance) (sqlalchemy_session_expire_on_commit{{{SEL_PROC}}})",
                instant=True,
            ),
        ],
        w=12,
        h=8,
        renames={
            "Value #A": "pool_timeout (s)",
            "Value #B": "pool_recycle (s, -1 never)",
            "Value #C": "pre_ping",
            "Value #D": "expire_on_commit (async sessions)",
        },
        description="pool_timeout, pool_recycle, pool_pre_ping; expire_on_commit=1 on an async "
        "session factory is a classic lazy-load footgun.",
    )

    by_route = f"job, {POOL}, http_route"
    route_legend = "{{http_route}} ({{job}} {{db_client_connection_pool_name}})"
    board.panel(
        "Use time p95 by route (top 10)",
        [
            q(
                f"topk(10, {quantile(0.95, 'db_client_connection_use_time_seconds', SEL, by_route)})",
                route_legend,
                exemplar=True,
            )
        ],
        unit="s",
        description="Connection hold time by the HTTP route that took the connection (route "
        "templates, at most 50 per pool, then 'other'; no route outside requests).",
    )
    board.panel(
        "Held-idle share by route (top 10)",
        [
            q(
                f"topk(10, sum by ({by_route}) "
                f"(rate(sqlalchemy_pool_connection_held_idle_time_seconds_sum{{{SEL}}}[{RATE}]))"
                f" / sum by ({by_route}) "
                f"(rate(db_client_connection_use_time_seconds_sum{{{SEL}}}[{RATE}])))",
                route_legend,
            )
        ],
        unit="percentunit",
        maximum=1,
        steps=[(0.5, "orange"), (0.8, "red")],
        description="Routes that hold connections without using them: the first place to look "
        "in the session-lifecycle step of the runbook.",
    )

    board.row("Connection churn")
    board.panel(
        "Connect (create) time p50 / p99",
        quantiles("db_client_connection_create_time_seconds", SEL, BY, LEGEND, qs=(0.5, 0.99)),
        unit="s",
    )
    board.panel(
        "Closes by reason /s",
        [
            q(
                or_zero(
                    f"sum by ({BY}, sqlalchemy_pool_close_reason) "
                    f"(rate(sqlalchemy_pool_connection_closes_total{{{SEL}}}[{RATE}]))"
                ),
                f"{LEGEND} {{{{sqlalchemy_pool_close_reason}}}}",
            )
        ],
        unit="ops",
        bars=True,
        description="recycle, invalidated, pre_ping_failed, overflow, dispose, returned, "
        "detached, error.",
    )

    board.row("PostgreSQL server (pg_stat_activity sampler, pg_activity=True)")
    board.panel(
        "Backends by state (this application)",
        [
            q(
                f"sum by ({BY}, sqlalchemy_pool_pg_state) "
                f'(sqlalchemy_pool_pg_backends{{sqlalchemy_pool_pg_scope="application", {SEL}}})',
                f"{LEGEND} {{{{sqlalchemy_pool_pg_state}}}}",
            )
        ],
        w=8,
    )
    board.panel(
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
    board.panel(
        "Oldest transaction / query age",
        [
            q(
                f"max by ({BY}, sqlalchemy_pool_pg_scope) "
                f"(sqlalchemy_pool_pg_oldest_transaction_age_seconds{{{SEL}}})",
                f"{LEGEND} transaction ({{{{sqlalchemy_pool_pg_scope}}}})",
            ),
            q(
                f"max by ({BY}, sqlalchemy_pool_pg_scope) "
                f"(sqlalchemy_pool_pg_oldest_query_age_seconds{{{SEL}}})",
                f"{LEGEND} query ({{{{sqlalchemy_pool_pg_scope}}}})",
            ),
        ],
        w=8,
        unit="s",
        steps=[(60, "red")],
        description="Alert SQLAlchemyPoolIdleInTransaction: oldest transaction > 60 s with "
        "backends idle in transaction.",
    )
    board.panel(
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
        steps=[(10, "orange"), (30, "green")],
        description="max_connections - reserved connections - backends on the server.",
    )
    board.panel(
        "Capacity: Σ pool max over instances vs max_connections",
        [
            q(f"sum by ({BY}) (db_client_connection_max{{{SEL}}})", f"{LEGEND} pool max"),
            q(
                f"sum by (job, {POOL}) (db_client_connection_max{{{SEL_ALL_INSTANCES}}})",
                "Σ {{job}} {{db_client_connection_pool_name}} over instances",
            ),
            q(f"sum(db_client_connection_max{{{SEL_ALL_INSTANCES}}})", "Σ all selected pools"),
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
    return board.build()


def latency_vs_saturation():
    route = variable(
        "route",
        "HTTP route",
        # Routes from either HTTP metric name (see HTTP_OLD above); Grafana takes the values
        # from the result's http_route label through the regex.
        f'query_result(count by (http_route) ({HTTP_NEW}_count{{job=~"$job"}}) or '
        f'label_replace(count by (http_target) ({HTTP_OLD}_count{{job=~"$job"}}), '
        '"http_route", "$1", "http_target", "(.+)"))',
        regex='/http_route="([^"]+)"/',
    )
    board = Board(
        "sqlalchemy-pool-latency",
        "SQLAlchemy pool: latency vs pool saturation",
        "Request latency on the same time axis as pool utilisation, pending checkouts and "
        "checkout wait, with exemplars.",
        [*pool_variables(), route],
    )
    board.panel(
        "HTTP request duration p95 / p99",
        [
            q(
                f"{quantile(x, HTTP_NEW, HTTP_NEW_SEL, 'job')}"
                f" or {quantile(x, HTTP_OLD, HTTP_OLD_SEL, 'job')} / 1000",
                f"p{round(x * 100)} {{{{job}}}}",
                exemplar=True,
            )
            for x in (0.95, 0.99)
        ],
        w=24,
        unit="s",
        description="http.server.request.duration (OTEL_SEMCONV_STABILITY_OPT_IN=http) or, "
        "with the ASGI/FastAPI instrumentation's defaults, http.server.duration (ms). "
        "Exemplars link to the slow requests' traces.",
    )
    board.panel(
        "Pool utilisation (used / max)",
        [q(used_ratio(SEL), LEGEND)],
        w=24,
        h=6,
        unit="percentunit",
        maximum=1,
        steps=[(0.75, "orange"), (0.9, "red")],
    )
    board.panel(
        "Pending checkouts",
        [q(f"sum by ({BY}) (db_client_connection_pending_requests{{{SEL}}})", LEGEND)],
        w=24,
        h=6,
    )
    board.panel(
        "Checkout wait p99 (metrics and pool-wait spans)",
        [
            *quantiles("db_client_connection_wait_time_seconds", SEL, BY, LEGEND, qs=(0.99,)),
            q(
                quantile(0.99, "traces_span_metrics_duration_seconds", WAIT_SPAN_SEL, BY),
                f"p99 sqlalchemy.pool.wait span {LEGEND}",
                exemplar=True,
            ),
        ],
        w=24,
        unit="s",
        description="The span-metrics series (collector path only) covers the checkouts that "
        "waited past the wait-span threshold; its exemplars open those traces.",
    )
    board.panel(
        "Checkout timeouts and slow checkouts /s",
        [
            q(
                or_zero(
                    f"sum by ({BY}) (rate(db_client_connection_timeouts_total{{{SEL}}}[{RATE}]))"
                ),
                f"timeouts {LEGEND}",
            ),
            q(
                or_zero(
                    f"sum by ({BY}) "
                    f"(rate(traces_span_metrics_calls_total{{{WAIT_SPAN_SEL}}}[{RATE}]))"
                ),
                f"sqlalchemy.pool.wait spans {LEGEND}",
            ),
        ],
        w=24,
        h=6,
        unit="ops",
        bars=True,
        description="Slow checkouts are sqlalchemy.pool.wait spans counted by the collector's "
        "span metrics (0 on the direct-scrape path, which has no span metrics).",
    )
    board.panel(
        "HTTP requests /s and 5xx /s",
        [
            q(http_rate(), "requests {{job}}"),
            q(
                http_rate('http_response_status_code=~"5..", ', 'http_status_code=~"5..", ')
                + f" or ({http_rate()}) * 0",
                "5xx {{job}}",
            ),
        ],
        w=24,
        h=6,
        unit="reqps",
    )
    return board.build()


DASHBOARDS = {
    "sqlalchemy-pool-overview.json": pool_overview,
    "sqlalchemy-pool-latency-vs-saturation.json": latency_vs_saturation,
}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"
        for name, build in DASHBOARDS.items()
    }


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
