"""Benchmarks of the instrumentor (source checkout only; ``python -m benchmarks.run``).

``register`` is re-exported so the ``sqlalchemy-pool`` CLI finds the ``benchmarks``
sub-command through this package when run from a source checkout.
"""

from sqlalchemy_pool_tools.benchmarks_cli import register, run

__all__ = ["register", "run"]
