"""Every PromQL expression the pipeline ships, ready to send to a real Prometheus.

Sources: the Grafana dashboards (panel targets and template-variable queries), the Grafana
data source provisioning (Tempo's trace-to-metrics queries) and the alerting rules.

Grafana syntax is replaced by something Prometheus accepts:

* template variables (``$job``, ``${pool}``, ``[[instance]]``; always inside ``=~"..."``
  matchers) become ``.*``;
* ``$__rate_interval`` / ``$__interval`` become ``1m``, ``$__range`` becomes ``5m``;
* ``$__tags`` (trace-to-metrics) becomes ``job=~".+"``;
* ``label_values(selector, label)`` becomes ``count by (label) (selector)``;
* ``query_result(expr)`` (a variable whose values a regex takes from the result) becomes
  ``expr``;
* ``$$`` in provisioning files (an escaped ``$``) becomes ``$``.

Usage::

    from pipeline.queries import all_queries  # tests/ is on sys.path under pytest
    for query in all_queries():
        print(query.kind, query.where, query.promql, query.requires_collector)

``requires_collector`` marks queries over the collector's span metrics
(``traces_span_metrics_*``): they return data only when the app exports traces through the
collector, never for a direct scrape of the app.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "datasources.yml"
RULES_DIR = REPO / "collector-config" / "rules"

RATE_INTERVAL = "1m"
RANGE = "5m"
COLLECTOR_ONLY_PREFIX = "traces_span_metrics_"

_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\[\[([A-Za-z_]\w*)\]\]|\$([A-Za-z_]\w*)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.+)\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    kind: str  # "panel" | "variable" | "datasource" | "alert"
    source: str  # file path relative to the repository
    where: str  # dashboard / panel title / refId, variable name, alert name ...
    expr: str  # as written in the file
    promql: str  # what to send to Prometheus

    @property
    def metrics(self) -> set[str]:
        return metric_names(self.promql)

    @property
    def requires_collector(self) -> bool:
        return any(name.startswith(COLLECTOR_ONLY_PREFIX) for name in self.metrics)


def to_promql(
    expr: str, *, provisioning: bool = False, variables: dict[str, str] | None = None
) -> str:
    """Substitute Grafana macros and template variables; see the module docstring.

    ``variables`` gives some variables a value (a regex, as Grafana would put in the ``=~``
    matcher); the others are "All" (``.*``).
    """
    if provisioning:
        expr = expr.replace("$$", "$")
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = f"count by ({match.group(2)}) ({match.group(1)})"
    match = _QUERY_RESULT.match(expr)
    if match:
        expr = match.group(1)
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    expr = expr.replace("$__interval", RATE_INTERVAL)
    expr = expr.replace("$__range", RANGE)
    expr = expr.replace("$__tags", 'job=~".+"')
    values = variables or {}
    return _VARIABLE.sub(lambda m: values.get(next(g for g in m.groups() if g), ".*"), expr)


def template_variables(expr: str) -> list[str]:
    """Names of the Grafana variables an expression uses (macros excluded)."""
    names = []
    for match in _VARIABLE.finditer(expr):
        name = next(group for group in match.groups() if group)
        if not name.startswith("__"):
            names.append(name)
    return names


# --- metric-name extraction ------------------------------------------------------------------
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
    # aggregation operators can stand without parentheses after them only in "sum by (x) (...)"
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "limitk", "limit_ratio",
}  # fmt: skip


def metric_names(promql: str) -> set[str]:
    """Metric names referenced by a PromQL expression (also ``{__name__="x"}`` matchers)."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', promql))
    text = _STRING.sub('""', promql)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range / subquery durations
    text = _GROUPING.sub(" ", text)
    for match in _IDENT.finditer(text):
        word = match.group(0)
        start, end = match.span()
        if start and (text[start - 1].isdigit() or text[start - 1] == "."):
            continue  # part of a number such as 1e3 or a duration such as 5m
        rest = text[end:].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function call or an operator
        names.add(word)
    return names


# --- sources ---------------------------------------------------------------------------------
def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _walk_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def dashboard_queries() -> list[Query]:
    out = []
    for path in dashboard_files():
        board = json.loads(path.read_text())
        title = board.get("title", path.stem)
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            raw = variable.get("query")
            expr = raw.get("query", "") if isinstance(raw, dict) else raw or ""
            if expr:
                out.append(
                    Query("variable", _rel(path), f"{title} / ${variable['name']}", expr,
                          to_promql(expr))
                )  # fmt: skip
        for panel in _walk_panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if expr:
                    where = f"{title} / {panel.get('title')} / {target.get('refId')}"
                    out.append(Query("panel", _rel(path), where, expr, to_promql(expr)))
    return out


def datasource_queries() -> list[Query]:
    out = []
    config = yaml.safe_load(DATASOURCES.read_text())
    for source in config.get("datasources", []):
        t2m = (source.get("jsonData") or {}).get("tracesToMetrics") or {}
        for item in t2m.get("queries", []):
            where = f"{source['name']} tracesToMetrics / {item.get('name')}"
            promql = to_promql(item["query"], provisioning=True)
            out.append(Query("datasource", _rel(DATASOURCES), where, item["query"], promql))
    return out


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.rules.yml"))


def rule_queries() -> list[Query]:
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert") or rule.get("record")
                kind = "alert" if "alert" in rule else "record"
                expr = rule["expr"].strip()
                out.append(Query(kind, _rel(path), f"{group['name']} / {name}", expr, expr))
    return out


def all_queries() -> list[Query]:
    """Every expression from the dashboards, the data sources and the rules."""
    return dashboard_queries() + datasource_queries() + rule_queries()


if __name__ == "__main__":  # print them, e.g. to paste into the Prometheus UI
    for query in all_queries():
        flag = " [collector]" if query.requires_collector else ""
        print(f"# {query.kind}: {query.where}{flag}\n{query.promql}\n")
