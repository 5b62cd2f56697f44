"""Quiet the known-harmless messages of our dependencies — in the project's own entry points only.

``matlora`` (:mod:`lightning_matlora.cli`) and the recipe's command line (``recipes/instruct.py``) call
:func:`quiet_known_noise` first thing. Importing the library never does: a user's own program sees every message
its dependencies print. Each entry below is one exact message, matched by its start, that we checked to be
harmless on the machines these commands run on; nothing else is hidden, and no log level is changed.

- bitsandbytes (imported by peft): "Failed to load CPU gemm_4bit_forward from kernels-community …" — an optional
  faster CPU kernel that needs the ``kernels`` package and hub access; bitsandbytes falls back to its own kernel.
- DeepSpeed (imported by peft and Lightning): "Setting accelerator to CPU …" — on a machine with no GPU that is
  the right choice; on a GPU machine DeepSpeed does not print it.
- torch's ``LeafSpec`` deprecation, warned from inside Lightning's ``_pytree`` helper (Lightning's code, not ours
  or the user's; nothing changes in behaviour).
"""

from __future__ import annotations

import logging
import warnings

#: (logger name, start of the message) of each known-harmless log record
KNOWN_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("DeepSpeed", "Setting accelerator to CPU."),
)
#: (category, regular expression matched at the start of the message) of each known-harmless warning
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``start``; passes every other record."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_known_noise() -> None:
    """Hide the messages listed in :data:`KNOWN_LOG_MESSAGES` and :data:`KNOWN_WARNINGS` in this process.

    For command-line entry points only (call it before importing peft, bitsandbytes or DeepSpeed); idempotent.
    """
    for name, start in KNOWN_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
