"""The benchmark suite of opentelemetry-instrumentation-sqlalchemy-pool (project issue 6).

Run it with ``sqlalchemy-pool benchmarks`` or, from a source checkout, ``python -m
benchmarks.run``. Modules: :mod:`.harness` (OTel SDK providers, variants, timing, statistics),
:mod:`.micro` (checkout cycles and the wait-heavy run), :mod:`.e2e` / :mod:`.e2e_app` (FastAPI
on uvicorn under a calibrated load generator), :mod:`.realapp` (the OTel stack a user runs),
:mod:`.memory` (RSS / GC objects / tracemalloc), :mod:`.profile`
(cProfile of the hot path), :mod:`.report` (targets and markdown) and :mod:`.suite`.
"""
