"""Tools that consume the telemetry of opentelemetry-instrumentation-sqlalchemy-pool:
the demo, the load test, the doctor, pg-activity and the ``sqlalchemy-pool`` CLI.

Installed with the ``[tools]`` extra; the instrumentor never imports this package.
"""
