"""promtool checks: Prometheus config, alerting rules, rule unit tests, dashboard PromQL syntax."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.queries import REPO, RULES_DIR, all_queries, rule_files

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found on PATH (Debian: apt-get install prometheus; or a Prometheus "
    "release tarball); these tests validate the Prometheus config and run the alert unit tests",
)

PROMETHEUS_YML = REPO / "collector-config" / "prometheus.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_prometheus_config_is_valid():
    out = promtool("check", "config", str(PROMETHEUS_YML)).stdout
    # rule_files is resolved relative to the config: the shipped rules must be found.
    for path in rule_files():
        assert path.name in out


def test_rules_are_valid():
    promtool("check", "rules", *map(str, rule_files()))


def test_rule_unit_tests_pass():
    assert RULE_TESTS, "no promtool unit tests in collector-config/rules/tests/"
    promtool("test", "rules", *map(str, RULE_TESTS))


def _alerts() -> dict[str, dict]:
    return {
        rule["alert"]: rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _test_cases() -> list[dict]:
    cases = []
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        rule_refs = {(path.parent / ref).resolve() for ref in doc["rule_files"]}
        assert rule_refs <= {p.resolve() for p in rule_files()}, path
        cases.extend(doc["tests"])
    return cases


def test_every_alert_has_firing_and_silent_unit_tests_for_both_label_sets():
    alerts = _alerts()
    assert alerts
    fires: dict[str, set[str]] = {name: set() for name in alerts}
    silent: set[str] = set()
    for case in _test_cases():
        series = [s["series"] for s in case["input_series"]]
        label_set = "collector" if any("service_instance_id=" in s for s in series) else "direct"
        for check in case.get("alert_rule_test", []):
            name = check["alertname"]
            assert name in alerts, f"unit test for unknown alert {name}"
            if check.get("exp_alerts"):
                fires[name].add(label_set)
                for exp in check["exp_alerts"]:
                    assert exp["exp_labels"]["severity"] == alerts[name]["labels"]["severity"]
            else:
                silent.add(name)
    for name, rule in alerts.items():
        assert fires[name], f"{name}: no test where it fires"
        assert name in silent, f"{name}: no test where it stays silent"
        if "traces_span_metrics_" in rule["expr"]:
            assert "collector" in fires[name], name  # span metrics exist only via the collector
        else:
            assert fires[name] == {"direct", "collector"}, f"{name}: fires only for {fires[name]}"


def test_alert_annotations_follow_the_runbook_order():
    order = ["1. Metrics", "2. Session lifecycle", "3. Explicit pool limits", "4. Load test",
             "5. Only then"]  # fmt: skip
    for name, rule in _alerts().items():
        annotations = rule["annotations"]
        assert annotations.get("summary"), name
        description = annotations.get("description", "")
        positions = [description.find(step) for step in order]
        assert -1 not in positions, f"{name}: runbook steps missing: {positions}"
        assert positions == sorted(positions), f"{name}: runbook steps out of order"
        assert "max_connections" in description.split("5. Only then")[1], name


def test_alert_aggregations_keep_job_and_instance():
    """Both label sets (direct scrape / collector) collapse onto job, instance and pool."""
    for name, rule in _alerts().items():
        expr = rule["expr"]
        assert "job" in expr and "db_client_connection_pool_name" in expr, name
        for clause in ("sum by (", "max by ("):
            for part in expr.split(clause)[1:]:
                grouping = part.split(")")[0]
                assert "job" in grouping, f"{name}: {clause}{grouping}) drops job"


def test_every_dashboard_and_datasource_query_is_valid_promql(tmp_path):
    """Grafana does not check PromQL; promtool does, via a throw-away recording-rule file."""
    queries = [q for q in all_queries() if q.kind in ("panel", "variable", "datasource")]
    assert queries
    rules = [{"record": f"pipeline:query_{i}", "expr": q.promql} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        details = "\n".join(f"{i}: {q.where}: {q.promql}" for i, q in enumerate(queries))
        pytest.fail(f"{result.stdout}\n{result.stderr}\n{details}")
