"""``sqlalchemy-pool demo``: the reference app under load, leaky vs fixed vs undersized.

One command, nothing to set up: an embedded PostgreSQL starts (``DATABASE_URL`` overrides
it; a fresh database is created on that server), gets a little schema and data, and each
scenario runs against a fresh app subprocess under bounded load:

* ``leaky``      the leaky build: the request session is handed to a background task that
                 holds a transaction open across a slow call, after the response;
* ``fixed``      the fixed build, same pool and same load;
* ``undersized`` the fixed build with a pool honestly too small for the concurrency.

For each scenario the report puts client figures (req/s, latency percentiles, errors) next
to the pool figures over the same window (checked-out, pending, wait p99, held-idle share,
leaks and sessions that outlived their response, with the code sites holding connections,
and pg_stat_activity states), then the doctor's verdict and a leaky-vs-fixed table.
``--serve`` instead keeps one app and the database running for Prometheus/Grafana.
Everything (database, subprocesses) is cleaned up on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy_pool_tools.demo import DATABASE_URL_ENV, HOLDERS_PATH
from sqlalchemy_pool_tools.doctor import _format as fmt
from sqlalchemy_pool_tools.doctor.figures import Figures
from sqlalchemy_pool_tools.doctor.report import to_dict as diagnosis_to_dict
from sqlalchemy_pool_tools.doctor.verdict import (
    HEALTHY,
    LEAKED_SESSIONS,
    UNDERSIZED_POOL,
    Diagnosis,
    diagnose,
)
from sqlalchemy_pool_tools.errors import UserError
from sqlalchemy_pool_tools.loadtest import (
    MAX_REPEAT,
    LoadResult,
    compare,
    describe_load,
    format_pool,
    latency_line,
    load_warning,
    outlived,
    run_load,
)

SCENARIO_NAMES = ("leaky", "fixed", "undersized")
FULL_DURATION_S = 15.0
QUICK_DURATION_S = 5.0
APP_START_TIMEOUT_S = 30.0
RESULT_VERSION = 2
IDLE_IN_TX_FLAG_S = 0.1  # holder parked this long inside a transaction: flag it


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One app configuration and the load put on it."""

    name: str
    title: str
    build: str
    pool_size: int
    max_overflow: int
    pool_timeout: float
    work_ms: float
    slow_io_ms: float
    paths: tuple[str, ...]
    connections: int
    rate: float | None  # requests/s; None = as fast as the app answers (closed loop)
    expected: str  # the doctor verdict this scenario should get

    def app_args(self) -> list[str]:
        return [
            "--build",
            self.build,
            "--pool-size",
            str(self.pool_size),
            "--max-overflow",
            str(self.max_overflow),
            "--pool-timeout",
            str(self.pool_timeout),
            "--work-ms",
            str(self.work_ms),
            "--slow-io-ms",
            str(self.slow_io_ms),
        ]

    def describe(self, with_load: bool = True) -> str:
        pool = f"pool {self.pool_size}+{self.max_overflow}, timeout {self.pool_timeout:g} s"
        if not with_load:
            return f"{self.build} build, {pool}"
        rate = f", ~{self.rate:g} req/s" if self.rate else ""
        return f"{self.build} build, {pool}; {self.connections} connections{rate}"


