"""Static checks of the shipped pipeline: collector, Prometheus, Tempo, Grafana, docker compose.

No Docker, collector, Tempo or Grafana binaries are needed: the files are parsed and checked
for consistency with each other and with the instrumentation's names (semconv.py,
docs/CONTRACT.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from opentelemetry.instrumentation.sqlalchemy_pool import SQLAlchemyPoolInstrumentor, semconv
from pipeline.queries import (
    REPO,
    all_queries,
    dashboard_files,
    dashboard_queries,
    metric_names,
    template_variables,
)

COLLECTOR = REPO / "collector-config"
COLLECTOR_CONFIGS = {
    name: COLLECTOR / f"{name}.yaml" for name in ("otelcol", "otelcol-agent", "otelcol-gateway")
}
COMPOSE = REPO / "deploy" / "docker-compose.yml"
TEMPO = REPO / "deploy" / "tempo.yaml"
PROMETHEUS_YML = COLLECTOR / "prometheus.yml"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
OVERVIEW = REPO / "grafana" / "dashboards" / "sqlalchemy-pool-overview.json"
LATENCY = REPO / "grafana" / "dashboards" / "sqlalchemy-pool-latency-vs-saturation.json"
PIPELINE_DOC = REPO / "docs" / "pipeline.md"
CONTRACT = REPO / "docs" / "CONTRACT.md"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def collector(name: str) -> dict:
    return load(COLLECTOR_CONFIGS[name])


def compose() -> dict:
    return load(COMPOSE)


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# --- parsing ---------------------------------------------------------------------------------
CONFIG_FILES = sorted(
    path
    for top in ("collector-config", "grafana", "deploy")
    for pattern in ("*.yml", "*.yaml", "*.json")
    for path in (REPO / top).rglob(pattern)
)


def test_config_files_exist():
    names = {p.relative_to(REPO).as_posix() for p in CONFIG_FILES}
    for required in (
        "collector-config/otelcol.yaml",
        "collector-config/otelcol-agent.yaml",
        "collector-config/otelcol-gateway.yaml",
        "collector-config/prometheus.yml",
        "collector-config/rules/sqlalchemy-pool.rules.yml",
        "grafana/provisioning/datasources/datasources.yml",
        "grafana/provisioning/dashboards/dashboards.yml",
        "grafana/dashboards/sqlalchemy-pool-overview.json",
        "grafana/dashboards/sqlalchemy-pool-latency-vs-saturation.json",
        "deploy/docker-compose.yml",
        "deploy/tempo.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_yaml_and_json_file_parses(path: Path):
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    assert data, path


def test_dashboards_are_generated_from_code():
    script = REPO / "grafana" / "generate_dashboards.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- docker compose ---------------------------------------------------------------------------
def _mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume["source"], volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            out.append((source, target))
    return out


def _bind_mounts() -> dict[str, dict[str, Path]]:
    """service -> {container path: host path} for bind mounts (sources that are paths)."""
    out: dict[str, dict[str, Path]] = {}
    for name, service in compose()["services"].items():
        for source, target in _mounts(service):
            if source.startswith((".", "/")):
                out.setdefault(name, {})[target] = (COMPOSE.parent / source).resolve()
    return out


def _published(service: str) -> set[int]:
    ports = set()
    for item in compose()["services"][service].get("ports", []):
        ports.add(int(str(item).split(":")[-1].split("/")[0]))
    return ports


def _arg(command: list[str], prefix: str) -> str:
    return next(a for a in command if a.startswith(prefix)).split("=", 1)[1]


def test_every_file_the_compose_mounts_exists():
    mounts = _bind_mounts()
    assert set(mounts) >= {"otel-collector", "prometheus", "tempo", "grafana"}
    for service, paths in mounts.items():
        for target, source in paths.items():
            assert source.exists(), f"{service}: {source} (mounted at {target}) is missing"
            assert REPO in source.parents, f"{service}: {source} is outside the repository"


def test_compose_mounts_the_shipped_configs_where_the_commands_look():
    services = compose()["services"]
    mounts = _bind_mounts()

    col = services["otel-collector"]
    assert "contrib" in col["image"]
    assert (
        mounts["otel-collector"][_arg(col["command"], "--config=")] == COLLECTOR_CONFIGS["otelcol"]
    )

    prom = services["prometheus"]
    config_path = _arg(prom["command"], "--config.file=")
    assert mounts["prometheus"][config_path] == PROMETHEUS_YML
    assert "--enable-feature=exemplar-storage" in prom["command"]
    # rule_files in prometheus.yml is relative to the config file's directory.
    assert mounts["prometheus"][str(Path(config_path).parent / "rules")] == COLLECTOR / "rules"
    for pattern in load(PROMETHEUS_YML)["rule_files"]:
        assert not pattern.startswith("/"), pattern
        assert list(PROMETHEUS_YML.parent.glob(pattern)), pattern

    tempo = services["tempo"]
    assert mounts["tempo"][_arg(tempo["command"], "-config.file=")] == TEMPO

    grafana = mounts["grafana"]
    assert grafana["/etc/grafana/provisioning"] == REPO / "grafana" / "provisioning"
    for provider in load(DASHBOARD_PROVIDERS)["providers"]:
        assert grafana[provider["options"]["path"]] == REPO / "grafana" / "dashboards"
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        dashboards_target = next(t for t, s in grafana.items() if s.name == "dashboards")
        assert (
            REPO / "grafana" / "dashboards" / Path(home).relative_to(dashboards_target)
        ).exists()


# --- ports and URLs agree --------------------------------------------------------------------
def test_ports_and_urls_agree_across_the_stack():
    services = compose()["services"]
    col = collector("otelcol")

    # Apps on the host reach the OTLP receiver.
    otlp = col["receivers"]["otlp"]["protocols"]
    assert port_of(otlp["grpc"]["endpoint"]) == 4317
    assert port_of(otlp["http"]["endpoint"]) == 4318
    assert {4317, 4318} <= _published("otel-collector")

    # Prometheus scrapes the collector's prometheus exporter and its own telemetry.
    exporter_port = port_of(col["exporters"]["prometheus"]["endpoint"])
    telemetry = col["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]
    scrape = {job["job_name"]: job for job in load(PROMETHEUS_YML)["scrape_configs"]}
    targets = {
        name: [t for sc in job["static_configs"] for t in sc["targets"]]
        for name, job in scrape.items()
    }
    assert "otel-collector" in services
    assert targets["otel-collector"] == [f"otel-collector:{exporter_port}"]
    assert scrape["otel-collector"]["honor_labels"] is True  # job/instance = service identity
    internal_port = telemetry["prometheus"]["port"]
    assert targets["otel-collector-internal"] == [f"otel-collector:{internal_port}"]
    assert exporter_port in _published("otel-collector")
    assert scrape["app"].get("metrics_path", "/metrics") == "/metrics"
    assert not scrape["app"].get("honor_labels", False)  # job/instance from the scrape
    assert any("host.docker.internal" in h for h in services["prometheus"]["extra_hosts"])

    # The collector sends traces to Tempo's OTLP gRPC receiver.
    tempo = load(TEMPO)
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    tempo_exporters = [
        v for k, v in col["exporters"].items() if k.split("/")[0] in ("otlp", "otlp_grpc")
    ]
    assert [e["endpoint"] for e in tempo_exporters] == [f"tempo:{port_of(tempo_grpc)}"]
    assert "tempo" in services

    # Grafana's data sources point at the compose services.
    sources = {ds["uid"]: ds for ds in load(DATASOURCES)["datasources"]}
    prom_url = urlparse(sources["prometheus"]["url"])
    assert prom_url.hostname in services
    assert prom_url.port == port_of(
        _arg(services["prometheus"]["command"], "--web.listen-address=")
    )
    assert prom_url.port in _published("prometheus")
    tempo_url = urlparse(sources["tempo"]["url"])
    assert tempo_url.hostname in services
    assert tempo_url.port == tempo["server"]["http_listen_port"]
    assert tempo_url.port in _published("tempo")
    assert 3000 in _published("grafana")

    # The agent's load balancer reaches the gateway's OTLP receiver.
    agent_lb = collector("otelcol-agent")["exporters"]["load_balancing"]
    gateway_otlp = collector("otelcol-gateway")["receivers"]["otlp"]["protocols"]["grpc"]
    assert int(agent_lb["resolver"]["dns"]["port"]) == port_of(gateway_otlp["endpoint"])
    gateway_tempo = collector("otelcol-gateway")["exporters"]["otlp_grpc/tempo"]["endpoint"]
    assert gateway_tempo == f"tempo:{port_of(tempo_grpc)}"


def test_datasources_link_exemplars_and_traces_both_ways():
    sources = {ds["uid"]: ds for ds in load(DATASOURCES)["datasources"]}
    assert sources["prometheus"]["type"] == "prometheus"
    assert sources["tempo"]["type"] == "tempo"
    exemplars = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # The collector's prometheus exporter names the exemplar label trace_id.
    assert exemplars[0]["name"] == "trace_id"
    assert exemplars[0]["datasourceUid"] == "tempo"
    t2m = sources["tempo"]["jsonData"]["tracesToMetrics"]
    assert t2m["datasourceUid"] == "prometheus"
    assert {tag["key"] for tag in t2m["tags"]} >= {"service.name", semconv.POOL_NAME}
    for query in t2m["queries"]:
        assert "$$__tags" in query["query"], "escape $ as $$ in provisioning files"


def test_dashboards_use_the_provisioned_datasources():
    uids = {ds["uid"] for ds in load(DATASOURCES)["datasources"]}
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] in uids
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] in uids, (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in uids


# --- collector pipelines ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COLLECTOR_CONFIGS))
def test_collector_pipelines_reference_only_defined_components(name: str):
    config = collector(name)
    service = config["service"]
    kinds = ("receivers", "processors", "exporters", "connectors", "extensions")
    defined = {kind: set(config.get(kind) or {}) for kind in kinds}
    used: dict[str, set[str]] = {kind: set() for kind in kinds}
    connector_from: dict[str, set[str]] = {}  # connector -> signals it consumes (as exporter)
    connector_to: dict[str, set[str]] = {}  # connector -> signals it produces (as receiver)
    for pipeline_id, pipeline in service["pipelines"].items():
        signal = pipeline_id.split("/")[0]
        assert signal in ("traces", "metrics", "logs"), pipeline_id
        assert pipeline.get("receivers") and pipeline.get("exporters"), pipeline_id
        for receiver in pipeline["receivers"]:
            if receiver in defined["connectors"]:
                connector_to.setdefault(receiver, set()).add(signal)
                used["connectors"].add(receiver)
            else:
                assert receiver in defined["receivers"], f"{pipeline_id}: receiver {receiver}"
                used["receivers"].add(receiver)
        processors = pipeline.get("processors", [])
        for processor in processors:
            assert processor in defined["processors"], f"{pipeline_id}: processor {processor}"
            used["processors"].add(processor)
        if "memory_limiter" in processors:
            assert processors[0] == "memory_limiter", f"{pipeline_id}: memory_limiter first"
        if "batch" in processors:
            assert processors[-1] == "batch", f"{pipeline_id}: batch last"
        for exporter in pipeline["exporters"]:
            if exporter in defined["connectors"]:
                connector_from.setdefault(exporter, set()).add(signal)
                used["connectors"].add(exporter)
            else:
                assert exporter in defined["exporters"], f"{pipeline_id}: exporter {exporter}"
                used["exporters"].add(exporter)
    for extension in service.get("extensions", []):
        assert extension in defined["extensions"], extension
        used["extensions"].add(extension)
    for kind in kinds:
        assert defined[kind] == used[kind], f"{name}: {kind} defined but unused"
    for connector in defined["connectors"]:
        # A connector is an exporter in one pipeline and a receiver in another.
        assert connector_from.get(connector) and connector_to.get(connector), connector
    if "span_metrics" in defined["connectors"]:
        assert connector_from["span_metrics"] == {"traces"}
        assert connector_to["span_metrics"] == {"metrics"}
    assert "memory_limiter" in defined["processors"] and "batch" in defined["processors"]


@pytest.mark.parametrize("name", sorted(COLLECTOR_CONFIGS))
def test_collector_listens_on_all_interfaces(name: str):
    # Since collector 0.104 the OTLP receiver defaults to localhost: inside a container it
    # must listen on 0.0.0.0.
    for protocol in collector(name)["receivers"]["otlp"]["protocols"].values():
        assert protocol["endpoint"].startswith("0.0.0.0:"), protocol


def _tail_sampling_configs() -> dict[str, dict]:
    out = {}
    for name in COLLECTOR_CONFIGS:
        processors = collector(name).get("processors") or {}
        if "tail_sampling" in processors:
            out[name] = processors["tail_sampling"]
    return out


def test_tail_sampling_runs_where_whole_traces_arrive():
    configs = _tail_sampling_configs()
    assert set(configs) == {"otelcol", "otelcol-gateway"}
    agent = collector("otelcol-agent")
    assert agent["exporters"]["load_balancing"]["routing_key"] == "traceID"
    traces = [p for k, p in agent["service"]["pipelines"].items() if k.startswith("traces")]
    assert any("load_balancing" in p["exporters"] for p in traces)
    # Same policies in the single collector and in the gateway tier.
    assert configs["otelcol"]["policies"] == configs["otelcol-gateway"]["policies"]


def test_tail_sampling_policies_keep_the_interesting_traces():
    for name, config in _tail_sampling_configs().items():
        policies = config["policies"]
        text = yaml.safe_dump(policies)
        by_type: dict[str, list[dict]] = {}
        for policy in policies:
            by_type.setdefault(policy["type"], []).append(policy)
        # every trace with a pool-wait span
        assert f'name == "{semconv.WAIT_SPAN_NAME}"' in text, name
        # timeouts (error.type)
        attrs = [p["string_attribute"] for p in by_type["string_attribute"]]
        timeout = next(a for a in attrs if a["key"] == semconv.ERROR_TYPE)
        assert timeout.get("enabled_regex_matching") is True
        assert any(re.search(v, "sqlalchemy.exc.TimeoutError") for v in timeout["values"])
        # flagged sessions: outlived the response (span event), or leaked
        for name_or_attr in (
            semconv.SESSION_SPAN_NAME,
            semconv.SESSION_OUTCOME,
            semconv.OUTCOME_GARBAGE_COLLECTED,
            semconv.LONG_HOLD_EVENT,
            semconv.OUTLIVED_RESPONSE_EVENT,
        ):
            assert f'"{name_or_attr}"' in text, name_or_attr
        # errors, plus a probabilistic sample of the rest
        assert by_type["status_code"][0]["status_code"]["status_codes"] == ["ERROR"]
        percentage = by_type["probabilistic"][0]["probabilistic"]["sampling_percentage"]
        assert 0 < percentage < 100
        for policy in by_type["ottl_condition"]:
            assert policy["ottl_condition"]["error_mode"] == "ignore"


_GO_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_seconds(text: str) -> float:
    match = _GO_DURATION.match(str(text))
    assert match, text
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@pytest.mark.parametrize("name", ["otelcol", "otelcol-agent"])
def test_spanmetrics_turn_pool_spans_into_metrics_with_exemplars(name: str):
    config = collector(name)
    spanmetrics = config["connectors"]["span_metrics"]
    dimensions = [d["name"] for d in spanmetrics["dimensions"]]
    assert dimensions == [semconv.POOL_NAME, semconv.ERROR_TYPE]
    assert spanmetrics["exemplars"]["enabled"] is True
    assert spanmetrics["histogram"]["unit"] == "s"
    buckets = [go_duration_seconds(b) for b in spanmetrics["histogram"]["explicit"]["buckets"]]
    assert buckets == pytest.approx(list(semconv.DURATION_BUCKETS))
    assert spanmetrics["namespace"] == "traces.span.metrics"
    assert spanmetrics["add_resource_attributes"] is True  # job/instance on span metrics too
    # Only the two instrumentation spans reach the connector, and before any sampling.
    pipeline = next(
        p for p in config["service"]["pipelines"].values() if "span_metrics" in p["exporters"]
    )
    assert "tail_sampling" not in pipeline.get("processors", [])
    filters = [config["processors"][p] for p in pipeline["processors"] if p.startswith("filter")]
    conditions = " ".join(c for f in filters for c in f["traces"]["span"])
    assert f'name != "{semconv.WAIT_SPAN_NAME}"' in conditions
    assert f'name != "{semconv.SESSION_SPAN_NAME}"' in conditions


@pytest.mark.parametrize("name", ["otelcol", "otelcol-agent"])
def test_prometheus_exporter_keeps_exemplars_and_service_identity(name: str):
    config = collector(name)
    exporter = config["exporters"]["prometheus"]
    assert exporter["enable_open_metrics"] is True
    assert exporter["resource_constant_labels"]["included"] == ["*"]
    metrics = config["service"]["pipelines"]["metrics"]
    assert set(metrics["receivers"]) == {"otlp", "span_metrics"}
    assert "prometheus" in metrics["exporters"]
    assert "resource/drop_noisy" in metrics["processors"]


# --- metric-name allow-list -------------------------------------------------------------------
# (OTel name, kind, unit suffix): the kind decides the Prometheus suffixes (CONTRACT.md).
INSTRUMENT_METRICS = [
    (semconv.CONNECTION_COUNT, "gauge", ""),
    (semconv.CONNECTION_MAX, "gauge", ""),
    (semconv.CONNECTION_IDLE_MAX, "gauge", ""),
    (semconv.CONNECTION_PENDING_REQUESTS, "gauge", ""),
    (semconv.CONNECTION_TIMEOUTS, "counter", ""),
    (semconv.CONNECTION_WAIT_TIME, "histogram", "_seconds"),
    (semconv.CONNECTION_CREATE_TIME, "histogram", "_seconds"),
    (semconv.CONNECTION_USE_TIME, "histogram", "_seconds"),
    (semconv.CONNECTION_HELD_IDLE_TIME, "histogram", "_seconds"),
    (semconv.CONNECTION_CLOSES, "counter", ""),
    (semconv.LEAKS, "counter", ""),
    (semconv.CONFIG_TIMEOUT, "gauge", "_seconds"),
    (semconv.CONFIG_RECYCLE, "gauge", "_seconds"),
    (semconv.CONFIG_PRE_PING, "gauge", ""),
    (semconv.SESSIONS_EXPIRE_ON_COMMIT, "gauge", ""),
    (semconv.PG_BACKENDS, "gauge", ""),
    (semconv.PG_OLDEST_XACT_AGE, "gauge", "_seconds"),
    (semconv.PG_OLDEST_QUERY_AGE, "gauge", "_seconds"),
    (semconv.PG_MAX_CONNECTIONS, "gauge", ""),
    (semconv.PG_RESERVED_CONNECTIONS, "gauge", ""),
]
# ASGI/FastAPI instrumentation: stable HTTP semconv (OTEL_SEMCONV_STABILITY_OPT_IN=http) and
# its default, the old http.server.duration in milliseconds.
HTTP_SERVER_DURATION = "http.server.request.duration"
HTTP_SERVER_DURATION_OLD = "http.server.duration"
# On that old metric FastAPI puts the route template in http.target (never the raw path).
OLD_HTTP_METRIC_LABELS = {"http_target"}


def prometheus_names(otel_name: str, kind: str, unit: str) -> set[str]:
    base = otel_name.replace(".", "_") + unit
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def spanmetrics_names() -> set[str]:
    spanmetrics = collector("otelcol")["connectors"]["span_metrics"]
    prefix = spanmetrics["namespace"]
    unit = {"s": "_seconds", "ms": "_milliseconds"}[spanmetrics["histogram"]["unit"]]
    calls = prometheus_names(f"{prefix}.calls", "counter", "")
    return calls | prometheus_names(f"{prefix}.duration", "histogram", unit)


def allowed_metric_names() -> set[str]:
    names = set()
    for otel_name, kind, unit in INSTRUMENT_METRICS:
        names |= prometheus_names(otel_name, kind, unit)
    names |= prometheus_names(HTTP_SERVER_DURATION, "histogram", "_seconds")
    names |= prometheus_names(HTTP_SERVER_DURATION_OLD, "histogram", "_milliseconds")
    return names | spanmetrics_names()


def test_allow_list_matches_the_contract():
    contract = CONTRACT.read_text()
    for otel_name, _, _ in INSTRUMENT_METRICS:
        # CONTRACT.md abbreviates siblings (".create_time"); the last segment is always there.
        assert otel_name.rsplit(".", 1)[-1] in contract, otel_name
    labels = {
        attr.replace(".", "_")
        for attr in (semconv.POOL_NAME, semconv.CONNECTION_STATE, semconv.CLOSE_REASON,
                     semconv.LEAK_KIND, semconv.PG_STATE, semconv.PG_SCOPE, semconv.HTTP_ROUTE)
    }  # fmt: skip
    bracketed = set(re.findall(r"\[`([a-z_]+)`", contract)) - labels
    assert len(bracketed) > 5
    for name in bracketed:  # the Prometheus names CONTRACT.md spells out in brackets
        assert name in allowed_metric_names() or f"{name}_bucket" in allowed_metric_names(), name
    assert {"traces_span_metrics_calls_total", "traces_span_metrics_duration_seconds_bucket"} <= (
        spanmetrics_names()
    )


def test_every_query_uses_only_allowed_metric_names():
    allowed = allowed_metric_names()
    queries = all_queries()
    assert len(queries) > 30
    for query in queries:
        assert query.metrics, f"{query.where}: no metric found in {query.promql}"
        unknown = query.metrics - allowed
        assert not unknown, f"{query.source}: {query.where} uses {sorted(unknown)}"


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="y(z)"}[5m]))) > 1e-3 '
        "and on (job) (b - (c or d * 0)) unless ignoring (le) e offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "e"}
    assert metric_names('count by (job) ({__name__="f"})') == {"f"}


_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def test_template_variables_only_in_regex_matchers():
    """A variable may be 'All' (.*) or several values (a|b): only =~ handles both."""
    for query in dashboard_queries():
        in_regex = []
        for label, op, value in _MATCHER.findall(query.expr):
            used = template_variables(value)
            if used:
                assert op == "=~", f'{query.where}: {label}{op}"{value}"'
                assert value == f"${used[0]}", f"{query.where}: {value}"
                in_regex += used
        assert sorted(template_variables(query.expr)) == sorted(in_regex), query.where


def test_dashboard_variables_are_defined_and_filter_every_panel():
    for path in dashboard_files():
        board = json.loads(path.read_text())
        defined = {v["name"] for v in board["templating"]["list"]}
        assert {"job", "instance", "pool"} <= defined, path.name
        for variable in board["templating"]["list"]:
            assert variable["includeAll"] and variable["multi"]
            assert variable["allValue"] == ".*"
    for query in dashboard_queries():
        board = json.loads((REPO / query.source).read_text())
        defined = {v["name"] for v in board["templating"]["list"]}
        assert set(template_variables(query.expr)) <= defined, query.where
        if query.kind == "panel":
            assert "$job" in query.expr, query.where


def test_latency_panels_show_exemplars():
    for path in dashboard_files():
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                if "histogram_quantile" in expr and (
                    "wait_time" in expr or "http_server_request_duration" in expr
                ):
                    assert target.get("exemplar") is True, (path.name, panel["title"])


def test_latency_dashboard_shares_the_time_axis():
    board = json.loads(LATENCY.read_text())
    assert board["graphTooltip"] == 1
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in (
        "http_server_request_duration_seconds_bucket",
        "db_client_connection_count",
        "db_client_connection_pending_requests",
        "db_client_connection_wait_time_seconds_bucket",
    ):
        assert metric in exprs
    assert all(p["gridPos"]["w"] == 24 for p in board["panels"])  # stacked: same x axis


def test_overview_dashboard_has_the_required_panels():
    board = json.loads(OVERVIEW.read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in (
        "db_client_connection_count",
        "db_client_connection_max",
        "db_client_connection_idle_max",
        "db_client_connection_pending_requests",
        "db_client_connection_wait_time_seconds_bucket",
        "db_client_connection_timeouts_total",
        "db_client_connection_use_time_seconds_bucket",
        "sqlalchemy_pool_connection_held_idle_time_seconds_sum",
        "db_client_connection_create_time_seconds_bucket",
        "sqlalchemy_pool_connection_closes_total",
        "sqlalchemy_pool_leaks_total",
        "sqlalchemy_pool_pg_backends",
        "sqlalchemy_pool_pg_oldest_transaction_age_seconds",
        "sqlalchemy_pool_pg_max_connections",
    ):
        assert metric in exprs, metric
    # the capacity panel: Σ over instances, per instance, and the server's limit
    assert "sum by (job, db_client_connection_pool_name) (db_client_connection_max" in exprs
    assert (
        "sum by (job, instance, db_client_connection_pool_name) (db_client_connection_max" in exprs
    )
    assert "sqlalchemy_pool_close_reason" in exprs and "sqlalchemy_pool_leak_kind" in exprs


# --- cardinality budget -----------------------------------------------------------------------
FORBIDDEN_LABEL = re.compile(
    r"^(code_.*|db_statement|db_query_.*|db_sql_.*|user.*|enduser_.*|url_.*|http_url|http_target"
    r"|.*holder.*|session_id|sql)$"
)
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _labels_in(promql: str) -> set[str]:
    labels = {label for label, _, _ in _MATCHER.findall(promql)}
    for group in _GROUPING.findall(promql):
        labels |= {item.strip() for item in group.split(",") if item.strip()}
    return labels


def test_forbidden_label_pattern():
    for bad in ("code_function_name", "code_file_path", "db_statement", "db_query_text",
                "user_id", "url_full", "http_target"):  # fmt: skip
        assert FORBIDDEN_LABEL.match(bad), bad
    for good in ("job", "instance", "db_client_connection_pool_name", "sqlalchemy_pool_leak_kind",
                 "http_route", "error_type", "span_name"):  # fmt: skip
        assert not FORBIDDEN_LABEL.match(good), good


def test_queries_never_use_high_cardinality_labels():
    old_http = prometheus_names(HTTP_SERVER_DURATION_OLD, "histogram", "_milliseconds")
    for query in all_queries():
        bad = {label for label in _labels_in(query.promql) if FORBIDDEN_LABEL.match(label)}
        if query.metrics & old_http:
            bad -= OLD_HTTP_METRIC_LABELS
        assert not bad, f"{query.where}: {sorted(bad)}"


async def test_fastapi_puts_the_route_template_in_http_target_of_its_default_metric():
    """Why http_target is allowed on http_server_duration_milliseconds: a real FastAPI app."""
    import httpx
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    app = FastAPI()

    @app.get("/items/{item}")
    def item(item: int):
        return {"item": item}

    reader = InMemoryMetricReader()
    FastAPIInstrumentor.instrument_app(app, meter_provider=MeterProvider(metric_readers=[reader]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for number in (1, 2, 3):
            assert (await client.get(f"/items/{number}")).status_code == 200
    targets = {
        point.attributes.get("http.target")
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == HTTP_SERVER_DURATION_OLD
        for point in metric.data.data_points
    }
    assert targets == {"/items/{item}"}


@pytest.mark.parametrize("name", ["otelcol", "otelcol-agent"])
def test_collector_never_turns_code_sites_or_sql_into_labels(name: str):
    config = collector(name)
    spanmetrics = config["connectors"]["span_metrics"]
    dims = [d["name"].replace(".", "_") for d in spanmetrics["dimensions"]]
    assert not [d for d in dims if FORBIDDEN_LABEL.match(d)]
    assert not spanmetrics.get("events", {}).get("enabled")  # event attributes -> labels
    drop = config["processors"]["resource/drop_noisy"]["attributes"]
    assert {"process.command_args", "process.command_line"} <= {a["key"] for a in drop}
    assert {a["action"] for a in drop} == {"delete"}


def series_budget() -> dict[str, int]:
    """Prometheus series of one pool (the figure docs/pipeline.md states)."""
    histogram = len(semconv.DURATION_BUCKETS) + 1 + 2  # buckets + le="+Inf" + _sum + _count
    close_reasons = semconv.CLOSE_REASONS
    leak_kinds = semconv.LEAK_KINDS
    return {
        "count (idle, used)": 2,
        "max, idle.max, pending_requests, timeouts": 4,
        "histograms wait/create/use/held_idle": 4 * histogram,
        "closes by reason": len(close_reasons),
        "leaks by kind": len(leak_kinds),
        "config gauges": 3,
    }


def test_docs_state_the_series_budget():
    from opentelemetry.instrumentation.sqlalchemy_pool.recorder import MAX_ROUTES_PER_POOL

    parts = series_budget()
    assert parts["closes by reason"] == 8 and parts["leaks by kind"] == 4
    per_pool = sum(parts.values())
    doc = PIPELINE_DOC.read_text()
    match = re.search(r"\*\*(\d+) series per pool\*\*", doc)
    assert match, "docs/pipeline.md must state '**N series per pool**'"
    assert int(match.group(1)) == per_pool
    # use_time and held_idle_time also split by http.route: 50 route templates + "other"
    per_route = 2 * (len(semconv.DURATION_BUCKETS) + 3)
    worst = per_pool + (MAX_ROUTES_PER_POOL + 1) * per_route
    match = re.search(r"\*\*(\d+) series per pool at most\*\*", doc)
    assert match, "docs/pipeline.md must state '**N series per pool at most**'"
    assert int(match.group(1)) == worst
    match = re.search(r"\*\*(\d+) series per instance\*\*", doc)
    assert match, "docs/pipeline.md must state '**N series per instance**'"
    assert int(match.group(1)) > per_pool


def _metrics_after(use, tmp_path: Path, **pool_kw):
    """What the real instrumentor exports after ``use(engine)`` on a SQLite QueuePool "main"."""
    import sqlalchemy as sa
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    reader = InMemoryMetricReader()
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=sa.pool.QueuePool, **pool_kw
    )
    instrumentor = SQLAlchemyPoolInstrumentor()
    instrumentor.instrument(
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=TracerProvider(),
        engine=engine,
        pool_name="main",
    )
    try:
        use(engine)
        return reader.get_metrics_data()
    finally:
        instrumentor.uninstrument()
        engine.dispose()


def test_instrumentor_metric_labels_stay_within_budget(tmp_path):
    """Run the real instrumentor on a SQLite QueuePool and inspect every exported data point."""
    import sqlalchemy as sa

    def use(engine: sa.Engine) -> None:
        held = [engine.connect(), engine.connect()]
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        for conn in held:
            conn.execute(sa.text("select 1"))
            conn.close()
        with engine.begin() as conn:
            conn.execute(sa.text("select 1"))

    data = _metrics_after(use, tmp_path, pool_size=2, max_overflow=0, pool_timeout=0.05)

    pool_metrics = {name for name, _, _ in INSTRUMENT_METRICS if not name.startswith(
        ("sqlalchemy.session.", "sqlalchemy.pool.pg."))}  # fmt: skip
    series = 0
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    keys = {k.replace(".", "_") for k in point.attributes}
                    bad = {k for k in keys if FORBIDDEN_LABEL.match(k)}
                    assert not bad, f"{metric.name}: {sorted(bad)}"
                    if metric.name not in pool_metrics:
                        continue
                    assert point.attributes.get(semconv.POOL_NAME) == "main", metric.name
                    buckets = getattr(point, "bucket_counts", None)
                    series += len(buckets) + 2 if buckets is not None else 1
    assert 0 < series <= sum(series_budget().values())


def test_every_counter_series_of_a_pool_starts_at_zero(tmp_path):
    """Prometheus' increase() sees a first event only in a series scraped before it: after a
    pool's first checkout, every counter series the alerts and dashboards read exists at 0."""
    import sqlalchemy as sa

    def use(engine: sa.Engine) -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))

    data = _metrics_after(use, tmp_path)
    counters = {semconv.CONNECTION_TIMEOUTS, semconv.CONNECTION_CLOSES, semconv.LEAKS}
    points: dict[str, dict[str | None, float]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    if metric.name not in counters:
                        continue
                    label = point.attributes.get(semconv.CLOSE_REASON) or point.attributes.get(
                        semconv.LEAK_KIND
                    )
                    points.setdefault(metric.name, {})[label] = point.value
    close_reasons = {v for k, v in vars(semconv).items() if k.startswith("CLOSE_REASON_")}
    leak_kinds = {v for k, v in vars(semconv).items() if k.startswith("LEAK_KIND_")}
    assert (set(semconv.CLOSE_REASONS), set(semconv.LEAK_KINDS)) == (close_reasons, leak_kinds)
    assert points[semconv.CONNECTION_TIMEOUTS] == {None: 0}
    assert points[semconv.CONNECTION_CLOSES] == dict.fromkeys(close_reasons, 0)
    assert points[semconv.LEAKS] == dict.fromkeys(leak_kinds, 0)
