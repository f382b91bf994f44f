#!/usr/bin/env bash
# Create .venv with islet-imaging installed (editable) and torch==2.13.0 (CPU).
# Usage: bash scripts/setup.sh [EXTRA]   e.g. `test` or `napari`
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
# torch is pinned to 2.13.0 in pyproject.toml; pip's configured find-links supplies the CPU wheel.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
