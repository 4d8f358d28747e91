#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with feddistill installed.
# torch==2.13.0 goes in FIRST: it is the CPU build on local disk, while any other
# torch spec (or letting a dependency resolve torch) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.feddistill-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "== setting up .venv (first run takes a few minutes) =="
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# .[test] is the full install (.[full]: simulation engine, digits, FixMatch, plots) plus the test tools;
# `pip install .` alone is the lean device profile (README "Run on real devices")
.venv/bin/python -c "import torch, flwr, opacus, dp_accounting; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "set-up failed: torch 2.13.0, flwr, opacus and dp-accounting must import" >&2; exit 1; }
.venv/bin/python -c "from feddistill.profiles import missing; import sys; sys.exit(', '.join(missing('simulation') + missing('plots') + missing('test')) or None)" \
  || { echo "set-up failed: the full install's packages above are missing (pip install -e '.[test]')" >&2; exit 1; }
echo "$want" > "$stamp"