# The leaky and fixed runs share pool and load so the comparison is fair. Half of the
# requests are reports (~10/s); in the leaky build each keeps a connection 1.5 s after its
# response: 15 connections' worth of holding, more than the 10 the pool has. No overflow:
# overflow connections are opened and closed under load, and that connect time would blur
# the fixed build's wait figures. The undersized pool is busy running real (short) queries:
# no idle holding, just not enough connections for 20 concurrent requests. Loads stay
# modest: the load generator, PostgreSQL and the app share 2 cores, and an instrumented async
# request costs ~10 ms of CPU on a small VM; a starved event loop would make even correct
# code look like it holds connections idle.
SCENARIOS: dict[str, Scenario] = {
    "leaky": Scenario(
        name="leaky",
        title="leaky build: request session used by a background task, I/O in a transaction",
        build="leaky",
        pool_size=10,
        max_overflow=0,
        pool_timeout=2.0,
        work_ms=20.0,
        slow_io_ms=1500.0,
        paths=("/orders", "/orders/report"),
        connections=20,
        rate=20.0,
        expected=LEAKED_SESSIONS,
    ),
    "fixed": Scenario(
        name="fixed",
        title="fixed build: fresh session in the background task, no I/O in transactions",
        build="fixed",
        pool_size=10,
        max_overflow=0,
        pool_timeout=2.0,
        work_ms=20.0,
        slow_io_ms=1500.0,
        paths=("/orders", "/orders/report"),
        connections=20,
        rate=20.0,
        expected=HEALTHY,
    ),
    "undersized": Scenario(
        name="undersized",
        title="undersized pool: correct code, too few connections for the concurrency",
        build="fixed",
        pool_size=2,
        max_overflow=0,
        pool_timeout=1.0,
        work_ms=25.0,
        slow_io_ms=0.0,
        paths=("/orders",),
        connections=20,
        rate=None,
        expected=UNDERSIZED_POOL,
    ),
}


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class Progress:
    """One line per phase on stderr (stdout stays clean for ``--json``).

    On a terminal the line is written when the phase starts and completed with its duration
    when it ends; elsewhere (CI logs, pipes) each phase is one plain line as it starts.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self._open = False

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.monotonic()
        if self.tty:
            self.stream.write(f"{self._stamp()} {text} ... ")
            self._open = True
        else:
            self.stream.write(f"{self._stamp()} {text}\n")
        self.stream.flush()
        outcome = "failed"
        try:
            yield
            outcome = f"done ({time.monotonic() - t0:.1f} s)"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            if self.tty and self._open:
                self.stream.write(outcome + "\n")
                self.stream.flush()
                self._open = False

    def note(self, text: str) -> None:
        if self.enabled:
            if self._open:
                self.stream.write("\n")
                self._open = False
            self.stream.write(f"{self._stamp()} {text}\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# The app subprocess
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppProcess:
    """The demo app under uvicorn in its own process group, so cleanup can kill it all."""

    def __init__(
        self, database_url: str, args: Sequence[str], log_dir: Path, port: int | None = None
    ) -> None:
        self.database_url = database_url
        self.args = list(args)
        self.log_path = log_dir / f"app-{len(list(log_dir.glob('app-*.log')))}.log"
        self.fixed_port = port
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        if self.fixed_port:
            # Something else answering /healthz on this port must not pass for our app.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", self.fixed_port))
                except OSError:
                    raise UserError(f"port {self.fixed_port} is already in use") from None
        self.port = self.fixed_port or free_port()
        command = [
            sys.executable,
            "-m",
            "sqlalchemy_pool_tools.demo.server",
            "--port",
            str(self.port),
            "--exit-with-parent",
            *self.args,
        ]
        # The URL (maybe with a password) goes through the environment, not the command line
        # that every `ps` shows.
        env = dict(os.environ, **{DATABASE_URL_ENV: self.database_url})
        with open(self.log_path, "ab") as log:
            # start_new_session: Ctrl-C in the terminal reaches only us; we stop the app.
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def start(self, timeout_s: float = APP_START_TIMEOUT_S) -> None:
        import httpx

        for attempt in range(3):  # the free port may be taken between probe and bind
            self._spawn()
            assert self.proc is not None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                self.stop()
                raise UserError(f"the demo app did not start in {timeout_s:.0f} s")
            tail = self.log_tail()
            if "address already in use" in tail.lower() and not self.fixed_port and attempt < 2:
                continue
            if "address already in use" in tail.lower():
                raise UserError(f"port {self.port} is already in use")
            raise UserError(f"the demo app exited at startup: {tail or 'no output'}")

    def stop(self, timeout_s: float = 8.0) -> None:
        """SIGTERM the whole process group (uvicorn shuts down gracefully), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --------------------------------------------------------------------------------------------
