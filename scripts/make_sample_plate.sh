#!/usr/bin/env bash
# Regenerate the bundled sample plate (sample_images/) bit for bit from the synthetic generator.
# Usage: bash scripts/make_sample_plate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/islet-imaging synth --sample-plate sample_images --overwrite "$@"
