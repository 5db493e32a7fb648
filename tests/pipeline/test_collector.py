"""The real collector: our distribution (collector-config/builder-config.yaml) validates and
starts every shipped config, and contains exactly the components those configs use."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
import yaml

from pipeline.collector import MANIFEST, SHIPPED, collector_binary, load, runnable

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")
# The file exporter is in the distribution for the tests: it stands in for Tempo.
TEST_ONLY = {("exporters", "file")}


def used_components() -> set[tuple[str, str]]:
    """(kind, type) of every component the shipped configs define."""
    used = set()
    for name in SHIPPED:
        config = load(name)
        for kind in KINDS:
            used |= {(kind, key.split("/")[0]) for key in config.get(kind) or {}}
    return used


def built_components() -> set[tuple[str, str]]:
    result = subprocess.run(
        [str(collector_binary()), "components"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    listed = yaml.safe_load(result.stdout)
    return {(kind, item["name"]) for kind in KINDS for item in listed.get(kind) or []}


def test_the_distribution_has_exactly_the_components_the_configs_use():
    assert built_components() == used_components() | TEST_ONLY


def test_the_manifest_uses_one_collector_release():
    manifest = yaml.safe_load(MANIFEST.read_text())
    versions = {entry["gomod"].split()[1] for kind in KINDS for entry in manifest.get(kind) or []}
    assert versions == {f"v{manifest['dist']['version']}"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_collector_validates_the_shipped_config(name: str):
    result = subprocess.run(
        [str(collector_binary()), "validate", f"--config={SHIPPED[name]}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{name}.yaml:\n{result.stdout}\n{result.stderr}"


def test_validate_rejects_a_wrong_key(tmp_path):
    """The validation above can fail: a misspelt spanmetrics key is refused."""
    config = load("otelcol")
    spanmetrics = config["connectors"]["span_metrics"]
    spanmetrics["dimension"] = spanmetrics.pop("dimensions")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(collector_binary()), "validate", f"--config={path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "dimension" in result.stderr


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_config_starts_and_reports_healthy(name: str, tmp_path):
    gateways = ["127.0.0.1:1"] if name == "otelcol-agent" else None
    config = runnable(name, tmp_path, gateways=gateways)
    path = config.write(tmp_path / f"{name}.yaml")
    log = tmp_path / "collector.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(collector_binary()), f"--config={path}"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        healthy = False
        while time.monotonic() < deadline and process.poll() is None and not healthy:
            try:
                health = httpx.get(f"http://127.0.0.1:{config.ports['health']}/")
                healthy = health.status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
        assert healthy, f"{name} did not become healthy:\n{log.read_text()[-4000:]}"
        if "prometheus" in config.ports:
            response = httpx.get(f"http://127.0.0.1:{config.ports['prometheus']}/metrics")
            assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=20)
    # No error, and no deprecated name or setting (the collector warns about those).
    problems = [
        line for line in log.read_text().splitlines()
        if "\terror\t" in line or "deprecated" in line.lower()
    ]  # fmt: skip
    assert not problems, "\n".join(problems)
