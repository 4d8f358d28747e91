#!/usr/bin/env bash
# The test suite (what CI runs): set-up, the Fashion-MNIST package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/fashion-mnist.sh
export FEDDISTILL_REQUIRE_FASHION=1
# A private teacher cache per test run, so tests never depend on an earlier run's files.
export FEDDISTILL_CACHE="${FEDDISTILL_CACHE:-$(mktemp -d)}"
exec .venv/bin/python -m pytest -q "$@"
