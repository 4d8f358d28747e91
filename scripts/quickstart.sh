#!/usr/bin/env bash
# The main job: a simulated fleet on the embedded digits data, then a readable summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --overwrite: the main job replaces its own earlier run (runs/quickstart) each time it is run
.venv/bin/feddistill simulate --config configs/digits.toml --out runs/quickstart --overwrite "$@"
.venv/bin/feddistill releases runs/quickstart
# ... then the privacy officer's view of the same run: membership inference on what left the
# devices, the local students and the released student, and a canary audit of the DP claim.
status=0
.venv/bin/feddistill audit runs/quickstart --policy configs/audit-policy.toml || status=$?
# ... and one self-contained HTML page of the whole run (it links the audit report)
.venv/bin/feddistill report runs/quickstart
exit "$status"
