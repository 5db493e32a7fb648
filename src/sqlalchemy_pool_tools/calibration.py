"""Calibration of the load generators against servers with a known latency mix.

A :class:`KnownLatencyServer` (asyncio, loopback, its own thread) answers request *k* after
a delay chosen by a :class:`Mix` and records the true latency of every request it answered,
measured on the server. :func:`calibrate` puts a generator's load on it and compares:

* p50 / p95 / p99 within ``TOLERANCE`` (``abs_s + rel x truth``) of the server's own;
* every answered request counted: client ``requests`` == server answers;
* every request the client gave up on counted as a timeout: ``requests + timeouts`` ==
  requests the server received.

The mixes are the issue's bimodal case scaled down (98 % fast / 2 % slow, where wrk was off
by 100x), a uniform and a heavy-tailed one. ``sqlalchemy-pool loadtest --calibrate`` runs it
on your machine; the test suite runs it for every generator.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy_pool_tools.loadgen import GENERATORS, LoadRun, LoadSpec, generate


@dataclass(frozen=True)
class Tolerance:
    """A measured pXX passes when it lies in the server's true p(XX - ranks) .. p(XX + ranks)
    range widened by ``abs_s + rel x truth``: the client adds loopback and parsing time
    (sub-millisecond) plus scheduling noise on a busy box, and percentile definitions differ
    by a rank (nearest rank, HDR's rounding, hey's), which matters in a sparse tail. In open
    loop the generator's own measured send lag (p99, reported with every result) is added:
    a request sent late on a starved host is charged from its due time."""

    abs_s: float = 0.005
    rel: float = 0.10
    ranks: float = 0.2  # percentage points

    def ok(self, measured: float, low: float, high: float, lag_s: float = 0.0) -> bool:
        slack = self.abs_s + self.rel * high + lag_s
        return low - self.abs_s - self.rel * low <= measured <= high + slack


TOLERANCE = Tolerance()
CHECKED = ("p50", "p95", "p99")


@dataclass(frozen=True)
class Mix:
    """A latency per request number ``k`` (deterministic, so runs are comparable)."""

    name: str
    describe: str
    latency: Callable[[int], float]


def _bimodal(k: int) -> float:
    return 0.400 if k % 50 == 25 else 0.020  # exactly 2 % slow


_UNIFORM = random.Random(17)
_UNIFORM_VALUES = [_UNIFORM.uniform(0.005, 0.045) for _ in range(4096)]
_PARETO = random.Random(42)
_PARETO_VALUES = [min(0.5, 0.008 * _PARETO.paretovariate(1.5)) for _ in range(4096)]

MIXES = {
    "bimodal": Mix("bimodal", "98% 20 ms, 2% 400 ms", _bimodal),
    "uniform": Mix("uniform", "uniform 5-45 ms", lambda k: _UNIFORM_VALUES[k % 4096]),
    "heavy_tail": Mix(
        "heavy_tail", "Pareto(1.5) from 8 ms, capped at 500 ms", lambda k: _PARETO_VALUES[k % 4096]
    ),
}


class KnownLatencyServer:
    """A loopback HTTP/1.1 keep-alive server answering request ``k`` after ``latency(k)``."""

    def __init__(self, latency: Callable[[int], float]) -> None:
        self.latency = latency
        self.received = 0
        self.answered: list[float] = []  # true latency of each answered request, seconds
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="known-latency", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                arrived = time.perf_counter()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                k = self.received
                self.received += 1
                await asyncio.sleep(self.latency(k))
                if reader.at_eof() or writer.is_closing():
                    return  # the client gave up (timeout): not an answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                self.answered.append(time.perf_counter() - arrived)
        except (ConnectionError, OSError, asyncio.CancelledError):
            return  # client gone, or the server is stopping
        finally:
            writer.close()

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
            self.port = server.sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            async with server:
                await self._stop.wait()

        asyncio.run(main())

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextmanager
def known_latency_server(mix: Mix) -> Iterator[KnownLatencyServer]:
    server = KnownLatencyServer(mix.latency)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def true_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of exact values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Calibration:
    """One generator x mix x mode run and its verdict."""

    generator: str
    mode: str
    mix: str
    run: LoadRun
    received: int
    answered: int
    truth_s: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def calibrate(
    generator: str,
    mix: Mix,
    *,
    rate: float | None = None,
    duration_s: float = 2.0,
    connections: int = 16,
    timeout_s: float = 5.0,
    tolerance: Tolerance = TOLERANCE,
) -> Calibration:
    """Load a known-latency server with ``generator`` and check its figures against the
    server's truth (``rate`` set: open loop)."""
    spec = LoadSpec(
        "", ["/"], duration_s, connections, rate=rate, timeout_s=timeout_s, generator=generator
    )
    with known_latency_server(mix) as server:
        spec.base_url = server.url
        run = generate(spec)
        time.sleep(0.05)  # the server's last bookkeeping after its final write
    result = Calibration(
        generator, spec.mode, mix.name, run, received=server.received, answered=len(server.answered)
    )
    if run.requests != result.answered:
        result.problems.append(f"counted {run.requests} answers, the server sent {result.answered}")
    if run.requests + run.timeouts + run.socket_errors != server.received:
        result.problems.append(
            f"{server.received} requests reached the server, the client accounts for "
            f"{run.requests + run.timeouts + run.socket_errors}"
        )
    if server.answered:
        for key in CHECKED:
            q = float(key[1:])
            truth = true_percentile(server.answered, q)
            low = true_percentile(server.answered, q - tolerance.ranks)
            high = true_percentile(server.answered, min(100.0, q + tolerance.ranks))
            result.truth_s[key] = truth
            measured = run.latency_s.get(key)
            if run.timeouts:
                continue  # timed-out requests are in the client's figures only
            if measured is None:
                result.problems.append(f"{key} missing")
            elif not tolerance.ok(measured, low, high, run.send_lag_p99_s or 0.0):
                result.problems.append(
                    f"{key} {measured * 1000:.1f} ms, true {truth * 1000:.1f} ms"
                )
    else:
        result.problems.append("the server answered nothing")
    return result


def calibrate_all(duration_s: float = 2.0) -> list[Calibration]:
    """Every available generator and mode on every mix (the ``--calibrate`` table)."""
    import shutil

    out = []
    for mix in MIXES.values():
        for generator in GENERATORS:
            if generator == "hey" and not shutil.which("hey"):
                continue
            out.append(calibrate(generator, mix, duration_s=duration_s))
        out.append(calibrate("builtin", mix, rate=200.0, duration_s=duration_s))
    return out


def format_calibrations(results: list[Calibration]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [
        f"{'generator':<9} {'mode':<6} {'mix':<10} {'requests':>8}  "
        + "  ".join(f"{k + ' (true)':>16}" for k in CHECKED)
        + "  verdict"
    ]
    for c in results:
        cells = "  ".join(
            f"{ms(c.run.latency_s.get(k)) + ' (' + ms(c.truth_s.get(k)) + ')':>16}" for k in CHECKED
        )
        verdict = "ok" if c.ok else "FAIL: " + "; ".join(c.problems)
        lines.append(
            f"{c.generator:<9} {c.mode:<6} {c.mix:<10} {c.run.requests:>8}  {cells}  {verdict}"
        )
    lines.append(
        f"(ms; pass = within {TOLERANCE.abs_s * 1000:g} ms + {TOLERANCE.rel:.0%} of the server's "
        f"true percentile, +-{TOLERANCE.ranks:g} percentile points (+ the generator's send lag "
        "in open loop), every answer counted, every timeout an error)"
    )
    return "\n".join(lines)
