#!/usr/bin/env bash
# Set up a virtual environment (CPU-only torch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
