"""The project's own collector distribution for the tests, and the shipped configs made runnable.

``collector_binary()`` runs scripts/build-collector.sh (a cached build of
collector-config/builder-config.yaml; seconds when cached). ``runnable()`` turns a shipped
config into one a test can start: every listener on 127.0.0.1 and a free port, Tempo replaced by
a file exporter (the test reads kept traces from it), the gateway's DNS name replaced by the
test's gateways, and optionally an unsampled copy of every span (the ground truth for tail
sampling). Nothing else of the shipped config changes.
"""

from __future__ import annotations

import copy
import functools
import json
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.queries import REPO

COLLECTOR_DIR = REPO / "collector-config"
BUILD_SCRIPT = REPO / "scripts" / "build-collector.sh"
MANIFEST = COLLECTOR_DIR / "builder-config.yaml"
SHIPPED = {name: COLLECTOR_DIR / f"{name}.yaml" for name in ("otelcol", "otelcol-agent",
                                                             "otelcol-gateway")}  # fmt: skip
TEMPO_EXPORTER = "otlp_grpc/tempo"
KEPT_EXPORTER = "file/kept"  # stands in for Tempo
ALL_EXPORTER = "file/all"  # every span, before sampling (test only)
ALL_PIPELINE = "traces/all"


class CollectorUnavailable(Exception):
    """The build script could not run here (no Go): a reason to skip, not a failure."""


@functools.cache
def _build() -> str:
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800
    )
    if result.returncode == 2 and "Go not found" in result.stderr:
        raise CollectorUnavailable(result.stderr.strip())
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def collector_binary() -> Path:
    """Path of the built collector; skips the calling test when Go is not installed."""
    try:
        return Path(_build())
    except CollectorUnavailable as exc:
        pytest.skip(f"the collector distribution needs Go to build: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(name: str) -> dict:
    return yaml.safe_load(SHIPPED[name].read_text())


@dataclass
class Runnable:
    """A shipped config rewritten for a test, and where it listens / writes."""

    config: dict
    ports: dict[str, int] = field(default_factory=dict)  # otlp_grpc, otlp_http, prometheus, ...
    kept: Path | None = None  # traces the shipped pipeline exported (Tempo's stand-in)
    all_spans: Path | None = None  # every span received, before sampling

    def write(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return path


def runnable(
    name: str,
    out_dir: Path,
    *,
    record_all_spans: bool = False,
    gateways: list[str] | None = None,
) -> Runnable:
    """The shipped config ``name`` with loopback listeners, file exporters and free ports."""
    config = copy.deepcopy(load(name))
    ports: dict[str, int] = {}
    for protocol, settings in config["receivers"]["otlp"]["protocols"].items():
        ports[f"otlp_{protocol}"] = free_port()
        settings["endpoint"] = f"127.0.0.1:{ports[f'otlp_{protocol}']}"
    ports["health"] = free_port()
    config["extensions"]["health_check"]["endpoint"] = f"127.0.0.1:{ports['health']}"
    reader = config["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]
    ports["telemetry"] = free_port()
    reader["prometheus"].update(host="127.0.0.1", port=ports["telemetry"])
    exporters = config["exporters"]
    if "prometheus" in exporters:
        ports["prometheus"] = free_port()
        exporters["prometheus"]["endpoint"] = f"127.0.0.1:{ports['prometheus']}"
    if "load_balancing" in exporters:
        assert gateways, f"{name}: the load_balancing exporter needs the test's gateways"
        exporters["load_balancing"]["resolver"] = {"static": {"hostnames": gateways}}

    result = Runnable(config, ports)
    pipelines = config["service"]["pipelines"]
    if TEMPO_EXPORTER in exporters:
        result.kept = out_dir / f"{name}-kept.jsonl"
        del exporters[TEMPO_EXPORTER]
        exporters[KEPT_EXPORTER] = {"path": str(result.kept), "flush_interval": "100ms"}
        for pipeline in pipelines.values():
            pipeline["exporters"] = [
                KEPT_EXPORTER if e == TEMPO_EXPORTER else e for e in pipeline["exporters"]
            ]
    if record_all_spans:
        result.all_spans = out_dir / f"{name}-all.jsonl"
        exporters[ALL_EXPORTER] = {"path": str(result.all_spans), "flush_interval": "100ms"}
        pipelines[ALL_PIPELINE] = {"receivers": ["otlp"], "exporters": [ALL_EXPORTER]}
    return result


# --- reading the file exporter's output (OTLP/JSON, one export request per line) --------------
@dataclass
class Span:
    trace_id: str
    span_id: str
    name: str
    service: str
    attributes: dict
    events: list[str]
    error: bool


def _value(any_value: dict):
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    return any_value


def _attributes(items: list[dict] | None) -> dict:
    return {item["key"]: _value(item.get("value", {})) for item in items or []}


def read_spans(path: Path | None) -> list[Span]:
    if path is None or not path.exists():
        return []
    spans = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        for resource_spans in json.loads(line).get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes"))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    spans.append(
                        Span(
                            trace_id=span["traceId"],
                            span_id=span["spanId"],
                            name=span["name"],
                            service=resource.get("service.name", ""),
                            attributes=_attributes(span.get("attributes")),
                            events=[e["name"] for e in span.get("events", [])],
                            error=span.get("status", {}).get("code") == 2,
                        )
                    )
    return spans


def traces(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for span in spans:
        out.setdefault(span.trace_id, []).append(span)
    return out
