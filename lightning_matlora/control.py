"""Deprecated module name: the functions on a whole adapted model live in :mod:`lightning_matlora.adapted_model`."""

import warnings

from .adapted_model import *  # noqa: F401,F403
from .adapted_model import controller_of, run_paired_passes  # noqa: F401

warnings.warn("lightning_matlora.control was renamed lightning_matlora.adapted_model (set_rank, at_rank, merge, "
              "paired_loss, controller_of, ...): import from there, or from lightning_matlora.", DeprecationWarning,
              stacklevel=2)
