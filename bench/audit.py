"""`python -m bench audit`: `feddistill audit` on digits runs (non-private, record-level eps 8 and
2, client-level GNMax eps 4): AUC, TPR at 1 % and 0.1 % FPR, empirical eps vs claimed eps per
target; and the audit's time on the digits quick start and on a Fashion-MNIST run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from bench.common import NO_BASELINES, header

AUDIT_RUNS = {
    "non-private": {},
    "record-eps8": {"privacy.record_level": True, "privacy.record_target_epsilon": 8.0},
    "record-eps2": {"privacy.record_level": True, "privacy.record_target_epsilon": 2.0},
    "client-gnmax-eps4": {
        "privacy.client_level": "gnmax",
        "privacy.bound": "votes",
        "privacy.target_epsilon": 4.0,
        "distill.query_size": 20,
    },
}


def _audited(out: Path, name: str, config: str, overrides: dict) -> tuple[dict, dict]:
    from feddistill.config import load_config
    from feddistill.privacy.audit.runner import run_audit
    from feddistill.simulations.run import simulate

    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(
        Path(config), {**NO_BASELINES, "audit.keep_artifacts": True, **overrides, "output_dir": str(run_dir)}
    )
    t0 = time.monotonic()
    results = simulate(cfg, baselines=False)
    run_seconds = time.monotonic() - t0
    logging.info("%s: run %.0f s, auditing", name, run_seconds)
    audit, code = run_audit(run_dir)
    return results, {
        "run_seconds": run_seconds,
        "audit_seconds": audit["timings_s"]["total"],
        "timings_s": audit["timings_s"],
        "exit_code": code,
        "audit": audit,
    }


def _audit_rows(audit: dict) -> dict:
    rows = {}
    for name, t in audit["targets"].items():
        if t.get("skipped"):
            rows[name] = {"skipped": t["reason"]}
            continue
        best = t["attacks"][t["best_auc_attack"]]["summary"]
        claim = t.get("claimed")
        rows[name] = {
            "best_attack": t["best_auc_attack"],
            "auc": best["auc"],
            "tpr_at_1pct_fpr": best["tpr_at_fpr"]["0.01"]["tpr"],
            "tpr_at_0.1pct_fpr": best["tpr_at_fpr"]["0.001"]["tpr"],
            "empirical_epsilon_lower_bound": t["epsilon_lower_bound"],
            "claimed_epsilon": None if not claim else claim["epsilon"],
            "claimed_unit": None if not claim else claim.get("unit"),
        }
    return rows


def audit(out: Path, overrides: dict) -> dict:
    runs = {}
    for name, extra in AUDIT_RUNS.items():
        results, timing = _audited(out, name, "configs/digits.toml", {**extra, **overrides})
        runs[name] = {
            "accuracy": results["final"]["student_accuracy"],
            "run_seconds": timing["run_seconds"],
            "audit_seconds": timing["audit_seconds"],
            "verdict_exit_code": timing["exit_code"],
            "dp_violations": len(timing["audit"]["dp_violations"]),
            "canary_audit": {
                k: {"epsilon_lower_bound": v["epsilon_lower_bound"], "claimed": v["claimed"]}
                for k, v in ((timing["audit"].get("canary_audit") or {}).get("results") or {}).items()
            },
            "targets": _audit_rows(timing["audit"]),
        }
    # The audit's cost on a Fashion-MNIST run of the core fleet (3 rounds keep it short; the
    # audit's work grows with the clients audited and reference models, not with rounds).
    _, fashion = _audited(
        out, "fashion-3rounds", "configs/fashion.toml", {"rounds": 3, "audit.canaries": 100, **overrides}
    )
    summary = {
        **header("audit", overrides),
        "options": "defaults of `feddistill audit` (4 reference models, 2 target clients)",
        "digits": runs,
        "audit_seconds": {
            "digits quick start (non-private)": runs["non-private"]["audit_seconds"],
            "fashion-mnist (100 clients, 3 rounds)": fashion["audit_seconds"],
        },
        "fashion_timings_s": fashion["timings_s"],
        "fashion_targets": _audit_rows(fashion["audit"]),
    }
    (out / "audit.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
