"""Which DeepSpeed ZeRO stage a Lightning strategy runs (the one place that reads it).

Lightning is imported when a function is called, never at import time: a strategy object exists only where
Lightning is installed.
"""

from __future__ import annotations

from typing import Any


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy`` (or a subclass)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Any) -> int:
    """The ZeRO stage (0–3) of a ``DeepSpeedStrategy``; 0 for every other strategy."""
    if not is_deepspeed(strategy):
        return 0
    strategy._init_config_if_needed()
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))
