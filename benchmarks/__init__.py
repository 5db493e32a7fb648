"""Benchmarks of the instrumentor, from a source checkout: ``python -m benchmarks.run``.

The suite itself lives in the installed package (``sqlalchemy_pool_tools.bench``, CLI
``sqlalchemy-pool benchmarks``); this folder only holds the thin ``run`` wrapper.
"""
