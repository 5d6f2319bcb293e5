"""``python -m fastkd ...`` runs the ``fastkd`` command line (see :mod:`fastkd.cli`)."""

import sys

from fastkd.cli import main

sys.exit(main())
