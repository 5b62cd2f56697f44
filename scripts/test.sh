#!/usr/bin/env bash
# The README's test command: install (CPU torch kept) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[dev,deepspeed]"
python -m pytest -q -ra "$@"
