"""``python -m sqlalchemy_pool_tools`` is the same as the ``sqlalchemy-pool`` command."""

import sys

from sqlalchemy_pool_tools.cli import main

sys.exit(main())
