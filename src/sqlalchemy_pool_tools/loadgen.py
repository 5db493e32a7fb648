"""Calibrated HTTP load generators: a built-in one in its own process, and ``hey``.

The load test's numbers are only as good as its generator (Debian's wrk reported a p99 of
16 ms for a server whose true p99 was 3 s, and a p75 of 1.2 s for a true p95 of 13 ms), so
every generator here passes the calibration in :mod:`sqlalchemy_pool_tools.calibration`
against servers with known latency mixes, and wrk is refused.

* ``builtin``: asyncio over raw keep-alive HTTP/1.1 connections in a child process (it does
  not share a CPU-bound interpreter with the caller's sampler or app), latencies in an HDR
  histogram (``hdrhistogram``; 3 significant digits, 1 µs .. 1 h). Two modes:

  - **closed loop** (``rate=None``): ``connections`` clients, each sends its next request
    when the previous one is answered; latency = send -> last body byte.
  - **open loop** (``rate=R``): request *n* is due at ``start + n / R`` whatever happened
    before; at most ``connections`` are in flight, and latency is measured from the *due*
    time, so a stalled server is charged for the requests it kept waiting (no coordinated
    omission; wrk2's method).

* ``hey`` (closed loop only): Debian's Go generator, parsed from its summary.

Every request the server answers is counted; a request that exceeds ``timeout_s`` is an
error (``timeouts``) and, in the built-in generator, enters the histogram at ``timeout_s``
(a lower bound: a percentile at that value reads "at least the timeout"). Requests still in
flight when the duration ends are waited for (up to ``timeout_s``) and counted.

Python API (also used by the benchmark)::

    from sqlalchemy_pool_tools.loadgen import LoadSpec, generate
    run = generate(LoadSpec("http://127.0.0.1:8000", ["/orders"], duration_s=10,
                            connections=20, rate=None))
    run.mode, run.requests, run.errors, run.timeouts, run.rps, run.latency_s["p99"]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy_pool_tools.errors import UserError

GENERATORS = ("builtin", "hey")
# Refused with this reason (docs/demo.md "Load test calibration" has the measurements).
REFUSED = {
    "wrk": "wrk's percentiles fail the calibration (a p99 of 16 ms for a true 3 s, slow "
    "requests dropped at its timeout); use builtin or hey",
}
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
# HDR histogram range and precision: 1 µs .. 1 h, 3 significant digits (0.1 % error).
_HDR_MAX_US = 3_600_000_000
_HDR_DIGITS = 3


@dataclass
class LoadSpec:
    """What load to put on which target. ``rate`` None = closed loop, else open loop."""

    base_url: str  # scheme://host:port
    paths: list[str] = field(default_factory=lambda: ["/"])
    duration_s: float = 10.0
    connections: int = 20
    rate: float | None = None
    max_requests: int | None = None
    timeout_s: float = 10.0
    generator: str = "builtin"
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"


@dataclass
class LoadRun:
    """What the generator saw. Latencies in seconds; ``requests`` = answered (any status)."""

    generator: str
    mode: str  # "closed" | "open"
    connections: int
    rate: float | None
    timeout_s: float
    duration_s: float = 0.0  # first send -> last answer
    requests: int = 0
    non_2xx: int = 0
    timeouts: int = 0
    connect_errors: int = 0
    socket_errors: int = 0  # connection reset / closed mid-response
    latency_s: dict[str, float] = field(default_factory=dict)  # PERCENTILES, max, mean
    # Open loop: p99 of how late the generator sent a request it was free to send on time
    # (its own scheduling delay on a busy host, which the latencies include).
    send_lag_p99_s: float | None = None
    # Built-in generator: its CPU time / wall time. Near 1 it is the bottleneck, and its
    # latencies include its own queueing (use fewer connections, or hey).
    cpu_share: float | None = None

    @property
    def errors(self) -> int:
        """Every request that did not end in a 2xx response."""
        return self.non_2xx + self.timeouts + self.connect_errors + self.socket_errors

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_generator(name: str) -> None:
    """UserError unless ``name`` is a generator that passed calibration and is installed."""
    if name in REFUSED:
        raise UserError(f"refusing --tool {name}: {REFUSED[name]}")
    if name not in GENERATORS:
        raise UserError(f"unknown load generator {name!r} (builtin or hey)")
    if name == "hey" and not shutil.which("hey"):
        raise UserError("hey is not installed (apt-get install hey, or use --tool builtin)")


def generate(spec: LoadSpec) -> LoadRun:
    """Run the load described by ``spec`` and return what the client saw."""
    check_generator(spec.generator)
    if spec.generator == "hey":
        return _run_hey(spec)
    return _run_builtin_process(spec)


# --- built-in generator: the child process ---------------------------------------------------
def _run_child(name: str, command: list[str], spec: LoadSpec, stdin: str | None = None) -> str:
    """Run a generator process bounded in time; its stdout, or UserError with its last line."""
    try:
        proc = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=spec.duration_s + 2 * spec.timeout_s + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"{name} did not finish in time") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"{name} failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def _run_builtin_process(spec: LoadSpec) -> LoadRun:
    command = [sys.executable, "-m", "sqlalchemy_pool_tools.loadgen"]
    out = _run_child("the load generator", command, spec, json.dumps(dataclasses.asdict(spec)))
    return LoadRun(**json.loads(out))


class _ConnectFailed(Exception):
    """The TCP (or TLS) connection could not be opened."""


class _Connection:
    """One keep-alive HTTP/1.1 connection (reconnects after a close)."""

    def __init__(self, host: str, port: int, ssl: bool) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        try:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=True if self.ssl else None
            )
        except OSError as exc:
            raise _ConnectFailed(str(exc)) from exc

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def get(self, request: bytes) -> int:
        """Send one request, read the whole response; its status code."""
        reused = self.writer is not None
        if not reused:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line and reused:  # the server closed an idle keep-alive: once more
            self.close()
            await self.open()
            assert self.reader is not None and self.writer is not None
            self.writer.write(request)
            await self.writer.drain()
            status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before the response")
        status = int(status_line.split(None, 2)[1])
        length: int | None = None
        chunked = close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                await self.reader.readexactly(size + 2)
        elif length is not None:
            await self.reader.readexactly(length)
        else:
            await self.reader.read()
            close = True
        if close:
            self.close()
        return status


async def _builtin(spec: LoadSpec) -> LoadRun:
    from hdrh.histogram import HdrHistogram

    parts = urlsplit(spec.base_url)
    ssl = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if ssl else 80)
    extra = "".join(f"{name}: {value}\r\n" for name, value in spec.headers.items())
    requests = [
        f"GET {p} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: sqlalchemy-pool-loadtest\r\n"
        f"Accept: */*\r\n{extra}\r\n".encode()
        for p in spec.paths
    ]
    hist = HdrHistogram(1, _HDR_MAX_US, _HDR_DIGITS)
    lag = HdrHistogram(1, _HDR_MAX_US, _HDR_DIGITS)  # open loop: sent this late, connection free
    run = LoadRun(spec.generator, spec.mode, spec.connections, spec.rate, spec.timeout_s)
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + spec.duration_s
    issued = 0
    last_answer = start
    timeout_us = int(spec.timeout_s * 1e6)

    async def client() -> None:
        nonlocal issued, last_answer
        conn = _Connection(host, port, ssl)
        try:
            while spec.max_requests is None or issued < spec.max_requests:
                n = issued
                if spec.rate:
                    due = start + n / spec.rate
                    if due >= deadline:
                        return
                    issued += 1
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                        lag.record_value(max(1, round((loop.time() - due) * 1e6)))
                else:
                    due = loop.time()
                    if due >= deadline:
                        return
                    issued += 1
                try:
                    status = await asyncio.wait_for(
                        conn.get(requests[n % len(requests)]), spec.timeout_s
                    )
                except asyncio.TimeoutError:
                    conn.close()
                    run.timeouts += 1
                    hist.record_value(timeout_us)
                    continue
                except _ConnectFailed:
                    run.connect_errors += 1
                    await asyncio.sleep(0.01)  # do not spin on a dead server
                    continue
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    conn.close()  # reset mid-response or not HTTP: a socket error
                    run.socket_errors += 1
                    continue
                now = loop.time()
                last_answer = max(last_answer, now)
                hist.record_value(max(1, round((now - due) * 1e6)))
                run.requests += 1
                if not 200 <= status <= 299:
                    run.non_2xx += 1
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(spec.connections)))
    run.duration_s = max(last_answer, min(loop.time(), deadline)) - start
    if hist.get_total_count():
        run.latency_s = {k: hist.get_value_at_percentile(q) / 1e6 for k, q in PERCENTILES.items()}
        run.latency_s["max"] = hist.get_max_value() / 1e6
        run.latency_s["mean"] = hist.get_mean_value() / 1e6
    if lag.get_total_count():
        run.send_lag_p99_s = lag.get_value_at_percentile(99.0) / 1e6
    return run


# --- hey ---------------------------------------------------------------------------------------
_HEY_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)% in (\d+\.\d+) secs", re.MULTILINE)
_HEY_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses", re.MULTILINE)
_HEY_ERROR = re.compile(r"^\s*\[(\d+)\]\s+(.*)$", re.MULTILINE)
_HEY_TOTAL = re.compile(r"Total:\s+(\d+\.\d+) secs")
_HEY_STAT = re.compile(r"(Slowest|Average):\s+(\d+\.\d+) secs")


def _run_hey(spec: LoadSpec) -> LoadRun:
    if spec.rate:
        raise UserError("hey has no open-loop mode; use --tool builtin with --rate")
    if len(spec.paths) > 1:
        raise UserError("hey loads one path; use --tool builtin to mix paths")
    # hey takes whole seconds: round the timeout up, and report the one it used.
    spec = dataclasses.replace(spec, timeout_s=float(max(1, math.ceil(spec.timeout_s))))
    command = ["hey", "-c", str(spec.connections), "-t", f"{spec.timeout_s:.0f}"]
    for name, value in spec.headers.items():
        command += ["-H", f"{name}: {value}"]
    if spec.max_requests:
        command += ["-n", str(max(spec.max_requests, spec.connections))]
    else:
        command += ["-z", f"{spec.duration_s:g}s"]
    command.append(spec.base_url + spec.paths[0])
    out = _run_child("hey", command, spec)
    if not _HEY_TOTAL.search(out):
        raise UserError(f"hey failed: no summary in its output ({out.strip()[-200:]!r})")
    return parse_hey(out, spec)


def parse_hey(text: str, spec: LoadSpec) -> LoadRun:
    """A LoadRun from hey's summary (its percentiles cover answered requests only)."""
    run = LoadRun("hey", "closed", spec.connections, None, spec.timeout_s)
    total = _HEY_TOTAL.search(text)
    run.duration_s = float(total.group(1)) if total else 0.0
    for code, count in _HEY_STATUS.findall(text):
        run.requests += int(count)
        if not 200 <= int(code) <= 299:
            run.non_2xx += int(count)
    errors = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    for count, message in _HEY_ERROR.findall(errors):
        if "Timeout" in message or "deadline exceeded" in message:
            run.timeouts += int(count)
        elif "connection refused" in message:
            run.connect_errors += int(count)
        else:
            run.socket_errors += int(count)
    points = {float(q): float(v) for q, v in _HEY_PERCENTILE.findall(text) if float(q) > 0}
    run.latency_s = {k: points[q] for k, q in PERCENTILES.items() if q in points}
    stats = dict(_HEY_STAT.findall(text))
    if run.requests and "Slowest" in stats:
        run.latency_s["max"] = float(stats["Slowest"])
        run.latency_s["mean"] = float(stats["Average"])
    return run


def _main() -> int:
    """Child-process entry: a LoadSpec as JSON on stdin, the LoadRun as JSON on stdout."""
    spec = LoadSpec(**json.loads(sys.stdin.read()))
    with contextlib.suppress(OSError):  # a measuring tool must not be late (root only)
        os.nice(-10)
    started, cpu_started = time.monotonic(), time.process_time()
    run = asyncio.run(_builtin(spec))
    wall = time.monotonic() - started
    run.cpu_share = (time.process_time() - cpu_started) / wall if wall > 0 else None
    if run.duration_s <= 0:
        run.duration_s = wall
    json.dump(run.to_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
