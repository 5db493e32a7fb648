"""A leaked connection finalized by the cyclic GC *inside* the OTel SDK's locked code.

The GC can run finalizers at any allocation, including while a metric reader holds the SDK's
non-reentrant aggregation locks. Our pool hooks run inside those finalizers; if they called the
SDK there, the process would deadlock. They queue the work instead and do it at the next safe
point (a checkout, the leak watchdog, uninstrument)."""

from __future__ import annotations

import gc
import threading

import sqlalchemy as sa
from sqlalchemy.orm import Session


class _Cycle:
    """Keeps a leaked Session in a reference cycle, so only the cyclic GC can free it."""

    def __init__(self, session: Session):
        self.session = session
        self.me = self


def _leak_in_cycle(engine) -> None:
    session = Session(engine)
    session.execute(sa.text("select 1"))
    _Cycle(session)


class _Spy:
    """Wraps a real SDK instrument; notes any call made while the cyclic GC is running."""

    def __init__(self, instrument, in_gc, violations):
        self._instrument, self._in_gc, self._violations = instrument, in_gc, violations

    def record(self, *args, **kwargs):
        if self._in_gc[0]:
            self._violations.append("record")
        self._instrument.record(*args, **kwargs)

    def add(self, *args, **kwargs):
        if self._in_gc[0]:
            self._violations.append("add")
        self._instrument.add(*args, **kwargs)


def test_gc_finalizers_never_call_the_sdk(otel, make_sync_engine):
    engine = make_sync_engine(pool_logging_name="gcdead")
    otel.instrument(engines=[engine], session_spans="all")
    telemetry = otel.instrumentor._state.telemetry
    in_gc, violations = [False], []

    def watch(phase, info):
        in_gc[0] = phase == "start"

    for name in ("use_time", "held_idle_time", "leaks", "closes"):
        setattr(telemetry, name, _Spy(getattr(telemetry, name), in_gc, violations))
    # A collection thread keeps the SDK busy meanwhile (the original deadlock: a GC inside
    # the reader's aggregation code finalized a leaked connection, whose hook called add()).
    stop = threading.Event()
    collector = threading.Thread(
        target=lambda: [otel.reader.get_metrics_data() for _ in iter(stop.is_set, True)],
        daemon=True,
    )
    gc.callbacks.append(watch)
    gc.disable()
    try:
        collector.start()
        for _ in range(50):
            _leak_in_cycle(engine)
            gc.collect()
    finally:
        gc.enable()
        gc.callbacks.remove(watch)
        stop.set()
        collector.join(timeout=10)
    assert not collector.is_alive()
    assert violations == []  # nothing touched the SDK from inside a collection
    assert otel.count("gcdead")[0] == 0  # "used" was exact immediately
    # The queued telemetry is done at the next safe point (here: a checkout).
    with engine.connect():
        pass
    leaks = otel.value(
        "sqlalchemy.pool.leaks",
        db__client__connection__pool__name="gcdead",
        sqlalchemy__pool__leak__kind="garbage_collected",
    )
    assert leaks == 50
    outcomes = [
        s.attributes["sqlalchemy.session.outcome"] for s in otel.spans("sqlalchemy.session")
    ]
    assert outcomes.count("garbage_collected") == 50
