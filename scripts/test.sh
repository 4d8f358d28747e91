#!/usr/bin/env bash
# The test suite (what CI runs): set-up, lint, format and type checks, the Fashion-MNIST package,
# then pytest. Each check fails the script; their settings are in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check (lint): src tests bench scripts =="
.venv/bin/ruff check src tests bench scripts
echo "== ruff format --check: src tests bench scripts (fix with: .venv/bin/ruff format src tests bench scripts) =="
.venv/bin/ruff format --check src tests bench scripts
echo "== mypy (type check): the files listed in pyproject.toml [tool.mypy] =="
.venv/bin/mypy
bash scripts/fashion-mnist.sh
export FEDDISTILL_REQUIRE_FASHION=1
# A private teacher cache per test run, so tests never depend on an earlier run's files.
export FEDDISTILL_CACHE="${FEDDISTILL_CACHE:-$(mktemp -d)}"
# Two pytest workers (pytest-xdist). A file's tests share a worker (--dist loadfile): module
# fixtures start once; files in collection order (tests/conftest.py puts the e2e files first,
# the longest first by their e2e(seconds=N) mark), not xdist's most-tests-first. FEDDISTILL_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -q -n "${FEDDISTILL_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --durations=15 "$@"
