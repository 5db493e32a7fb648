"""Every load generator the tool can use, against servers that know their true latencies.

A generator passes when its p50/p95/p99 match the server's own per-request latencies within
the stated tolerance (calibration.TOLERANCE), it counts every answered request, and every
request it gave up on is a timeout error. wrk failed exactly this (see docs/demo.md).
"""

from __future__ import annotations

import pytest

from sqlalchemy_pool_tools.calibration import MIXES, Mix, calibrate, known_latency_server
from sqlalchemy_pool_tools.loadgen import LoadSpec, generate

DURATION_S = 2.0

CASES = [
    pytest.param(generator, rate, mix, id=f"{generator}-{'open' if rate else 'closed'}-{mix}")
    for mix in MIXES
    for generator, rate in (("builtin", None), ("builtin", 200.0), ("hey", None))
]


@pytest.mark.parametrize(("generator", "rate", "mix"), CASES)
def test_generator_matches_the_true_latencies(generator: str, rate: float | None, mix: str) -> None:
    result = calibrate(generator, MIXES[mix], rate=rate, duration_s=DURATION_S)
    assert result.ok, (result.problems, result.run, result.truth_s)
    assert result.run.mode == ("open" if rate else "closed")
    assert result.run.requests > 100


@pytest.mark.parametrize("generator", ["builtin", "hey"])
def test_a_request_that_times_out_is_an_error_never_dropped(generator: str) -> None:
    # 2% of the requests take 1.5 s; the client gives up after 0.5 s.
    mix = Mix("timeouts", "98% 10 ms, 2% 1.5 s", lambda k: 1.5 if k % 50 == 25 else 0.010)
    result = calibrate(generator, mix, duration_s=DURATION_S, timeout_s=0.5)
    run = result.run
    slow_received = sum(1 for k in range(result.received) if k % 50 == 25)
    assert run.timeouts == slow_received > 0, result.problems
    assert run.requests == result.answered == result.received - slow_received
    assert run.errors == run.timeouts
    if generator == "builtin":
        # Timed-out requests enter the distribution at the timeout (a lower bound).
        assert run.latency_s["p99"] >= 0.5 * 0.999


def test_open_loop_charges_a_stall_to_every_request_it_delayed() -> None:
    """Coordinated omission: one connection, request 20 stalls the server for 1 s. Closed loop
    sees one slow request; open loop at 50 req/s sees the ~50 requests that were due during
    the stall wait for it, as users arriving at that rate would."""
    stall = Mix("stall", "request 20 takes 1 s, the rest 2 ms", lambda k: 1.0 if k == 20 else 0.002)
    with known_latency_server(stall) as server:
        open_loop = generate(LoadSpec(server.url, ["/"], 2.0, connections=1, rate=50.0))
    with known_latency_server(stall) as server:
        closed_loop = generate(LoadSpec(server.url, ["/"], 2.0, connections=1))
    assert open_loop.requests == 100
    assert open_loop.latency_s["p50"] > 0.05  # half the requests were due during the stall
    assert open_loop.latency_s["p90"] > 0.5
    assert closed_loop.latency_s["p90"] < 0.05  # closed loop: the stall is one request
    assert closed_loop.latency_s["max"] >= 1.0