# Database
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def demo_database(progress: Progress) -> Iterator[tuple[str, str]]:
    """A fresh database with the demo schema: ``(url with password, source description)``."""
    from sqlalchemy_pool_tools import pg
    from sqlalchemy_pool_tools.demo.app import ORDER_ROWS, create_schema

    external = bool(os.environ.get("DATABASE_URL"))
    source = "DATABASE_URL" if external else "embedded PostgreSQL"
    with progress.phase(f"starting {source}" if not external else "connecting to DATABASE_URL"):
        server_cm = pg.database_url()
        try:
            admin_url = server_cm.__enter__()
        except Exception as exc:
            raise UserError(f"cannot start PostgreSQL: {_one_line(exc)}") from None
    try:
        with progress.phase(f"creating a database with {ORDER_ROWS} orders"):
            try:
                url = pg.create_database(admin_url, prefix="sqla_pool_demo")
                create_schema(url)
            except Exception as exc:
                raise UserError(f"cannot create the demo database: {_one_line(exc)}") from None
        try:
            yield url.render_as_string(hide_password=False), source
        finally:
            if external:  # an embedded server disappears with its data directory anyway
                _drop_database(admin_url, url.database)
    finally:
        with progress.phase("stopping PostgreSQL" if not external else "dropping the database"):
            try:
                server_cm.__exit__(None, None, None)
            except Exception as exc:  # after Ctrl-C the server may already be gone
                progress.note(f"PostgreSQL cleanup: {_one_line(exc)}")


