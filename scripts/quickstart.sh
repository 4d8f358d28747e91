#!/usr/bin/env bash
# The main job: a simulated fleet on the embedded digits data, then a readable summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/feddistill simulate --config configs/digits.toml --out runs/quickstart "$@"
