"""The scenario suite's harness: a FastAPI app in its own uvicorn process on 127.0.0.1, real
load (wrk or the built-in generator) against the embedded PostgreSQL, and the doctor sampling
the app's /metrics endpoint over the same window.

The app runs in its own process so its event loop and CPU are its own: the load generator and
the doctor must not be what blocks it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL
from tests.uvicorn_thread import free_port

from sqlalchemy_pool_tools.doctor import Diagnosis, diagnose
from sqlalchemy_pool_tools.loadtest import LoadResult, run_load
from sqlalchemy_pool_tools.pg import with_driver

APPS = Path(__file__).parent / "apps"
SCRAPE_INTERVAL_S = 0.5


@dataclass
class Outcome:
    """What one scenario run produced: the doctor's diagnosis and what the clients saw."""

    diagnosis: Diagnosis
    load: LoadResult
    log: str

    @property
    def verdict(self) -> str:
        return self.diagnosis.verdict

    def finding(self, kind: str):
        return next((f for f in self.diagnosis.findings if f.kind == kind), None)

    def explain(self) -> str:
        """Enough context in an assertion message to see why a verdict differs."""
        fig = self.diagnosis.figures
        keys = (
            "checkouts", "used_max", "max_connections", "saturated_share", "pending_max",
            "timeouts", "wait_p99", "use_mean", "use_p95", "busy_mean", "held_idle_share",
            "held_idle_in_tx_share", "leaks_by_kind", "closes_by_reason", "connect_errors",
            "too_many_clients", "cpu_cores", "loop_active_share", "loop_blocked_share",
            "loop_cpu_demand", "loop_runqueue_share", "loop_lag_p99", "blocking_sites",
            "request_error_share", "slow_statement_sites",
        )  # fmt: skip
        figures = {k: getattr(fig, k) for k in keys}
        findings = [(f.kind, f.severity, f.title) for f in self.diagnosis.findings]
        load = (
            f"{self.load.run.requests} req, {self.load.rps:.0f}/s, errors {self.load.errors}, "
            f"p99 {self.load.latency_s.get('p99')} s"
        )
        return f"\nfindings={findings}\nfigures={figures}\nload: {load}\napp log: {self.log[-800:]}"


class ScenarioApp:
    """``uvicorn <module>:app`` in its own process group, stopped with SIGTERM then SIGKILL."""

    def __init__(self, module: str, database_url: str, env: dict[str, str], log_dir: Path):
        self.module = module
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SCENARIO_DATABASE_URL": database_url,
            "OTEL_SEMCONV_STABILITY_OPT_IN": "http",
            **env,
        }
        self.log_path = log_dir / f"{module}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ScenarioApp:
        command = [
            sys.executable, "-m", "uvicorn", f"{self.module}:app", "--app-dir", str(APPS),
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
            "--no-access-log",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.module} did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def scenario_db(pg_server_url: URL) -> str:
    """One database for the suite, with the few tables the apps use (URL without driver)."""
    from sqlalchemy_pool_tools.pg import create_database

    url = create_database(pg_server_url, prefix="scenarios")
    engine = sa.create_engine(with_driver(url, "psycopg"))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id int PRIMARY KEY, name text, price int)")
        conn.exec_driver_sql(
            "INSERT INTO items SELECT i, 'item ' || i, i * 100 FROM generate_series(1, 200) i"
        )
        conn.exec_driver_sql(
            "CREATE TABLE audit (id serial PRIMARY KEY, item_id int, note text, "
            "at timestamptz DEFAULT now())"
        )
    engine.dispose()
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def scenario(scenario_db: str, tmp_path_factory: pytest.TempPathFactory):
    """``scenario(module, path, connections=, duration_s=, drain_s=, env=)`` -> Outcome.

    Runs are cached for the session: the closed-loop tests compare against the same run the
    verdict tests judged."""
    log_dir = tmp_path_factory.mktemp("scenario-logs")
    cache: dict[tuple, Outcome] = {}

    def run(
        module: str,
        path: str,
        *,
        connections: int = 16,
        duration_s: float = 6.0,
        drain_s: float = 1.0,
        env: dict[str, str] | None = None,
        pool: str = "main",
    ) -> Outcome:
        key = (module, path, connections, duration_s, drain_s, tuple(sorted((env or {}).items())))
        if key not in cache:
            cache[key] = _run(module, path, connections, duration_s, drain_s, env or {}, pool)
        return cache[key]

    def _run(
        module: str,
        path: str,
        connections: int,
        duration_s: float,
        drain_s: float,
        env: dict[str, str],
        pool: str,
    ) -> Outcome:
        with ScenarioApp(module, scenario_db, env, log_dir) as app:
            for _ in range(3):  # warm up: first connections, imports, route compilation
                httpx.get(app.url + path, timeout=10)
            # The doctor's figures come from the load test's one metrics sampler, over the
            # load plus the drain (work that outlives the responses lands in the window).
            load = run_load(
                app.url + path,
                duration_s=duration_s,
                connections=connections,
                timeout_s=15,
                metrics_url=app.url + "/metrics",
                drain_s=drain_s,
                sample_interval_s=SCRAPE_INTERVAL_S,
            )
            if pool not in load.pools:
                raise AssertionError(f"no pool {pool!r} in {list(load.pools)}: {app.log()}")
            return Outcome(diagnose(load.pools[pool]), load, app.log())

    return run


@contextlib.contextmanager
def held_connections(database_url: str, leave_free: int) -> Iterator[int]:
    """Sibling workers: hold server connections until only ``leave_free`` slots are left."""
    import psycopg

    conns = []
    try:
        with psycopg.connect(database_url, autocommit=True) as probe:
            max_connections = int(probe.execute("SHOW max_connections").fetchone()[0])
            used = probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchone()[0]
        # The probe itself is closed when we open the siblings.
        for _ in range(max_connections - (used - 1) - leave_free):
            conns.append(psycopg.connect(database_url, autocommit=True))
        yield max_connections
    finally:
        for conn in conns:
            conn.close()
