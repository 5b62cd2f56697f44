"""The package's version (recorded in every adapter file it writes)."""

__version__ = "0.1.0"