def _drop_database(admin_url: Any, name: str | None) -> None:
    import sqlalchemy as sa

    from sqlalchemy_pool_tools.pg import with_driver

    if not name:
        return
    engine = sa.create_engine(with_driver(admin_url, "psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass  # best effort: never hide the real outcome of the run behind cleanup
    finally:
        engine.dispose()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Holders: which code holds the connections (sampled during the load)
# --------------------------------------------------------------------------------------------
def code_site(record: dict[str, Any]) -> str | None:
    """``function (file:line)`` from a holder record of the instrumentor's ``holders()``."""
    path = record["code_file"]
    return fmt.code_site(record["code_function"], path and Path(path).name, record["code_line"])


class HoldersSampler:
    """Polls the app's holders route and tallies the code sites seen holding connections."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples = 0
        self.max_holders = 0
        self.sites: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="holders-sampler", daemon=True)

    def _take(self, client: Any) -> None:
        try:
            data = client.get(self.url).json()
        except Exception:
            return  # best effort: the figures that matter come from /metrics
        # {"pools": {name: [holder, ...]}} from the instrumentor's holders app.
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, dict):
            return
        records = [r for rows in pools.values() if isinstance(rows, list) for r in rows]
        self.samples += 1
        self.max_holders = max(self.max_holders, len(records))
        for record in records:
            if not isinstance(record, dict):
                continue
            site = code_site(record) or "(unknown site)"
            tally = self.sites.setdefault(
                site,
                {"site": site, "seen": 0, "max_age_s": 0.0, "max_idle_in_transaction_s": 0.0,
                 "idle_in_transaction": False, "route": None},
            )  # fmt: skip
            tally["seen"] += 1
            tally["max_age_s"] = max(tally["max_age_s"], record["age_s"])
            idle_tx = record["idle_in_transaction_s"]
            tally["max_idle_in_transaction_s"] = max(tally["max_idle_in_transaction_s"], idle_tx)
            # A statement gap this long is not ORM overhead: the transaction is parked.
            tally["idle_in_transaction"] |= idle_tx >= IDLE_IN_TX_FLAG_S
            tally["route"] = tally["route"] or record.get("http_route")

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=2.0) as client:
            while not self._stop.wait(self.interval_s):
                self._take(client)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 5) -> list[dict[str, Any]]:
        return sorted(self.sites.values(), key=lambda t: (-t["seen"], t["site"]))[:n]


# --------------------------------------------------------------------------------------------
# Running a scenario
# --------------------------------------------------------------------------------------------
@dataclass
class ScenarioResult:
    scenario: Scenario
    load: LoadResult
    holders: dict[str, Any] = field(default_factory=dict)
    diagnoses: dict[str, Diagnosis] = field(default_factory=dict)  # pool -> the doctor's

    @property
    def pool(self) -> Figures | None:
        return self.load.main_pool

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The diagnosis of the pool the load went through (the busiest one)."""
        pool = self.pool
        return None if pool is None else self.diagnoses.get(pool.pool)

    @property
    def verdict(self) -> str | None:
        """The doctor's headline verdict for this scenario's pool."""
        return self.diagnosis.verdict if self.diagnosis else None

    @property
    def verdicts(self) -> list[str]:
        """The headline, then every other finding kind the doctor reported."""
        if self.diagnosis is None:
            return []
        kinds = [self.diagnosis.verdict, *(f.kind for f in self.diagnosis.findings)]
        return list(dict.fromkeys(kinds))

    def to_dict(self) -> dict[str, Any]:
        diagnoses = {}
        for pool, diagnosis in self.diagnoses.items():
            data = diagnosis_to_dict(diagnosis)
            data.pop("figures", None)  # already under "load" -> "pools"
            diagnoses[pool] = data
        return {
            "name": self.scenario.name,
            "title": self.scenario.title,
            "config": dataclasses.asdict(self.scenario),
            "load": self.load.to_dict(),
            "pool": self.pool.to_dict() if self.pool else None,
            "holders": self.holders,
            "diagnoses": diagnoses,
            "verdict": self.verdict,
            "verdicts": self.verdicts,
            "expected_verdict": self.scenario.expected,
        }


def warm_up(base_url: str, concurrency: int) -> None:
    """Concurrent requests so the pool opens its connections (and asyncpg its type caches)
    before the measured window: the run shows steady state, not connection setup."""
    import httpx

    async def go() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=15.0) as client:
            for _ in range(2):
                await asyncio.gather(
                    *(client.get(path) for path in ("/orders",) * max(1, concurrency))
                )

    try:
        asyncio.run(go())
    except httpx.HTTPError as exc:
        raise UserError(f"the demo app does not answer: {_one_line(exc)}") from None


def run_scenario(
    scenario: Scenario,
    database_url: str,
    duration_s: float,
    log_dir: Path,
    progress: Progress,
    tool: str = "builtin",
) -> ScenarioResult:
    """Fresh app, short warm-up, bounded load with metrics and holders sampling, the doctor's
    verdict on the same window, stop."""
    app = AppProcess(database_url, scenario.app_args(), log_dir)
    try:
        with progress.phase(f"{scenario.name}: starting the app ({scenario.describe()})"):
            app.start()
            warm_up(app.url, scenario.pool_size)
        drain_s = scenario.slow_io_ms / 1000 + 1.5  # let post-response work land in the window
        with progress.phase(f"{scenario.name}: load for {duration_s:g} s"):
            # Every scrape costs the app CPU: one sampler, once a second.
            holders = HoldersSampler(app.url + HOLDERS_PATH, interval_s=1.0)
            holders.start()
            try:
                load = run_load(
                    app.url,
                    duration_s=duration_s,
                    connections=scenario.connections,
                    rate=scenario.rate,
                    paths=list(scenario.paths),
                    metrics_url=app.url + "/metrics",
                    tool=tool,
                    timeout_s=10.0,
                    drain_s=drain_s,
                    sample_interval_s=1.0,
                    label=scenario.name,
                )
            finally:
                holders.stop()
        result = ScenarioResult(scenario=scenario, load=load)
        result.holders = {
            "samples": holders.samples,
            "max_holders": holders.max_holders,
            "top_sites": holders.top(),
        }
        result.diagnoses = {pool: diagnose(fig) for pool, fig in load.pools.items()}
        return result
    finally:
        app.stop()


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def format_scenario(result: ScenarioResult) -> str:
    run = result.load.run
    lines = [
        f"== {result.scenario.name}: {result.scenario.title}",
        f"   {result.scenario.describe()}; paths {', '.join(result.scenario.paths)}",
        f"   load         {describe_load(run)}",
        f"   requests     {run.requests:,} in {run.duration_s:.1f} s = {run.rps:.1f} req/s",
        f"   latency      {latency_line(run)}",
        f"   errors       {run.errors:,} (non-2xx {run.non_2xx:,}, timeouts {run.timeouts:,}, "
        f"socket {run.connect_errors + run.socket_errors:,})",
    ]
    warning = load_warning(run)
    if warning:
        lines.append(f"   {warning}")
    pool = result.pool
    sites = result.holders.get("top_sites") or []
    if pool is None:
        lines.append("   pool         no pool metrics at the app's /metrics endpoint")
    else:
        lines.extend(format_pool(pool, indent="   "))
        if outlived(pool):
            lines.append(
                f"   outlived     {fmt.count(outlived(pool))} sessions still held "
                "a connection after their response was sent"
            )
            parked = [site["site"] for site in sites if site["idle_in_transaction"]]
            if parked:
                lines.append(f"                idle in a transaction at: {'; '.join(parked[:2])}")
    if sites:
        lines.append("   holders      (code sites seen holding connections during the load)")
        for site in sites[:3]:
            extra = "; idle in transaction" if site["idle_in_transaction"] else ""
            lines.append(
                f"     {site['seen']:>4}x  {site['site']}  (max age {site['max_age_s']:.1f} s"
                f"{extra})"
            )
    diagnosis = result.diagnosis
    if diagnosis is not None:
        lines.append(f"   verdict      {diagnosis.verdict}")
        for finding in diagnosis.findings[:3]:
            lines.append(f"     [{finding.severity}] {finding.title}")
        culprits = next((f.culprits for f in diagnosis.findings if f.culprits), None)
        if culprits:
            lines.append(f"     culprits: {'; '.join(culprits[:3])}")
    return "\n".join(lines)


Results = dict[str, list[ScenarioResult]]  # scenario name -> its runs (``--repeat``)


def _comparison(results: Results) -> str | None:
    if "leaky" not in results or "fixed" not in results:
        return None
    return compare([r.load for r in results["leaky"]], [r.load for r in results["fixed"]])


def format_report(results: Results, source: str) -> str:
    parts = []
    for runs in results.values():
        section = format_scenario(runs[-1])
        if len(runs) > 1:
            section += f"\n   (the last of {len(runs)} runs; the table below has all of them)"
        parts.append(section)
    verdicts = ["== verdicts"]
    for name, runs in results.items():
        got = [r.verdict or "none (no pool metrics)" for r in runs]
        others = list(dict.fromkeys(v for r in runs for v in r.verdicts[1:] if v not in got))
        also = f" (also: {', '.join(others)})" if others else ""
        headline = ", ".join(got)
        verdicts.append(f"   {name:<11} {headline}{also}   [expected: {runs[0].scenario.expected}]")
    parts.append("\n".join(verdicts))
    table = _comparison(results)
    if table is not None:
        parts.append("== leaky (before) vs fixed (after), same pool and load\n" + table)
    first = next(iter(results.values()))[0].load.run
    parts.append(f"(database: {source}; load: {first.generator}, HDR histogram)")
    return "\n\n".join(parts)


def report_json(results: Results, source: str, duration_s: float) -> str:
    data: dict[str, Any] = {
        "version": RESULT_VERSION,
        "database": source,
        "duration_s": duration_s,
        "repeat": len(next(iter(results.values()))),
        # The last run of each scenario; every run under "runs".
        "scenarios": {name: runs[-1].to_dict() for name, runs in results.items()},
        "runs": {name: [r.to_dict() for r in runs] for name, runs in results.items()},
    }
    table = _comparison(results)
    if table is not None:
        data["comparison"] = {"before": "leaky", "after": "fixed", "table": table}
    return json.dumps(data, indent=2)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the same ``finally`` blocks clean up."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the reference app leaky vs fixed vs undersized under load",
        description="Start an embedded PostgreSQL (DATABASE_URL overrides it), then run the "
        "reference FastAPI + SQLAlchemy app under bounded load in three scenarios (leaky build, "
        "fixed build, undersized pool) and report pool figures, verdicts and a before/after "
        "table. --serve keeps one app running for Prometheus/Grafana instead.",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_DURATION_S:g} s of load per scenario"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds of load per scenario (default {FULL_DURATION_S:g})",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIO_NAMES,
        help="run only this scenario (repeatable; default all)",
    )
    parser.add_argument(
        "--tool",
        choices=("builtin", "hey", "wrk"),
        default="builtin",
        help="load generator (wrk is refused: it fails the calibration)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the scenarios N times, interleaved; the table shows median and spread",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--serve", action="store_true", help="keep one app and the database running until Ctrl-C"
    )
    parser.add_argument(
        "--build", choices=("fixed", "leaky"), default="fixed", help="app build for --serve"
    )
    parser.add_argument("--port", type=int, default=8000, help="app port for --serve")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    if not 1 <= duration_s <= 300:
        raise UserError("--duration must be between 1 and 300 seconds")
    if not 1 <= args.repeat <= MAX_REPEAT:
        raise UserError(f"--repeat must be between 1 and {MAX_REPEAT}")
    if args.serve and not 1 <= args.port <= 65535:
        raise UserError("--port must be between 1 and 65535")
    progress = Progress(enabled=True)
    # Cleanup is layered: each app process is stopped by run_scenario/serve, the database by
    # demo_database, the log directory by TemporaryDirectory -- on errors and Ctrl-C alike.
    with (
        _terminate_on_sigterm(),
        tempfile.TemporaryDirectory(prefix="sqla-pool-demo-") as tmp,
        demo_database(progress) as (database_url, source),
    ):
        if args.serve:
            return serve(database_url, args.build, args.port, Path(tmp), progress)
        names = args.scenario or SCENARIO_NAMES
        results: Results = {name: [] for name in names}
        for _ in range(args.repeat):  # interleaved: leaky, fixed, undersized, leaky, ...
            for name in names:
                results[name].append(
                    run_scenario(
                        SCENARIOS[name], database_url, duration_s, Path(tmp), progress, args.tool
                    )
                )
    if args.json:
        print(report_json(results, source, duration_s))
    else:
        print(format_report(results, source))
    return 0


def serve(database_url: str, build: str, port: int, log_dir: Path, progress: Progress) -> int:
    """Keep one app (and the database) up until Ctrl-C, for Prometheus and Grafana."""
    scenario = SCENARIOS["leaky" if build == "leaky" else "fixed"]
    app = AppProcess(database_url, scenario.app_args(), log_dir, port=port)
    try:
        with progress.phase(f"starting the app ({scenario.describe(with_load=False)})"):
            app.start()
        print(f"app:      {app.url}  (build {build}; routes /orders, /orders/report)")
        print(f"metrics:  {app.url}/metrics")
        print(f"holders:  {app.url}{HOLDERS_PATH}  (sqlalchemy-pool holders URL)")
        print("Prometheus scrape config:")
        print("  - job_name: sqlalchemy-pool-demo")
        print(f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]")
        print(
            f"load it:  sqlalchemy-pool loadtest {app.url} --path /orders "
            f"--path /orders/report --metrics-url {app.url}/metrics"
        )
        print("Ctrl-C stops the app and the database.", flush=True)
        try:
            while app.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            progress.note("stopping")
            return 0
        raise UserError(f"the demo app exited: {app.log_tail() or 'no output'}")
    finally:
        app.stop()
