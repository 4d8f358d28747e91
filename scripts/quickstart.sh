#!/usr/bin/env bash
# The main job: a simulated fleet on the embedded digits data, then a readable summary.
#   bash scripts/quickstart.sh [--record] [feddistill simulate options...]
# --record (maintainers): also write bench/results/quickstart/quickstart.json from this run and
# rewrite the README's quick-start table from it (python -m bench.readme --quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
record=0
if [[ "${1:-}" == "--record" ]]; then
  record=1
  shift
fi
bash scripts/setup.sh
start=$SECONDS
# --overwrite: the main job replaces its own earlier run (runs/quickstart) each time it is run
.venv/bin/feddistill simulate --config configs/digits.toml --out runs/quickstart --overwrite "$@"
.venv/bin/feddistill releases runs/quickstart
# ... then the privacy officer's view of the same run: membership inference on what left the
# devices, the local students and the released student, and a canary audit of the DP claim.
status=0
.venv/bin/feddistill audit runs/quickstart --policy configs/audit-policy.toml || status=$?
# ... and one self-contained HTML page of the whole run (it links the audit report)
.venv/bin/feddistill report runs/quickstart
if [[ "$record" == 1 ]]; then
  .venv/bin/python -m bench.readme --quickstart runs/quickstart --seconds "$((SECONDS - start))"
fi
exit "$status"
