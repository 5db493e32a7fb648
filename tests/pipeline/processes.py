"""Real processes for the end-to-end pipeline tests: start, wait until ready, stop; a real
Prometheus with the shipped rules; its HTTP API. Loopback only, bounded waits."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipeline.queries import rule_files

PROMETHEUS = shutil.which("prometheus")
FOR_IN_TEST = "2s"


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout}s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_rules(directory: Path) -> list[str]:
    """Copies of the shipped rule files, evaluated every second, with every ``for:`` shortened
    (thresholds unchanged)."""
    paths = []
    for path in rule_files():
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = FOR_IN_TEST
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(str(copy))
    return paths


test_rules.__test__ = False  # a helper, not a pytest test


def start_prometheus(scrape_configs: list[dict], tmp_path: Path, port: int):
    """A real Prometheus (exemplar storage on) scraping every second with the shipped rules.

    Returns (url, process); the caller stops the process."""
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not on PATH (Debian: apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": test_rules(tmp_path),
        "scrape_configs": scrape_configs,
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    process = start(
        [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", process, log)
    except BaseException:
        stop(process)
        raise
    return url, process


async def firing(client: httpx.AsyncClient) -> dict[str, list[dict]]:
    """alertname -> firing alerts."""
    alerts = (await client.get("/api/v1/alerts")).json()["data"]["alerts"]
    out: dict[str, list[dict]] = {}
    for alert in alerts:
        if alert["state"] == "firing":
            out.setdefault(alert["labels"]["alertname"], []).append(alert)
    return out


async def query(client: httpx.AsyncClient, promql: str) -> tuple[str, list]:
    response = await client.post("/api/v1/query", data={"query": promql})
    body = response.json()
    if body.get("status") != "success":
        return f"error: {body.get('error')}", []
    return "success", body["data"]["result"]
