"""Deprecated module name: the callback's per-rank validation lives in :mod:`lightning_matlora.rank_validation`."""

import warnings

from .rank_validation import *  # noqa: F401,F403
from .rank_validation import (LOSS, RANK_EVAL_MODES, RankCurveValidation, batch_rows, check_rank_eval,  # noqa: F401
                              find_rank_metrics, replicate_batch, silenced, step_loss)

warnings.warn("lightning_matlora.evaluation was renamed lightning_matlora.rank_validation: import from there.",
              DeprecationWarning, stacklevel=2)
