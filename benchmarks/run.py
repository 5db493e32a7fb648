"""``python -m benchmarks.run [--quick] [--json out.json] [--only sync,async,...]``.

A thin wrapper: the suite lives in the installed package (``sqlalchemy_pool_tools.bench``)
so ``sqlalchemy-pool benchmarks`` runs exactly the same code.
"""

from __future__ import annotations

import sys

from sqlalchemy_pool_tools.benchmarks_cli import main

if __name__ == "__main__":
    sys.exit(main())
