"""``python -m sqlalchemy_pool_tools.doctor ...`` runs the doctor without the ``sqlalchemy-pool``
entry point (same flags and exit codes)."""

import sys

from sqlalchemy_pool_tools.doctor.cli import main

sys.exit(main())
