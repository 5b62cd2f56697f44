"""``python -m lightning_matlora``: the ``matlora`` command line (see :mod:`lightning_matlora.cli`)."""

import sys

from .cli import main

sys.exit(main())
